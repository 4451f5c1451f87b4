"""Quality gates on the shipped reference weights (issue: the embedded reference pipeline; issue 12 adds
reference-hunyuan and the per-frame colour gate, issue 13 reference-opensora).

The prompts are the 20 held-out captions that were never in the training set.
"""

import numpy as np
import pytest

from videocache.family import known_models
from videocache.pipelines.loader import load_pipeline
from videocache.pipelines.reference.data import split_captions
from videocache.pipelines.reference.evaluate import GATES, prompt_adherence, vae_psnr

pytestmark = pytest.mark.slow
REFERENCE_MODELS = [m for m in known_models() if m.startswith("reference-")]
# Gates a shipped model is known to miss, recorded strictly (the test fails once the model passes, so the
# entry must go), each with today's measured rate as a floor (a fall below it fails rather than xfails).
# With the noise-robust shared decoder (2026-11-28) reference-hunyuan, trained for about 70 CPU-minutes, shows
# every frame in the prompted colour in 45 % of the held-out videos (its colour flips mid-video;
# benchmarks/reference_quality_hunyuan), reference-opensora in 75 % (red shapes on white start yellow;
# benchmarks/reference_quality_opensora).
KNOWN_FAILURES = {("reference-hunyuan", "every_frame"): 0.45, ("reference-opensora", "every_frame"): 0.75}


def known_failure(request, model: str, gate: str, rate: float) -> None:
    """Fail outright if a known miss fell below today's rate, else expect the gate's assertion to fail.

    pytest.fail raises no AssertionError, so the xfail (raises=AssertionError) cannot absorb it.
    """
    if (model, gate) not in KNOWN_FAILURES:
        return
    todays_rate = KNOWN_FAILURES[(model, gate)]
    if rate < todays_rate - 1e-9:
        pytest.fail(f"{model} {gate} rate {rate:.0%} fell below today's {todays_rate:.0%} (see the benchmark)")
    request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                          reason=f"{model} misses the {gate} gate (see the benchmark)"))


@pytest.fixture(scope="module", params=REFERENCE_MODELS)
def adherence(request):
    model = request.param
    if not (known_models()[model] / "model_index.json").is_file():
        pytest.skip(f"shipped {model} weights not present")
    pipe = load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    _, held_out = split_captions()
    return model, pipe, prompt_adherence(pipe, held_out, steps=25, guidance_scale=5.0)


def test_held_out_prompts_show_prompted_colour(adherence, request):
    model, _, report = adherence
    known_failure(request, model, "colour", report.colour_rate)
    assert report.colour_rate >= GATES["colour_rate"], report


def test_held_out_prompts_show_prompted_motion(adherence, request):
    model, _, report = adherence
    known_failure(request, model, "direction", report.direction_rate)
    assert report.direction_rate >= GATES["direction_rate"], report


def test_every_frame_shows_the_prompted_colour(adherence, request):
    model, _, report = adherence
    known_failure(request, model, "every_frame", report.every_frame_colour_rate)
    assert report.every_frame_colour_rate >= GATES["every_frame_colour_rate"], report


def test_vae_reconstructs_held_out_clips(adherence):
    _, pipe, _ = adherence
    _, held_out = split_captions()
    psnrs = vae_psnr(pipe.vae, held_out)
    assert np.mean(psnrs) >= GATES["vae_psnr_mean"], f"PSNR mean {np.mean(psnrs):.2f} dB, min {min(psnrs):.2f} dB"


def test_image_to_video_reference_starts_from_the_given_first_frame(adherence):
    """An image-to-video reference's first frame follows the frame it is given (measured: 22.9 dB mean over the
    held-out prompts, against 17.5 dB for reference-wan22 on the same prompts and seeds without one)."""
    model, _, report = adherence
    if report.first_frame_psnr is None:
        pytest.skip(f"{model} makes videos from text only")
    assert np.mean(report.first_frame_psnr) >= 20.0, report.first_frame_psnr
