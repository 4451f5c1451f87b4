"""`videocache eval` end to end on the reference pipeline: VBench videos, scores, resumption, one-line errors.

CI has no VBench environment, so these runs use a stand-in `vbench` package (same entry points as vbench 0.1.5:
`VBench(...).evaluate`, `vbench.utils.init_submodules` / `CACHE_DIR`) in a fake environment whose python is this
one; it scores temporal flickering as VBench does and, like VBench, starts a wget for every other dimension's
checkpoint. `test_real_vbench_*` runs the real package when its environment exists.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import yaml

from videocache.cli import main
from videocache.eval_vbench.comparison.run_store import read_json
from videocache.eval_vbench.scoring import vbench_env
from videocache.profile import PROFILES_DIR

from .conftest import requires_reference

SMALL = ["--steps", "10", "--frames", "5", "--height", "32", "--width", "32", "--no-progress"]
PROMPTS = "a red circle moving left on a black background\na white square moving up on a gray background\n"

FAKE_INIT = '''
import json, os
import numpy as np


class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.output_path = output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, mode="vbench_standard", **kw):
        import imageio.v2 as imageio
        results = {}
        for dim in dimension_list:
            per = []
            for f in sorted(os.listdir(videos_path)):
                if f.endswith(".mp4"):
                    v = np.stack(imageio.mimread(os.path.join(videos_path, f))).astype(np.float32)
                    per.append({"video_path": os.path.join(videos_path, f),
                                "video_results": float((255.0 - np.abs(np.diff(v, axis=0)).mean()) / 255.0)})
            results[dim] = [float(np.mean([p["video_results"] for p in per])), per]
        with open(os.path.join(self.output_path, name + "_eval_results.json"), "w") as f:
            json.dump(results, f)
'''
FAKE_UTILS = '''
import os, subprocess
CACHE_DIR = os.environ.get("VBENCH_CACHE_DIR", "/nonexistent/vbench-cache")


def init_submodules(dimension_list, local=False, read_frame=False):
    out = {}
    for dim in dimension_list:
        if dim == "motion_smoothness":
            subprocess.run(["wget", "-P", f"{CACHE_DIR}/amt_model", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth"], check=True)
        out[dim] = []
    return out
'''


@pytest.fixture
def fake_vbench_venv(tmp_path):
    venv = tmp_path / "vbench-venv"
    site = venv / "site"
    (site / "vbench").mkdir(parents=True)
    (site / "vbench" / "__init__.py").write_text(FAKE_INIT)
    (site / "vbench" / "utils.py").write_text(FAKE_UTILS)
    (site / "vbench" / "VBench_full_info.json").write_text("[]")
    dist = site / "vbench-0.1.5.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vbench\nVersion: 0.1.5\n")
    python = venv / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return venv


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.json")}


@requires_reference
def test_eval_end_to_end_resumes_and_reports_missing_weights(tmp_path, fake_vbench_venv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as in the README
    profile = tmp_path / "p.yaml"
    data = yaml.safe_load((PROFILES_DIR / "reference-wan.yaml").read_text())
    profile.write_text(yaml.safe_dump(data))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "ev"
    argv = ["eval", "--profile", str(profile), "--presets", "none,fast", "--suite", str(prompts), "--samples", "2",
            "--dimensions", "temporal_flickering,motion_smoothness", "--out", "ev",
            "--vbench-venv", str(fake_vbench_venv), *SMALL]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "missing checkpoint amt-s.pth" in printed
    for name in ("report.json", "report.md", "radar.png", "quality_speedup.png"):
        assert (out / name).is_file(), name
    report = read_json(out / "report.json")
    entries = {e["label"]: e for e in report["methods"]}
    assert list(entries) == ["none (uncached)", "fast"]
    for e in entries.values():
        assert e["videos"] == 4 and e["seeds"] == [0, 1]
        names = sorted(os.listdir(tmp_path / e["videos_dir"]))
        assert names == [f"{p}-{i}.mp4" for p in sorted(PROMPTS.split("\n")[:2]) for i in range(2)]
        vb = e["vbench"]
        assert 0.0 < vb["scores"]["temporal_flickering"] <= 1.0
        error = vb["errors"]["motion_smoothness"]  # one line naming the checkpoint and how to fetch it
        assert "\n" not in error and "amt-s.pth" in error and "wget" in error
        assert vb["total_score"] is None and vb["quality_partial_dimensions"] == ["temporal_flickering"]
        acc = e["prompt_accuracy"]
        assert acc["videos"] == 4 and set(acc) >= {"colour", "shape", "direction", "mean"}
    assert entries["none (uncached)"]["psnr"] == float("inf")
    assert entries["fast"]["computed_fraction"] < 1.0 and entries["fast"]["transformer_speedup"] > 0
    md = (out / "report.md").read_text()
    assert "| `fast` (`videocache:" in md and "motion_smoothness: missing checkpoint amt-s.pth" in md

    # rerun: nothing is generated or scored again
    runs = out / "generation" / "runs"
    before = _mtimes(runs) | _mtimes(out / "vbench")
    assert main(argv) == 0
    assert "generated 0 videos (8 already done)" in capsys.readouterr().out
    assert _mtimes(runs) | _mtimes(out / "vbench") == before

    # an interrupted run (a record never written): only that video is made again
    lost = sorted(runs.glob("videocache*/*.json"))[0]
    lost.unlink()
    assert main(argv) == 0
    after = _mtimes(runs)
    assert lost in after and all(after[p] == t for p, t in before.items() if p.parent.parent == runs.parent / "runs" and p != lost)

    # a changed profile reruns its preset, not the uncached videos
    data["presets"]["fast"]["final_steps"] = 2
    profile.write_text(yaml.safe_dump(data))
    none_before = _mtimes(runs / next(p.name for p in runs.iterdir() if p.name.startswith("none")))
    fast_before = _mtimes(runs / lost.parent.name)
    assert main(argv) == 0
    assert _mtimes(runs / next(p.name for p in runs.iterdir() if p.name.startswith("none"))) == none_before
    assert all(t != fast_before[p] for p, t in _mtimes(runs / lost.parent.name).items())


@requires_reference
def test_eval_data_parallel_under_accelerate_launch(tmp_path):
    """Two launched processes share the (prompt, sample) items; process 0 writes one report over all of them."""
    import subprocess

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS + "a green triangle moving down on a black background\n")
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "-m", "videocache.cli", "eval", "--profile", "reference-wan", "--presets", "none,fast", "--suite",
           str(prompts), "--samples", "1", "--no-vbench", "--out", str(out), *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # process 0 alone reports
    report = read_json(out / "report.json")
    assert [e["videos"] for e in report["methods"]] == [3, 3]
    assert len(list((out / "generation" / "runs").rglob("*.json"))) == 6
    assert [e["items"] for e in read_json(out / "generation" / "report.json")["methods"]] == [3, 3]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--suite", "temporal_flickering", "--no-vbench"], "read from the vbench package: drop --no-vbench"),
        (["--presets", "none,fast"], "--presets fast needs --profile"),
        (["--profile", "reference-wan", "--presets", "turbo"], "turbo"),
        (["--suite", "standard", "--no-create-venv"], "no VBench environment at"),
        (["--profile", "reference-wan", "--presets", "fast", "--steps", "6"], "covers 10-100 steps; got 6"),
    ],
)
def test_bad_eval_input_is_one_line(tmp_path, capsys, extra, fragment, monkeypatch):
    monkeypatch.setenv(vbench_env.VENV_ENV, str(tmp_path / "absent-venv"))
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    argv = ["eval", "--out", str(tmp_path / "o"), "--suite", str(prompts), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("videocache: error: ") and fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_runner_turns_downloads_into_one_line_errors(tmp_path):
    """The runner's guard, without vbench: every wget / urlretrieve VBench would start becomes an error."""
    import subprocess
    import urllib.request

    from videocache.eval_vbench.scoring import vbench_runner

    real_run, real_retrieve = subprocess.run, urllib.request.urlretrieve
    try:
        vbench_runner._refuse_downloads()
        with pytest.raises(vbench_runner.MissingCheckpoint) as info:
            subprocess.run(["wget", "https://x.org/a/grit_b_densecap_objectdet.pth", "-P", "/c/grit_model"], check=True)
        assert str(info.value) == (
            "missing checkpoint grit_b_densecap_objectdet.pth into /c/grit_model; fetch it with: "
            "wget https://x.org/a/grit_b_densecap_objectdet.pth -P /c/grit_model"
        )
        with pytest.raises(vbench_runner.MissingCheckpoint, match="fetch it with: wget https://x.org/h.pth -O /c/h.pth"):
            urllib.request.urlretrieve("https://x.org/h.pth", "/c/h.pth")
        assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).returncode == 0
    finally:
        subprocess.run, urllib.request.urlretrieve = real_run, real_retrieve


