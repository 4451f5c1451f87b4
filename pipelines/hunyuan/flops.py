"""Where the FLOP counter watches a HunyuanVideo transformer, with T = N video + M text tokens joined:

  dual attn        joint attention over T, watched at the video output projection `to_out[0]` (it sees the
                   N video tokens; M is read at the attention's call)
  ff, ff_context   the video and the text feed-forward, at their first Linear
  single attn      joint attention over T (q, k, v and the attention columns of the fused proj_out), at
                   `attn.to_q`, which runs only when attention does and sees all T tokens
  single mlp       `proj_mlp` (and the MLP columns of proj_out), at proj_mlp
"""

from __future__ import annotations

import torch

from videocache.family import FlopPoint

from ..adapter_helpers import attention_output_projection, first_linear, last_linear


def hunyuan_flop_points(transformer: torch.nn.Module) -> list[FlopPoint]:
    points = []
    for block in transformer.transformer_blocks:
        points += [
            FlopPoint("dual_attn", attention_output_projection(block.attn), "joint_attention", context=block.attn,
                      video_only=True),
            FlopPoint("ff", first_linear(block.ff), "feed_forward", width=last_linear(block.ff).in_features),
            FlopPoint("ff_context", first_linear(block.ff_context), "feed_forward",
                      width=last_linear(block.ff_context).in_features),
        ]
    for block in transformer.single_transformer_blocks:
        points += [
            FlopPoint("single_attn", block.attn.to_q, "joint_attention"),
            FlopPoint("single_mlp", block.proj_mlp, "feed_forward", width=block.proj_mlp.out_features),
        ]
    return points
