"""A tiny random HunyuanVideoTransformer3DModel and its inputs, for tests and for counting what the engine
runs (`presets`): the real diffusers class at toy width, any number of blocks, nothing downloaded."""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel

TINY_TEXT = 8  # text tokens of `tiny_inputs`


def tiny_hunyuan(dual: int = 2, single: int = 3, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """HUNYUAN.md's CPU configuration: 2 heads x 16, patch 2/1, rope axes (4, 6, 6)."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=dual,
        num_single_layers=single, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
    ).eval()


def tiny_inputs(seed: int = 1, pad: int = 0) -> dict:
    """`tiny_hunyuan`'s call arguments but the timestep: a (1, 4, 3, 8, 8) latent, TINY_TEXT text tokens of
    which the last `pad` are masked, pooled projections."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, TINY_TEXT, dtype=torch.long)
    if pad:
        mask[:, TINY_TEXT - pad:] = 0
    return {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, TINY_TEXT, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(1, 8, generator=g),
    }
