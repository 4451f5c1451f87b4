"""Method specs for side-by-side comparisons, and how each one is switched on and off a pipeline.

A spec is a short string (`diffusers:fbcache:0.08`) parsed into a small validated dataclass. Every
method can `apply` itself to a loaded pipeline and returns an `AppliedMethod` that removes it again
and reports what it kept in memory. cache-dit patches pipeline classes for the whole process, so its
methods declare `isolated = True` and the comparison runs each of them in a process of its own.

Under sequence or CFG parallelism (`videocache compare --ulysses N ...` under accelerate launch) the
comparison's worker applies a method and then `videocache.distributed.parallelize` (the cache first, as
diffusers' caches and CFG parallelism need), except for a method whose `parallel_impl` is "own": cache-dit
cannot run under videocache's parallelism and is run with its own context parallelism at the same degrees
(`parallelize_pipeline`). diffusers' First-Block-Cache decides from the local token shard: its decision is
replaced by the agreed global one (`videocache.distributed.peers`).

diffusers' caches find blocks by their list's name (`blocks`, `transformer_blocks`, ...) and PAB finds diffusers
`Attention` modules only: on a transformer where they find nothing (Open-Sora's STDiT3, whose `spatial_blocks`
and `temporal_blocks` interleave), First-Block-Cache and MagCache get diffusers' own hooks on the engine
adapter's blocks in execution order (`enable_diffusers_cache`), PAB on the adapter's attention components,
TaylorSeer module names per architecture (TAYLORSEER_MODULES); cache-dit gets one block list in execution
order from the model's package (CACHEDIT_BLOCK_LISTS). Peers that cannot attach to an architecture are
listed with the reason in CANNOT_ATTACH.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

VALID_FORMS = (
    "none",
    "videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise]",
    "diffusers:fbcache:THRESHOLD",
    "diffusers:taylorseer:INTERVAL[:attn]",
    "diffusers:magcache:THRESHOLD",
    "diffusers:pab:RANGE",
    "diffusers:pab:SPATIAL:TEMPORAL:CROSS",
    "cachedit:dbcache:Fn:Bn:THRESHOLD",
    "cachedit:dbcache-taylorseer:Fn:Bn:THRESHOLD[:ORDER]",
)
# diffusers TaylorSeer's modules per architecture and scope: (cache_identifiers, skip_predict_identifiers),
# None for diffusers' defaults. "components": every cached component's pre-gate output; "attn": attention
# only. diffusers' default identifiers match nothing on Wan (it would silently run uncached); on
# HunyuanVideo they hook the blocks' `attn` (pre-gate outputs), and the per-component form caches the
# single-stream blocks' fused proj_out while their attention and MLP input projection are skipped.
TAYLORSEER_MODULES: dict[str, dict[str, tuple[list[str] | None, list[str] | None]]] = {
    "WanTransformer3DModel": {
        "components": ([r"^blocks\.\d+\.(attn1|attn2|ffn)$"], None),
        "attn": ([r"^blocks\.\d+\.(attn1|attn2)$"], None),
    },
    "HunyuanVideoTransformer3DModel": {
        "components": ([r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+\.proj_out"],
                       [r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"]),
        "attn": (None, None),
    },
    # Open-Sora 1.2: diffusers' defaults (`^blocks.*attn`, ...) match none of STDiT3's names either
    "STDiT3Model": {
        "components": ([r"(spatial|temporal)_blocks\.\d+\.(attn|cross_attn|mlp)"], None),
        "attn": ([r"(spatial|temporal)_blocks\.\d+\.(attn|cross_attn)"], None),
    },
}
# PAB's published Open-Sora setting (VideoSys OpenSoraPABConfig): spatial / temporal / cross attention
# broadcast inside 450 < t < 930 (t in [0, 1000]); the `diffusers:pab:SPATIAL:TEMPORAL:CROSS` form uses this
# window for all three (2:4:6 is the paper's setting). Its MLP broadcast (3 timesteps, blocks 0-4) has no
# counterpart in diffusers and is left out.
PAB_OPENSORA_WINDOW = (450, 930)
# Peers that cannot attach to an architecture, and why (none of them is a method spec here).
CANNOT_ATTACH: dict[str, dict[str, str]] = {
    "STDiT3Model": {
        "diffusers:fastercache": (
            "FasterCache's CFG cache needs the cond and uncond branches batched in one call, and OpenSoraPipeline "
            "runs them as separate calls; its attention hooks attach to diffusers Attention classes only"
        ),
    },
}
# Share of the steps every peer keeps uncached at the start (MagCache's retention ratio, used for
# cache-dit's warm-up too so that the peers are compared at the same warm-up).
WARMUP_FRACTION = 0.2


class MethodSpecError(ValueError):
    """A spec that cannot be parsed; the message is one line and lists the valid forms."""


def _spec_error(spec: str, why: str | None = None) -> MethodSpecError:
    head = f"bad method spec {spec!r}: {why}" if why else f"unknown method spec {spec!r}"
    return MethodSpecError(f"{head}; valid forms: {', '.join(VALID_FORMS)}")


# -- what a method needs from the comparison and what it gives back ---------------------------------------
@dataclass
class MethodSetup:
    """What `apply` may use besides the pipeline.

    `calibrate()` runs one generation of the comparison's first prompt and seed with whatever is
    applied to the pipeline at that moment (MagCache learns its ratios this way); `store` persists
    small results such as those ratios across reruns of the same comparison.
    """

    num_inference_steps: int
    calibrate: Callable[[], None] = lambda: None
    store: dict[str, Any] = field(default_factory=dict)
    save_store: Callable[[], None] = lambda: None
    parallel: Any = None  # videocache.distributed.ParallelSettings of a parallel comparison (None: one process)


@dataclass
class AppliedMethod:
    """A method switched on; `remove()` restores the uncached pipeline."""

    remove: Callable[[], None]
    cache_bytes: Callable[[], int] | None = None  # bytes held now, sampled after every transformer call
    stats: Callable[[], dict[str, Any]] = dict  # the method's own report (videocache: engine.stats())
    reset_stats: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)  # settings that actually ran (e.g. calibrated ratios)


# -- value parsing ------------------------------------------------------------------------------------
def _positive_float(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _spec_error(spec, f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise _spec_error(spec, f"{name} must be a positive number, got {text!r}")
    return value


def _int(spec: str, name: str, text: str, minimum: int) -> int:
    if not re.fullmatch(r"\d+", text):
        raise _spec_error(spec, f"{name} must be an integer >= {minimum}, got {text!r}")
    value = int(text)
    if value < minimum:
        raise _spec_error(spec, f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


# -- methods -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """Base of every method spec."""

    family: ClassVar[str] = ""
    isolated: ClassVar[bool] = False  # True: must run in a process of its own
    # who spreads the transformer over the ranks in a parallel comparison: "videocache" (the worker calls
    # parallelize after apply, per run) or "own" (the method's parallelize_pipeline, once per worker)
    parallel_impl: ClassVar[str] = "videocache"

    @property
    def spec(self) -> str:  # canonical form, used as the method's name in reports
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short label for plots."""
        return self.spec.split(":", 1)[-1]

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        raise NotImplementedError

    def config_digest(self) -> str:
        """What the spec does not pin down (a profile file's contents): a resumed comparison reruns a
        method whose digest changed. Empty when the spec says everything."""
        return ""

    def parallelize_pipeline(self, pipe: Any, setup: MethodSetup) -> dict[str, Any]:
        """For parallel_impl "own": spread the pipeline over the ranks with the method's own parallelism,
        once per worker process, leaving it uncached (the uncached runs of that worker then run on it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoCache(Method):
    """The uncached reference run."""

    family: ClassVar[str] = "none"

    @property
    def spec(self) -> str:
        return "none"

    @property
    def label(self) -> str:
        return "none"

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        return AppliedMethod(remove=lambda: None, cache_bytes=lambda: 0)


@dataclass(frozen=True)
class VideocacheMethod(Method):
    """videocache's own engine with a profile (name or YAML path) and an optional preset."""

    profile: str
    preset: str | None = None
    exposure_bias: str | None = None  # None: the profile's setting; "eb": b(t) on; "eb-inv": 1/b(t); "noeb": off
    blockwise: bool = False  # skip uniform steps block by block (the engine's fused skip off), for ablations
    family: ClassVar[str] = "videocache"

    @property
    def spec(self) -> str:
        flags = (self.exposure_bias, "blockwise" if self.blockwise else None)
        return ":".join(p for p in ("videocache", self.profile, self.preset, *flags) if p)

    def exposure_bias_override(self) -> Any:
        from videocache import ExposureBiasConfig

        if self.exposure_bias is None:
            return None
        if self.exposure_bias == "noeb":
            return False
        return ExposureBiasConfig(enabled=True, sign=-1 if self.exposure_bias == "eb-inv" else 1)

    def config_digest(self) -> str:
        import hashlib

        import videocache

        preset = videocache.load_profile(self.profile).preset(self.preset)
        text = json.dumps([preset.to_dict(), self.exposure_bias, self.blockwise], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        import videocache  # lazily: the engine is optional for every other method

        engine = videocache.apply(
            pipe,
            self.profile,
            preset=self.preset,
            num_inference_steps=setup.num_inference_steps,
            exposure_bias=self.exposure_bias_override(),
            fuse_skipped_steps=not self.blockwise,
        )
        return AppliedMethod(
            remove=lambda: videocache.remove(pipe),
            stats=engine.stats,
            reset_stats=getattr(engine, "reset_stats", lambda: None),
            info={"preset": getattr(engine, "preset_name", self.preset)},
        )


def _diffusers_finds_blocks(transformer: Any) -> bool:
    """Whether diffusers' block caches (First-Block-Cache, MagCache) find this transformer's blocks: they
    take the children named like `blocks` / `transformer_blocks` (`_ALL_TRANSFORMER_BLOCK_IDENTIFIERS`)."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return any(name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
               for name, child in transformer.named_children())


def _hook_blocks_in_order(transformer: Any, config: Any) -> None:
    """diffusers' own First-Block-Cache or MagCache hooks, on the engine adapter's blocks in execution order
    (what `apply_first_block_cache` / `apply_mag_cache` do on the blocks they find by name). Both need only the
    first and the last executed block to be the head and the tail, so STDiT3's interleaved lists are fine
    in this order; `disable_cache` removes the hooks as usual."""
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import HookRegistry, first_block_cache, mag_cache
    from diffusers.hooks.hooks import StateManager

    from videocache.adapters import get_adapter

    head, *middle, tail = get_adapter(transformer).blocks(transformer)
    if isinstance(config, FirstBlockCacheConfig):
        state = StateManager(first_block_cache.FBCSharedBlockState, (), {})
        first_block_cache._apply_fbc_head_block_hook(head, state, config.threshold)
        for block in middle:
            first_block_cache._apply_fbc_block_hook(block, state)
        first_block_cache._apply_fbc_block_hook(tail, state, is_tail=True)
    else:
        state = StateManager(mag_cache.MagCacheState, (), {})
        mag_cache._apply_mag_cache_head_hook(head, state, config)
        for block in middle:
            mag_cache._apply_mag_cache_block_hook(block, state, config)
        mag_cache._apply_mag_cache_block_hook(tail, state, config, is_tail=True)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config  # what enable_cache records: disable_cache removes the hooks


def enable_diffusers_cache(transformer: Any, config: Any) -> None:
    """`transformer.enable_cache(config)`, except for First-Block-Cache and MagCache on a transformer whose
    block lists diffusers does not find by name (STDiT3's `spatial_blocks` / `temporal_blocks`: FBCache would
    fail on an empty list, MagCache would warn and run uncached): there diffusers' own hooks go on the
    blocks in execution order."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if isinstance(config, (FirstBlockCacheConfig, MagCacheConfig)) and not _diffusers_finds_blocks(transformer):
        if transformer.is_cache_enabled:
            raise ValueError(f"a diffusers cache ({type(transformer._cache_config).__name__}) is already enabled")
        _hook_blocks_in_order(transformer, config)
    else:
        transformer.enable_cache(config)


def _diffusers_applied(pipe: Any, config: Any, info: dict[str, Any] | None = None) -> AppliedMethod:
    enable_diffusers_cache(pipe.transformer, config)
    return _diffusers_applied_hooked(pipe.transformer, info)


def _diffusers_applied_hooked(transformer: Any, info: dict[str, Any] | None = None) -> AppliedMethod:
    """The AppliedMethod of a diffusers cache already enabled on `transformer`."""
    from ..metrics.cache_memory import diffusers_hook_roots, tensor_bytes

    return AppliedMethod(
        remove=transformer.disable_cache,
        cache_bytes=lambda: tensor_bytes(diffusers_hook_roots(transformer)),
        info=info or {},
    )


@dataclass(frozen=True)
class FBCacheMethod(Method):
    """diffusers First-Block-Cache: skip all later blocks while the first block's residual barely moves."""

    threshold: float
    family: ClassVar[str] = "diffusers:fbcache"

    @property
    def spec(self) -> str:
        return f"diffusers:fbcache:{self.threshold:g}"

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        from diffusers import FirstBlockCacheConfig

        from videocache.distributed.peers import agree_first_block_cache

        applied = _diffusers_applied(pipe, FirstBlockCacheConfig(threshold=self.threshold))
        # one process: diffusers' decision unchanged; sequence-parallel: the global statistic, agreed
        agreement = agree_first_block_cache(pipe.transformer)
        remove = applied.remove

        def remove_all() -> None:
            agreement.remove()
            remove()

        applied.remove = remove_all
        applied.stats = agreement.stats
        applied.reset_stats = agreement.reset
        if setup.parallel is not None and setup.parallel.sequence_degree > 1:
            applied.info["decision"] = (
                "agreed across ranks (all-reduced global statistic; diffusers 0.42.1 decides on the local shard)"
            )
        return applied


@dataclass(frozen=True)
class TaylorSeerMethod(Method):
    """diffusers TaylorSeer: full compute every INTERVAL steps, Taylor forecasts in between, of every
    component's output (default) or of the attention only (`:attn`); modules per architecture in
    TAYLORSEER_MODULES."""

    interval: int
    scope: str = "components"
    family: ClassVar[str] = "diffusers:taylorseer"

    @property
    def spec(self) -> str:
        return f"diffusers:taylorseer:{self.interval}" + (":attn" if self.scope == "attn" else "")

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        from diffusers import TaylorSeerCacheConfig

        arch = type(pipe.transformer).__name__
        if arch not in TAYLORSEER_MODULES:
            raise ValueError(f"diffusers:taylorseer: no module list for {arch} (known: {', '.join(TAYLORSEER_MODULES)})")
        cache, skip = TAYLORSEER_MODULES[arch][self.scope]
        kwargs = {k: v for k, v in (("cache_identifiers", cache), ("skip_predict_identifiers", skip)) if v is not None}
        config = TaylorSeerCacheConfig(cache_interval=self.interval, **kwargs)
        return _diffusers_applied(pipe, config, {"cache_identifiers": cache or "diffusers defaults",
                                                 "skip_predict_identifiers": skip or []})


_MAG_PRINT = re.compile(r"\[MagCache\] Calibration Complete[^\n]*\n\s*(\[[^\]]*\])")


def parse_mag_ratios(printed: str) -> list[float]:
    """MagCache ratios from diffusers' calibration printout (one list per cache context, e.g. cond and
    uncond on Wan), averaged element-wise into the single list MagCacheConfig takes."""
    lists = [ast.literal_eval(m) for m in _MAG_PRINT.findall(printed)]
    lists = [[float(v) for v in found] for found in lists if found]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios (did the run cover every step?)")
    length = len(lists[0])
    if any(len(found) != length for found in lists):
        raise RuntimeError(
            f"MagCache calibration printed ratio lists of different lengths: {[len(x) for x in lists]}"
        )
    return [sum(col) / len(col) for col in zip(*lists, strict=True)]


@dataclass(frozen=True)
class MagCacheMethod(Method):
    """diffusers MagCache, calibrated automatically on the comparison's first prompt."""

    threshold: float
    family: ClassVar[str] = "diffusers:magcache"

    @property
    def spec(self) -> str:
        return f"diffusers:magcache:{self.threshold:g}"

    def calibrated_ratios(self, pipe: Any, setup: MethodSetup) -> list[float]:
        """Ratios for this step count from the store, or from one calibration run (then stored)."""
        from diffusers import MagCacheConfig

        key = f"magcache_ratios_{setup.num_inference_steps}"
        if key not in setup.store:
            enable_diffusers_cache(
                pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=setup.num_inference_steps)
            )
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    setup.calibrate()
            finally:
                pipe.transformer.disable_cache()
            setup.store[key] = parse_mag_ratios(printed.getvalue())
            setup.save_store()
        return list(setup.store[key])

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        from diffusers import MagCacheConfig

        ratios = self.calibrated_ratios(pipe, setup)
        config = MagCacheConfig(
            threshold=self.threshold,
            num_inference_steps=setup.num_inference_steps,
            retention_ratio=WARMUP_FRACTION,
            mag_ratios=ratios,
        )
        return _diffusers_applied(pipe, config, {"mag_ratios": [round(r, 6) for r in ratios]})


