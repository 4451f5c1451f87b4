"""What the loader and the pre-load parallel checks need of a HunyuanVideo pipeline: its generation defaults
(129 frames at 720 x 1280, 50 steps, embedded guidance 6.0) and its geometry from the config files alone."""

from __future__ import annotations

from videocache.family import GenerationDefaults

from ..loader import folder_config, video_tokens

HUNYUAN_DEFAULTS = GenerationDefaults(129, 720, 1280, 50, 6.0, 24)


def hunyuan_geometry(source: str, frames: int, height: int, width: int) -> tuple[int | None, int | None]:
    """(attention heads, video tokens) of a HunyuanVideo pipeline folder for this video size; None where unknown."""
    config = folder_config(source, "transformer") or {}
    heads, p, p_t = config.get("num_attention_heads"), config.get("patch_size"), config.get("patch_size_t")
    patch = (p_t, p, p) if p and p_t else None
    return (int(heads) if heads else None), video_tokens(source, frames, height, width, patch)
