"""Shared fixtures: the shipped reference pipeline and tiny random pipelines of the real classes."""

from __future__ import annotations

import pytest

from videocache.pipelines.loader import REFERENCE_DIR

requires_reference = pytest.mark.skipif(
    not (REFERENCE_DIR / "model_index.json").is_file(),
    reason="shipped reference weights not present (run scripts/train_reference.py)",
)


@pytest.fixture(scope="session")
def reference_pipe():
    if not (REFERENCE_DIR / "model_index.json").is_file():
        pytest.skip("shipped reference weights not present (run scripts/train_reference.py)")
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(REFERENCE_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_pipe():
    from videocache.pipelines.reference import build

    pipe = build.build_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_random_pipe():
    """Random-init tiny Wan pipeline built from the reference architecture (no weights needed), fresh per test."""
    return _random_pipe()


@pytest.fixture(scope="module")
def pipe():
    """The same tiny random pipeline, shared by the tests of one module (engine, profile, block-run tests)."""
    return _random_pipe()


@pytest.fixture
def clean(pipe):
    """Every test leaves the shared pipeline without videocache hooks, even when it fails."""
    import videocache

    yield pipe
    videocache.remove(pipe)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init reference pipeline saved as a diffusers folder, with small generation defaults."""
    import json

    from videocache.pipelines.reference import build

    folder = tmp_path_factory.mktemp("tiny-wan")
    build.build_pipeline(seed=0).save_pretrained(folder)
    defaults = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 10, "guidance_scale": 5.0, "fps": 8}
    (folder / "videocache.json").write_text(json.dumps({"generation_defaults": defaults}))
    return folder


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is 40x faster than two fighting over shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _two_forecast_gains(monkeypatch):
    """Full calibrations in tests try two forecast gains, not the shipped four: every path of the gain search
    still runs, at half its measured trials (the CI's time)."""
    from videocache.eval_vbench.calibration import runs

    monkeypatch.setattr(runs, "FORECAST_GAINS", (1.0, 0.4))
