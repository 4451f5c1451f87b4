"""Quality gates on the shipped reference weights (issue: the embedded reference pipeline).

The prompts are the 20 held-out captions that were never in the training set.
"""

import math

import numpy as np
import pytest
import torch

from videocache.pipelines.generation import generate
from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import render_clip, split_captions

pytestmark = pytest.mark.slow


def test_held_out_prompts_show_prompted_colour_and_motion(reference_pipe):
    _, held_out = split_captions()
    colour_hits = direction_hits = 0
    for i, caption in enumerate(held_out):
        result = generate(reference_pipe, caption.text, seed=i, num_inference_steps=25, num_frames=17,
                          height=64, width=64, guidance_scale=5.0, progress=False)
        colour_ok, direction_ok = check_video(result.frames).matches(caption)
        colour_hits += colour_ok
        direction_hits += direction_ok
    n = len(held_out)
    assert colour_hits / n >= 0.8, f"colour found in {colour_hits}/{n}"
    assert direction_hits / n >= 0.7, f"direction found in {direction_hits}/{n}"


@torch.no_grad()
def test_vae_reconstructs_held_out_clips(reference_pipe):
    vae = reference_pipe.vae
    _, held_out = split_captions()
    psnrs = []
    for i, caption in enumerate(held_out):
        video = render_clip(caption, seed=10_000 + i).video
        x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recon = ((recon[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().numpy()
        mse = np.mean((recon - video.astype(np.float64)) ** 2)
        psnrs.append(10 * math.log10(255.0**2 / mse))
    assert min(psnrs) >= 26.0 and np.mean(psnrs) >= 28.0, f"PSNR mean {np.mean(psnrs):.2f}, min {min(psnrs):.2f}"