@dataclass(frozen=True)
class PABMethod(Method):
    """diffusers Pyramid Attention Broadcast: self-attention recomputed every RANGE calls in its window
    (diffusers' default window); or the pyramid SPATIAL:TEMPORAL:CROSS (spatial, temporal and cross
    attention ranges) in PAB's published Open-Sora window, PAB_OPENSORA_WINDOW.

    diffusers' PAB attaches to diffusers `Attention` modules only; on a transformer without them (STDiT3)
    its hook goes on the adapter's attention components by name (`spatial_attn`, `temporal_attn`,
    `cross_attn`), with one state per cache context (`_BranchPABHook`): the pipeline runs cond and uncond
    as separate calls, and a shared state would hand the uncond call the cond call's attention (VideoSys'
    PAB sees both branches in one batched call, so its counters advance once per step)."""

    skip_range: int
    temporal_range: int | None = None
    cross_range: int | None = None
    family: ClassVar[str] = "diffusers:pab"

    @property
    def spec(self) -> str:
        if self.temporal_range is None:
            return f"diffusers:pab:{self.skip_range}"
        return f"diffusers:pab:{self.skip_range}:{self.temporal_range}:{self.cross_range}"

    def config(self, timestep: Callable[[], Any]) -> Any:
        from diffusers import PyramidAttentionBroadcastConfig

        if self.temporal_range is None:
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=self.skip_range, current_timestep_callback=timestep
            )
        window = PAB_OPENSORA_WINDOW
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip_range,
            temporal_attention_block_skip_range=self.temporal_range,
            cross_attention_block_skip_range=self.cross_range,
            spatial_attention_timestep_skip_range=window,
            temporal_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=timestep,
        )

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        transformer = pipe.transformer
        if _has_diffusers_attention(transformer):
            config = self.config(lambda: pipe.current_timestep)
            info = {"spatial_attention_timestep_skip_range": list(config.spatial_attention_timestep_skip_range)}
            return _diffusers_applied(pipe, config, info)
        timestep = _TimestepProbe(transformer)
        config = self.config(timestep)
        try:
            hooked = _hook_pab_components(transformer, config)
        except ValueError:
            timestep.remove()
            raise
        applied = _diffusers_applied_hooked(transformer, {
            "timestep_skip_range": list(config.spatial_attention_timestep_skip_range),
            "hooked": hooked, "state": "one per cache context (cond / uncond apart)"})
        remove = applied.remove

        def remove_all() -> None:
            remove()
            timestep.remove()

        applied.remove = remove_all
        return applied


