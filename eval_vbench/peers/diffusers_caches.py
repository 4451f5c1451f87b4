"""diffusers' caches as comparison methods: First-Block-Cache, TaylorSeer, MagCache and Pyramid Attention
Broadcast, each switched on with diffusers' own hooks.

diffusers' caches find blocks by their list's name (`blocks`, `transformer_blocks`, ...) and PAB finds diffusers
`Attention` modules only: on a transformer where they find nothing (Open-Sora's STDiT3, whose `spatial_blocks`
and `temporal_blocks` interleave), First-Block-Cache and MagCache get diffusers' own hooks on the engine
adapter's blocks in execution order (`enable_diffusers_cache`), PAB on the adapter's attention components
by kind, TaylorSeer on module names: the model family's peer settings (`videocache.family.PeerSettings`,
declared in `pipelines/<family>/peers.py`) say which, and which peers cannot attach at all.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .spec import (
    WARMUP_FRACTION,
    AppliedMethod,
    Method,
    MethodSetup,
    family_peers,
    int_at_least,
    positive_float,
    spec_error,
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


def denoiser_modules(pipe: Any) -> list[Any]:
    """The pipeline's transformers (its experts where it has several); videocache imported only when needed."""
    from videocache.experts import denoiser_modules as modules

    return modules(pipe)


def _diffusers_applied(pipe: Any, config: Any, info: dict[str, Any] | None = None) -> AppliedMethod:
    """The cache enabled on every transformer of the pipeline (each expert of a two-expert one gets its own
    hooks and state, from `config`, or from `config[i]` where a list gives each its own)."""
    experts = denoiser_modules(pipe)
    configs = config if isinstance(config, list) else [config] * len(experts)
    enabled = []
    try:
        for transformer, each in zip(experts, configs, strict=True):
            enable_diffusers_cache(transformer, copy.copy(each))
            enabled.append(transformer)
    except Exception:
        for transformer in enabled:
            transformer.disable_cache()
        raise
    return _diffusers_applied_hooked(experts, info)


