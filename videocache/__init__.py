"""videocache: training-free feature caching for video diffusion transformers.

    import videocache
    engine = videocache.apply(pipe, "reference-wan", "fast")   # hooks the pipeline's transformer
    video = pipe(prompt, ...)
    print(engine.stats()["computed_fraction"])
    videocache.remove(pipe)                                    # output is bit-identical to never applied

The engine is model-agnostic: what it knows of a model comes from the model's family
(`videocache.family.ModelFamily`), found by the transformer's class when `apply` runs; families are
installed packages' entry points (group `videocache.families`) or registered with `register_family`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .adapters import ModelAdapter, get_adapter
from .engine import CacheEngine, EngineConfig
from .experts import ExpertEngines, pipeline_denoisers, steps_run
from .exposure_bias import ExposureBiasConfig, b_schedule, correct_velocity
from .family import (
    Denoiser,
    FamilyError,
    FlopPoint,
    GenerationDefaults,
    ModelFamily,
    PeerSettings,
    families,
    family_of,
    register_family,
)
from .guard import GuardConfig
from .profile import (
    ExpertsProfile,
    PresetSpec,
    Profile,
    ProfileError,
    available_profiles,
    build_table,
    load_profile,
)
from .table import COMPONENTS, Action, BlockGroup, BlockLayout, CacheTable
from .weights import loaded_lora, lora_mismatch

__all__ = [
    "COMPONENTS",
    "BlockGroup",
    "BlockLayout",
    "Action",
    "CacheEngine",
    "CacheTable",
    "Denoiser",
    "EngineConfig",
    "ExpertEngines",
    "ExpertsProfile",
    "ExposureBiasConfig",
    "FamilyError",
    "FlopPoint",
    "GenerationDefaults",
    "GuardConfig",
    "ModelAdapter",
    "ModelFamily",
    "PeerSettings",
    "PresetSpec",
    "Profile",
    "ProfileError",
    "apply",
    "apply_to_transformer",
    "available_profiles",
    "b_schedule",
    "build_table",
    "correct_velocity",
    "families",
    "family_of",
    "get_adapter",
    "get_engine",
    "load_profile",
    "register_family",
    "remove",
]

_ATTR = "_videocache_engine"


def _preflight(
    preset: PresetSpec, steps: int, adapter: ModelAdapter, scheduler: Any, layout: BlockLayout
) -> None:
    """Expand the preset once for `steps` steps, so a bad table fails at apply time, not mid-generation."""
    preset.check_steps(steps)
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        return
    try:
        trial = copy.deepcopy(scheduler)
        trial.set_timesteps(steps)
        sigmas = adapter.scheduler_sigmas(trial, steps)
    except Exception:  # schedulers that need extra arguments (e.g. dynamic shifting): checked at run time
        return
    build_table(preset, sigmas, layout.num_blocks, layout)


def apply_to_transformer(
    transformer: torch.nn.Module,
    scheduler: Any = None,
    table_or_profile: CacheTable | Profile | str | Path | None = None,
    preset: str | None = None,
    *,
    max_cache_bytes: int | None = None,
    max_host_cache_bytes: int | None = None,
    cache_dtype: torch.dtype | None = None,
    offload_to_cpu: bool = False,
    exposure_bias: bool | ExposureBiasConfig | None = None,
    trace: bool = True,
    num_inference_steps: int | None = None,
    observer: Any = None,
    fuse_skipped_steps: bool = True,
    compile_options: dict[str, Any] | None = None,
    guard: bool | GuardConfig | None = None,
    guidance_scale: Any = None,
    variants: bool = True,
    steps_run: Callable[[int], tuple[int, int]] | None = None,
) -> CacheEngine:
    """Attach a cache engine to a transformer without a pipeline.

    `scheduler` (or a zero-argument callable returning it) supplies the per-step sigmas a profile preset
    needs; it may be None with a fixed CacheTable when calls carry a `cache_context` with `step_index`.
    `exposure_bias` overrides the preset's enabled flag (a bool) or its whole configuration (an
    ExposureBiasConfig); None keeps the preset's. `num_inference_steps`, when
    known, is checked against the profile or table now instead of at the first step.
    Storage (`max_cache_bytes`, `max_host_cache_bytes`, `cache_dtype`, `offload_to_cpu`) and
    `compile_options` are described in `EngineConfig`.
    `guard`: the run-time guard on the table (`videocache.guard`): None follows the profile (on where its
    `guard` section is enabled), True turns the profile's on (a profile without one is an error), False off,
    a GuardConfig uses that one (also with a CacheTable).
    `guidance_scale` (a zero-argument callable, or a number): the run's guidance scale, which picks the
    preset's calibration made nearest to it (and to the run's step count) where the profile has variants
    (`apply` reads the pipeline's); `variants=False` always uses the profile's own calibration.
    `steps_run(N)`: (start, stop), the steps of an N-step run this transformer denoises, where it is one expert
    of several (`apply` works it out for a pipeline's experts; see `videocache.experts`).

    torch.compile: apply before or after `transformer.compile_repeated_blocks()` or
    `transformer.compile()`, or pass a `torch.compile(transformer)` wrapper; the engine then compiles the
    block compute itself and keeps its decisions out of the graphs (see `videocache.engine`).
    """
    transformer = getattr(transformer, "_orig_mod", transformer)  # a torch.compile(...) wrapper
    if getattr(transformer, _ATTR, None) is not None:
        raise RuntimeError("videocache is already applied to this transformer; call videocache.remove first")
    if table_or_profile is None:
        raise ValueError("give the cache's profile (a name, a YAML path or a Profile) or a CacheTable")
    adapter = get_adapter(transformer)
    fingerprint = adapter.fingerprint(transformer)
    get_scheduler = (
        scheduler if callable(scheduler) and not hasattr(scheduler, "set_timesteps") else (lambda: scheduler)
    )

    profile_obj, preset_name = None, None
    if isinstance(table_or_profile, CacheTable):
        if preset is not None:
            raise ValueError("preset applies to profiles; a CacheTable is used as given")
        source: Any = table_or_profile
        eb = exposure_bias if isinstance(exposure_bias, ExposureBiasConfig) else ExposureBiasConfig(enabled=bool(exposure_bias))
        if num_inference_steps is not None and num_inference_steps != source.num_steps:
            raise ValueError(
                f"the cache table was made for {source.num_steps} steps; this run has {num_inference_steps}"
            )
    else:
        profile_obj = load_profile(table_or_profile)
        if isinstance(profile_obj, ExpertsProfile):
            raise ProfileError(
                f"profile {profile_obj.name} holds a table per expert ({', '.join(profile_obj.experts)}): apply it to "
                "the pipeline with videocache.apply, or give this transformer its expert's (profile.experts[name])")
        profile_obj.check_model(fingerprint)
        source = profile_obj.preset(preset)
        if not variants:
            source = dataclasses.replace(source, variants=())
        preset_name = source.name
        eb = source.exposure_bias or ExposureBiasConfig()
        if isinstance(exposure_bias, ExposureBiasConfig):
            eb = exposure_bias
        elif exposure_bias is not None:
            eb = dataclasses.replace(eb, enabled=bool(exposure_bias))
        steps = num_inference_steps if num_inference_steps is not None else profile_obj.steps
        _preflight(source, steps, adapter, get_scheduler(), BlockLayout.from_fingerprint(fingerprint))
    guard_config = _guard_config(guard, profile_obj)

    config = EngineConfig(
        max_cache_bytes=max_cache_bytes,
        max_host_cache_bytes=max_host_cache_bytes,
        cache_dtype=cache_dtype,
        offload_to_cpu=offload_to_cpu,
        exposure_bias=eb,
        trace=trace,
        observer=observer,
        fuse_skipped_steps=fuse_skipped_steps,
        compile_options=compile_options,
        guard=guard_config,
    )
    engine = CacheEngine(
        transformer, adapter, source, get_scheduler, config, profile=profile_obj, preset=preset_name,
        guidance_scale=guidance_scale if callable(guidance_scale) or guidance_scale is None else (lambda: guidance_scale),
        steps_run=steps_run,
    )
    setattr(transformer, _ATTR, engine)
    return engine


def _guard_config(guard: bool | GuardConfig | None, profile: Profile | None) -> GuardConfig | None:
    if isinstance(guard, GuardConfig):
        return guard
    if guard is not None and not isinstance(guard, bool):
        raise ValueError(f"guard must be True, False, None or a GuardConfig; got {guard!r}")
    own = None if profile is None else profile.guard
    if guard is True:
        if own is None:
            where = "a CacheTable" if profile is None else f"profile {profile.name}"
            raise ValueError(f"guard=True: {where} has no guard calibration; add one with videocache profile --guard-only")
        return dataclasses.replace(own, enabled=True)
    if guard is False or own is None or not own.enabled:
        return None
    return own


def apply(
    pipe: Any,
    profile: Profile | ExpertsProfile | str | Path | None = None,
    preset: str | None = None,
    *,
    table: CacheTable | Mapping[str, CacheTable] | None = None,
    max_cache_bytes: int | None = None,
    max_host_cache_bytes: int | None = None,
    cache_dtype: torch.dtype | None = None,
    offload_to_cpu: bool = False,
    exposure_bias: bool | ExposureBiasConfig | None = None,
    trace: bool = True,
    num_inference_steps: int | None = None,
    observer: Any = None,
    fuse_skipped_steps: bool = True,
    compile_options: dict[str, Any] | None = None,
    guard: bool | GuardConfig | None = None,
    variants: bool = True,
) -> CacheEngine | ExpertEngines:
    """Cache the pipeline's transformer with a profile preset (or a concrete `table=`); returns the engine, also
    kept at `pipe._videocache_engine`. The profile is checked against the model's fingerprint here.
    A pipeline with several transformers (Wan2.2 A14B's two experts, as its model family declares them) needs a
    profile with a table per expert (an ExpertsProfile), or `table=` a CacheTable for them all or one per expert
    ({attribute: CacheTable}): each expert gets its own engine on the steps it denoises (`videocache.experts`),
    and an `ExpertEngines` is returned.
    `observer(context, step, block, component, output)` sees every computed component (calibration).
    `fuse_skipped_steps=False` skips uniform skip steps block by block (see EngineConfig). Where the profile has
    presets calibrated at several guidance scales or step counts (variants), each run uses the one made nearest the
    pipeline's guidance scale (an expert's own), then its step count (`variants=False`: always the profile's own).
    `guard`: see `apply_to_transformer`."""
    if getattr(pipe, _ATTR, None) is not None:
        raise RuntimeError(
            "videocache is already applied to this pipeline; call videocache.remove(pipe) first"
        )
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer to cache")
    denoisers = pipeline_denoisers(pipe)
    sources = _expert_sources(profile, table, [d.attribute for d in denoisers],
                              getattr(getattr(pipe, "config", None), "boundary_ratio", None), loaded_lora(pipe))
    options = dict(
        max_cache_bytes=max_cache_bytes, max_host_cache_bytes=max_host_cache_bytes, cache_dtype=cache_dtype,
        offload_to_cpu=offload_to_cpu, exposure_bias=exposure_bias, trace=trace, num_inference_steps=num_inference_steps,
        observer=observer, fuse_skipped_steps=fuse_skipped_steps, compile_options=compile_options, guard=guard,
        variants=variants,
    )
    engines: dict[str, CacheEngine] = {}
    try:
        for denoiser in denoisers:
            engines[denoiser.attribute] = apply_to_transformer(
                getattr(pipe, denoiser.attribute),
                lambda: getattr(pipe, "scheduler", None),
                sources[denoiser.attribute],
                None if table is not None else preset,
                # diffusers pipelines set it per call
                guidance_scale=lambda name=denoiser.guidance_scale: getattr(pipe, name, None),
                steps_run=None if len(denoisers) == 1 else steps_run(pipe, denoiser),
                **options,
            )
    except Exception:
        for engine in engines.values():
            remove(engine.transformer)
        raise
    engine = next(iter(engines.values())) if len(engines) == 1 else ExpertEngines(engines)
    setattr(pipe, _ATTR, engine)
    return engine


def _expert_sources(profile: Any, table: Any, experts: list[str], boundary: float | None = None,
                    lora: dict | None = None) -> dict[str, Any]:
    """What each expert's engine runs: its table, its expert's profile, or the profile (one transformer).
    `boundary`: the pipeline's boundary_ratio, checked against the one the profile was made for; `lora`: the
    LoRA the pipeline runs (videocache.weights), against the one it was calibrated with (one-line warnings)."""
    if table is not None:  # one table indexed by the generation's step: each expert runs its own steps of it
        if not isinstance(table, Mapping):
            return dict.fromkeys(experts, table)
        if sorted(table) != sorted(experts):
            raise ValueError(f"table= names experts {', '.join(table)}; this pipeline has {', '.join(experts)}")
        return dict(table)
    if profile is None:
        raise ValueError("give the cache's profile (a name, a YAML path or a Profile) or a CacheTable")
    loaded = load_profile(profile)
    mismatch = lora_mismatch(loaded.name, loaded.metadata.get("lora"), lora)
    if mismatch:
        warnings.warn(mismatch, stacklevel=3)
    if not isinstance(loaded, ExpertsProfile):
        if len(experts) > 1:
            raise ProfileError(
                f"profile {loaded.name} has one table; this pipeline has experts {', '.join(experts)}: give a profile "
                "with a table per expert (videocache profile makes one on this pipeline), or cache one expert with "
                "videocache.apply_to_transformer")
        return {experts[0]: loaded}
    missing = [e for e in experts if e not in loaded.experts]
    if len(experts) == 1 or missing:
        raise ProfileError(
            f"profile {loaded.name} has tables for experts {', '.join(loaded.experts)}; this pipeline runs "
            f"{', '.join(experts)}: " + (f"it has no table for {missing[0]}" if missing else "use a profile made for it"))
    if None not in (boundary, loaded.boundary_ratio) and abs(boundary - loaded.boundary_ratio) > 1e-9:
        warnings.warn(f"videocache: profile {loaded.name} was made for experts switching at boundary_ratio "
                      f"{loaded.boundary_ratio:g}, this pipeline switches at {boundary:g}: each expert runs its "
                      "table on its own steps, but the split is not the one calibrated (videocache profile on this "
                      "pipeline makes tables for it)", stacklevel=3)
    return loaded.experts


def get_engine(pipe_or_transformer: Any) -> CacheEngine | ExpertEngines | None:
    """The engine applied to a pipeline (its experts' ExpertEngines where it has several) or transformer (or to
    a pipeline's transformer), or None."""
    engine = getattr(pipe_or_transformer, _ATTR, None)
    if engine is None:
        engine = getattr(getattr(pipe_or_transformer, "transformer", None), _ATTR, None)
    return engine


def remove(pipe_or_transformer: Any) -> None:
    """Remove every videocache hook and free kept tensors; a no-op when nothing is applied."""
    engine = get_engine(pipe_or_transformer)
    if engine is None:
        return
    engine.remove()
    parts = engine.engines.values() if isinstance(engine, ExpertEngines) else (engine,)
    for owner, applied in ((pipe_or_transformer, engine), *((e.transformer, e) for e in parts)):
        if getattr(owner, _ATTR, None) is applied:
            delattr(owner, _ATTR)
