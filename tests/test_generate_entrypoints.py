"""`videocache generate --profile` and `scripts/generate.py` under a real `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from videocache.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left on a black background"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_generate_with_profile_reports_cache_fields(tiny_model_dir, tmp_path):
    summary = tmp_path / "s.json"
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--profile", "reference-wan",
            "--preset", "fast", "--steps", "25", "--out", str(tmp_path / "v.mp4"), "--summary", str(summary),
            "--no-progress"]
    assert main(args) == 0
    data = json.loads(summary.read_text())
    assert data["profile"] == "reference-wan" and data["preset"] == "fast"
    assert 0 < data["computed_fraction"] <= 0.5 and data["cache_peak_bytes"] > 0
    assert (tmp_path / "v.mp4").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, message",
    [(["--profile", "reference-wan", "--preset", "turbo"], "turbo"),
     (["--profile", "reference-wan", "--steps", "4"], "10-100 steps"),
     (["--profile", "no-such-profile"], "no-such-profile")],
)
def test_generate_bad_cache_arguments_are_one_line_errors(tiny_model_dir, tmp_path, capsys, extra, message):
    args = ["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--out", str(tmp_path / "v.mp4"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videocache: error:") and "\n" not in err and message in err


def _accelerate(num_processes: int, *args: str) -> subprocess.CompletedProcess:
    launch = ["--num_processes", "1"] if num_processes == 1 else [
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "29517",
           str(ROOT / "scripts" / "generate.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


def test_accelerate_launch_single_prompt(tiny_model_dir, tmp_path):
    out, summary = tmp_path / "v.mp4", tmp_path / "v.json"
    proc = _accelerate(1, "--model", str(tiny_model_dir), "--prompt", PROMPT, "--profile", "reference-wan",
                       "--out", str(out), "--summary", str(summary), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(summary.read_text())
    assert data["computed_fraction"] < 1.0 and out.stat().st_size > 0


def test_accelerate_launch_data_parallel_over_prompts(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\n" + PROMPT + "\na blue square moving up on a gray background\n"
                       "a white triangle moving right on a green background\n")
    proc = _accelerate(2, "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out-dir", str(tmp_path / "v"),
                       "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = sorted((tmp_path / "v").glob("*.json"))
    assert [s.stem for s in summaries] == ["0000", "0001", "0002"]
    assert "with 2 process(es)" in proc.stdout
    # same prompt + seed gives the same video whichever rank made it
    again = _accelerate(1, "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out-dir", str(tmp_path / "w"),
                        "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    from videocache.video_io import read_video

    for name in ("0000.mp4", "0002.mp4"):
        assert (read_video(tmp_path / "v" / name) == read_video(tmp_path / "w" / name)).all()


def test_accelerate_launch_missing_prompt_file(tiny_model_dir, tmp_path):
    proc = _accelerate(1, "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "nope.txt"))
    assert proc.returncode != 0 and "generate.py: error: prompts file" in proc.stderr
    # accelerate's launcher re-raises the child's exit status with its own traceback; ours prints none
    assert 'generate.py", line' not in proc.stderr