def _diffusers_applied_hooked(transformers: Any, info: dict[str, Any] | None = None) -> AppliedMethod:
    """The AppliedMethod of a diffusers cache already enabled on `transformers` (one, or a list)."""
    from ..metrics.cache_memory import diffusers_hook_roots, tensor_bytes

    transformers = transformers if isinstance(transformers, list) else [transformers]

    def remove() -> None:
        for transformer in transformers:
            transformer.disable_cache()

    return AppliedMethod(
        remove=remove,
        cache_bytes=lambda: sum(tensor_bytes(diffusers_hook_roots(t)) for t in transformers),
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
        agreements = [agree_first_block_cache(t) for t in denoiser_modules(pipe)]
        remove = applied.remove

        def remove_all() -> None:
            for agreement in agreements:
                agreement.remove()
            remove()

        def reset() -> None:
            for agreement in agreements:
                agreement.reset()

        applied.remove = remove_all
        applied.stats = agreements[0].stats if len(agreements) == 1 else (
            lambda: {"experts": [agreement.stats() for agreement in agreements]})
        applied.reset_stats = reset
        if setup.parallel is not None and setup.parallel.sequence_degree > 1:
            applied.info["decision"] = (
                "agreed across ranks (all-reduced global statistic; diffusers 0.42.1 decides on the local shard)"
            )
        return applied


@dataclass(frozen=True)
class TaylorSeerMethod(Method):
    """diffusers TaylorSeer: full compute every INTERVAL steps, Taylor forecasts in between, of every
    component's output (default) or of the attention only (`:attn`); which modules, the model family's
    `PeerSettings.taylorseer_modules` (diffusers' default names match nothing on Wan or STDiT3: it would run
    uncached without a word)."""

    interval: int
    scope: str = "components"
    family: ClassVar[str] = "diffusers:taylorseer"

    @property
    def spec(self) -> str:
        return f"diffusers:taylorseer:{self.interval}" + (":attn" if self.scope == "attn" else "")

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        from diffusers import TaylorSeerCacheConfig

        name, peers = family_peers(pipe.transformer)
        if self.scope not in peers.taylorseer_modules:
            raise ValueError(f"diffusers:taylorseer: the {name} model family declares no TaylorSeer module names for "
                             f"scope {self.scope!r} (PeerSettings.taylorseer_modules)")
        cache, skip = peers.taylorseer_modules[self.scope]
        kwargs = {k: v for k, v in (("cache_identifiers", cache), ("skip_predict_identifiers", skip)) if v is not None}
        config = TaylorSeerCacheConfig(cache_interval=self.interval, **kwargs)
        return _diffusers_applied(pipe, config, {"cache_identifiers": cache or "diffusers defaults",
                                                 "skip_predict_identifiers": skip or []})


_MAG_PRINT = re.compile(r"\[MagCache\] Calibration Complete[^\n]*\n\s*(\[[^\]]*\])")


def printed_ratio_lists(printed: str) -> list[list[float]]:
    """Every ratio list of diffusers' MagCache calibration printout, in order (one per cache context and expert)."""
    return [[float(v) for v in found] for found in map(ast.literal_eval, _MAG_PRINT.findall(printed)) if found]


def average_ratios(lists: list[list[float]]) -> list[float]:
    """Ratio lists of one transformer's cache contexts (e.g. cond and uncond on Wan), averaged element-wise into
    the single list MagCacheConfig takes."""
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios (did the run cover every step?)")
    length = len(lists[0])
    if any(len(found) != length for found in lists):
        raise RuntimeError(
            f"MagCache calibration printed ratio lists of different lengths: {[len(x) for x in lists]}"
        )
    return [sum(col) / len(col) for col in zip(*lists, strict=True)]


def parse_mag_ratios(printed: str) -> list[float]:
    """The averaged ratios of one transformer's calibration printout."""
    return average_ratios(printed_ratio_lists(printed))


@dataclass(frozen=True)
class MagCacheMethod(Method):
    """diffusers MagCache, calibrated automatically on the comparison's first prompt."""

    threshold: float
    family: ClassVar[str] = "diffusers:magcache"

    @property
    def spec(self) -> str:
        return f"diffusers:magcache:{self.threshold:g}"

    def calibrated_ratios(self, pipe: Any, setup: MethodSetup) -> list[list[float]]:
        """Ratios for this step count, one list per expert (its own steps: MagCache counts the calls it sees, so
        a two-expert pipeline's second expert would otherwise read the first steps' ratios), from the store or
        from one calibration run (then stored)."""
        from diffusers import MagCacheConfig

        steps = self.expert_steps(pipe, setup)
        key = f"magcache_ratios_{setup.num_inference_steps}" + ("" if len(steps) == 1 else "_experts")
        if key not in setup.store:
            experts = denoiser_modules(pipe)
            for transformer, n in zip(experts, steps, strict=True):
                enable_diffusers_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=n))
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    setup.calibrate()
            finally:
                for transformer in experts:
                    transformer.disable_cache()
            # each expert prints one list per cache context (cond, uncond) when its steps are done, in turn
            lists = printed_ratio_lists(printed.getvalue())
            per = max(1, len(lists) // len(steps))
            ratios = [average_ratios(lists[i * per:(i + 1) * per]) for i in range(len(steps))]
            setup.store[key] = ratios[0] if len(steps) == 1 else ratios
            setup.save_store()
        stored = setup.store[key]
        return [list(stored)] if len(steps) == 1 else [list(r) for r in stored]

    @staticmethod
    def expert_steps(pipe: Any, setup: MethodSetup) -> list[int]:
        from videocache.experts import expert_steps

        return [stop - start for start, stop in expert_steps(pipe, setup.num_inference_steps).values()]

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        from diffusers import MagCacheConfig

        ratios = self.calibrated_ratios(pipe, setup)
        configs = [MagCacheConfig(threshold=self.threshold, num_inference_steps=n, retention_ratio=WARMUP_FRACTION,
                                  mag_ratios=r) for n, r in zip(self.expert_steps(pipe, setup), ratios, strict=True)]
        info = {"mag_ratios": [round(x, 6) for x in ratios[0]]} if len(ratios) == 1 else {
            "mag_ratios_per_expert": [[round(x, 6) for x in r] for r in ratios],
            "steps_per_expert": self.expert_steps(pipe, setup)}
        return _diffusers_applied(pipe, configs, info)


@dataclass(frozen=True)
class PABMethod(Method):
    """diffusers Pyramid Attention Broadcast: self-attention recomputed every RANGE calls in its window
    (diffusers' default window); or the pyramid SPATIAL:TEMPORAL:CROSS (spatial, temporal and cross
    attention ranges) in the model family's published PAB window (`PeerSettings.pab_window`; Open-Sora's).

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

    def config(self, timestep: Callable[[], Any], transformer: Any) -> Any:
        from diffusers import PyramidAttentionBroadcastConfig

        if self.temporal_range is None:
            return PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=self.skip_range, current_timestep_callback=timestep
            )
        name, peers = family_peers(transformer)
        window = peers.pab_window
        if window is None:
            raise ValueError(f"{self.spec}: the {name} model family declares no published PAB window "
                             "(PeerSettings.pab_window); use diffusers:pab:RANGE")
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
        if len(denoiser_modules(pipe)) > 1 and not _has_diffusers_attention(transformer):
            raise ValueError(f"{self.spec}: PAB on components by name covers one transformer, not a pipeline's experts")
        if _has_diffusers_attention(transformer):
            config = self.config(lambda: pipe.current_timestep, transformer)
            info = {"spatial_attention_timestep_skip_range": list(config.spatial_attention_timestep_skip_range)}
            return _diffusers_applied(pipe, config, info)
        timestep = _TimestepProbe(transformer)
        try:
            config = self.config(timestep, transformer)
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
    family, peers = family_peers(transformer)
    hooked: dict[str, int] = {}
    for block in adapter.blocks(transformer):
        for name, module in adapter.component_modules(block).items():
            kind = peers.pab_components.get(name)
            if kind is None or getattr(config, f"{kind}_attention_block_skip_range") is None:
                continue
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_branch_pab_hook(config, kind), _PYRAMID_ATTENTION_BROADCAST_HOOK)
            hooked[kind] = hooked.get(kind, 0) + 1
    if not hooked:
        raise ValueError(f"diffusers:pab: no attention of {type(transformer).__name__} to hook: it has no diffusers "
                         f"Attention modules and the {family} model family names no PAB components "
                         "(PeerSettings.pab_components)")
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config  # disable_cache removes the hooks by name
    return hooked


def parse_spec(text: str, parts: list[str]) -> Method:
    """A `diffusers:...` spec, split at ':' (`parts`); MethodSpecError otherwise."""
    if len(parts) < 2:
        raise spec_error(text)
    kind = parts[1].lower()
    forms = {"fbcache": "THRESHOLD", "taylorseer": "INTERVAL", "magcache": "THRESHOLD", "pab": "RANGE"}
    if kind not in forms:
        raise spec_error(text)
    if kind == "pab" and len(parts) == 5:
        ranges = [int_at_least(text, name, value, 2) for name, value in zip(("SPATIAL", "TEMPORAL", "CROSS"), parts[2:], strict=True)]
        return PABMethod(*ranges)
    if kind == "taylorseer" and len(parts) == 4:
        if parts[3] != "attn":
            raise spec_error(text, "expected diffusers:taylorseer:INTERVAL[:attn]")
        return TaylorSeerMethod(int_at_least(text, "INTERVAL", parts[2], 2), scope="attn")
    if len(parts) != 3:
        raise spec_error(text, f"expected diffusers:{kind}:{forms[kind]}")
    value = parts[2]
    if kind == "fbcache":
        return FBCacheMethod(positive_float(text, "THRESHOLD", value))
    if kind == "magcache":
        return MagCacheMethod(positive_float(text, "THRESHOLD", value))
    if kind == "taylorseer":
        return TaylorSeerMethod(int_at_least(text, "INTERVAL", value, 2))
    return PABMethod(int_at_least(text, "RANGE", value, 2))
