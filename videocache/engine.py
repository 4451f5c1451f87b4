"""The cache engine: executes a cache table on a transformer through diffusers' hook registry.

Hooks are attached to module *instances* (no class patching), so `remove()` restores the exact original
forwards and the output becomes bit-identical to a model that never had the engine:

* one hook on each cacheable component module of each block (for Wan: `attn1`, `attn2`, `ffn`) that
  replaces its forward. On COMPUTE it runs the module and keeps the output only if the table reads it
  later; on REUSE it returns the kept output without running the module; on FORECAST it extrapolates
  from the last k+1 kept outputs. The block then applies the *current* step's gate to whatever the
  component returned, so the cache sits exactly before the gated residual add.
* with block runs in the table (ProfilingDiT's background blocks), one hook on every block: on a run's
  compute step the run's first block remembers its input h_in and the last block keeps
  delta = h_out - h_in; on a reuse step the first block returns h_in + delta and the run's other blocks
  return their input unchanged, so none of the run's components execute (their FLOPs, as measured on the
  run's last compute, count as skipped). Blocks in runs must take the hidden states first (or as
  `hidden_states=`) and return the new hidden states tensor.
* on a step whose cells are all skipped alike (same action and source steps: the aligned schedules),
  when the adapter splits each gate into a per-block part and a part all blocks share
  (`residual_gates`), block 0 adds the whole stack's contribution at once and the other blocks return
  their input: the per-block gated adds are summed over blocks on the compute steps those skips read
  (`_StepSum`), so a skipped step costs a few tensor operations instead of a gated add per block and
  component. Values match the block-by-block path up to float summation order.
* one hook on the transformer that works out the step of each call (from the pipeline's
  `cache_context`, else from the scheduler's timesteps), picks the table for the run, and applies the
  optional exposure-bias correction to the output.

State lives per cache context ("cond", "uncond", ... or "default" for a direct call) in a diffusers
`StateManager`, so the two CFG branches never read each other's tensors. The pipeline's
`_reset_stateful_cache()` frees everything at the end of a call; a context whose step index goes
backwards starts a new generation and is reset too.

Sequence parallelism (Ulysses): every rank holds its own shard of the tokens, so the tensors kept here
are per-rank shards and must never be gathered. Correctness needs every compute/reuse decision to be
identical on all ranks. Decisions made here depend only on (table, step), which all ranks share, so they
agree without communication. `CacheEngine._decide` is the single place where a data-dependent decision
(e.g. a threshold on a feature change) would have to be agreed on by a collective before it is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from .adapters import ModelAdapter
from .exposure_bias import ExposureBiasConfig, correct_velocity
from .table import _COMPUTE, _REUSE, COMPONENTS, Action, CacheTable, build_table

TRANSFORMER_HOOK = "videocache_transformer"
COMPONENT_HOOK = "videocache_component"
MEMO_HOOK = "videocache_memo"
BLOCK_HOOK = "videocache_block"
_DEFAULT_CONTEXT = CacheContext("default")
_NC = len(COMPONENTS)
_TRACE_LETTERS = "CRFD"
_SKIPPED = 3  # trace code of a component whose block a block-run reuse skipped
_COUNT_KEYS = ("compute", "reuse", "forecast")
_NEW = object()  # no step sum started yet


@dataclass(frozen=True)
class EngineConfig:
    """Storage and correction options. `max_cache_bytes` bounds the kept tensors over all contexts;
    `cache_dtype`/`offload_to_cpu` change how they are kept (restored to the module's dtype/device on use)."""

    max_cache_bytes: int | None = None
    cache_dtype: torch.dtype | None = None
    offload_to_cpu: bool = False
    exposure_bias: ExposureBiasConfig = field(default_factory=ExposureBiasConfig)
    trace: bool = True
    # a step whose cells are all skipped alike skips the whole block stack at once (adapters with
    # `residual_gates`); same values as skipping block by block, up to float summation order
    fuse_skipped_steps: bool = True
    # called as observer(context, step, block, component, output) after every computed component (calibration)
    observer: Callable[[str, int, int, str, Any], None] | None = None

    def __post_init__(self) -> None:
        m = self.max_cache_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"max_cache_bytes must be an integer >= 0 or None; got {m!r}")
        if self.cache_dtype is not None and not (
            isinstance(self.cache_dtype, torch.dtype) and self.cache_dtype.is_floating_point
        ):
            raise ValueError(
                f"cache_dtype must be a floating torch.dtype (e.g. torch.bfloat16); got {self.cache_dtype!r}"
            )
        if not isinstance(self.fuse_skipped_steps, bool):
            raise ValueError(f"fuse_skipped_steps must be True or False; got {self.fuse_skipped_steps!r}")
        if not isinstance(self.offload_to_cpu, bool):
            raise ValueError(f"offload_to_cpu must be True or False; got {self.offload_to_cpu!r}")
        if not isinstance(self.exposure_bias, ExposureBiasConfig):
            raise ValueError("exposure_bias must be an ExposureBiasConfig")


