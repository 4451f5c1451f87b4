"""Wan2.2 A14B's two experts (text- and image-to-video, diffusers' `WanPipeline` and `WanImageToVideoPipeline`):
`transformer` denoises while the timestep is at or above `boundary_ratio * num_train_timesteps`, then
`transformer_2` at `guidance_scale_2`. A pipeline without `boundary_ratio` or `transformer_2` (Wan2.1, TI2V-5B)
has its `transformer` alone."""

from __future__ import annotations

from typing import Any

from videocache.family import Denoiser


def wan_denoisers(pipe: Any) -> list[Denoiser]:
    def boundary() -> float | None:  # read at each run: the pipeline's config and scheduler may change
        ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
        return None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    if boundary() is None or getattr(pipe, "transformer_2", None) is None:
        return [Denoiser("transformer")]
    return [Denoiser("transformer", lambda t: t >= boundary()),
            Denoiser("transformer_2", lambda t: t < boundary(), "_guidance_scale_2")]
