"""cache-dit's DBCache, alone or with its TaylorSeer calibrator, as a comparison method.

cache-dit patches pipeline classes for the whole process (`isolated`: a worker process of its own) and cannot run
under videocache's parallelism, so it brings its own context parallelism (`parallel_impl = "own"`). On a
transformer whose block lists it cannot wrap as they are (Open-Sora's STDiT3, whose `spatial_blocks` and
`temporal_blocks` interleave) it gets one block list in execution order from the model's family
(`PeerSettings.cachedit_blocks`).
"""

from __future__ import annotations

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
        if _cachedit_blocks(pipe.transformer) is not None:
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
        own = _cachedit_blocks(pipe.transformer)
        target = _cachedit_target(pipe)
        try:
            cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)
        except Exception:
            if own is not None:
                own[1](pipe.transformer)
            raise
        info = {"max_warmup_steps": config.max_warmup_steps, "cache_dit": getattr(cache_dit, "__version__", "?")}
        if own is not None:
            info["adapter"] = (f"{own[0].__module__}.{own[0].__name__}: the blocks in execution order as one list, "
                               "has_separate_cfg=True")
        elif target is not pipe:
            info["adapter"] = (f"cache-dit's own adapter for {type(pipe).__mro__[1].__name__}, "
                               f"has_separate_cfg={target.has_separate_cfg}")
        if getattr(pipe, "_videocache_cachedit_parallel", None) is not None:
            info["parallel"] = "cache-dit's own context parallelism (its DBCache all-reduces its residual statistic)"

        def remove() -> None:
            cache_dit.disable_cache(pipe)
            if own is not None:
                own[1](pipe.transformer)

        return AppliedMethod(remove=remove, cache_bytes=lambda: tensor_bytes(cachedit_roots(pipe)), info=info)


def _cachedit_blocks(transformer: Any) -> Any:
    """(attach(pipe) -> cache-dit BlockAdapter, detach(transformer)) where the transformer's family gives
    cache-dit one block list in execution order, else None."""
    return family_peers(transformer)[1].cachedit_blocks


def _cachedit_target(pipe: Any) -> Any:
    """What to hand cache-dit: the pipeline when cache-dit knows its class by name, else cache-dit's own
    block adapter for the nearest base class it knows (our reference pipelines subclass diffusers' ones,
    e.g. ReferenceHunyuanVideoPipeline(HunyuanVideoPipeline)), or the block adapter the transformer's family
    gives (STDiT3). cache-dit 1.5.3's HunyuanVideo adapter
    assumes one transformer call per step (the distilled-guidance model); a transformer without a guidance
    embedding is guided by true CFG, two calls per step, so its cond and uncond calls are declared separate
    (has_separate_cfg) or they would read each other's cache."""
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    own = _cachedit_blocks(pipe.transformer)
    if own is not None:  # STDiT3: its interleaved lists as one, see pipelines/opensora/peers.py
        return own[0](pipe)
    if BlockAdapterRegister.is_supported(pipe):
        return pipe
    for base in type(pipe).__mro__[1:]:
        for name, make in BlockAdapterRegister._adapters.items():
            if base.__name__.startswith(name):
                true_cfg = getattr(pipe.transformer.config, "guidance_embeds", True) is False
                return make(pipe, **({"has_separate_cfg": True} if true_cfg else {}))
    return pipe  # cache-dit raises its own error


def parse_spec(text: str, parts: list[str]) -> CacheDitDBCacheMethod:
    """A `cachedit:...` spec, split at ':' (`parts`); MethodSpecError otherwise."""
    if len(parts) < 2:
        raise spec_error(text)
    kind = parts[1].lower()
    if kind == "dbcache":
        if len(parts) != 5:
            raise spec_error(text, "expected cachedit:dbcache:Fn:Bn:THRESHOLD")
        order = None
    elif kind == "dbcache-taylorseer":
        if len(parts) not in (5, 6):
            raise spec_error(text, "expected cachedit:dbcache-taylorseer:Fn:Bn:THRESHOLD[:ORDER]")
        order = int_at_least(text, "ORDER", parts[5], 1) if len(parts) == 6 else 1
        if order > 4:
            raise spec_error(text, f"ORDER must be 1 to 4, got {order}")
    else:
        raise spec_error(text)
    return CacheDitDBCacheMethod(
        fn=int_at_least(text, "Fn", parts[2], 1),
        bn=int_at_least(text, "Bn", parts[3], 0),
        threshold=positive_float(text, "THRESHOLD", parts[4]),
        taylorseer_order=order,
    )