# PAB's three attention kinds by the engine adapter's component names (transformers without diffusers Attention)
_PAB_KINDS = {"spatial_attn": "spatial", "temporal_attn": "temporal", "cross_attn": "cross"}


def _has_diffusers_attention(transformer: Any) -> bool:
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return any(isinstance(module, _ATTENTION_CLASSES) for module in transformer.modules())


class _TimestepProbe:
    """The transformer call's timestep as a number, for PAB's window, when the pipeline keeps no
    `current_timestep` (OpenSoraPipeline): read once per transformer call (its first sample's)."""

    def __init__(self, transformer: Any):
        self.value: float | None = None
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.value = None if timestep is None else float(timestep.reshape(-1)[0])

    def __call__(self) -> float:
        if self.value is None:
            raise RuntimeError("PAB: the transformer was called without a timestep")
        return self.value

    def remove(self) -> None:
        self._handle.remove()


def _branch_pab_hook(config: Any, kind: str) -> Any:
    """diffusers' PAB hook for one attention of `kind`, its state (counter and kept output) kept per cache
    context."""
    from diffusers.hooks.hooks import CacheContext, StateManager
    from diffusers.hooks.pyramid_attention_broadcast import (
        PyramidAttentionBroadcastHook,
        PyramidAttentionBroadcastState,
    )

    class _BranchPABHook(PyramidAttentionBroadcastHook):
        def initialize_hook(self, module):
            self.states = StateManager(PyramidAttentionBroadcastState)
            return module

        @property
        def state(self):
            if self.states._context is None:  # called outside cache_context: one default branch
                self.states.set_context(CacheContext(name="inference"))
            return self.states.get_state()

        def reset_state(self, module):
            self.states.reset()
            return module

    return _BranchPABHook(getattr(config, f"{kind}_attention_timestep_skip_range"),
                          getattr(config, f"{kind}_attention_block_skip_range"), config.current_timestep_callback)


