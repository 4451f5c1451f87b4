"""What the loader and the pre-load parallel checks need of a Wan pipeline: its generation defaults (Wan2.1's
81 frames at 480 x 832, 50 steps) and its geometry, read from the folder's config files alone."""

from __future__ import annotations

from videocache.family import GenerationDefaults

from ..loader import folder_config, video_tokens

WAN_DEFAULTS = GenerationDefaults(81, 480, 832, 50, 5.0, 16)


def wan_geometry(source: str, frames: int, height: int, width: int) -> tuple[int | None, int | None]:
    """(attention heads, video tokens) of a Wan pipeline folder for this video size; None where unknown."""
    config = folder_config(source, "transformer") or {}
    heads = config.get("num_attention_heads")
    return (int(heads) if heads else None), video_tokens(source, frames, height, width, config.get("patch_size"))
