"""Parallel plans, and the attribute through which ranks agree: what the core shares with
`videocache.distributed` (torchtitan's idea: the model says what is split where and what is gathered; the
machinery that does it knows no model).

A model family declares a `parallel_plan(transformer) -> ParallelPlan` (`videocache.family.ModelFamily`);
`videocache.distributed` applies it. A plan has these parts:

* `sequence`: diffusers' context-parallel plan format (`ContextParallelModelPlan`): module path ->
  either `{input name or output index: ContextParallelInput}` (split that input before the module runs,
  or that output after it, along `split_dim`) or `ContextParallelOutput` (gather the module's output
  along `gather_dim`). Between the split and the gather every rank holds a shard of the tokens; the
  attention processors exchange heads for tokens (Ulysses) inside diffusers' attention dispatch. Wan's
  plan is the model's own `_cp_plan`.
* the CFG part: the names of the two guidance branches (the pipeline's `cache_context` names) and how
  to make an empty output of the right shape, so that a rank that does not compute a branch can return
  a tensor the other rank's result is later written into.
* optionally, attention key masks (`key_masks`): inputs that hold a mask over the model's whole key
  sequence, laid out as the concatenated token groups of a call (`token_segments`, e.g. video then text),
  each group split over the ranks by the `sequence` part. After the split every rank's keys are its own
  shard of each group, so a mask in the model's layout would be misaligned: the machinery reorders it
  into the ranks' layout (rank 0's shard of every group, then rank 1's, ...), which is where the
  attention's keys are after Ulysses' all-to-all and where ring attention's key/value blocks come from.
* optionally, `axes` (an `AxesPlan`): two-axis sequence parallelism (DSP, see `dsp`) instead of Ulysses
  or ring attention, for a model whose tokens form a grid and whose attentions mix along one axis each
  (Open-Sora's STDiT3). With it, the `sequence` part is not used and the ranks that share a branch's
  tokens are the Ulysses degree (`--ulysses N`); ring degrees are refused.

`AGREE_ATTR`: under sequence parallelism `videocache.distributed` sets this attribute of a transformer to a
callable `agree(flag: bool) -> bool` that returns the same answer on every rank sharing the tokens (an
all-reduce); the cache engine calls it for its data-dependent decisions (the byte budget), so that every rank
takes the same branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

AGREE_ATTR = "_videocache_agree"


def _default_output_tensor(output: Any) -> torch.Tensor:
    """The denoiser's prediction in a diffusers transformer output: `(sample,)` or `.sample`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return output[0]
    return output.sample


def _default_wrap_output(sample: torch.Tensor, kwargs: dict) -> Any:
    """A diffusers transformer's return value for `sample`, honouring `return_dict`."""
    if kwargs.get("return_dict", True):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
    return (sample,)


@dataclass(frozen=True)
class AxesPlan:
    """Two-axis sequence parallelism (`dsp`): module paths as in `sequence` (a `*` wildcard allowed).

    `grid(transformer, args, kwargs)`: the (A0, A1) token grid of a top-level call (token index
    a0 * A1 + a1 in the token dim 1), from input shapes only. `split`: module -> its token input, split
    along axis 0 before it runs (where the stream enters the blocks). `gather`: modules whose output (the
    first, when a tuple) is gathered along axis 0 after they run (where the stream leaves). `switch`:
    module -> its token input, re-sharded along axis 1 while the module runs (an all-to-all before it and
    one back after it): the modules that mix tokens along axis 0. `local_rows`: module -> an int input that
    holds A0, replaced by this rank's A0 count (a module that views its tokens as rows). `names`: the two
    axes in messages."""

    grid: Callable[[torch.nn.Module, tuple, dict], tuple[int, int]]
    split: dict[str, str]
    gather: tuple[str, ...]
    switch: dict[str, str] = field(default_factory=dict)
    local_rows: dict[str, str] = field(default_factory=dict)
    names: tuple[str, str] = ("rows", "columns")


@dataclass(frozen=True)
class ParallelPlan:
    """How one transformer family is parallelised; see the module docstring.

    `sequence_length(transformer, args, kwargs)` is the number of tokens a top-level call shards (from
    input shapes only); `attention_heads` the heads Ulysses spreads over ranks. `empty_output(transformer,
    args, kwargs)` is an uninitialised tensor shaped like the prediction of a top-level call, made without
    running it. `output_tensor` / `wrap_output` read the prediction out of a return value and build one
    around it.

    `token_segments(transformer, args, kwargs)`: the token groups a top-level call splits apart, name ->
    length, in the order the attention concatenates its keys (default: `{"video": sequence_length}`);
    every group decides the even or uneven path and must have at least one token per rank. `key_masks`: module
    path (a `*` wildcard as in `sequence`) -> the name of the input holding a key mask `[..., sum(segments)]`
    over all of the call's keys in the model's layout; it is handed to the module reordered for the ranks
    (see the module docstring). `axes`: two-axis sequence parallelism instead (`AxesPlan`; a dict of its
    fields is taken too)."""

    sequence: dict[str, Any]
    attention_heads: int
    sequence_length: Callable[[torch.nn.Module, tuple, dict], int]
    empty_output: Callable[[torch.nn.Module, tuple, dict], torch.Tensor]
    cfg_branches: tuple[str, str] = ("cond", "uncond")
    output_tensor: Callable[[Any], torch.Tensor] = field(default=_default_output_tensor)
    wrap_output: Callable[[torch.Tensor, dict], Any] = field(default=_default_wrap_output)
    token_segments: Callable[[torch.nn.Module, tuple, dict], dict[str, int]] | None = None
    key_masks: dict[str, str] = field(default_factory=dict)
    axes: AxesPlan | None = None

    def segments(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
        """The token groups of a top-level call, name -> length (see `token_segments`)."""
        if self.token_segments is None:
            return {"video": int(self.sequence_length(transformer, args, kwargs))}
        return {name: int(n) for name, n in self.token_segments(transformer, args, kwargs).items()}
