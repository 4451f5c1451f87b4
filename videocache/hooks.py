"""The engine's hooks (diffusers' hook registry, attached to module instances) and its per-context state.

The hooks only route calls to what they are given (an `EngineCallbacks`: the cache engine); every decision
and all bookkeeping happen in its `@torch.compiler.disable` entry points, so neither dynamo nor a compiled
region ever sees them. This module is a leaf: it imports nothing of the engine's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

if TYPE_CHECKING:
    from .stack_skip import StepSum
    from .store import Kept
    from .table import CacheTable

TRANSFORMER_HOOK = "videocache_transformer"
COMPONENT_HOOK = "videocache_component"
MEMO_HOOK = "videocache_memo"
BLOCK_HOOK = "videocache_block"
_DEFAULT_CONTEXT = CacheContext("default")


class EngineCallbacks(Protocol):
    """What the hooks call back: the per-call entry points, the active context's state (for the memo
    hooks) and the store that releases kept outputs when a context resets."""

    _active: ContextState | None
    store: Any

    def _run_transformer(self, hook: TransformerHook, args: tuple, kwargs: dict, compiling: bool) -> Any: ...

    def _run_block(self, hook: BlockHook, args: tuple, kwargs: dict) -> Any: ...

    def _run_component(self, hook: ComponentHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any: ...


def drop_empty_registry(module: torch.nn.Module) -> None:
    """Delete a hook registry left without hooks, so the module is exactly as before any hook was added."""
    reg = getattr(module, "_diffusers_hook", None)
    if reg is None or reg.hooks:
        return
    del module._diffusers_hook
    # the registry leaves the original bound forward as an instance attribute; drop it so the class's
    # forward is found again
    fwd = module.__dict__.get("forward")
    if getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(module).forward:
        del module.forward


class ContextState(BaseState):
    """Where one cache context ("cond", "uncond", ...) is in its run, and the outputs it keeps."""

    def __init__(self, engine: EngineCallbacks) -> None:
        self.engine = engine
        self.entries: dict[int, list[Kept]] = {}  # per block * components + component, in step order
        self.step: int | None = None
        self.sigma: float | None = None
        self.sigmas: list[float] | None = None  # of the table's run, on the host
        self.table: CacheTable | None = None
        self.call_index = -1
        # block runs: kept delta per run, h_in of a run being computed, what each run does this step, and
        # the FLOPs of each (block, component) of a run as last executed (what a skip saves)
        self.run_deltas: dict[int, Kept] = {}
        self.run_inputs: dict[int, tuple[torch.Tensor, ...]] = {}  # a computing run's input streams
        self.run_doing: dict[int, int] = {}
        self.block_flops: dict[int, list[float | None]] = {}
        self.memo: dict[str, tuple[tuple, Any]] = {}  # constant modules' last (key, output)
        self.sums: dict[int, StepSum | None] = {}  # per compute step read by uniform skips; None: refused
        self.building: StepSum | None = None  # the step sum being accumulated in this call
        self.stack_skipped = False  # block 0 skipped the whole stack in this call

    def reset(self, *args, **kwargs) -> None:
        engine = self.engine
        for kept in self.entries.values():
            for e in kept:
                engine.store.release(e)
        for e in self.run_deltas.values():
            engine.store.release(e)
        for sums in (*self.sums.values(), self.building):
            if sums is not None:
                sums.release(engine.store)
        self.entries.clear()
        self.run_deltas.clear()
        self.sums.clear()
        self.building = None
        self.run_inputs.clear()
        self.run_doing.clear()
        self.block_flops.clear()
        self.memo.clear()
        self.step = self.sigma = self.sigmas = self.table = None


class EngineStateManager(StateManager):
    """A StateManager that treats a call with no cache context as the single context "default"."""

    @property
    def context(self) -> CacheContext:
        return self._context if self._context is not None else _DEFAULT_CONTEXT


class TransformerHook(ModelHook):
    _is_stateful = True

    def __init__(self, engine: EngineCallbacks) -> None:
        super().__init__()
        self.engine = engine
        self.state_manager = EngineStateManager(ContextState, (engine,))

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        # is_compiling() is True while dynamo traces a compiled transformer (torch.compile(transformer)):
        # the engine then runs the call eagerly and compiles the block compute itself
        return self.engine._run_transformer(self, args, kwargs, torch.compiler.is_compiling())

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class BlockHook(ModelHook):
    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: EngineCallbacks, block: int) -> None:
        super().__init__()
        self.engine = engine
        self.block = block
        self.flops_key: tuple | None = None  # input shapes of the memoised FLOP counts
        self.flops: tuple[float, ...] = ()

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine._run_block(self, args, kwargs)


class ComponentHook(ModelHook):
    """For adapters without `block_compute`: the engine answers each component module call."""

    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: EngineCallbacks, block: int, comp: int) -> None:
        super().__init__()
        self.engine = engine
        self.block = block
        self.comp = comp
        self.flops_key: tuple | None = None  # input shapes of the memoised FLOP count
        self.flops = 0.0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine._run_component(self, module, args, kwargs)


class MemoHook(ModelHook):
    """Answers a module whose output is a pure function of its first input, given by identity ("tensor":
    the same tensor object, not modified in place since) or by shape ("shape"), from the last call in the
    same cache context. Exact: the module's own earlier output is returned."""

    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: EngineCallbacks, name: str, mode: str) -> None:
        super().__init__()
        if mode not in ("tensor", "shape"):
            raise ValueError(f"constant module {name!r}: mode must be 'tensor' or 'shape', not {mode!r}")
        self.engine = engine
        self.name = name
        self.mode = mode

    @torch.compiler.disable
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.engine._active
        x = args[0] if args else next(iter(kwargs.values()), None)
        if state is None or not isinstance(x, torch.Tensor):
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.mode == "shape":
            key: tuple = (tuple(x.shape), x.dtype, x.device)
            hit = state.memo.get(self.name, ((),))[0] == key
        else:  # the key pins its input tensor, so no other tensor can take over its identity
            key = (x, x._version)
            kept = state.memo.get(self.name, ((None, None),))[0]
            hit = kept[0] is x and kept[1] == x._version
        if hit:
            return state.memo[self.name][1]
        out = self.fn_ref.original_forward(*args, **kwargs)
        state.memo[self.name] = (key, out)
        return out
