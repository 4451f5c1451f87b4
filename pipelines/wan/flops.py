"""Where the FLOP counter watches a Wan transformer, per block: self-attention `attn1` and cross-attention
`attn2` at their output projection (it runs once per executed attention, fused q/k/v or not; the
cross-attention's context length read at `attn2`'s call), the feed-forward `ffn` at its first Linear."""

from __future__ import annotations

import torch

from videocache.family import FlopPoint

from ..adapter_helpers import attention_output_projection, first_linear, last_linear


def wan_flop_points(transformer: torch.nn.Module) -> list[FlopPoint]:
    points = []
    for block in transformer.blocks:
        points += [
            FlopPoint("attn1", attention_output_projection(block.attn1), "self_attention"),
            FlopPoint("attn2", attention_output_projection(block.attn2), "cross_attention", context=block.attn2),
            FlopPoint("ffn", first_linear(block.ffn), "feed_forward", width=last_linear(block.ffn).in_features),
        ]
    return points
