"""Open-Sora 1.2's rectified-flow ("RFLOW") sampling schedule through diffusers' FlowMatchEulerDiscreteScheduler.

Official (OPENSORA.md 1.8): base times s_i = 1 - i / N (i = 0 .. N-1), shifted by
t_i = ratio s_i / (1 + (ratio - 1) s_i) with ratio = sqrt(H W / 512^2) * sqrt(T'), T' = 1 for one frame,
else (num_frames // 17) * 5. The 512 is the released model's `input_sq_size` (the square size its position
embedding scale is relative to); a model of another base size (our 64-pixel reference) passes its own, so
that its base size gets the shift 512x512 gets in the released model; the model sees 1000 t_i; Euler steps to the next t, the last one to 0; the model
predicts v = x0 - noise, so `z += v (t_i - t_{i+1})`.

FlowMatchEulerDiscreteScheduler (static shift = ratio, explicit sigmas s_i) applies the same shift, sets
timesteps = 1000 sigma and appends a terminal sigma 0; its step is `x + (sigma_next - sigma) * output`, so
the pipeline passes `-v`.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

BASE_SIZE = 512  # pixels: the released model's input_sq_size
FRAMES_PER_CHUNK = 17
LATENTS_PER_CHUNK = 5


def shift_ratio(height: int, width: int, num_frames: int, dtype: torch.dtype | None = None,
                base_size: int = BASE_SIZE) -> float:
    """The official timestep-transform ratio (relative to a `base_size` square). In float math by default;
    with `dtype` (the model's, e.g. bfloat16) every step is rounded as the reference computes it on tensors
    of that dtype (480p / 51 frames: 4.84375 in bfloat16 instead of 4.8431)."""
    if dtype is not None:
        h, w, f = (torch.tensor(float(v), dtype=dtype) for v in (height, width, num_frames))
        space = (h * w / base_size**2).sqrt()
        time = torch.ones((), dtype=dtype) if num_frames == 1 else (f // FRAMES_PER_CHUNK * LATENTS_PER_CHUNK).sqrt()
        return float(space * time)
    space = math.sqrt(height * width / base_size**2)
    time = 1.0 if num_frames == 1 else math.sqrt((num_frames // FRAMES_PER_CHUNK) * LATENTS_PER_CHUNK)
    return space * time


def base_sigmas(num_inference_steps: int) -> list[float]:
    """Unshifted times 1 - i / N, i = 0 .. N-1 (t = 0 is never evaluated)."""
    return [1.0 - i / num_inference_steps for i in range(num_inference_steps)]


def official_timesteps(num_inference_steps: int, ratio: float, num_timesteps: int = 1000) -> list[float]:
    """The reference's shifted timesteps in [0, 1000] (its formula, for tests and comparisons)."""
    out = []
    for s in base_sigmas(num_inference_steps):
        out.append(num_timesteps * ratio * s / (1 + (ratio - 1) * s))
    return out


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler a pipeline folder without scheduler/ gets (the shift is set per call)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def set_opensora_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler, num_inference_steps: int, height: int, width: int,
    num_frames: int, device=None, ratio_dtype: torch.dtype | None = None, base_size: int = BASE_SIZE,
) -> float:
    """Configure `scheduler` for one generation (shift from the size and length relative to `base_size`,
    rounded through `ratio_dtype` when given); returns the ratio."""
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError("Open-Sora needs a FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=False")
    ratio = shift_ratio(height, width, num_frames, ratio_dtype, base_size)
    if ratio <= 0:
        raise ValueError(
            f"num_frames={num_frames} gives a zero time shift (Open-Sora takes 1 frame or at least {FRAMES_PER_CHUNK})"
        )
    scheduler.set_shift(ratio)
    scheduler.set_timesteps(sigmas=base_sigmas(num_inference_steps), device=device)
    return ratio
