"""Model adapters: what the engine needs to know about one transformer family, and their registry.

The engine is model-agnostic: it only sees blocks, their cacheable component modules, FLOPs per call
and the scheduler's sigmas through an adapter looked up by the transformer's class. Adapters live in
`videocache.pipelines` and register themselves on import; `get_adapter` imports the built-in ones
lazily, so the engine has no import-time dependency on any model package.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

# Modules that register the built-in adapters when imported (soft dependency, resolved at lookup time).
BUILTIN_ADAPTER_MODULES: tuple[str, ...] = (
    "videocache.pipelines", "videocache.pipelines.wan", "videocache.pipelines.hunyuan",
    "videocache.pipelines.opensora.adapter",
)


@runtime_checkable
class ModelAdapter(Protocol):
    """The per-architecture knowledge the engine uses. Blocks come in groups (`videocache.BlockGroup`) with
    component names of their own; a fingerprint without `groups` means one group of `videocache.COMPONENTS`
    (Wan's self_attn, cross_attn, mlp)."""

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


_REGISTRY: dict[str, ModelAdapter] = {}


def _key(cls_name_or_type: str | type) -> str:
    return cls_name_or_type if isinstance(cls_name_or_type, str) else cls_name_or_type.__name__


def register_adapter(cls_name_or_type: str | type, adapter: ModelAdapter) -> None:
    """Register `adapter` for a transformer class (by class or class name); re-registering replaces."""
    missing = [
        m
        for m in (
            "blocks",
            "component_modules",
            "fingerprint",
            "component_flops",
            "scheduler_sigmas",
            "denoiser_inputs",
        )
        if not callable(getattr(adapter, m, None))
    ]
    if missing:
        raise TypeError(f"adapter {type(adapter).__name__} lacks {', '.join(missing)}")
    _REGISTRY[_key(cls_name_or_type)] = adapter


def registered_architectures() -> list[str]:
    return sorted(_REGISTRY)


def _load_builtin_adapters() -> None:
    for name in BUILTIN_ADAPTER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:  # not installed with this build; a broken adapter still raises
            if e.name is None or not name.startswith(e.name):
                raise


def get_adapter(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter registered for the transformer's class (or the nearest base class)."""
    for attempt in range(2):
        for cls in type(transformer).__mro__:
            adapter = _REGISTRY.get(cls.__name__)
            if adapter is not None:
                return adapter
        if attempt == 0:
            _load_builtin_adapters()
    raise ValueError(
        f"videocache has no adapter for {type(transformer).__name__}; supported: "
        f"{', '.join(registered_architectures()) or 'none'} (register one with videocache.register_adapter)"
    )
