"""HunyuanVideo's parallel plan (diffusers 0.42.1 ships none: `HunyuanVideoTransformer3DModel._cp_plan` is
None). Facts behind it: ../shared/HUNYUAN.md, section 3.

* Split after the token refiner, not at the root: `context_embedder` runs full self-attention over the
  prompt tokens and a masked mean-pool, so every rank runs it on the whole prompt, and the video and
  text tokens are split where they enter the first block (`transformer_blocks.0`). The text is split
  too: replicated text keys would be seen once per rank by Ulysses and ring attention.
* The RoPE tables (video tokens only, `[Nv, head_dim]` each) are split with the video tokens; the
  video tokens are gathered after `proj_out`. Both blocks concatenate [video shard, text shard], and the
  single-stream blocks and the attention processor read the local text length, so shards stay aligned.
* The key mask: the model builds one `[B, 1, 1, Nv + Nt]` mask (True for the video tokens and the first
  `encoder_attention_mask.sum()` text tokens: a right-padded prompt) and hands it to every block. In the
  model's layout [all video, all text] it would mask the wrong keys once the tokens are split, so the
  plan declares it (`key_masks`, token groups video then text) and the generic machinery hands each
  block the mask reordered for the ranks (`videocache.distributed.sequence.ranks_key_order`). Ulysses:
  exact for any padding, even and uneven shards. Ring: right on the CPU with even shards (each key/value
  block gets its own rank's slice of the mask, `videocache.distributed.ring`); uneven shards and other
  devices are refused with a one-line error.
* The refiner's attention (`AttnProcessor2_0`) takes no parallel config and stays whole on every rank.

Only the text-to-video blocks are exercised by the tests; the token-replace (image-to-video) blocks take
the same arguments in the same places.
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from videocache.parallel_plan import ParallelPlan

from ..adapter_helpers import denoiser_inputs, empty_prediction


def _text(args: tuple, kwargs: dict) -> torch.Tensor:
    """encoder_hidden_states of a top-level call (third in the forward's signature)."""
    return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]


def hunyuan_parallel_plan(transformer: torch.nn.Module) -> ParallelPlan:
    """The plan of a HunyuanVideoTransformer3DModel (see the module docstring)."""
    config = transformer.config
    p, p_t = config.patch_size, config.patch_size_t
    out_channels = config.out_channels or config.in_channels
    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"

    def sequence_length(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
        _, _, f, h, w = denoiser_inputs(args, kwargs)[0].shape
        return (f // p_t) * (h // p) * (w // p)

    def token_segments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
        # the refiner keeps the prompt's length, so the text tokens entering the blocks are the prompt's
        return {"video": sequence_length(module, args, kwargs), "text": int(_text(args, kwargs).shape[1])}

    rope_table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    tokens = ContextParallelInput(split_dim=1, expected_dims=3)
    sequence = {
        "rope": {0: rope_table, 1: rope_table},
        first: {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    key_masks = {}
    if len(transformer.transformer_blocks):
        key_masks["transformer_blocks.*"] = "attention_mask"
    if len(transformer.single_transformer_blocks):
        key_masks["single_transformer_blocks.*"] = "attention_mask"
    return ParallelPlan(
        sequence=sequence,
        attention_heads=int(config.num_attention_heads),
        sequence_length=sequence_length,
        token_segments=token_segments,
        key_masks=key_masks,
        empty_output=lambda module, args, kwargs: empty_prediction(args, kwargs, out_channels),
    )
