"""Model adapters: what the engine needs to know about one transformer family.

The engine is model-agnostic: it only sees blocks, their cacheable component modules, FLOPs per call
and the scheduler's sigmas through an adapter, which a model family declares (`videocache.family`) and
`get_adapter` finds by the transformer's class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .family import family_of


@runtime_checkable
class ModelAdapter(Protocol):
    """The per-architecture knowledge the engine uses. Blocks come in groups (`videocache.BlockGroup`) with
    component names of their own; a fingerprint without `groups` names one group's `components`."""

    architecture: str

    def blocks(self, transformer: torch.nn.Module) -> Sequence[torch.nn.Module]:
        """The transformer blocks, in execution order."""

    def component_modules(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Cacheable sub-modules of one block, keyed by component name. Their outputs are cached as
        returned, i.e. before the block applies its gate and residual add."""

    def fingerprint(self, transformer: torch.nn.Module) -> dict[str, Any]:
        """{"architecture": str, "num_blocks": int, "components": [str, ...]} for one kind of block, or with
        "groups": [{"name", "num_blocks", "components"}, ...] in block order instead of "components"
        (each group with "blocks", its block indices, where groups interleave: `videocache.BlockGroup`);
        compared to a profile's `model`, and the layout of the engine's tables."""

    def component_flops(self, component: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        """FLOPs of one call of a component module, from its input shapes only (no data access)."""

    def scheduler_sigmas(self, pipe_or_scheduler: Any, num_steps: int | None = None) -> list[float]:
        """Per-step sigmas (1 = pure noise) of the current schedule, one per denoising step."""

    def denoiser_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        """(x_t, timestep) of a top-level transformer call."""

    # Optional, together: `block_compute(block, args, kwargs, served) -> (hidden_states, computed)` and
    # `block_flops(block, args, kwargs) -> FLOPs per component`. block_compute is the block's forward
    # where `served[c]` (None or a tensor, in the block group's component order) replaces component c's output, computing
    # only the others (their inputs, norms and modulation included) and returning them in `computed`
    # (None where served); the step's gates apply to every output. It must be a pure function of its
    # tensors, so the engine can compile it and every block shares the compiled graphs. With it the engine
    # hooks blocks instead of component modules, and supports torch.compile.
    # Optional: `constant_modules(transformer) -> {name: (module, "tensor" | "shape")}`, modules outside
    # the blocks whose output depends only on their first input's identity (e.g. the text projection of
    # the prompt embeddings) or its shape (e.g. RoPE tables); the engine reuses their last output.
    # Optional, with block_compute: `residual_gates(block)` -> per component, the index of the gate part
    # shared by all blocks (each gate = the block's own part + that shared part) or None if ungated, and
    # `shared_gates(args, kwargs, indices) -> (hidden_states, [shared part per index])` from a block call.
    # With them, a step whose cells are all skipped alike skips the whole block stack at once.


def get_adapter(transformer: torch.nn.Module) -> ModelAdapter:
    """The cache adapter of the transformer's model family (`videocache.family`); a one-line FamilyError if
    no family covers it."""
    return family_of(transformer).adapter
