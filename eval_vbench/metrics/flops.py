"""Measure how much transformer block work a run really executed, FLOP-weighted.

A cache's computed fraction must be measured, never derived from its configuration: diffusers hooks
replace a module's forward, so a forward pre-hook on `attn1` fires even when the hook returns a cached
value. The counter therefore watches a module *inside* each component that runs exactly once per executed
component (an attention's output projection, a feed-forward's first Linear, ...): the model family's FLOP
points (`videocache.family.FlopPoint`, declared in `pipelines/<family>/flops.py`), each with its formula.
For a batch of B sequences of N tokens, hidden d, context length M:

  self-attention   B * 2 * (4 N d^2 + 2 N^2 d)   (sequence-parallel over S ranks: each rank's N/S queries
                                                  attend to all N keys, 2 * (4 n d^2 + 2 n (n S) d) per rank)
  cross-attention  B * 2 * (2 N d^2 + 2 M d^2 + 2 N M d)
  feed-forward     B * 2 * (2 N d f)         (f = the feed-forward's hidden width)

A joint attention counts self-attention over the joined N + M tokens; a grouped one (attention within
groups each rank holds whole, e.g. Open-Sora's spatial and temporal attention) counts self-attention per
group, with no sequence-parallel term.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from videocache.family import FlopPoint, family_of


def self_attention_flops(n: int, d: int, keys: int | None = None) -> int:
    """n query tokens (this rank's), `keys` key tokens (all of them; default n: one process)."""
    return 2 * (4 * n * d * d + 2 * n * (n if keys is None else keys) * d)


def cross_attention_flops(n: int, m: int, d: int) -> int:
    return 2 * (2 * n * d * d + 2 * m * d * d + 2 * n * m * d)


def feed_forward_flops(n: int, d: int, f: int) -> int:
    return 2 * (2 * n * d * f)


@dataclass
class ComponentCounts:
    """Executed component calls and their FLOPs, keyed by component kind (the FLOP points' `kind`)."""

    calls: Counter = field(default_factory=Counter)
    flops: Counter = field(default_factory=Counter)
    kinds: tuple[str, ...] = ()

    @property
    def total_flops(self) -> int:
        return int(sum(self.flops.values()))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "calls": {k: int(self.calls[k]) for k in self.kinds},
            "flops": {k: int(self.flops[k]) for k in self.kinds},
        }


class ComponentCounter:
    """Counts executed block components of `transformer` while installed; use as a context manager.

    `transformer` may be a list (a pipeline's experts): their counts add up.
    Installs plain torch pre-hooks on the family's FLOP points (and on the modules that carry a context, to
    learn its length), so it sees exactly what ran, whichever cache library is active. Under sequence
    parallelism over `sequence_degree` ranks a rank sees its token shard; its self-attention attends to
    all the keys, so that the ranks' counts add up to the single-process FLOPs (exactly for even shards).
    A family without FLOP points is a one-line FamilyError.
    """

    def __init__(self, transformer: torch.nn.Module | Sequence[torch.nn.Module], sequence_degree: int = 1):
        transformers = list(transformer) if isinstance(transformer, Sequence) else [transformer]  # or a pipeline's experts
        self.transformer = transformers[0]
        self.sequence_degree = sequence_degree
        self.points = []
        for each in transformers:
            points = family_of(each).require("flop_points", "the measured computed fraction (videocache compare)")
            self.points += list(points(each))
        self.kinds = tuple(dict.fromkeys(p.kind for p in self.points))
        self.counts = ComponentCounts(kinds=self.kinds)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._context_len: dict[int, int] = {}  # per point: the context length its last call saw

    def __enter__(self) -> ComponentCounter:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        if self._handles:
            return
        for i, point in enumerate(self.points):
            if point.context is not None:
                self._hook(point.context, self._remember_context(i, point.context_arg), with_kwargs=True)
            self._hook(point.module, self._count(i, point))

    def _hook(self, module: torch.nn.Module, hook, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> ComponentCounts:
        """Return the counts so far and start from zero."""
        counts, self.counts = self.counts, ComponentCounts(kinds=self.kinds)
        return counts

    @staticmethod
    def _shape(x: torch.Tensor) -> tuple[int, int, int]:
        """(batch, tokens, width) of a (..., tokens, width) activation."""
        n, d = int(x.shape[-2]), int(x.shape[-1])
        return max(1, x.numel() // (n * d)), n, d

    def _remember_context(self, index: int, name: str):
        def hook(module, args, kwargs) -> None:
            context = kwargs.get(name, args[1] if len(args) > 1 else None)
            if context is not None:
                self._context_len[index] = int(context.shape[-2])

        return hook

    def _count(self, index: int, point: FlopPoint):
        def hook(module, args) -> None:
            b, n, d = self._shape(args[0])
            m = self._context_len.get(index, 0)
            if point.formula == "self_attention":
                flops = b * self_attention_flops(n, d, n * self.sequence_degree)
            elif point.formula == "grouped_attention":
                flops = b * self_attention_flops(n, d)
            elif point.formula == "cross_attention":
                flops = b * cross_attention_flops(n, m, d)
            elif point.formula == "joint_attention":
                tokens = n + m if point.video_only else n
                flops = b * self_attention_flops(tokens, d, tokens * self.sequence_degree)
            else:  # feed_forward
                flops = b * feed_forward_flops(n, d, point.width)
            self.counts.calls[point.kind] += 1
            self.counts.flops[point.kind] += flops

        return hook


def computed_fraction(method: ComponentCounts, uncached: ComponentCounts) -> float:
    """FLOP-weighted share of the uncached run's block work that the method executed."""
    if uncached.total_flops <= 0:
        raise ValueError("the uncached run executed no block components; cannot form a computed fraction")
    return method.total_flops / uncached.total_flops
