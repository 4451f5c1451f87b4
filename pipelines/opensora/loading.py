"""What the loader and the pre-load parallel checks need of an Open-Sora 1.2 pipeline: its generation
defaults (51 frames at 480 x 854, 30 steps, guidance 7.0) and its geometry from the config files alone.
Its sequence parallelism (DSP) splits frames and positions, not heads, so no head count is checked; the
frame and position counts per rank are checked when the transformer is first called."""

from __future__ import annotations

from videocache.family import GenerationDefaults

from ..loader import folder_config, video_tokens
from .model.pipeline import GENERATION_DEFAULTS

OPENSORA_DEFAULTS = GenerationDefaults(**GENERATION_DEFAULTS)


def opensora_geometry(source: str, frames: int, height: int, width: int) -> tuple[int | None, int | None]:
    """(None, video tokens) of an Open-Sora pipeline folder for this video size (tokens None where unknown:
    the official VAE's chunked frame compression is not read from its config)."""
    config = folder_config(source, "transformer") or {}
    return None, video_tokens(source, frames, height, width, config.get("patch_size"))
