"""Wan's parallel plan: diffusers' own context-parallel plan (`WanTransformer3DModel._cp_plan`: the RoPE
tables and the first block's tokens split, the tokens gathered after `proj_out`, Wan2.2's per-token
timestep split), the self-attention heads that Ulysses spreads over ranks, a call's token count, and an
empty prediction of a call's shape (the rank that does not compute a CFG branch receives it into that)."""

from __future__ import annotations

import torch

from videocache.parallel_plan import ParallelPlan

from ..adapter_helpers import denoiser_inputs, empty_prediction


def wan_parallel_plan(transformer: torch.nn.Module) -> ParallelPlan:
    config = transformer.config
    p_t, p_h, p_w = config.patch_size
    out_channels = config.out_channels or config.in_channels

    def sequence_length(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
        _, _, f, h, w = denoiser_inputs(args, kwargs)[0].shape
        return (f // p_t) * (h // p_h) * (w // p_w)

    return ParallelPlan(
        sequence=dict(type(transformer)._cp_plan),
        attention_heads=int(config.num_attention_heads),
        sequence_length=sequence_length,
        empty_output=lambda module, args, kwargs: empty_prediction(args, kwargs, out_channels),
    )