# -- kept outputs ------------------------------------------------------------------------------------
def _flatten(out: Any) -> tuple[list[torch.Tensor], type | None]:
    """A component output as a list of tensors plus the container type (None for a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, tuple | list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out), type(out)
    raise TypeError(
        f"videocache can cache tensors or tuples of tensors; this component returned {type(out).__name__}"
    )


def _rebuild(parts: Sequence[torch.Tensor], container: type | None) -> Any:
    return parts[0] if container is None else container(parts)


class _Entry:
    """One kept component output: the step it was computed at and the last step that reads it."""

    __slots__ = ("step", "parts", "container", "nbytes", "last_use", "devices", "dtypes", "flops", "converted")

    def __init__(
        self,
        step: int,
        parts: list[torch.Tensor],
        container: type | None,
        last_use: int,
        devices: list[torch.device],
        dtypes: list[torch.dtype],
    ) -> None:
        self.step = step
        self.parts = parts
        self.container = container
        self.nbytes = sum(p.numel() * p.element_size() for p in parts)
        self.last_use = last_use
        self.devices = devices
        self.dtypes = dtypes
        self.flops = 0.0  # FLOPs of the call that produced it (what a reuse of it saves)
        # kept in another dtype or on another device than it was produced in (cache_dtype, offload_to_cpu)
        self.converted = any(
            p.device != d or p.dtype != t for p, d, t in zip(parts, devices, dtypes, strict=True)
        )

    def restored(self) -> list[torch.Tensor]:
        if not self.converted:
            return self.parts
        return [
            p.to(device=d, dtype=t) for p, d, t in zip(self.parts, self.devices, self.dtypes, strict=True)
        ]


class _StepSum:
    """One compute step's component outputs summed over the blocks, for steps that skip every cell alike.

    With every component skipped, a block adds sum_c o_c * gate_c to the residual stream, and each gate is
    the block's own part plus a part shared by all blocks that changes with the step
    (`adapter.residual_gates`). So the whole stack adds `base + sum_i shared_i(step) * gated[i]`, with
    base = sum_(b,c) o * own and gated[i] = sum of the outputs gated by shared part i, kept once per compute
    step (in float32) instead of touching every block.
    """

    __slots__ = ("base", "gated", "flops", "cells", "nbytes")

    def __init__(self) -> None:
        self.base: torch.Tensor | None = None
        self.gated: dict[int, torch.Tensor] = {}
        self.flops = [0.0] * _NC  # per component, summed over blocks: what one skip of the stack saves
        self.cells = 0
        self.nbytes = 0

    def terms(self) -> list[torch.Tensor]:
        return [self.base, *self.gated.values()]


def _newton_extrapolate(xs: Sequence[int], fs: Sequence[torch.Tensor], x: int) -> torch.Tensor:
    """Value at `x` of the polynomial through (xs[i], fs[i]) (Newton divided differences, float32).

    With two points this is the linear extrapolation f1 + (f1 - f0) (x - x1) / (x1 - x0); with k+1 points it
    is the order-k finite-difference Taylor forecast, valid for uneven step spacing too.
    """
    coeffs = [f.float() for f in fs]
    n = len(xs)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coeffs[i] = (coeffs[i] - coeffs[i - 1]) / float(xs[i] - xs[i - j])
    result = coeffs[n - 1]
    for i in range(n - 2, -1, -1):
        result = coeffs[i] + result * float(x - xs[i])
    return result.to(fs[0].dtype)


def _served(
    action: int, steps: Sequence[int], kept: Sequence[list[torch.Tensor]], step: int, scale: float
) -> list[torch.Tensor]:
    """What a skipped cell (or a whole uniform skip step) returns at `step` from the values kept at `steps`
    (one list of tensors per kept step): the last ones times the reuse factor, or their forecast."""
    if action == _REUSE:
        return kept[-1] if scale == 1.0 else [t * scale for t in kept[-1]]
    if len(steps) == 2:  # order 1, the common case: one fused lerp instead of Newton's steps
        weight = 1.0 + (step - steps[1]) / (steps[1] - steps[0])
        return [torch.lerp(a, b, weight) for a, b in zip(kept[0], kept[1], strict=True)]
    return [_newton_extrapolate(steps, [k[i] for k in kept], step) for i in range(len(kept[0]))]


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


# -- per-context state -------------------------------------------------------------------------------
class _ContextState(BaseState):
    """Where one cache context is in its run, and the component outputs it keeps."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine
        self.entries: dict[int, list[_Entry]] = {}
        self.step: int | None = None
        self.sigma: float | None = None
        self.table: CacheTable | None = None
        self.call_index = -1
        # block runs: kept delta per run, h_in of a run being computed, what each run does this step, and
        # the FLOPs of each (block, component) of a run as last executed (what a skip saves)
        self.run_deltas: dict[int, _Entry] = {}
        self.run_inputs: dict[int, torch.Tensor] = {}
        self.run_doing: dict[int, Action] = {}
        self.block_flops: dict[int, list[float | None]] = {}
        self.memo: dict[str, tuple[tuple, Any]] = {}  # constant modules' last (key, output)
        self.sums: dict[int, _StepSum | None] = {}  # per compute step read by uniform skips; None: refused
        self.stack_skipped = False  # block 0 skipped the whole stack in this call

    def reset(self, *args, **kwargs) -> None:
        for kept in self.entries.values():
            for e in kept:
                self.engine._release(e)
        self.entries.clear()
        for e in self.run_deltas.values():
            self.engine._release(e)
        self.run_deltas.clear()
        for sums in self.sums.values():
            if sums is not None:
                self.engine._release_sum(sums)
        self.sums.clear()
        self.run_inputs.clear()
        self.run_doing.clear()
        self.block_flops.clear()
        self.memo.clear()
        self.step = None
        self.sigma = None
        self.table = None


