"""STDiT3's parallel plan: DSP (two-axis sequence parallelism, `videocache.distributed.dsp`) and CFG
parallelism. Facts behind it: ../shared/OPENSORA.md, sections 1.5 and 4.4.

STDiT3's tokens are a (T, S) grid, frames x positions (token t * S + s). Only the self-attentions mix
tokens, each along one axis: spatial attention within a frame, temporal attention along time at one
position (with RoPE over the frames); cross-attention, MLP, norms and modulation are token-wise. So:

* the stream is split by frames where it enters the first block (`spatial_blocks.0`'s hidden_states):
  each rank holds whole frames, and spatial blocks run with no communication. Their `num_frames` input
  becomes the rank's frame count, so that the spatial attention's (frames, positions) view stays right.
* every temporal attention (`temporal_blocks.*.attn`) gets the tokens re-sharded by positions (one
  all-to-all: each rank every frame of its positions, `num_frames` the whole T, the RoPE table over all
  frames), and its output re-sharded by frames (another). The rest of a temporal block is token-wise and
  runs on the frame shard. A cache that serves a temporal attention skips both all-to-alls.
* the position embedding is added in `embed`, before the split, on the whole grid; the final layer is
  token-wise and its output is gathered by frames, so `finish`'s unpatchify sees the whole grid.

T and S need not divide by the degree (the all-to-alls pad and crop, `dsp`); each needs at least one frame
or position per rank (a one-line ParallelConfigError otherwise). The caption, its mask and the timestep
embedding stay whole on every rank.
"""

from __future__ import annotations

import torch

from videocache.parallel_plan import AxesPlan, ParallelPlan

from ..adapter_helpers import denoiser_inputs, empty_prediction


def opensora_parallel_plan(transformer: torch.nn.Module) -> ParallelPlan:
    """The plan of an STDiT3Model (see the module docstring)."""
    config = transformer.config
    pt, ph, pw = config.patch_size
    out_channels = transformer.out_channels

    def grid(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        _, _, f, h, w = denoiser_inputs(args, kwargs)[0].shape
        return -(-f // pt), -(-h // ph) * -(-w // pw)

    def sequence_length(module: torch.nn.Module, args: tuple, kwargs: dict) -> int:
        frames, positions = grid(module, args, kwargs)
        return frames * positions

    axes = AxesPlan(
        grid=grid,
        split={"spatial_blocks.0": "hidden_states"},
        gather=("final_layer",),
        switch={"temporal_blocks.*.attn": "x"},
        local_rows={"spatial_blocks.*": "num_frames"},
        names=("latent frames", "positions per frame"),
    )
    return ParallelPlan(
        sequence={},
        attention_heads=int(config.num_heads),
        sequence_length=sequence_length,
        # finish()'s dtype
        empty_output=lambda module, args, kwargs: empty_prediction(args, kwargs, out_channels, torch.float32),
        axes=axes,
    )