def test_venv_location_and_install_steps(tmp_path, monkeypatch):
    monkeypatch.setenv(vbench_env.VENV_ENV, str(tmp_path / "v"))
    assert vbench_env.venv_dir() == tmp_path / "v"
    assert vbench_env.venv_dir("/x") == vbench_env.Path("/x")
    steps = vbench_env.install_steps(tmp_path / "v", "torch==2.13.0")
    assert steps[1][-1] == "torch==2.13.0"  # torch first, pinned
    assert steps[2][-2:] == ["torch==2.13.0", vbench_env.VBENCH_REQUIREMENT]  # and kept pinned with vbench
    with pytest.raises(vbench_env.VBenchUnavailable, match="create it with: python -m videocache.eval_vbench.scoring.vbench_env create"):
        vbench_env.package(tmp_path / "v")


REAL_VENV = vbench_env.venv_dir()


@pytest.mark.skipif(not vbench_env.venv_python(REAL_VENV).is_file(), reason=f"no VBench environment at {REAL_VENV} "
                    "(python -m videocache.eval_vbench.scoring.vbench_env create)")
def test_real_vbench_temporal_flickering_and_missing_weights(tmp_path):
    from videocache.video_io import write_video

    videos = tmp_path / "videos"
    write_video(videos / "a still gray frame-0.mp4", np.full((9, 32, 32, 3), 90, np.uint8), fps=8)
    noise = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    write_video(videos / "noise-0.mp4", noise, fps=8)
    pkg = vbench_env.package(REAL_VENV)
    assert pkg.full_info.is_file() and len(json.loads(pkg.full_info.read_text())) == 946
    result = vbench_env.evaluate(pkg, videos, ["temporal_flickering", "motion_smoothness"], "custom_input", tmp_path / "w")
    per = {os.path.basename(r["video_path"]): r["video_results"] for r in result["per_video"]["temporal_flickering"]}
    assert per["a still gray frame-0.mp4"] == pytest.approx(1.0) and per["noise-0.mp4"] < 0.8
    amt = os.path.join(result.get("cache_dir", os.path.expanduser("~/.cache/vbench")), "amt_model", "amt-s.pth")
    if not os.path.isfile(amt):
        assert "amt-s.pth" in result["errors"]["motion_smoothness"] and "\n" not in result["errors"]["motion_smoothness"]
    else:  # with its weights present, motion smoothness is scored rather than reported as an error
        assert "motion_smoothness" not in result["errors"] and "motion_smoothness" in result["scores"], result["errors"]
