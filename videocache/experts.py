"""Pipelines with several transformers (experts: Wan2.2 A14B's high-noise `transformer`, then its low-noise
`transformer_2`): one engine per expert, each running its own table on the steps its expert denoises.

The experts' tables are indexed by the generation's step; an expert's engine restricts its table to its own
steps (`CacheTable.within`): it computes everything at its first step, so nothing one expert computed is
read by the other, and keeps nothing past its last step. When a later expert starts, the earlier experts'
engines free whatever else they hold (their per-context state), also under `enable_model_cpu_offload`.
Which transformers a pipeline has and which steps each runs is the model family's declaration
(`ModelFamily.denoisers`); the steps are worked out once per table from the scheduler's timesteps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .engine import CacheEngine
from .family import Denoiser, FamilyError, family_of

_SUMMED = ("executed_flops", "skipped_flops", "fallbacks", "refused_stores", "cache_current_bytes",
           "cache_current_host_bytes")
_PEAKS = ("cache_peak_bytes", "cache_peak_host_bytes")  # the experts never hold outputs at the same time


def pipeline_denoisers(pipe: Any) -> list[Denoiser]:
    """The transformers a pipeline denoises with, in the order they run (its family's declaration; a
    pipeline whose family declares none, or that no family covers, has its `transformer` alone)."""
    try:
        declared = family_of(pipe.transformer).denoisers
    except FamilyError:  # uncached runs need no family; caching one says so (videocache.apply)
        declared = None
    found = [Denoiser("transformer")] if declared is None else list(declared(pipe))
    missing = [d.attribute for d in found if getattr(pipe, d.attribute, None) is None]
    if missing:
        raise ValueError(f"{type(pipe).__name__} has no {missing[0]} to cache")
    return found


def denoiser_modules(pipe: Any) -> list[Any]:
    """The pipeline's transformers, in the order they run (one, or its experts)."""
    return [getattr(pipe, d.attribute) for d in pipeline_denoisers(pipe)]


def steps_run(pipe: Any, denoiser: Denoiser) -> Callable[[int], tuple[int, int]]:
    """(start, stop): the steps of a run of N that `denoiser` denoises, from the pipeline's scheduler as the run
    set it (its timesteps are read once per table, to the host)."""

    def span(num_steps: int) -> tuple[int, int]:
        timesteps = [float(t) for t in pipe.scheduler.timesteps.tolist()]
        if len(timesteps) != num_steps:
            raise ValueError(f"the scheduler has {len(timesteps)} timesteps for a run of {num_steps} steps")
        return _span(denoiser, timesteps)

    return span


def expert_steps(pipe: Any, num_steps: int) -> dict[str, tuple[int, int]]:
    """Each transformer's (start, stop) steps of a `num_steps`-step run, on a copy of the pipeline's scheduler
    (one transformer: all of them)."""
    denoisers = pipeline_denoisers(pipe)
    if len(denoisers) == 1:
        return {denoisers[0].attribute: (0, num_steps)}
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_steps)
    timesteps = [float(t) for t in scheduler.timesteps.tolist()]
    return {d.attribute: _span(d, timesteps) for d in denoisers}


def _span(denoiser: Denoiser, timesteps: list[float]) -> tuple[int, int]:
    runs = [i for i, t in enumerate(timesteps) if denoiser.runs_at(t)]
    if not runs:
        return len(timesteps), len(timesteps)
    if runs != list(range(runs[0], runs[-1] + 1)):
        raise ValueError(f"{denoiser.attribute} denoises steps {runs}, not one consecutive span: videocache "
                         "caches experts that each run one span of steps")
    return runs[0], runs[-1] + 1


class ExpertEngines:
    """The engines of a pipeline's experts (by attribute, in the order they run), answering as one engine:
    `stats()` sums what all executed and gives each expert's own under "experts"; `remove()` detaches all."""

    def __init__(self, engines: Mapping[str, CacheEngine]) -> None:
        self.engines = dict(engines)
        earlier: list[CacheEngine] = []
        for engine in self.engines.values():
            engine.follows = tuple(earlier)
            earlier.append(engine)

    @property
    def preset_name(self) -> str | None:
        return next(iter(self.engines.values())).preset_name

    @property
    def attached(self) -> bool:
        return any(e.attached for e in self.engines.values())

    def remove(self) -> None:
        for engine in self.engines.values():
            engine.remove()

    def reset_stats(self) -> None:
        for engine in self.engines.values():
            engine.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Overall: FLOP-weighted computed fraction, summed FLOPs, calls, block runs, fallbacks and current
        bytes, the largest peak bytes; per expert: its engine's own stats."""
        parts = {attribute: engine.stats() for attribute, engine in self.engines.items()}
        out: dict[str, Any] = {key: sum(p[key] for p in parts.values()) for key in _SUMMED}
        out.update({key: max(p[key] for p in parts.values()) for key in _PEAKS})
        total = out["executed_flops"] + out["skipped_flops"]
        out["computed_fraction"] = out["executed_flops"] / total if total else None
        for key in ("calls", "block_runs"):
            out[key] = {k: sum(p[key][k] for p in parts.values()) for k in next(iter(parts.values()))[key]}
        out["compiled"] = all(p["compiled"] for p in parts.values())
        out["computed_fraction_by_expert"] = {a: p["computed_fraction"] for a, p in parts.items()}
        out["experts"] = parts
        return out

    def component_flops(self) -> np.ndarray:
        """(blocks, components) FLOPs of each component's last computed call, in whichever expert ran it last
        (experts of one architecture at one size cost the same)."""
        return np.maximum.reduce([e.component_flops() for e in self.engines.values()])

    def trace(self) -> list[dict[str, Any]]:
        """Every expert's trace records, each with its expert's attribute, in the order the experts run."""
        return [r | {"expert": a} for a, e in self.engines.items() for r in e.trace()]

    def __repr__(self) -> str:
        return f"ExpertEngines({', '.join(f'{a}: {e!r}' for a, e in self.engines.items())})"
