"""The fused skip of a uniform step: the whole block stack's contribution from per-step sums.

On a step whose cells are all skipped alike (same action, same source steps, same reuse factor), every
block adds sum_c o_c * gate_c to the residual stream, where each gate is the block's own part plus a part
shared by all blocks that changes with the step (`adapter.residual_gates`). So the stack adds

    base + sum_i shared_i(step) * G_i,   base = sum_(b,c) o * own,   G_i = sum of the outputs gated by part i

and the blocks need not run. On a compute step that such skips read, the engine keeps, in float32:
G_i, accumulated with one in-place add per gated component, and base, from the stack's own change
h_out - h_in minus sum_i shared_i(d) * G_i at the end of the step. That is two tensors per shared gate
part and step instead of one per block and component, and no per-block work on skipped steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .forecast import served

if TYPE_CHECKING:
    from .store import CacheStore


class StepSum:
    """The sums of one compute step; `complete` once the last block added its part."""

    __slots__ = ("base", "gated", "flops", "h_in", "complete", "nbytes")

    def __init__(self, num_components: int, h_in: torch.Tensor) -> None:
        self.base: torch.Tensor | None = None
        self.gated: dict[int, torch.Tensor] = {}
        self.flops = [0.0] * num_components  # per component, summed over blocks: what one skip saves
        self.h_in: torch.Tensor | None = h_in  # the stack's input, until `finish`
        self.complete = False
        self.nbytes = 0

    def add(self, shared: int, out: torch.Tensor) -> int:
        """Add one component output gated by shared part `shared`; the bytes newly held."""
        kept = self.gated.get(shared)
        if kept is None:
            self.gated[shared] = out.detach().to(torch.float32, copy=True)
            return self.gated[shared].numel() * 4
        kept.add_(out.detach())
        return 0

    def finish(self, h_out: torch.Tensor, gates: Sequence[torch.Tensor]) -> int:
        """Close the step with the stack's output and the step's shared gate parts (in `gated` order)."""
        base = h_out.detach().float() - self.h_in.float()
        for gate, total in zip(gates, self.gated.values(), strict=True):
            base.addcmul_(gate, total, value=-1)
        self.base, self.h_in, self.complete = base, None, True
        return base.numel() * 4

    def terms(self) -> list[torch.Tensor]:
        return [self.base, *self.gated.values()]

    def release(self, store: CacheStore) -> None:
        """Drop the tensors and give their bytes back to the store's budget."""
        store.unreserve(self.nbytes)
        self.base, self.gated, self.h_in, self.nbytes = None, {}, None, 0


def stack_output(
    hidden: torch.Tensor, gates: Sequence[torch.Tensor], action: int, deps: Sequence[int],
    sums: Sequence[StepSum], step: int, scale: float,
) -> torch.Tensor:
    """The block stack's output at a uniform skip step, from the sums of its source steps."""
    base, *gated = served(action, deps, [s.terms() for s in sums], step, scale)
    out = hidden.float() + base
    for gate, total in zip(gates, gated, strict=True):
        out.addcmul_(gate, total)
    return out.type_as(hidden)
