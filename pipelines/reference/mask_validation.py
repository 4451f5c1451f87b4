"""Checks the fg/bg profiler's foreground masks against exact ground truth on rendered reference clips.

A generated video has no true mask, so instead a rendered clip (which has one per pixel frame) is encoded,
normalised as the pipeline's latents are ((z - mean) / std), noised to a step's sigma,
x_t = (1 - sigma) x0 + sigma eps, and denoised once at that step with its caption. The mask the profiler
derives from that output is compared (IoU on the token grid) with the clip's true mask, and R_attn is
scored both with the derived mask and with the true one, so the two block rankings can be compared too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from videocache.fgbg import FgBgProfile, ScoreAccumulator, block_scores, mask_iou, mask_to_token_grid

from ..attention_capture import SelfAttentionCapture, score_call
from .data import Caption, render_clip, split_captions

CLIP_SEED_BASE = 50_000  # far from the training clips' seeds


@dataclass(frozen=True)
class MaskValidation:
    """Mean token-grid IoU of the derived masks (overall and per step), and the block profiles scored with
    the derived masks (`profile`, what a model without true masks gets) and with the true ones."""

    mask_iou: float
    iou_per_step: dict[int, float]
    profile: FgBgProfile
    profile_true_mask: FgBgProfile
    clips: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mask_iou": round(self.mask_iou, 4),
            "iou_per_step": {s: round(v, 4) for s, v in self.iou_per_step.items()},
            "clips": self.clips,
            "r_attn_true_mask": [round(v, 4) for v in self.profile_true_mask.r_attn],
            "classes_true_mask": list(self.profile_true_mask.classes),
        }


def video_to_latents(pipe: Any, video: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> normalised latent (1, C, F', H', W') as the transformer sees clean videos."""
    vae = pipe.vae
    x = torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)[None]
    x = x.to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mode().float()
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(shape)
    return (z - mean) / std


def default_captions(count: int) -> list[Caption]:
    """The first `count` held-out captions (never seen in training)."""
    return split_captions()[1][:count]


@torch.no_grad()
def validate_masks(
    pipe: Any,
    steps: Sequence[int],
    *,
    captions: Sequence[Caption | str] | None = None,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 25,
    heads: Sequence[int] | None = None,
    chunk: int = 1024,
    signal: str = "x0",
    border: int = 1,
    token_threshold: float = 0.5,
    tau: float | None = None,
    noise_seed: int = 0,
    max_sequence_length: int = 512,
) -> MaskValidation:
    """Score rendered clips (caption x seed) at `steps` of a `num_inference_steps` schedule; the text is
    encoded as the pipeline's call does (padded to `max_sequence_length`, WanPipeline's default 512)."""
    captions = list(captions) if captions is not None else default_captions(8)
    transformer, vae = pipe.transformer, pipe.vae
    patch = tuple(transformer.config.patch_size)
    spatial = int(vae.config.scale_factor_spatial) * patch[1]
    temporal = int(vae.config.scale_factor_temporal) * patch[0]
    pipe.scheduler.set_timesteps(num_inference_steps)
    sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
    bad = [s for s in steps if not 0 <= s < num_inference_steps]
    if bad:
        raise ValueError(f"steps must lie in 0-{num_inference_steps - 1}; got {bad}")
    derived = ScoreAccumulator(len(transformer.blocks), tuple(steps))
    truth = ScoreAccumulator(len(transformer.blocks), tuple(steps))
    ious: dict[int, list[float]] = {s: [] for s in steps}
    gen = torch.Generator().manual_seed(noise_seed)
    device, dtype = transformer.device, transformer.dtype
    with SelfAttentionCapture(transformer, heads, chunk) as capture:
        for caption in captions:
            text = caption if isinstance(caption, str) else caption.text
            embeds, _ = pipe.encode_prompt(
                text,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
                device=device,
            )
            for seed in seeds:
                clip = render_clip(text, CLIP_SEED_BASE + int(seed))
                x0 = video_to_latents(pipe, clip.video)
                true_mask = mask_to_token_grid(clip.mask, temporal=temporal, spatial=spatial).to(x0.device)
                for step in steps:
                    sigma = float(sigmas[step])
                    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
                    x_t = ((1 - sigma) * x0 + sigma * eps).to(dtype)
                    capture.armed = True
                    try:
                        out = transformer(
                            hidden_states=x_t,
                            timestep=timesteps[step].expand(1).to(device),
                            encoder_hidden_states=embeds.to(dtype),
                            return_dict=False,
                        )[0]
                    finally:
                        capture.armed = False
                    received = capture.take()
                    masks, scores = score_call(
                        received, out, x_t, sigma, patch, signal, border, token_threshold
                    )
                    ious[step].append(mask_iou(masks[0], true_mask))
                    derived.add(step, scores[0])
                    truth.add(step, block_scores({b: a[0] for b, a in received.items()}, true_mask))
    per_step = {s: float(np.mean(v)) for s, v in ious.items()}
    mean_iou = float(np.mean([v for vals in ious.values() for v in vals]))
    used = capture.heads
    return MaskValidation(
        mask_iou=mean_iou,
        iou_per_step=per_step,
        profile=derived.result(tau=tau, heads=used, mask_iou=mean_iou),
        profile_true_mask=truth.result(tau=tau, heads=used, mask_iou=1.0),
        clips=len(captions) * len(seeds),
    )
