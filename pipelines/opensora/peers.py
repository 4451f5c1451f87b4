"""What the peer-method wrappers need on Open-Sora 1.2 (STDiT3), whose names diffusers' caches and cache-dit
do not know: TaylorSeer's module names, PAB's attention kinds and its published window, and for cache-dit one
block list in execution order.

PAB (VideoSys OpenSoraPABConfig): spatial / temporal / cross attention broadcast inside 450 < t < 930 (t in
[0, 1000]); 2:4:6 is the paper's setting. Its MLP broadcast (3 timesteps, blocks 0-4) has no counterpart in
diffusers and is left out. diffusers' PAB attaches to diffusers `Attention` modules only, which STDiT3 has
not: its hooks go on the adapter's attention components by name. FasterCache cannot attach at all: its CFG
cache needs the cond and uncond branches batched in one call, and OpenSoraPipeline runs them as separate
calls; its attention hooks attach to diffusers Attention classes only.

cache-dit:

cache-dit (1.5.3) caches a transformer by swapping a named block list for one wrapper module that runs the
whole list in a single call (DBCache: the first Fn blocks, then the rest or their cached residual). STDiT3's
own loop alternates two lists, `spatial_blocks` and `temporal_blocks` (S0, T0, S1, ...): wrapping each
would run every spatial block before every temporal one, and the loop reads each block's `temporal` flag,
which the wrapper lacks. So while cache-dit is attached the transformer gets, on the instance only, a
block list in execution order (`cachedit_blocks`, the same block modules) and a forward that runs it;
every block is given the RoPE angles (spatial blocks ignore them: their attention applies RoPE only when
temporal), so the output is the model's own, bit for bit, and cache-dit's wrapper can stand in for the list.
`detach` restores the class's forward and drops the list.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from videocache.family import PeerSettings

BLOCK_LIST = "cachedit_blocks"


def forward_over_one_list(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None,
                          fps=None, height=None, width=None, attention_kwargs=None, return_dict=True):
    """STDiT3Model.forward with the blocks taken from `cachedit_blocks` (what cache-dit swaps while it runs)."""
    state = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, fps, height, width)
    x = state["x"]
    for block in getattr(self, BLOCK_LIST):
        x = block(x, state["y"], state["t_mlp"], state["mask"], state["grid"][0], state["rope"])
    out = self.finish(x, state["t"], state["grid"], tuple(hidden_states.shape[2:]))
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def attach(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """Give the transformer instance its execution-order block list and the forward that runs it."""
    blocks = torch.nn.ModuleList(transformer.blocks())
    setattr(transformer, BLOCK_LIST, blocks)
    transformer.forward = types.MethodType(forward_over_one_list, transformer)
    return blocks


def detach(transformer: torch.nn.Module) -> None:
    """Undo `attach` (after cache-dit's own removal); nothing to do when it was not attached."""
    if BLOCK_LIST in transformer._modules:
        del transformer._modules[BLOCK_LIST]
    transformer.__dict__.pop("forward", None)


def block_adapter(pipe: Any) -> Any:
    """cache-dit's BlockAdapter over the execution-order list: blocks take (hidden_states,
    encoder_hidden_states, ...) and return the hidden states alone (its Pattern_2, as Wan's); cond and uncond
    are separate calls (has_separate_cfg)."""
    from cache_dit import BlockAdapter, ForwardPattern

    blocks = attach(pipe.transformer)
    return BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=blocks, blocks_name=BLOCK_LIST,
                        forward_pattern=ForwardPattern.Pattern_2, has_separate_cfg=True)


OPENSORA_PEERS = PeerSettings(
    taylorseer_modules={  # diffusers' defaults (`^blocks.*attn`, ...) match none of STDiT3's names
        "components": ([r"(spatial|temporal)_blocks\.\d+\.(attn|cross_attn|mlp)"], None),
        "attn": ([r"(spatial|temporal)_blocks\.\d+\.(attn|cross_attn)"], None),
    },
    pab_components={"spatial_attn": "spatial", "temporal_attn": "temporal", "cross_attn": "cross"},
    pab_window=(450, 930),
    cachedit_blocks=(block_adapter, detach),
)