class _EngineStateManager(StateManager):
    """A StateManager that treats a call with no cache context as the single context "default"."""

    @property
    def context(self) -> CacheContext:
        return self._context if self._context is not None else _DEFAULT_CONTEXT


# -- hooks -------------------------------------------------------------------------------------------
class _TransformerHook(ModelHook):
    _is_stateful = True

    def __init__(self, engine: CacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self.state_manager = _EngineStateManager(_ContextState, (engine,))

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine._run_transformer(self, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class _ComponentHook(ModelHook):
    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: CacheEngine, block: int, comp: int) -> None:
        super().__init__()
        self.engine = engine
        self.block = block
        self.comp = comp
        self.flops_key: tuple | None = None  # input shapes of the memoised FLOP count
        self.flops = 0.0

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine._run_component(self, module, args, kwargs)


class _BlockHook(ModelHook):
    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: CacheEngine, block: int) -> None:
        super().__init__()
        self.engine = engine
        self.block = block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.engine._run_block(self, args, kwargs)


class _MemoHook(ModelHook):
    """Answers a module whose output is a pure function of its first input, given by identity ("tensor":
    the same tensor object, not modified in place since) or by shape ("shape"), from the last call in the
    same cache context. Exact: the module's own earlier output is returned."""

    _is_stateful = False  # its state is the transformer hook's, per context

    def __init__(self, engine: CacheEngine, name: str, mode: str) -> None:
        super().__init__()
        if mode not in ("tensor", "shape"):
            raise ValueError(f"constant module {name!r}: mode must be 'tensor' or 'shape', not {mode!r}")
        self.engine = engine
        self.name = name
        self.mode = mode

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


# -- table sources -----------------------------------------------------------------------------------
class _TableSource:
    """Gives the table for a run of `num_steps` steps with these sigmas (a preset, or one fixed table)."""

    def __init__(self, source: CacheTable | Any, num_blocks: int) -> None:
        self.fixed = source if isinstance(source, CacheTable) else None
        self.preset = None if self.fixed is not None else source
        self.num_blocks = num_blocks
        self._built: dict[tuple, CacheTable] = {}

    @property
    def has_block_runs(self) -> bool:
        """Whether any table from this source can have block runs (block hooks are attached only then)."""
        if self.fixed is not None:
            return bool(self.fixed.block_runs)
        return getattr(self.preset, "block_runs", None) is not None

    def __call__(self, num_steps: int, sigmas: Sequence[float] | None) -> CacheTable:
        if self.fixed is not None:
            if num_steps != self.fixed.num_steps:
                raise ValueError(
                    f"the cache table was made for {self.fixed.num_steps} steps; this run has {num_steps}: "
                    f"run {self.fixed.num_steps} steps or apply a table for {num_steps}"
                )
            return self.fixed
        if sigmas is None or len(sigmas) != num_steps:
            raise ValueError(
                "videocache needs the scheduler's sigmas to expand a profile preset: apply it to a pipeline "
                "with a scheduler, or pass the scheduler to apply_to_transformer"
            )
        key = (num_steps, tuple(round(float(s), 6) for s in sigmas))
        table = self._built.get(key)
        if table is None:
            if len(self._built) >= 8:
                self._built.clear()
            table = self._built[key] = build_table(self.preset, sigmas, self.num_blocks)
        return table


