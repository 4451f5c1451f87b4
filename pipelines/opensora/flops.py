"""Where the FLOP counter watches an STDiT3 transformer (blocks in execution order S0, T0, S1, ...). Each
self-attention works on groups: spatial attention on the B*T frames of S tokens, temporal attention on the
B*S positions of T frames; its output projection `attn.proj` sees (groups, length, d), so the probe's shape
gives the grouping and every group is whole on a rank (no sequence-parallel term). The cross-attention is
watched at `cross_attn.proj` (its context length read at the call, input `context`), the MLP at `mlp.fc1`.
Points are listed kind by kind, so reports show spatial_attn, temporal_attn, cross_attn, mlp in that order."""

from __future__ import annotations

import torch

from videocache.family import FlopPoint


def opensora_flop_points(transformer: torch.nn.Module) -> list[FlopPoint]:
    blocks = transformer.blocks()
    attention = [FlopPoint("temporal_attn" if b.temporal else "spatial_attn", b.attn.proj, "grouped_attention")
                 for b in blocks]
    cross = [FlopPoint("cross_attn", b.cross_attn.proj, "cross_attention", context=b.cross_attn, context_arg="context")
             for b in blocks]
    mlp = [FlopPoint("mlp", b.mlp.fc1, "feed_forward", width=b.mlp.fc1.out_features) for b in blocks]
    return attention + cross + mlp
