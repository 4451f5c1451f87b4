"""Quality gates on the shipped reference weights (issue: the embedded reference pipeline).

The prompts are the 20 held-out captions that were never in the training set.
"""

import numpy as np
import pytest

from videocache.pipelines.reference.data import split_captions
from videocache.pipelines.reference.evaluate import prompt_adherence, vae_psnr

pytestmark = pytest.mark.slow

def test_held_out_prompts_show_prompted_colour_and_motion(reference_pipe):
    _, held_out = split_captions()
    report = prompt_adherence(reference_pipe, held_out, steps=25, guidance_scale=5.0)
    assert report.colour_rate >= 0.8, report
    assert report.direction_rate >= 0.7, report


def test_vae_reconstructs_held_out_clips(reference_pipe):
    _, held_out = split_captions()
    psnrs = vae_psnr(reference_pipe.vae, held_out)
    assert np.mean(psnrs) >= 28.0, f"PSNR mean {np.mean(psnrs):.2f} dB, min {min(psnrs):.2f} dB"
