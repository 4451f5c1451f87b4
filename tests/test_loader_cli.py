import json
import subprocess
import sys

import pytest

from videocache.cli import main
from videocache.pipelines.loader import ModelLoadError, resolve_model

from tests.conftest import requires_reference


@pytest.mark.parametrize("model", ["no-such-model", "./missing/folder", "/definitely/not/here"])
def test_unknown_or_missing_model_is_a_one_line_error(model, capsys):
    assert main(["generate", "--prompt", "x", "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videocache: error:") and "\n" not in err and model in err


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_hub_ids_are_passed_through():
    assert resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@requires_reference
def test_generate_writes_video_and_summary(tmp_path):
    out, summary = tmp_path / "v.mp4", tmp_path / "v.json"
    cmd = [sys.executable, "-m", "videocache.cli", "generate", "--prompt",
           "a yellow square moving down on a blue background", "--steps", "6", "--out", str(out),
           "--summary", str(summary), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", **__import__("os").environ})
    data = json.loads(summary.read_text())
    for key in ("model", "prompt", "seed", "steps", "frames", "height", "width", "wall_s", "transformer_s", "peak_mem_bytes"):
        assert key in data
    assert (data["frames"], data["height"], data["width"], data["steps"]) == (17, 64, 64, 6)
    assert data["model"] == "reference-wan" and data["peak_mem_bytes"] > 0
    assert 0 < data["transformer_s"] < data["wall_s"]
    from videocache.video_io import read_video

    video = read_video(out)
    assert video.shape == (17, 64, 64, 3)


@requires_reference
def test_bad_step_count_is_a_one_line_error(capsys):
    assert main(["generate", "--prompt", "a red circle moving left on a black background", "--steps", "0"]) == 2
    assert "--steps must be positive" in capsys.readouterr().err


def test_an_unknown_device_is_a_one_line_error(tmp_path, capsys):
    rc = main(["generate", "--device", "foo", "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--device 'foo' is not a device" in err
