"""Quality gates on the shipped reference weights (issue: the embedded reference pipeline; issue 12 adds
reference-hunyuan and the per-frame colour gate).

The prompts are the 20 held-out captions that were never in the training set.
"""

import numpy as np
import pytest

from videocache.pipelines.loader import KNOWN_MODELS, load_pipeline
from videocache.pipelines.reference.data import split_captions
from videocache.pipelines.reference.evaluate import GATES, prompt_adherence, vae_psnr

pytestmark = pytest.mark.slow
REFERENCE_MODELS = [m for m in KNOWN_MODELS if m.startswith("reference-")]
# reference-wan was trained before the per-frame gate existed: 70 % of its held-out videos show the prompted
# colour in every frame (benchmarks/reference_quality.md; its early frames turn red shapes yellow). Retraining
# it is outside issue 12, so the gate is recorded as a known failure, strictly: it must fail until retrained.
PER_FRAME_KNOWN_FAILURES = {"reference-wan"}


@pytest.fixture(scope="module", params=REFERENCE_MODELS)
def adherence(request):
    model = request.param
    if not (KNOWN_MODELS[model] / "model_index.json").is_file():
        pytest.skip(f"shipped {model} weights not present")
    pipe = load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    _, held_out = split_captions()
    return model, pipe, prompt_adherence(pipe, held_out, steps=25, guidance_scale=5.0)


def test_held_out_prompts_show_prompted_colour_and_motion(adherence):
    _, _, report = adherence
    assert report.colour_rate >= GATES["colour_rate"], report
    assert report.direction_rate >= GATES["direction_rate"], report


def test_every_frame_shows_the_prompted_colour(adherence, request):
    model, _, report = adherence
    if model in PER_FRAME_KNOWN_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{model} predates the per-frame gate"))
    assert report.every_frame_colour_rate >= GATES["every_frame_colour_rate"], report


def test_vae_reconstructs_held_out_clips(adherence):
    _, pipe, _ = adherence
    _, held_out = split_captions()
    psnrs = vae_psnr(pipe.vae, held_out)
    assert np.mean(psnrs) >= GATES["vae_psnr_mean"], f"PSNR mean {np.mean(psnrs):.2f} dB, min {min(psnrs):.2f} dB"
