"""The cache engine: executes a cache table on a transformer through diffusers' hook registry.

Hooks are attached to module *instances* (no class patching), so `remove()` restores the exact original
forwards and the output becomes bit-identical to a model that never had the engine:

* one hook on the transformer (`hooks.TransformerHook`) that works out the step of each call (from the
  pipeline's `cache_context`, else from the scheduler), picks the table for the run, and applies the
  optional exposure-bias correction to the output.
* one hook on every block when the adapter has `block_compute` (Wan): per call the engine reads the
  block's cells, serves the reused / forecast components from what it keeps (`store.CacheStore`), and
  runs `adapter.block_compute(block, args, kwargs, served)`, a pure tensor function that computes only
  the components not served and applies the *current* step's gates to every component output, so the
  cache sits exactly before the gated residual add. Adapters without it get one hook per component
  module instead, which answers the module call.
* a step whose cells are all skipped alike skips the whole block stack at once (`stack_skip`): block 0
  returns the stack's output and the other blocks return their input.
* block runs (ProfilingDiT's background blocks): on a run's compute step the first block remembers h_in
  and the last keeps delta = h_out - h_in; on its reuse step the first block returns h_in + delta and
  the other blocks of the run return their input.

torch.compile: the hooks' Python never enters a compiled region. Every engine entry point is
`@torch.compiler.disable`; when the blocks were compiled (`transformer.compile_repeated_blocks()`, before
or after `apply`) or the whole transformer is (`torch.compile(transformer)`), the engine takes the
compilation over: the blocks' own compiled call is set aside (and given back by `remove`) and
`adapter.block_compute` is compiled once instead. It is a function of tensors whose only Python inputs
are which components are served, so all blocks share its graphs (one per served pattern: at most
2^components) and a generation after warm-up compiles nothing.

State lives per cache context ("cond", "uncond", ... or "default" for a direct call) in a diffusers
`StateManager`, so the two CFG branches never read each other's tensors. The pipeline's
`_reset_stateful_cache()` frees everything at the end of a call; a context whose step index goes
backwards starts a new generation and is reset too.

Without the guard, nothing on the per-call path synchronises with the device: steps, sigmas and decisions are host values
from the table and the scheduler, FLOPs are memoised per input shape, and kept outputs are tensors.

Sequence parallelism: every rank holds its own shard of the tokens, so the tensors kept here are
per-rank shards and must never be gathered. Table decisions depend only on (table, step), which all
ranks share, so they agree without communication. The one data-dependent decision, whether the byte
budget has room (shards of uneven size hold different byte counts), is agreed by the ranks that share
the tokens through the transformer's `parallel_plan.AGREE_ATTR` (set under sequence parallelism; a CPU
all_reduce, only when a budget is set). The run-time guard (`videocache.guard`, off unless asked) rewrites
the table from a step on, from one signal the ranks all-reduce; with it, the per-call path reads the device
once per step. `CacheEngine._decide` is where any future data-dependent cell decision must be agreed the same
way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry

from .adapters import ModelAdapter
from .exposure_bias import ExposureBiasConfig, correct_velocity
from .forecast import served
from .guard import GuardConfig, TableGuard
from .hooks import (
    BLOCK_HOOK,
    COMPONENT_HOOK,
    MEMO_HOOK,
    TRANSFORMER_HOOK,
    BlockHook,
    ComponentHook,
    ContextState,
    MemoHook,
    TransformerHook,
    drop_empty_registry,
)
from .parallel_plan import AGREE_ATTR
from .stack_skip import StepSum, stack_output
from .stats import EngineStats
from .store import CacheStore, Kept, flatten, rebuild
from .table import _COMPUTE, _REUSE, BlockLayout, CacheTable
from .table_source import TableSource

__all__ = [
    "BLOCK_HOOK", "COMPONENT_HOOK", "MEMO_HOOK", "TRANSFORMER_HOOK", "CacheEngine", "EngineConfig",
    "drop_empty_registry",
]

_NEW = object()  # no step sum started yet


@dataclass(frozen=True)
class EngineConfig:
    """Storage and correction options.

    `max_cache_bytes` bounds the kept bytes on the model's device and `max_host_cache_bytes` those
    offloaded to the host, over all contexts. `cache_dtype` stores kept outputs in another precision
    (`torch.bfloat16`, `torch.float8_e4m3fn` with a per-token scale, `torch.int8` with a scale per 64
    channels; see `videocache.store`); `offload_to_cpu` keeps them in
    pinned host memory (only what does not fit `max_cache_bytes`, when that is set) and prefetches them on
    a side stream. Both are restored to the module's dtype and device on use. `compile_options` are
    passed to `torch.compile` when the engine compiles the block compute (see the module docstring)."""

    max_cache_bytes: int | None = None
    max_host_cache_bytes: int | None = None
    cache_dtype: torch.dtype | None = None
    offload_to_cpu: bool = False
    exposure_bias: ExposureBiasConfig = field(default_factory=ExposureBiasConfig)
    trace: bool = True
    # a step whose cells are all skipped alike skips the whole block stack at once (adapters with
    # `residual_gates`); same values as skipping block by block, up to float summation order
    fuse_skipped_steps: bool = True
    # called as observer(context, step, block, component, output) after every computed component (calibration)
    observer: Callable[[str, int, int, str, Any], None] | None = None
    compile_options: dict[str, Any] | None = None
    # the run-time guard on the table (videocache.guard); with it, uniform skip steps go block by block (the
    # guard rewrites which steps are uniform)
    guard: GuardConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_cache_bytes", "max_host_cache_bytes"):
            m = getattr(self, name)
            if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None; got {m!r}")
        if self.cache_dtype is not None and not (
            isinstance(self.cache_dtype, torch.dtype) and (self.cache_dtype.is_floating_point or self.cache_dtype == torch.int8)
        ):
            raise ValueError(
                "cache_dtype must be a floating torch.dtype (e.g. torch.bfloat16, torch.float8_e4m3fn) or "
                f"torch.int8 (with per-group scales); got {self.cache_dtype!r}"
            )
        for name in ("fuse_skipped_steps", "offload_to_cpu", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not isinstance(self.exposure_bias, ExposureBiasConfig):
            raise ValueError("exposure_bias must be an ExposureBiasConfig")
        if self.guard is not None and not isinstance(self.guard, GuardConfig):
            raise ValueError("guard must be a GuardConfig or None")
        if self.compile_options is not None and not isinstance(self.compile_options, dict):
            raise ValueError(f"compile_options must be a dict of torch.compile arguments; got {self.compile_options!r}")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


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
        guidance_scale: Callable[[], float | None] | None = None,
        steps_run: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.config = config or EngineConfig()
        self.profile = profile
        self.preset = preset
        self._scheduler = scheduler if callable(scheduler) else (lambda: scheduler)
        self._guidance_scale = guidance_scale or (lambda: None)  # the run's, for presets calibrated at several
        # one expert of several: the (start, stop) steps it runs of a run of N, and the engines of the experts
        # that run before it (freed when it starts; videocache.experts)
        self._steps_run = steps_run
        self.follows: tuple[CacheEngine, ...] = ()
        self._blocks = list(adapter.blocks(transformer))
        self.layout = layout = BlockLayout.from_fingerprint(adapter.fingerprint(transformer))
        if layout.num_blocks != len(self._blocks):
            raise ValueError(f"adapter fingerprint has {layout.num_blocks} blocks; blocks() gave {len(self._blocks)}")
        self._width = layout.width  # kept outputs are keyed block * width + component
        self._components: list[dict[str, torch.nn.Module]] = []
        for i, block in enumerate(self._blocks):
            comps = adapter.component_modules(block)
            bad = [c for c in comps if c not in layout.components_of[i]]
            if bad:
                raise ValueError(
                    f"adapter gave unknown component {bad[0]!r} for block {i}; valid: {layout.components_of[i]}"
                )
            self._components.append(comps)
        if isinstance(source, CacheTable) and source.num_blocks != len(self._blocks):
            raise ValueError(
                f"the cache table has {source.num_blocks} blocks; this {type(transformer).__name__} has {len(self._blocks)}"
            )
        if isinstance(source, CacheTable) and source.layout != layout:
            raise ValueError(
                f"the cache table is laid out for {source.layout.to_list()}; this {type(transformer).__name__} "
                f"has {layout.to_list()}"
            )
        self._tables = TableSource(source, layout)
        self._block_mode = callable(getattr(adapter, "block_compute", None))
        guard = self.config.guard
        self._guard = TableGuard(guard, self.component_flops, self._agreement_group) if guard and guard.enabled else None
        self._fuse = (self.config.fuse_skipped_steps and self._block_mode and hasattr(adapter, "residual_gates")
                      and self._guard is None)
        # per block and component: index of the gate part all blocks share (None: not gated by one)
        self._shared_gate = [adapter.residual_gates(b) for b in self._blocks] if self._fuse else []
        self.table: CacheTable | None = source if isinstance(source, CacheTable) else None
        self._active: ContextState | None = None
        cfg = self.config
        self.store = CacheStore(cfg.max_cache_bytes, cfg.cache_dtype, cfg.offload_to_cpu, cfg.max_host_cache_bytes)
        self._stats = EngineStats(layout, cfg.trace)
        self._compute_fn: Callable | None = None  # adapter.block_compute, compiled once compilation is asked for
        self._set_aside: dict[int, Any] = {}  # blocks' own compiled calls, given back on remove
        self._warned_fallback = False
        self._warned_sigma = False
        self._created_registries: list[torch.nn.Module] = []
        self._hook: TransformerHook | None = None
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
        self._hook = TransformerHook(self)
        root.register_hook(self._hook, TRANSFORMER_HOOK)
        try:
            self._component_hooks: list[dict[int, tuple[ComponentHook, torch.nn.Module]]] = []
            self._block_hooks: list[BlockHook] = []
            if not self._block_mode:
                for b, comps in enumerate(self._components):
                    hooks = {}
                    for name, module in comps.items():
                        hook = ComponentHook(self, b, self.layout.index(b, name))
                        self._registry(module).register_hook(hook, COMPONENT_HOOK)
                        hooks[hook.comp] = (hook, module)
                    self._component_hooks.append(hooks)
            constant = getattr(self.adapter, "constant_modules", None)
            self._memo_modules = list((constant(self.transformer) if constant else {}).items())
            for name, (module, mode) in self._memo_modules:
                self._registry(module).register_hook(MemoHook(self, name, mode), MEMO_HOOK)
            if self._block_mode or self._tables.has_block_runs:
                for b, block in enumerate(self._blocks):
                    hook = BlockHook(self, b)
                    self._registry(block).register_hook(hook, BLOCK_HOOK)
                    self._block_hooks.append(hook)
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
        """Detach every hook and free every kept tensor; forwards (and compiled blocks) are restored."""
        if self._hook is None:
            return
        self._hook.state_manager.reset()
        self.store.clear_pool()
        root = HookRegistry.check_if_exists_or_initialize(self.transformer)
        root.remove_hook(TRANSFORMER_HOOK, recurse=False)
        owned = [(m, COMPONENT_HOOK) for comps in self._components for m in comps.values()]
        owned += [(b, BLOCK_HOOK) for b in self._blocks]
        owned += [(m, MEMO_HOOK) for _, (m, _) in getattr(self, "_memo_modules", ())]
        for module, name in owned:
            reg = getattr(module, "_diffusers_hook", None)
            if reg is not None and name in reg.hooks:
                reg.remove_hook(name, recurse=False)
        for module in self._created_registries:
            drop_empty_registry(module)
        self._created_registries.clear()
        for b, compiled in self._set_aside.items():
            self._blocks[b]._compiled_call_impl = compiled
        self._set_aside.clear()
        if hasattr(self.transformer, "_diffusers_hook"):
            self.transformer._diffusers_hook.invalidate_child_registries_cache()
        self._hook = None
        self._active = None

    def release(self) -> None:
        """Free every kept output and per-context state now; the next call starts a generation afresh."""
        if self._hook is not None:
            self._hook.state_manager.reset()

    # -- compilation ---------------------------------------------------------------------------
    def _take_over_compilation(self) -> None:
        """Set the blocks' own compiled calls aside (they would trace the hooks) and compile the block
        compute instead; see the module docstring."""
        for b, block in enumerate(self._blocks):
            compiled = block.__dict__.get("_compiled_call_impl")
            if compiled is not None:
                self._set_aside[b] = compiled
                block._compiled_call_impl = None
        if self._compute_fn is None:
            if not self._block_mode:
                raise RuntimeError(
                    f"videocache cannot compile {type(self.transformer).__name__} with its cache: its adapter "
                    "has no block_compute; run it uncompiled"
                )
            self._compute_fn = torch.compile(self.adapter.block_compute, **(self.config.compile_options or {}))

    @property
    def compiled(self) -> bool:
        """Whether the engine runs a compiled block compute."""
        return self._compute_fn is not None

    # -- the transformer call ------------------------------------------------------------------
    def _step_from_scheduler(self, scheduler: Any, timestep: Any) -> int | None:
        """The step of this call from the scheduler: its step counter once it has stepped (no device
        access), else the index of the timestep (one read of the device value, at a run's first step)."""
        index = getattr(scheduler, "step_index", None)
        if isinstance(index, int):
            return index
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or timestep is None or len(timesteps) == 0:
            return None
        t = float(timestep) if isinstance(timestep, int | float) else float(torch.as_tensor(timestep).max())
        ts = torch.as_tensor(timesteps).detach().float().cpu()
        idx = int((ts - t).abs().argmin())
        return idx if abs(float(ts[idx]) - t) <= 1e-3 * max(1.0, abs(t)) else None

    def _locate(self, ctx: Any, state: ContextState, timestep: Any) -> tuple[int, int]:
        """(step, num_steps) of this call: from the cache context, else from the scheduler, else by
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
            step = self._step_from_scheduler(scheduler, timestep)
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
        return int(step), int(num)

    @torch.compiler.disable
    def _run_transformer(self, hook: TransformerHook, args: tuple, kwargs: dict, compiling: bool) -> Any:
        # once per compilation: the blocks' own compiled calls appear (compile_repeated_blocks, before or
        # after apply) or dynamo traces the transformer (whole-model compile) before the engine compiled
        if (compiling and self._compute_fn is None) or self._blocks[0].__dict__.get("_compiled_call_impl") is not None:
            self._take_over_compilation()
        # set under sequence parallelism (either order of apply and parallelize)
        self.store.agree = getattr(self.transformer, AGREE_ATTR, None)
        manager = hook.state_manager
        ctx = manager.context
        state: ContextState = manager.get_state()
        x_t, timestep = self.adapter.denoiser_inputs(args, kwargs)
        step, num = self._locate(ctx, state, timestep)
        if state.step is not None and step < state.step:  # a new generation began in this context
            state.reset()
        if state.table is None or state.table.num_steps != num:
            state.reset()
            for earlier in self.follows:  # their steps are over: nothing of theirs is read again
                earlier.release()
            state.sigmas = self._sigmas(num)
            state.table = self._tables(num, state.sigmas if self._tables.preset is not None else None,
                                       self._guidance_scale(), None if self._steps_run is None else self._steps_run(num))
            self.table = state.table
        if self._guard is not None:
            self._guarded_table(state, step, x_t)
        sigma = ctx.sigma
        if sigma is None and state.sigmas is not None:
            sigma = state.sigmas[step]
        state.step, state.sigma = step, (None if sigma is None else float(sigma))
        state.call_index = self._stats.call(ctx.name, step, state.sigma)
        previous, self._active = self._active, state
        try:
            out = hook.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._active = previous
        if self.config.exposure_bias.enabled:
            out = self._correct_exposure_bias(out, x_t, state.sigma)
        return out

    def _agreement_group(self) -> Any:
        return getattr(getattr(self.transformer, AGREE_ATTR, None), "group", None)

    def _guarded_table(self, state: ContextState, step: int, x_t: torch.Tensor) -> None:
        """The guard's table for this step (the first context of a step decides; videocache.guard); this
        context's kept outputs and block-run deltas are given the new table's last uses."""
        guard = self._guard
        if guard.table is None or step < guard.step or guard.table.num_steps != state.table.num_steps:
            guard.start(state.table, state.sigmas)
        table = guard.decide(step, x_t)
        if table is state.table:
            return
        for key, kept in state.entries.items():
            block, comp = divmod(key, self._width)
            alive = []
            for e in kept:
                last = table.cells[e.step][block][comp][2]  # no fused skips under the guard
                if last is None or last < step:
                    self.store.release(e)
                else:
                    e.last_use = last
                    alive.append(e)
            kept[:] = alive
        for run, e in list(state.run_deltas.items()):
            last = table.run_last_use(e.step, run)
            if last is None or last < step:
                self.store.release(state.run_deltas.pop(run))
            else:
                e.last_use = last
        state.table = self.table = table

    def _sigmas(self, num: int) -> list[float] | None:
        """The run's per-step sigmas on the host, read once per table."""
        try:
            return [float(s) for s in self.adapter.scheduler_sigmas(self._scheduler(), num)]
        except (AttributeError, TypeError, ValueError):
            return None

    def _correct_exposure_bias(self, out: Any, x_t: torch.Tensor, sigma: float | None) -> Any:
        if sigma is None:
            if not self._warned_sigma:
                warnings.warn(
                    "videocache: no sigma for this call; exposure-bias correction skipped", stacklevel=3
                )
                self._warned_sigma = True
            return out
        b = self.config.exposure_bias.factor(sigma)
        sign = getattr(self.adapter, "velocity_sign", 1)  # -1: the model predicts x0 - eps (Open-Sora)

        def fix(v: torch.Tensor) -> torch.Tensor:
            # an input with more channels (image-to-video: the first frame's mask and latent) carries x_t first;
            # a prediction with more channels (Open-Sora's 8 for 4) carries v first
            channels = min(x_t.shape[1], v.shape[1])
            x = x_t if x_t.shape[1] == channels else x_t[:, :channels]
            head = v if v.shape[1] == channels else v[:, :channels]
            head = correct_velocity(head, x, sigma, b) if sign == 1 else -correct_velocity(-head, x, sigma, b)
            return head if v.shape[1] == channels else torch.cat([head, v[:, channels:]], dim=1)

        if isinstance(out, torch.Tensor):
            return fix(out)
        if isinstance(out, tuple):
            return (fix(out[0]), *out[1:])
        if hasattr(out, "sample"):
            out.sample = fix(out.sample)
            return out
        raise TypeError(f"cannot apply the exposure-bias correction to a {type(out).__name__} output")

    # -- cells ---------------------------------------------------------------------------------
    def _decide(self, state: ContextState, step: int, block: int, comp: int) -> int:
        """The action for this cell. Table-only today, hence identical on every sequence-parallel rank; any
        data-dependent rule must be agreed across ranks (e.g. all_reduce of the criterion) right here."""
        return state.table.cells[step][block][comp][0]

    def _serve(self, state: ContextState, block: int, comp: int) -> Any | None:
        """The output of a cell the table reuses or forecasts, from what is kept; None when the cell must be
        computed (its action is COMPUTE, or what it reads was not kept: a fallback, counted)."""
        step = state.step
        action = self._decide(state, step, block, comp)
        if action == _COMPUTE:
            return None
        _, deps, _, scale = state.table.cells[step][block][comp]
        kept = state.entries.get(block * self._width + comp, ())
        found = [e for e in kept if e.step in deps]
        if len(found) != len(deps) or not deps:
            self._fallback(step, block, comp)
            return None
        last = found[-1]
        parts = served(action, deps, [self.store.load(e) for e in found], step, scale)
        self._account(state, block, comp, action, last.flops)
        return rebuild(parts, last.container)

    def _computed(self, state: ContextState, block: int, comp: int, out: Any, flops: float) -> None:
        """After a component ran: show it to the observer, keep it if the table reads it later, count it."""
        if self.config.observer is not None:
            self.config.observer(self._hook.state_manager.context.name, state.step, block, self.layout.name(block, comp), out)
        last = self._last_use(state.table, state.step, block, comp)
        if last is not None:
            parts, container = flatten(out)
            entry = self.store.keep(state.step, parts, container, last)
            if entry is not None:
                entry.flops = flops
                state.entries.setdefault(block * self._width + comp, []).append(entry)
        self._account(state, block, comp, _COMPUTE, flops)

    def _last_use(self, table: CacheTable, step: int, block: int, comp: int) -> int | None:
        """The last step that reads this cell's output computed at `step` (None: not kept); uniform skip
        steps read the step sums instead, when the engine fuses them."""
        return table.cell_last_use[step][block][comp] if self._fuse else table.cells[step][block][comp][2]

    def _account(self, state: ContextState, block: int, comp: int, done: int, flops: float) -> None:
        """Count what this cell executed, and free kept outputs of the cell that nothing reads any more."""
        self._stats.cell(state.call_index, block, comp, done, flops)
        if state.table.block_runs and state.table.run_of(block) is not None:
            state.block_flops.setdefault(block, [None] * self._width)[comp] = flops
        kept = state.entries.get(block * self._width + comp)
        if kept:
            self._release_expired(kept, state.step)

    def _release_expired(self, kept: list[Kept], step: int) -> None:
        """Free the kept outputs of one cell that no step after `step` reads. They are in step order and so
        are their last uses: the expired ones are at the front."""
        while kept and kept[0].last_use <= step:
            self.store.release(kept.pop(0))

    def _prefetch(self, state: ContextState, block: int) -> None:
        """Start bringing back the offloaded outputs that `block` serves at this step."""
        if block >= len(self._blocks):
            return
        for comp, (action, deps, _, _) in enumerate(state.table.cells[state.step][block]):
            if action != _COMPUTE:
                for e in state.entries.get(block * self._width + comp, ()):
                    if e.step in deps:
                        self.store.prefetch(e)

    def _fallback(self, step: int, block: int, comp: int | None) -> None:
        """A reuse with nothing kept (comp None: a block run starting at `block`) computes instead."""
        self._stats.fallbacks += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            what = "its block run" if comp is None else self.layout.name(block, comp)
            warnings.warn(
                f"videocache: nothing kept to reuse at step {step}, block {block} {what} "
                f"(max_cache_bytes={self.config.max_cache_bytes}); computing it instead. Further fallbacks "
                "are counted in engine.stats()['fallbacks'].",
                stacklevel=4,
            )

    # -- a component call (adapters without block_compute) -------------------------------------
    @torch.compiler.disable
    def _run_component(self, hook: ComponentHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        state = self._active
        if state is None or state.table is None:  # called outside a tracked transformer call
            return hook.fn_ref.original_forward(*args, **kwargs)
        out = self._serve(state, hook.block, hook.comp)
        if out is None:
            shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args[:2])
            if shapes != hook.flops_key:
                hook.flops_key = shapes
                hook.flops = float(self.adapter.component_flops(self.layout.name(hook.block, hook.comp), module, args, kwargs))
            out = hook.fn_ref.original_forward(*args, **kwargs)
            self._computed(state, hook.block, hook.comp, out, hook.flops)
        return out

    # -- a block call --------------------------------------------------------------------------
    @torch.compiler.disable
    def _run_block(self, hook: BlockHook, args: tuple, kwargs: dict) -> Any:
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
                return _hidden(args, kwargs)
        if table.block_runs and table.run_of(hook.block) is not None:
            return self._run_in_block_run(hook, state, args, kwargs)
        return self._block_forward(hook, state, args, kwargs)

    def _block_flops(self, hook: BlockHook, args: tuple, kwargs: dict) -> tuple[float, ...]:
        """FLOPs of each component of this block call; they depend on input shapes only, so memoised."""
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in (*args, *kwargs.values()))
        if shapes != hook.flops_key:
            hook.flops_key = shapes
            hook.flops = tuple(float(f) for f in self.adapter.block_flops(self._blocks[hook.block], args, kwargs))
        return hook.flops

    def _block_forward(self, hook: BlockHook, state: ContextState, args: tuple, kwargs: dict) -> Any:
        """The block with its cells executed: served components from the store, the others computed."""
        if not self._block_mode:
            return hook.fn_ref.original_forward(*args, **kwargs)  # the component hooks do the rest
        block, step, table = hook.block, state.step, state.table
        cells = table.cells[step][block]
        flops = self._block_flops(hook, args, kwargs)
        if self.store.offload:
            self._prefetch(state, block + 1)
        outs = [None if cell[0] == _COMPUTE else self._serve(state, block, c) for c, cell in enumerate(cells)]
        summing = self._fuse and step in table.sum_last_use
        if (
            self._compute_fn is None and not summing and self.config.observer is None
            and all(o is None for o in outs) and all(self._last_use(table, step, block, c) is None for c in range(len(cells)))
        ):
            # nothing served and nothing kept: the block's own forward, bit for bit
            out = hook.fn_ref.original_forward(*args, **kwargs)
            for c in range(len(cells)):
                self._account(state, block, c, _COMPUTE, flops[c])
            return out
        compute = self._compute_fn or self.adapter.block_compute
        out, computed = compute(self._blocks[block], args, kwargs, tuple(outs))
        for c, o in enumerate(computed):
            if o is not None:
                self._computed(state, block, c, o, flops[c])
        if summing:
            self._add_to_sum(state, block, args, kwargs, computed, flops, out)
        return out

    # -- uniform skip steps --------------------------------------------------------------------
    def _add_to_sum(
        self, state: ContextState, block: int, args: tuple, kwargs: dict, computed: tuple, flops: tuple, out: Any
    ) -> None:
        step = state.step
        if block == 0:
            if state.building is not None:  # left by an interrupted call: this step starts afresh
                state.building.release(self.store)
                state.sums.pop(step, None)
            state.building = None if state.sums.get(step, _NEW) is None else StepSum(len(self.layout.names), _hidden(args, kwargs))
        sums = state.building
        if sums is None:  # refused by the byte budget: those skips go block by block
            return
        nbytes = 0
        for c, o in enumerate(computed):
            shared = self._shared_gate[block][c]
            if o is not None and shared is not None:
                if not isinstance(o, torch.Tensor):
                    return self._drop_sum(state)
                nbytes += sums.add(shared, o)
            sums.flops[self._stats.name_index[block][c]] += flops[c]
        if block == len(self._blocks) - 1:
            _, gates = self.adapter.shared_gates(args, kwargs, list(sums.gated))
            nbytes += sums.finish(out, gates)
        if nbytes and not self.store.reserve(nbytes):
            return self._drop_sum(state)
        sums.nbytes += nbytes
        if sums.complete:
            state.sums[step], state.building = sums, None

    def _drop_sum(self, state: ContextState) -> None:
        if state.building is not None:
            state.building.release(self.store)
        state.building = None
        state.sums[state.step] = None

    def _skip_stack(self, state: ContextState, args: tuple, kwargs: dict) -> Any | None:
        """Block 0 of a uniform skip step: the output of the whole block stack from the step sums, or None
        (nothing complete kept: the blocks then skip one by one from their own kept outputs)."""
        step = state.step
        action, deps, scale = state.table.uniform_skips[step]
        found = [state.sums.get(d) for d in deps]
        if any(f is None or not f.complete for f in found):
            return None
        hidden, gates = self.adapter.shared_gates(args, kwargs, list(found[-1].gated))
        out = stack_output(hidden, gates, action, deps, found, step, scale)
        self._stats.stack(state.call_index, action, found[-1].flops)
        for kept in state.entries.values():
            self._release_expired(kept, step)
        for d in deps:
            if state.table.sum_last_use[d] <= step:
                state.sums.pop(d).release(self.store)
        return out

    # -- block runs ----------------------------------------------------------------------------
    def _streams(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The residual streams a block call carries and returns (`adapter.block_streams`: HunyuanVideo's
        video and text), or its hidden states alone."""
        streams = getattr(self.adapter, "block_streams", None)
        return tuple(streams(args, kwargs)) if streams is not None else (_hidden(args, kwargs),)

    def _run_in_block_run(self, hook: BlockHook, state: ContextState, args: tuple, kwargs: dict) -> Any:
        table, step, block = state.table, state.step, hook.block
        run = table.run_of(block)
        first, last = table.block_runs[run]
        streams = self._streams(args, kwargs)
        single = len(streams) == 1
        if block == first:
            action = int(table.run_actions[step, run])
            kept = state.run_deltas.get(run)
            if kept is not None and kept.last_use < step:  # left over from a reuse that fell back
                self.store.release(state.run_deltas.pop(run))
                kept = None
            if action == _REUSE and (kept is None or kept.step != table.run_dependency(step, run)):
                action = _COMPUTE
                self._fallback(step, block, None)
            state.run_doing[run] = action
            if action == _COMPUTE:
                self._stats.runs["compute"] += 1
                if table.run_last_use(step, run) is not None:
                    state.run_inputs[run] = streams
            else:
                self._stats.runs["reuse"] += 1
        if state.run_doing.get(run) == _REUSE:
            self._stats.skipped_block(state.call_index, block, state.block_flops.get(block, [None] * self._width))
            if block != first:
                return streams[0] if single else streams
            delta = state.run_deltas[run]
            out = tuple((h.float() + d.float()).to(h.dtype) for h, d in zip(streams, self.store.load(delta), strict=True))
            if delta.last_use <= step:
                self.store.release(state.run_deltas.pop(run))
            return out[0] if single else out
        out = self._block_forward(hook, state, args, kwargs)
        if block == last and run in state.run_inputs:
            outs = (out,) if single else out
            h_in = state.run_inputs.pop(run)
            if not all(isinstance(o, torch.Tensor) and o.shape == h.shape for o, h in zip(outs, h_in, strict=False)) \
                    or len(outs) != len(h_in):
                raise TypeError(
                    f"block runs need blocks that return their residual streams; block {block} returned "
                    f"{type(out).__name__} (an adapter with several streams declares them in block_streams)"
                )
            self._keep_delta(state, run, step, [(o.float() - h.float()).to(o.dtype) for o, h in zip(outs, h_in, strict=True)])
        return out

    def _keep_delta(self, state: ContextState, run: int, step: int, delta: list[torch.Tensor]) -> None:
        old = state.run_deltas.pop(run, None)
        if old is not None:
            self.store.release(old)
        last = state.table.run_last_use(step, run)
        if last is None:
            return
        entry = self.store.keep(step, delta, None, last)
        if entry is not None:
            state.run_deltas[run] = entry

    # -- measurements --------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the FLOP counters, call counts and trace; peak bytes restart from the current bytes."""
        self._stats.reset()
        self.store.reset_peaks()

    def stats(self) -> dict[str, Any]:
        """What actually executed since the last reset_stats: FLOP-weighted computed fraction of block
        components (overall and per component), kept bytes (on the device and on the host), call counts,
        block-run executions (computed / reused runs, skipped blocks) and fallbacks."""
        out = self._stats.summary()
        store = self.store
        out.update(
            cache_peak_bytes=store.peak_device,
            cache_current_bytes=store.device_bytes,
            cache_peak_host_bytes=store.peak_host,
            cache_current_host_bytes=store.host_bytes,
            refused_stores=store.refused,
            compiled=self.compiled,
        )
        if self._guard is not None:
            out.update(guard_forced=list(self._guard.forced), guard_dropped=list(self._guard.dropped),
                       guard_signal=list(self._guard.signal))
        return out

    def component_flops(self) -> np.ndarray:
        """(blocks, components) FLOPs of each component's last computed call (0 where none ran yet)."""
        if self._block_mode:
            return np.array([[*h.flops, *[0.0] * (self._width - len(h.flops))] if h.flops else [0.0] * self._width
                             for h in self._block_hooks])
        return np.array([[self._component_hooks[b][c][0].flops if c in self._component_hooks[b] else 0.0
                          for c in range(self._width)] for b in range(len(self._blocks))])

    def trace(self) -> list[dict[str, Any]]:
        """One record per component call: {context, step, sigma, block, component, action} where action is the
        letter of what executed (C/R/F; a reuse that fell back to compute reads C; D: the component's block
        was skipped by a block-run reuse)."""
        return self._stats.records()

    def __repr__(self) -> str:
        src = (
            f"profile={getattr(self.profile, 'name', None)!r}, preset={self.preset!r}"
            if self.profile
            else "table"
        )
        return f"CacheEngine({type(self.transformer).__name__}, {src}, attached={self.attached})"