def _hook_pab_components(transformer: Any, config: Any) -> dict[str, int]:
    """PAB hooks on the adapter's attention components whose kind has a range; how many of each kind."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    from videocache.adapters import get_adapter

    adapter = get_adapter(transformer)
    hooked: dict[str, int] = {}
    for block in adapter.blocks(transformer):
        for name, module in adapter.component_modules(block).items():
            kind = _PAB_KINDS.get(name)
            if kind is None or getattr(config, f"{kind}_attention_block_skip_range") is None:
                continue
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_branch_pab_hook(config, kind), _PYRAMID_ATTENTION_BROADCAST_HOOK)
            hooked[kind] = hooked.get(kind, 0) + 1
    if not hooked:
        raise ValueError(f"diffusers:pab: no attention of {type(transformer).__name__} to hook "
                         f"(components named {', '.join(_PAB_KINDS)} or diffusers Attention modules)")
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config  # disable_cache removes the hooks by name
    return hooked


@dataclass(frozen=True)
class CacheDitDBCacheMethod(Method):
    """cache-dit DBCache: compute the first Fn and last Bn blocks, reuse the middle while the residual
    difference stays under THRESHOLD; optionally with cache-dit's TaylorSeer calibrator (ORDER).

    Fn is explicit because cache-dit's default (8) leaves nothing to cache on the 8-block reference
    model. Warm-up is WARMUP_FRACTION of the steps. cache-dit's calibrator forms its first derivative
    only from the third fully computed step on, so with fewer than 3 warm-up steps (and no later
    recompute) it forecasts exactly like plain DBCache reuse.
    """

    fn: int
    bn: int
    threshold: float
    taylorseer_order: int | None = None
    family: ClassVar[str] = "cachedit:dbcache"
    isolated: ClassVar[bool] = True
    parallel_impl: ClassVar[str] = "own"  # its CachedBlocks cannot run under videocache's split hooks

    @property
    def spec(self) -> str:
        if self.taylorseer_order is None:
            return f"cachedit:dbcache:{self.fn}:{self.bn}:{self.threshold:g}"
        return f"cachedit:dbcache-taylorseer:{self.fn}:{self.bn}:{self.threshold:g}:{self.taylorseer_order}"

    @property
    def kind(self) -> str:
        """Family for plots: DBCache alone or with the TaylorSeer calibrator."""
        return "cachedit:dbcache" if self.taylorseer_order is None else "cachedit:dbcache-taylorseer"

    def warmup_steps(self, num_inference_steps: int) -> int:
        return max(1, int(WARMUP_FRACTION * num_inference_steps + 0.5))

    def _config(self, pipe: Any, setup: MethodSetup) -> Any:
        from videocache.adapters import get_adapter

        num_blocks = len(get_adapter(pipe.transformer).blocks(pipe.transformer))
        if self.fn + self.bn >= num_blocks:  # checked before cache-dit patches anything
            raise ValueError(
                f"{self.spec}: Fn + Bn = {self.fn + self.bn} leaves none of the model's {num_blocks} blocks to cache"
            )
        import cache_dit

        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.fn,
            Bn_compute_blocks=self.bn,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup_steps(setup.num_inference_steps),
            num_inference_steps=setup.num_inference_steps,
        )

    def parallelize_pipeline(self, pipe: Any, setup: MethodSetup) -> dict[str, Any]:
        """cache-dit's own context parallelism at the comparison's Ulysses and ring degrees.

        cache-dit 1.5.3 enables its parallelism only together with a cache and cannot take it off again
        (`disable_cache` removes the cache, its split/gather hooks stay; a second `enable_cache` with a
        `parallelism_config` fails on the existing hooks): so it is enabled once per worker process with
        this method's cache, whose cache is removed at once; every later run adds the cache alone. It
        has no CFG parallelism."""
        s = setup.parallel
        if s.cfg > 1:
            raise ValueError(
                f"{self.spec}: cache-dit 1.5.3 has no CFG parallelism and cannot run under videocache's (its block "
                "wrapper breaks videocache's split hooks): compare cache-dit with --ulysses / --ring only"
            )
        if s.ring > 1 and pipe.transformer.device.type == "cpu":
            raise ValueError(
                f"{self.spec}: cache-dit's ring attention takes its log-sum-exp from aten's CUDA flash-attention op "
                "(aten::_scaled_dot_product_flash_attention), which the CPU lacks: compare cache-dit with --ulysses on the CPU"
            )
        if getattr(pipe, "_videocache_cachedit_parallel", None) is not None:
            return pipe._videocache_cachedit_parallel
        if _cachedit_block_list(pipe.transformer) is not None:
            raise ValueError(
                f"{self.spec}: cache-dit's context parallelism plans only the model classes it registers, and "
                f"{type(pipe.transformer).__name__} is not one: compare cache-dit on this model in one process"
            )
        import cache_dit

        parallelism = cache_dit.ParallelismConfig(
            ulysses_size=s.ulysses if s.ulysses > 1 else None, ring_size=s.ring if s.ring > 1 else None
        )
        cache_dit.enable_cache(_cachedit_target(pipe), cache_config=self._config(pipe, setup),
                               parallelism_config=parallelism)
        cache_dit.disable_cache(pipe)
        pipe._videocache_cachedit_parallel = {"impl": "cache-dit", "ulysses": s.ulysses, "ring": s.ring}
        return pipe._videocache_cachedit_parallel

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        config = self._config(pipe, setup)
        import cache_dit

        from ..metrics.cache_memory import cachedit_roots, tensor_bytes

        calibrator = None
        if self.taylorseer_order is not None:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        own = _cachedit_block_list(pipe.transformer)
        target = _cachedit_target(pipe)
        try:
            cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)
        except Exception:
            if own is not None:
                own.detach(pipe.transformer)
            raise
        info = {"max_warmup_steps": config.max_warmup_steps, "cache_dit": getattr(cache_dit, "__version__", "?")}
        if own is not None:
            info["adapter"] = f"{own.__name__}.block_adapter: the blocks in execution order as one list, has_separate_cfg=True"
        elif target is not pipe:
            info["adapter"] = (f"cache-dit's own adapter for {type(pipe).__mro__[1].__name__}, "
                               f"has_separate_cfg={target.has_separate_cfg}")
        if getattr(pipe, "_videocache_cachedit_parallel", None) is not None:
            info["parallel"] = "cache-dit's own context parallelism (its DBCache all-reduces its residual statistic)"

        def remove() -> None:
            cache_dit.disable_cache(pipe)
            if own is not None:
                own.detach(pipe.transformer)

        return AppliedMethod(remove=remove, cache_bytes=lambda: tensor_bytes(cachedit_roots(pipe)), info=info)


# Transformers whose block lists cache-dit cannot wrap as they are, and the module (of the model's package)
# that gives cache-dit one list in execution order (`block_adapter(pipe)`, `detach(transformer)`).
CACHEDIT_BLOCK_LISTS = {"STDiT3Model": "videocache.pipelines.opensora.cachedit"}


def _cachedit_block_list(transformer: Any) -> Any:
    """The CACHEDIT_BLOCK_LISTS module for this transformer, or None."""
    import importlib

    name = CACHEDIT_BLOCK_LISTS.get(type(transformer).__name__)
    return importlib.import_module(name) if name else None


def _cachedit_target(pipe: Any) -> Any:
    """What to hand cache-dit: the pipeline when cache-dit knows its class by name, else cache-dit's own
    block adapter for the nearest base class it knows (our reference pipelines subclass diffusers' ones,
    e.g. ReferenceHunyuanVideoPipeline(HunyuanVideoPipeline)), or for a transformer in CACHEDIT_BLOCK_LISTS
    the block adapter its package gives (STDiT3). cache-dit 1.5.3's HunyuanVideo adapter
    assumes one transformer call per step (the distilled-guidance model); a transformer without a guidance
    embedding is guided by true CFG, two calls per step, so its cond and uncond calls are declared separate
    (has_separate_cfg) or they would read each other's cache."""
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    own = _cachedit_block_list(pipe.transformer)
    if own is not None:  # STDiT3: its interleaved lists as one, see videocache.pipelines.opensora.cachedit
        return own.block_adapter(pipe)
    if BlockAdapterRegister.is_supported(pipe):
        return pipe
    for base in type(pipe).__mro__[1:]:
        for name, make in BlockAdapterRegister._adapters.items():
            if base.__name__.startswith(name):
                true_cfg = getattr(pipe.transformer.config, "guidance_embeds", True) is False
                return make(pipe, **({"has_separate_cfg": True} if true_cfg else {}))
    return pipe  # cache-dit raises its own error