# -- the engine --------------------------------------------------------------------------------------
class CacheEngine:
    """Executes cache tables on one transformer; see the module docstring. Create it with
    `videocache.apply` / `videocache.apply_to_transformer`."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        adapter: ModelAdapter,
        source: CacheTable | Any,
        scheduler: Callable[[], Any] | Any = None,
        config: EngineConfig | None = None,
        *,
        profile: Any = None,
        preset: str | None = None,
    ) -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.config = config or EngineConfig()
        self.profile = profile
        self.preset = preset
        self._scheduler = scheduler if callable(scheduler) else (lambda: scheduler)
        self._blocks = list(adapter.blocks(transformer))
        self._components: list[dict[str, torch.nn.Module]] = []
        for i, block in enumerate(self._blocks):
            comps = adapter.component_modules(block)
            bad = [c for c in comps if c not in COMPONENTS]
            if bad:
                raise ValueError(
                    f"adapter gave unknown component {bad[0]!r} for block {i}; valid: {COMPONENTS}"
                )
            self._components.append(comps)
        if isinstance(source, CacheTable) and source.num_blocks != len(self._blocks):
            raise ValueError(
                f"the cache table has {source.num_blocks} blocks; this {type(transformer).__name__} has {len(self._blocks)}"
            )
        self._tables = _TableSource(source, len(self._blocks))
        self._fuse = self.config.fuse_skipped_steps and hasattr(adapter, "residual_gates")
        self.table: CacheTable | None = source if isinstance(source, CacheTable) else None
        self._active: _ContextState | None = None
        self._bytes = 0
        self._peak = 0
        self._context_names: list[str] = []
        self._context_ids: dict[str, int] = {}
        self._warned_fallback = False
        self._warned_sigma = False
        self._created_registries: list[torch.nn.Module] = []
        self.reset_stats()
        self._hook: _TransformerHook | None = None
        self._attach()

    # -- attach / detach -----------------------------------------------------------------------
    def _registry(self, module: torch.nn.Module) -> HookRegistry:
        if not hasattr(module, "_diffusers_hook"):
            self._created_registries.append(module)
        return HookRegistry.check_if_exists_or_initialize(module)

    def _attach(self) -> None:
        root = self._registry(self.transformer)
        if root.get_hook(TRANSFORMER_HOOK) is not None:
            raise RuntimeError(
                "videocache is already applied to this transformer; call videocache.remove first"
            )
        self._hook = _TransformerHook(self)
        root.register_hook(self._hook, TRANSFORMER_HOOK)
        try:
            self._component_hooks: list[dict[int, tuple[_ComponentHook, torch.nn.Module]]] = []
            for b, comps in enumerate(self._components):
                hooks = {}
                for name, module in comps.items():
                    hook = _ComponentHook(self, b, COMPONENTS.index(name))
                    self._registry(module).register_hook(hook, COMPONENT_HOOK)
                    hooks[hook.comp] = (hook, module)
                self._component_hooks.append(hooks)
            constant = getattr(self.adapter, "constant_modules", None)
            self._memo_modules = list((constant(self.transformer) if constant else {}).items())
            for name, (module, mode) in self._memo_modules:
                self._registry(module).register_hook(_MemoHook(self, name, mode), MEMO_HOOK)
            if self._tables.has_block_runs or hasattr(self.adapter, "lean_block_forward"):
                for b, block in enumerate(self._blocks):
                    self._registry(block).register_hook(_BlockHook(self, b), BLOCK_HOOK)
        except Exception:
            self.remove()  # never leave a half-attached engine behind
            raise
        root.invalidate_child_registries_cache()  # so cache_context reaches the new hooks

    @property
    def preset_name(self) -> str | None:
        """Name of the profile preset in use (None for a table applied directly)."""
        return self.preset

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def remove(self) -> None:
        """Detach every hook and free every kept tensor; forwards are restored exactly."""
        if self._hook is None:
            return
        self._hook.state_manager.reset()
        root = HookRegistry.check_if_exists_or_initialize(self.transformer)
        root.remove_hook(TRANSFORMER_HOOK, recurse=False)
        for comps in self._components:
            for module in comps.values():
                if hasattr(module, "_diffusers_hook"):
                    module._diffusers_hook.remove_hook(COMPONENT_HOOK, recurse=False)
        for block in self._blocks:
            reg = getattr(block, "_diffusers_hook", None)
            if reg is not None and BLOCK_HOOK in reg.hooks:
                reg.remove_hook(BLOCK_HOOK, recurse=False)
        for _, (module, _) in getattr(self, "_memo_modules", ()):
            reg = getattr(module, "_diffusers_hook", None)
            if reg is not None and MEMO_HOOK in reg.hooks:
                reg.remove_hook(MEMO_HOOK, recurse=False)
        for module in self._created_registries:
            drop_empty_registry(module)
        self._created_registries.clear()
        if hasattr(self.transformer, "_diffusers_hook"):
            self.transformer._diffusers_hook.invalidate_child_registries_cache()
        self._hook = None
        self._active = None

    # -- the transformer call ------------------------------------------------------------------
    def _context_id(self, name: str) -> int:
        cid = self._context_ids.get(name)
        if cid is None:
            cid = self._context_ids[name] = len(self._context_names)
            self._context_names.append(name)
        return cid

    def _step_from_timestep(self, scheduler: Any, timestep: Any) -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or timestep is None or len(timesteps) == 0:
            return None
        t = (
            float(torch.as_tensor(timestep).detach().float().max())
            if not isinstance(timestep, int | float)
            else float(timestep)
        )
        ts = torch.as_tensor(timesteps).detach().float().cpu()
        idx = int((ts - t).abs().argmin())
        return idx if abs(float(ts[idx]) - t) <= 1e-3 * max(1.0, abs(t)) else None

    def _locate(
        self, ctx: CacheContext, state: _ContextState, timestep: Any
    ) -> tuple[int, int, float | None]:
        """(step, num_steps, sigma) of this call: from the cache context, else from the scheduler, else by
        counting the calls of this context."""
        scheduler = self._scheduler()
        num = ctx.num_inference_steps
        if num is None:
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is not None and len(timesteps) > 0:
                num = len(timesteps)
            elif self._tables.fixed is not None:
                num = self._tables.fixed.num_steps
        step = ctx.step_index
        if step is None:
            step = self._step_from_timestep(scheduler, timestep)
        if step is None:  # nothing to go by: count the calls of this context
            step = 0 if state.step is None else state.step + 1
            if num is not None and step >= num:
                step = 0
        if num is None:
            raise ValueError(
                "videocache cannot tell how many steps this run has: call the transformer inside "
                "transformer.cache_context(name, step_index=i, num_inference_steps=N, sigma=s), or give it a scheduler"
            )
        if not 0 <= step < num:
            raise ValueError(f"step {step} is outside this run of {num} steps")
        sigma = ctx.sigma
        if sigma is None:
            sigmas = getattr(scheduler, "sigmas", None)
            if sigmas is not None and len(sigmas) > step:
                sigma = float(sigmas[step])
        return int(step), int(num), (None if sigma is None else float(sigma))

    def _run_transformer(self, hook: _TransformerHook, args: tuple, kwargs: dict) -> Any:
        manager = hook.state_manager
        ctx = manager.context
        state: _ContextState = manager.get_state()
        x_t, timestep = self.adapter.denoiser_inputs(args, kwargs)
        step, num, sigma = self._locate(ctx, state, timestep)
        if state.step is not None and step < state.step:  # a new generation began in this context
            state.reset()
        if state.table is None or state.table.num_steps != num:
            state.reset()
            sigmas = None
            if self._tables.preset is not None:
                sigmas = self.adapter.scheduler_sigmas(self._scheduler(), num)
            state.table = self._tables(num, sigmas)
            self.table = state.table
        state.step, state.sigma = step, sigma
        if self.config.trace:
            self._call_log.append((self._context_id(ctx.name), step, sigma))
            state.call_index = len(self._call_log) - 1
        previous, self._active = self._active, state
        try:
            out = hook.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._active = previous
        self._counts["transformer"] += 1
        eb = self.config.exposure_bias
        if eb.enabled:
            out = self._correct_exposure_bias(out, x_t, sigma)
        return out

    def _correct_exposure_bias(self, out: Any, x_t: torch.Tensor, sigma: float | None) -> Any:
        if sigma is None:
            if not self._warned_sigma:
                warnings.warn(
                    "videocache: no sigma for this call; exposure-bias correction skipped", stacklevel=3
                )
                self._warned_sigma = True
            return out
        b = self.config.exposure_bias.factor(sigma)

        def fix(v: torch.Tensor) -> torch.Tensor:
            return correct_velocity(v, x_t, sigma, b)

        if isinstance(out, torch.Tensor):
            return fix(out)
        if isinstance(out, tuple):
            return (fix(out[0]), *out[1:])
        if hasattr(out, "sample"):
            out.sample = fix(out.sample)
            return out
        raise TypeError(f"cannot apply the exposure-bias correction to a {type(out).__name__} output")

    # -- a component call ----------------------------------------------------------------------
    def _decide(self, state: _ContextState, step: int, block: int, comp: int) -> int:
        """The action for this cell. Table-only today, hence identical on every sequence-parallel rank; any
        data-dependent rule must be agreed across ranks (e.g. all_reduce of the criterion) right here."""
        return state.table.cells[step][block][comp][0]

    def _flops(self, hook: _ComponentHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        """FLOPs of this component call; depends on input shapes only, so memoised per shape."""
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args[:2])
        if shapes != hook.flops_key:
            hook.flops_key = shapes
            hook.flops = float(self.adapter.component_flops(COMPONENTS[hook.comp], module, args, kwargs))
        return hook.flops

    def _run_component(self, hook: _ComponentHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        state = self._active
        if state is None or state.table is None:  # called outside a tracked transformer call
            return hook.fn_ref.original_forward(*args, **kwargs)
        out = self._serve(state, hook.block, hook.comp)
        if out is None:
            out = self._compute(state, hook, module, args, kwargs)
        return out

    def _serve(self, state: _ContextState, block: int, comp: int) -> Any | None:
        """The output of a cell the table reuses or forecasts, from what is kept; None when the cell must be
        computed (its action is COMPUTE, or what it reads was not kept: a fallback, counted)."""
        step = state.step
        action = self._decide(state, step, block, comp)
        if action == _COMPUTE:
            return None
        _, deps, _, scale = state.table.cells[step][block][comp]
        kept = state.entries.get(block * _NC + comp, ())
        found = [e for e in kept if e.step in deps]
        if len(found) != len(deps) or not deps:
            self._fallback(step, block, comp)
            return None
        last = found[-1]
        parts = _served(action, [e.step for e in found], [e.restored() for e in found], step, scale)
        self._account(state, block, comp, action, last.flops)
        return _rebuild(parts, last.container)

    def _compute(
        self, state: _ContextState, hook: _ComponentHook, module: torch.nn.Module, args: tuple, kwargs: dict
    ) -> Any:
        flops = self._flops(hook, module, args, kwargs)
        out = hook.fn_ref.original_forward(*args, **kwargs)
        if self.config.observer is not None:
            self.config.observer(self._hook.state_manager.context.name, state.step, hook.block, COMPONENTS[hook.comp], out)
        entry = self._keep(state, hook.block * _NC + hook.comp, state.step, hook.block, hook.comp, out)
        if entry is not None:
            entry.flops = flops
        if self._fuse and state.step in state.table.sum_last_use:
            self._add_to_sum(state, hook.block, hook.comp, out, flops)
        self._account(state, hook.block, hook.comp, _COMPUTE, flops)
        return out

    def _add_to_sum(self, state: _ContextState, block: int, comp: int, out: Any, flops: float) -> None:
        step = state.step
        sums = state.sums.get(step, _NEW)
        if sums is None:  # refused by the byte budget or not a tensor: those skips go block by block
            return
        if sums is _NEW:
            sums = state.sums[step] = _StepSum()
        if not isinstance(out, torch.Tensor):
            self._drop_sum(state, step)
            return
        own, shared = self.adapter.residual_gates(self._blocks[block])[comp]
        o = out.detach().float()
        term = o if own is None else o * own
        grown = []
        if sums.base is None:
            sums.base = term if term is not o else o.clone()
            grown.append(sums.base)
        else:
            sums.base += term
        if shared is not None:
            kept = sums.gated.get(shared)
            if kept is None:
                kept = sums.gated[shared] = o.clone()
                grown.append(kept)
            else:
                kept += o
        nbytes = sum(t.numel() * t.element_size() for t in grown)
        if self.config.max_cache_bytes is not None and self._bytes + nbytes > self.config.max_cache_bytes:
            self._refused += 1
            self._drop_sum(state, step)
            return
        sums.nbytes += nbytes
        self._bytes += nbytes
        self._peak = max(self._peak, self._bytes)
        sums.flops[comp] += flops
        sums.cells += 1

    def _drop_sum(self, state: _ContextState, step: int) -> None:
        sums = state.sums.get(step)
        if sums is not None:
            self._release_sum(sums)
        state.sums[step] = None

    def _release_sum(self, sums: _StepSum) -> None:
        self._bytes -= sums.nbytes
        sums.nbytes, sums.base, sums.gated = 0, None, {}

    def _skip_stack(self, state: _ContextState, args: tuple, kwargs: dict) -> Any | None:
        """Block 0 of a uniform skip step: the output of the whole block stack from the step sums, or None
        (nothing complete kept: the blocks then skip one by one from their own kept outputs)."""
        step = state.step
        action, deps, scale = state.table.uniform_skips[step]
        found = [state.sums.get(d) for d in deps]
        cells = len(self._blocks) * _NC
        if any(f is None or f.cells != cells for f in found):
            return None
        last = found[-1]
        terms = _served(action, deps, [f.terms() for f in found], step, scale)
        hidden, gates = self.adapter.shared_gates(args, kwargs, list(last.gated))
        out = hidden.float() + terms[0]
        for gate, gated in zip(gates, terms[1:], strict=True):
            out = out.addcmul_(gate, gated)
        # the accounting of every cell of the step, and what this step was the last reader of
        self._counts[_COUNT_KEYS[action]] += cells
        for c in range(_NC):
            self._skipped[c] += last.flops[c]
        if self.config.trace:
            self._trace.extend((state.call_index, b, c, action) for b in range(len(self._blocks)) for c in range(_NC))
        for kept in state.entries.values():
            self._release_expired(kept, step)
        for d in deps:
            if state.table.sum_last_use[d] <= step:
                self._release_sum(state.sums.pop(d))
        return out.type_as(hidden)

    def _account(self, state: _ContextState, block: int, comp: int, done: int, flops: float) -> None:
        """Count what this cell executed, and free kept outputs of the cell that nothing reads any more."""
        step = state.step
        if done == _COMPUTE:
            self._executed[comp] += flops
        else:
            self._skipped[comp] += flops
        if state.table.block_runs and state.table.run_of(block) is not None:
            state.block_flops.setdefault(block, [None] * _NC)[comp] = flops
        self._counts[_COUNT_KEYS[done]] += 1
        kept = state.entries.get(block * _NC + comp)
        if kept:
            self._release_expired(kept, step)
        if self.config.trace:
            self._trace.append((state.call_index, block, comp, done))

    # -- a block call ---------------------------------------------------------------------------
    def _run_block(self, hook: _BlockHook, args: tuple, kwargs: dict) -> Any:
        state = self._active
        table = None if state is None else state.table
        if table is None:  # outside a tracked call
            return hook.fn_ref.original_forward(*args, **kwargs)
        if self._fuse and state.step in table.uniform_skips:
            if hook.block == 0:
                out = self._skip_stack(state, args, kwargs)
                state.stack_skipped = out is not None
                if out is not None:
                    return out
            elif state.stack_skipped:
                return args[0] if args else kwargs["hidden_states"]
        run = table.run_of(hook.block)
        if run is None:
            return self._block_forward(hook, state, args, kwargs)
        step, block = state.step, hook.block
        first, last = table.block_runs[run]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if block == first:
            action = table.run_action(step, run)
            kept = state.run_deltas.get(run)
            if kept is not None and kept.last_use < step:  # left over from a reuse that fell back
                self._release(state.run_deltas.pop(run))
                kept = None
            if action == Action.REUSE and (kept is None or kept.step != table.run_dependency(step, run)):
                action = Action.COMPUTE
                self._fallback(step, block, None)
            state.run_doing[run] = action
            if action == Action.COMPUTE:
                self._runs["compute"] += 1
                if table.run_last_use(step, run) is not None:
                    state.run_inputs[run] = hidden
            else:
                self._runs["reuse"] += 1
        if state.run_doing.get(run) == Action.REUSE:
            self._skip_block(state, block)
            if block != first:
                return hidden
            delta = state.run_deltas[run]
            out = (hidden.float() + delta.restored()[0].float()).to(hidden.dtype)
            if delta.last_use <= step:
                self._release(state.run_deltas.pop(run))
            return out
        out = self._block_forward(hook, state, args, kwargs)
        if block == last and run in state.run_inputs:
            if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
                raise TypeError(
                    f"block runs need blocks that return the hidden states tensor; block {block} returned "
                    f"{type(out).__name__}"
                )
            h_in = state.run_inputs.pop(run)
            delta = (out.float() - h_in.float()).to(out.dtype)
            self._keep_delta(state, run, step, delta)
        return out

    def _block_forward(self, hook: _BlockHook, state: _ContextState, args: tuple, kwargs: dict) -> Any:
        """The block's own forward when it computes every component this step (so a compute-everything
        table stays bit-exact); otherwise the adapter's lean forward, which prepares a component's input
        (norm, modulation) only when that component is computed."""
        lean = getattr(self.adapter, "lean_block_forward", None)
        if lean is None or not state.table.partial_blocks[state.step, hook.block]:
            return hook.fn_ref.original_forward(*args, **kwargs)
        block = hook.block
        hooks = self._component_hooks[block]

        def component(name: str, make_args: Callable[[], tuple]) -> Any:
            comp = COMPONENTS.index(name)
            out = self._serve(state, block, comp)
            if out is None:
                chook, module = hooks[comp]
                out = self._compute(state, chook, module, make_args(), {})
            return out

        return lean(self._blocks[block], args, kwargs, component)

    def _skip_block(self, state: _ContextState, block: int) -> None:
        """Account a block a run reuse skips: its components' FLOPs (as last executed) count as skipped."""
        flops = state.block_flops.get(block, [None] * _NC)
        for comp in range(_NC):
            if flops[comp] is not None:
                self._skipped[comp] += flops[comp]
            if self.config.trace:
                self._trace.append((state.call_index, block, comp, _SKIPPED))
        self._runs["skipped_blocks"] += 1

    def _keep_delta(self, state: _ContextState, run: int, step: int, delta: torch.Tensor) -> None:
        old = state.run_deltas.pop(run, None)
        if old is not None:
            self._release(old)
        last = state.table.run_last_use(step, run)
        if last is None:
            return
        entry = self._stored_entry(step, [delta], None, last)
        if entry is not None:
            state.run_deltas[run] = entry

    def _keep(
        self, state: _ContextState, key: int, step: int, block: int, comp: int, out: Any
    ) -> _Entry | None:
        # last_use is not None exactly when table.next_use_after(step, ...) is: keep only what is read later
        # (uniform skip steps read the step sums instead, when the engine fuses them)
        table = state.table
        last = table.cell_last_use[step][block][comp] if self._fuse else table.cells[step][block][comp][2]
        if last is None:
            return None
        parts, container = _flatten(out)
        entry = self._stored_entry(step, parts, container, last)
        if entry is not None:
            state.entries.setdefault(key, []).append(entry)
        return entry

    def _stored_entry(
        self, step: int, parts: list[torch.Tensor], container: type | None, last: int
    ) -> _Entry | None:
        """Kept copies of `parts` as the config says (dtype, offload), counted against the byte budget; None
        when the budget refuses them."""
        devices = [p.device for p in parts]
        dtypes = [p.dtype for p in parts]
        cfg = self.config
        stored = []
        for p in parts:
            p = p.detach()
            if cfg.offload_to_cpu or cfg.cache_dtype is not None:
                p = p.to(
                    device="cpu" if cfg.offload_to_cpu else p.device,
                    dtype=cfg.cache_dtype or p.dtype,
                    copy=True,
                )
            stored.append(p)
        entry = _Entry(step, stored, container, last, devices, dtypes)
        if cfg.max_cache_bytes is not None and self._bytes + entry.nbytes > cfg.max_cache_bytes:
            self._refused += 1
            return None
        self._bytes += entry.nbytes
        self._peak = max(self._peak, self._bytes)
        return entry

    def _release_expired(self, kept: list[_Entry], step: int) -> None:
        """Free the kept outputs of one cell that no step after `step` reads. They are in step order and so
        are their last uses: the expired ones are at the front."""
        while kept and kept[0].last_use <= step:
            self._release(kept.pop(0))

    def _release(self, entry: _Entry) -> None:
        self._bytes -= entry.nbytes
        entry.parts = []

    def _fallback(self, step: int, block: int, comp: int | None) -> None:
        """A reuse with nothing kept (comp None: a block run starting at `block`) computes instead."""
        self._fallbacks += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            what = "its block run" if comp is None else COMPONENTS[comp]
            warnings.warn(
                f"videocache: nothing kept to reuse at step {step}, block {block} {what} "
                f"(max_cache_bytes={self.config.max_cache_bytes}); computing it instead. Further fallbacks "
                "are counted in engine.stats()['fallbacks'].",
                stacklevel=4,
            )

    # -- measurements --------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the FLOP counters, call counts and trace; peak bytes restart from the current bytes."""
        self._executed = [0.0] * _NC
        self._skipped = [0.0] * _NC
        self._counts = {"transformer": 0, "compute": 0, "reuse": 0, "forecast": 0}
        self._runs = {"compute": 0, "reuse": 0, "skipped_blocks": 0}
        self._fallbacks = 0
        self._refused = 0
        self._call_log: list[tuple[int, int, float | None]] = []
        self._trace: list[tuple[int, int, int, int]] = []
        self._peak = self._bytes

    def stats(self) -> dict[str, Any]:
        """What actually executed since the last reset_stats: FLOP-weighted computed fraction of block
        components (overall and per component), kept-tensor bytes, call counts, block-run executions
        (computed / reused runs, skipped blocks) and fallbacks."""
        ex, sk = sum(self._executed), sum(self._skipped)
        by_comp = {
            c: (
                self._executed[i] / (self._executed[i] + self._skipped[i])
                if self._executed[i] + self._skipped[i]
                else None
            )
            for i, c in enumerate(COMPONENTS)
        }
        return {
            "computed_fraction": ex / (ex + sk) if ex + sk else None,
            "computed_fraction_by_component": by_comp,
            "executed_flops": ex,
            "skipped_flops": sk,
            "cache_peak_bytes": self._peak,
            "cache_current_bytes": self._bytes,
            "calls": dict(self._counts),
            "block_runs": dict(self._runs),
            "fallbacks": self._fallbacks,
            "refused_stores": self._refused,
        }

    def component_flops(self) -> np.ndarray:
        """(blocks, components) FLOPs of each component's last computed call (0 where none ran yet)."""
        return np.array([[self._component_hooks[b][c][0].flops if c in self._component_hooks[b] else 0.0
                          for c in range(_NC)] for b in range(len(self._blocks))])

    def trace(self) -> list[dict[str, Any]]:
        """One record per component call: {context, step, sigma, block, component, action} where action is the
        letter of what executed (C/R/F; a reuse that fell back to compute reads C; D: the component's block
        was skipped by a block-run reuse)."""
        out = []
        for call, block, comp, code in self._trace:
            cid, step, sigma = self._call_log[call]
            out.append(
                {
                    "context": self._context_names[cid],
                    "step": step,
                    "sigma": sigma,
                    "block": block,
                    "component": COMPONENTS[comp],
                    "action": _TRACE_LETTERS[code],
                }
            )
        return out

    def __repr__(self) -> str:
        src = (
            f"profile={getattr(self.profile, 'name', None)!r}, preset={self.preset!r}"
            if self.profile
            else "table"
        )
        return f"CacheEngine({type(self.transformer).__name__}, {src}, attached={self.attached})"