def family_of(method: Method) -> str:
    """Marker family for plots and reports (DBCache with and without its calibrator are distinct)."""
    return method.kind if isinstance(method, CacheDitDBCacheMethod) else method.family


# -- parsing -------------------------------------------------------------------------------------------
def parse_method(spec: str) -> Method:
    """Parse one spec; raise MethodSpecError (a ValueError, one line, listing the valid forms) otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(str(spec), "empty")
    text = spec.strip()
    parts = text.split(":")
    head = parts[0].lower()
    if text.lower() == "none":
        return NoCache()
    if head == "videocache":
        blockwise = len(parts) > 2 and parts[-1] == "blockwise"
        if blockwise:
            parts.pop()
        eb = parts.pop() if len(parts) > 2 and parts[-1] in ("eb", "eb-inv", "noeb") else None
        if len(parts) not in (2, 3) or not all(parts[1:]):
            raise _spec_error(text, "expected videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise]")
        return VideocacheMethod(
            profile=parts[1], preset=parts[2] if len(parts) == 3 else None, exposure_bias=eb, blockwise=blockwise
        )
    if head == "diffusers" and len(parts) >= 2:
        kind = parts[1].lower()
        forms = {"fbcache": "THRESHOLD", "taylorseer": "INTERVAL", "magcache": "THRESHOLD", "pab": "RANGE"}
        if kind not in forms:
            raise _spec_error(text)
        if kind == "pab" and len(parts) == 5:
            ranges = [_int(text, name, value, 2) for name, value in zip(("SPATIAL", "TEMPORAL", "CROSS"), parts[2:], strict=True)]
            return PABMethod(*ranges)
        if kind == "taylorseer" and len(parts) == 4:
            if parts[3] != "attn":
                raise _spec_error(text, "expected diffusers:taylorseer:INTERVAL[:attn]")
            return TaylorSeerMethod(_int(text, "INTERVAL", parts[2], 2), scope="attn")
        if len(parts) != 3:
            raise _spec_error(text, f"expected diffusers:{kind}:{forms[kind]}")
        value = parts[2]
        if kind == "fbcache":
            return FBCacheMethod(_positive_float(text, "THRESHOLD", value))
        if kind == "magcache":
            return MagCacheMethod(_positive_float(text, "THRESHOLD", value))
        if kind == "taylorseer":
            return TaylorSeerMethod(_int(text, "INTERVAL", value, 2))
        return PABMethod(_int(text, "RANGE", value, 2))
    if head == "cachedit" and len(parts) >= 2:
        kind = parts[1].lower()
        if kind == "dbcache":
            if len(parts) != 5:
                raise _spec_error(text, "expected cachedit:dbcache:Fn:Bn:THRESHOLD")
            order = None
        elif kind == "dbcache-taylorseer":
            if len(parts) not in (5, 6):
                raise _spec_error(text, "expected cachedit:dbcache-taylorseer:Fn:Bn:THRESHOLD[:ORDER]")
            order = _int(text, "ORDER", parts[5], 1) if len(parts) == 6 else 1
            if order > 4:
                raise _spec_error(text, f"ORDER must be 1 to 4, got {order}")
        else:
            raise _spec_error(text)
        return CacheDitDBCacheMethod(
            fn=_int(text, "Fn", parts[2], 1),
            bn=_int(text, "Bn", parts[3], 0),
            threshold=_positive_float(text, "THRESHOLD", parts[4]),
            taylorseer_order=order,
        )
    raise _spec_error(text)


def parse_methods(specs: list[str]) -> list[Method]:
    """Parse every spec, `none` first and exactly once, duplicates (by canonical form) dropped."""
    methods: list[Method] = [NoCache()]
    seen = {"none"}
    for spec in specs:
        method = parse_method(spec)
        if method.spec not in seen:
            seen.add(method.spec)
            methods.append(method)
    return methods
