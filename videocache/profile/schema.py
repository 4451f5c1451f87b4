"""The profile schema and its validation: a profile, its model fingerprint, presets, rules, block runs and
step rules, each validated in `__post_init__` or while parsed, every mistake a one-line `ProfileError`
naming the field to fix."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..exposure_bias import ExposureBiasConfig
from ..fgbg import FgBgProfile
from ..guard import GuardConfig
from ..table import COMPONENTS, BlockGroup, BlockLayout, consecutive_runs, is_forecast_gain
from .search_path import suggest_profiles

SCHEMA_VERSION = 1
STAGES = ("early", "late", "all")
MODES = ("reuse", "forecast")



class ProfileError(ValueError):
    """A profile that cannot be used as written; the message is one line saying what to fix."""


@contextlib.contextmanager
def _where(path: str) -> Iterator[None]:
    """Prefix validation errors raised inside with the field path, keeping them one line."""
    try:
        yield
    except (ValueError, TypeError) as e:  # ProfileError included: nested paths accumulate
        msg = str(e)
        raise ProfileError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def _check_keys(data: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"must be a mapping; got {type(data).__name__} {data!r}")
    unknown = [k for k in data if k not in required + optional]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (valid: {', '.join(required + optional)})")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing required key {missing[0]!r}")
    return dict(data)


def _check_step_count(steps: Any) -> None:
    """A profile's or a variant's `steps`: the step count its presets were calibrated for."""
    if not _is_int(steps) or steps < 1:
        raise ProfileError(f"steps must be an integer >= 1; got {steps!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- block selections --------------------------------------------------------------------------------
def _parse_block_item(item: Any) -> tuple[int, int]:
    if _is_int(item):
        return item, item
    if isinstance(item, str):
        text = item.strip()
        if "-" in text:
            a, _, b = text.partition("-")
            if a.strip().isdigit() and b.strip().isdigit():
                lo, hi = int(a), int(b)
                if lo <= hi:
                    return lo, hi
        elif text.isdigit():
            return int(text), int(text)
    raise ValueError(
        f"blocks must be 'all', an index, an 'a-b' range (a <= b) or a list of them; got {item!r}"
    )


def parse_blocks(spec: Any) -> tuple[tuple[int, int], ...] | None:
    """'all' -> None; otherwise inclusive (lo, hi) ranges."""
    if spec == "all":
        return None
    items = spec if isinstance(spec, list | tuple) else [spec]
    if not items:
        raise ValueError("blocks list is empty")
    return tuple(_parse_block_item(i) for i in items)


def resolve_blocks(spec: Any, num_blocks: int) -> list[int]:
    ranges = parse_blocks(spec)
    if ranges is None:
        return list(range(num_blocks))
    out: set[int] = set()
    for lo, hi in ranges:
        if hi >= num_blocks:
            raise ValueError(
                f"block {hi} does not exist in a model with {num_blocks} blocks (0-{num_blocks - 1})"
            )
        out.update(range(lo, hi + 1))
    return sorted(out)


# -- schema ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRule:
    """`scale`: carry the preset to the run's step count, within [min, max], keeping its computed fraction:
    explicit step lists are resampled (`StepPlan.resample`), warm-up/final counts keep their share of the run,
    rule intervals and block-run intervals stay (every k-th step is a share already); `exact`: only the
    profile's own step count."""

    mode: str = "scale"
    min_steps: int | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("scale", "exact"):
            raise ValueError(f"step_rule.mode must be 'scale' or 'exact'; got {self.mode!r}")
        for name in ("min_steps", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"step_rule.{name} must be an integer >= 1; got {v!r}")
        if self.min_steps is not None and self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"step_rule.min_steps ({self.min_steps}) is above max_steps ({self.max_steps})")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture fingerprint the profile was made for: one kind of block with `components` (Wan), or
    `groups` of blocks with components of their own (HunyuanVideo's dual- and single-stream blocks)."""

    architecture: str
    num_blocks: int
    components: tuple[str, ...] = COMPONENTS
    groups: tuple[BlockGroup, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"model.architecture must be a class name; got {self.architecture!r}")
        if not _is_int(self.num_blocks) or self.num_blocks < 1:
            raise ValueError(f"model.num_blocks must be an integer >= 1; got {self.num_blocks!r}")
        if self.groups is not None:
            groups = tuple(g if isinstance(g, BlockGroup) else _group_from_dict(g) for g in self.groups)
            total = sum(g.num_blocks for g in groups)
            if total != self.num_blocks:
                raise ValueError(f"model.groups hold {total} blocks; model.num_blocks is {self.num_blocks}")
            object.__setattr__(self, "groups", groups)
            object.__setattr__(self, "components", BlockLayout(groups).names)
            return
        comps = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        if not comps or not all(isinstance(c, str) and c for c in comps) or len(set(comps)) != len(comps):
            raise ValueError(f"model.components must be a non-empty list of distinct component names; got {list(comps)}")
        object.__setattr__(self, "components", comps)

    @property
    def layout(self) -> BlockLayout:
        """The table layout of this model: its groups, or one group of its components."""
        return BlockLayout.from_fingerprint(self.fingerprint())

    def fingerprint(self) -> dict:
        out = {"architecture": self.architecture, "num_blocks": self.num_blocks}
        if self.groups is not None:
            return out | {"groups": [g.to_dict() for g in self.groups]}
        return out | {"components": list(self.components)}

    @classmethod
    def from_fingerprint(cls, fingerprint: Mapping[str, Any]) -> ModelSpec:
        groups = fingerprint.get("groups")
        return cls(
            fingerprint["architecture"], fingerprint["num_blocks"],
            tuple(fingerprint.get("components", COMPONENTS)), None if groups is None else tuple(groups),
        )


def _group_from_dict(raw: Any) -> BlockGroup:
    g = _check_keys(raw, ("name", "num_blocks", "components"), ("blocks",))
    return BlockGroup(g["name"], g["num_blocks"], g["components"], g.get("blocks"))


def _check_component_names(names: Sequence[str], layout: BlockLayout, blocks: Sequence[int] | None = None) -> None:
    """Raise unless every name is a component of the model (of some block in `blocks`, when given)."""
    for name in names:
        if name not in layout.names:
            raise ValueError(f"unknown component {name!r} (this model has {', '.join(layout.names)})")
        if blocks is not None and not layout.cells_of(name, blocks):
            raise ValueError(f"none of the selected blocks has a {name!r} component")


@dataclass(frozen=True)
class RuleSpec:
    """In `stage`, for `blocks` x `components`: compute every `interval`-th step counted from the stage's
    first step, reuse (or forecast with `mode: forecast`) in between."""

    stage: str
    components: tuple[str, ...]
    interval: int
    blocks: Any = "all"
    mode: str = "reuse"
    order: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {self.stage!r}")
        comps = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        if not comps or not all(isinstance(c, str) and c for c in comps):
            raise ValueError(f"components must be a non-empty list of component names; got {list(comps)}")
        object.__setattr__(self, "components", comps)
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        parse_blocks(self.blocks)
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1; got {self.interval!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'reuse' or 'forecast'; got {self.mode!r}")
        if self.order is not None:
            if self.mode != "forecast":
                raise ValueError("order is only meaningful with mode: forecast")
            if not _is_int(self.order) or not 1 <= self.order <= 4:
                raise ValueError(f"order must be an integer in 1-4; got {self.order!r}")

    def block_indices(self, num_blocks: int) -> list[int]:
        return resolve_blocks(self.blocks, num_blocks)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"stage": self.stage, "components": list(self.components)}
        d["blocks"] = list(self.blocks) if isinstance(self.blocks, tuple) else self.blocks
        d["interval"] = self.interval
        if self.mode != "reuse":
            d["mode"] = self.mode
        if self.order is not None:
            d["order"] = self.order
        return d


@dataclass(frozen=True)
class BlockRunSpec:
    """ProfilingDiT's background-block caching: the `blocks` (usually those the fg/bg profiler classed as
    background) are grouped into maximal runs of consecutive blocks; each run is computed on every step of
    its own warm-up, then recomputed every T_s steps, T_s = t_max - (t_max - t_min)(s - s0)/(S - s0) (long
    reuse stretches early, short late), and skipped with its kept delta h_out - h_in in between."""

    blocks: Any
    t_max: int
    t_min: int
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        parse_blocks(self.blocks)
        for name in ("t_max", "t_min"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")

    def runs(self, num_blocks: int) -> list[tuple[int, int]]:
        """The maximal runs of consecutive blocks, (first, last) inclusive."""
        return consecutive_runs(resolve_blocks(self.blocks, num_blocks))

    def to_dict(self) -> dict:
        blocks = list(self.blocks) if isinstance(self.blocks, tuple) else self.blocks
        return {"blocks": blocks, "warmup_steps": self.warmup_steps, "t_max": self.t_max, "t_min": self.t_min}


@dataclass(frozen=True)
class StepPlan:
    """How a preset written for `reference_steps` steps is carried to a run of `num_steps` (`resample`)."""

    num_steps: int
    reference_steps: int

    def reference_step(self, step: int) -> int:
        """The profile step nearest to a run step (explicit lists are written for the profile's steps)."""
        if self.num_steps == self.reference_steps or self.num_steps == 1:
            return step
        return int(math.floor(step * (self.reference_steps - 1) / (self.num_steps - 1) + 0.5))

    def resample(self, reference: Sequence[int]) -> tuple[list[int], dict[int, float]]:
        """A schedule over the profile's steps (per step 0 to compute, else the skipped step's action) carried to
        this run's step count with the same share of compute steps: K = the reference's computes x num_steps /
        reference_steps. The reference's computes, at the middle of their steps, set a cumulative compute count
        over the run, linear between them; the j-th of ceil(K) computes goes where that count reaches the
        middle of the j-th of ceil(K) equal slices (the next free step where two meet). So computes stay where
        the profile has them, and the ones a longer run gains are spread through its skip runs rather than
        lengthening them (every other step stays every other step); step 0 always computes. When K is not
        whole, the last compute step computes only the fractional part: returned as {step: share} beside the
        actions, which mark that step skipped (the caller computes that share of the schedule's cells). A
        skipped run step takes the action of the reference step it reads, or of the nearest skipped one.

        Measured (benchmarks/experiments/resample_placement.md, reference-wan's presets, 4 held-out prompts):
        against stretching the profile's skip runs with the step count, +3.5 to +4.9 dB at 15 steps and +4.0 to
        +9.5 dB at 50; reading the profile step by step let the share drift (balanced computed 0.40 at 15
        steps, at 16.3 dB)."""
        n, r = self.num_steps, len(reference)
        if n == r:
            return list(reference), {}
        centres = [i + 0.5 for i, a in enumerate(reference) if a == 0]
        total = len(centres)
        exact = min(float(n), max(1.0, total * n / r))
        k = math.ceil(exact - 1e-9)
        counts, positions = [0.0, *(j + 0.5 for j in range(total)), float(total)], [0.0, *centres, float(r)]
        computes = [0]
        for j in range(1, k):
            s = min(n - 1, int(np.interp((j + 0.5) * total / k, counts, positions) / r * n))
            while s in computes and s < n - 1:
                s += 1
            while s in computes:
                s -= 1
            computes.append(s)
        skipped = [i for i, a in enumerate(reference) if a != 0] or [0]

        def skip_action(s: int) -> int:
            ref = self.reference_step(s)
            return reference[ref] if reference[ref] != 0 else reference[min(skipped, key=lambda i: abs(i - ref))]

        actions = [0 if s in computes else skip_action(s) for s in range(n)]
        shares: dict[int, float] = {}
        if k > 1 and exact < k - 1e-9:
            last = max(computes)
            actions[last] = skip_action(last)
            shares[last] = exact - (k - 1)
        return actions, shares


def _per_block_entries(key: str, raw: Any, what: str) -> Iterator[tuple[str, Any, Any]]:
    """(component, block selection, value) of a {component: {block selection: value}} mapping, with the
    component names, the mappings and the block selections validated; `what` names the value for errors."""
    for comp, per_blocks in dict(raw or {}).items():
        if not isinstance(comp, str) or not comp:
            raise ValueError(f"{key}: component names must be strings; got {comp!r}")
        if not isinstance(per_blocks, Mapping):
            raise ValueError(f"{key}.{comp} must map block selections to {what}")
        for block_spec, value in per_blocks.items():
            parse_blocks(block_spec)
            yield comp, block_spec, value


def _check_step_lists(key: str, raw: Any, reference_steps: int | None) -> dict[str, dict[Any, tuple[int, ...]]]:
    """{component: {block selection: [step, ...]}}, validated."""
    out: dict[str, dict[Any, tuple[int, ...]]] = {comp: {} for comp in dict(raw or {})}
    for comp, block_spec, steps in _per_block_entries(key, raw, "lists of steps"):
        if not isinstance(steps, list | tuple) or not all(_is_int(s) and s >= 0 for s in steps):
            raise ValueError(f"{key}.{comp}.{block_spec} must be a list of step indices >= 0; got {steps!r}")
        if reference_steps is not None and any(s >= reference_steps for s in steps):
            raise ValueError(
                f"{key}.{comp}.{block_spec} lists step {max(steps)} but the profile has "
                f"{reference_steps} steps (0-{reference_steps - 1})"
            )
        out[comp][block_spec] = tuple(steps)
    return out


def _check_correction(raw: Any, reference_steps: int | None) -> dict[str, dict[Any, dict[int, float]]]:
    """{component: {block selection: {step: factor}}}: factors for reused outputs, in (0, 4)."""
    out: dict[str, dict[Any, dict[int, float]]] = {comp: {} for comp in dict(raw or {})}
    for comp, block_spec, factors in _per_block_entries("correction", raw, "{step: factor}"):
        if isinstance(factors, Mapping):  # JSON has string keys only
            factors = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in factors.items()}
        if not isinstance(factors, Mapping) or not all(
            _is_int(k) and k >= 0 and isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 4
            for k, v in factors.items()
        ):
            raise ValueError(
                f"correction.{comp}.{block_spec} must map step indices to factors in (0, 4); got {factors!r}"
            )
        if reference_steps is not None and any(k >= reference_steps for k in factors):
            raise ValueError(f"correction.{comp}.{block_spec} lists a step beyond the profile's {reference_steps} steps")
        out[comp][block_spec] = {int(k): float(v) for k, v in factors.items()}
    return out


@dataclass(frozen=True)
class PresetSpec:
    """One named preset. `reference_steps`, `step_rule`, `source` and `profile_name` are filled in by
    the owning `Profile`; `exposure_bias=None` inherits the profile's setting."""

    name: str = "preset"
    warmup_steps: int = 0
    final_steps: int = 0
    stage_threshold: float = 0.4
    rules: tuple[RuleSpec, ...] = ()
    explicit: Mapping[str, Mapping[Any, tuple[int, ...]]] = field(default_factory=dict)
    explicit_forecast: Mapping[str, Mapping[Any, tuple[int, ...]]] = field(default_factory=dict)
    correction: Mapping[str, Mapping[Any, Mapping[int, float]]] = field(default_factory=dict)
    exposure_bias: ExposureBiasConfig | None = None
    block_runs: BlockRunSpec | None = None
    reference_steps: int | None = None
    step_rule: StepRule = field(default_factory=StepRule)
    source: str = "<preset>"
    profile_name: str = ""
    guidance_scale: float | None = None  # the guidance scale it was calibrated at (the profile's)
    forecast_gain: float = 1.0  # forecasts return last + gain (extrapolated - last): videocache.forecast.served
    # the same preset calibrated at other settings (the profile's variants), each with its own reference_steps
    variants: tuple[tuple[float, PresetSpec], ...] = ()  # (guidance scale, preset)

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "final_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {v!r}")
        t = self.stage_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
            raise ValueError(f"stage_threshold must be a number in [0, 1] (sigma, 1 = noisiest); got {t!r}")
        if not is_forecast_gain(self.forecast_gain):
            raise ValueError(f"forecast_gain must be a number in (0, 1] (1: plain forecasts); got {self.forecast_gain!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, RuleSpec):
                raise TypeError(f"rules must be RuleSpec objects; got {type(r).__name__}")
        if self.block_runs is not None and not isinstance(self.block_runs, BlockRunSpec):
            raise TypeError(f"block_runs must be a BlockRunSpec; got {type(self.block_runs).__name__}")
        orders = {r.order or 1 for r in self.rules if r.mode == "forecast"}
        if len(orders) > 1:
            raise ValueError(f"all forecast rules of a preset must use the same order; got {sorted(orders)}")
        object.__setattr__(self, "explicit", _check_step_lists("explicit", self.explicit, self.reference_steps))
        object.__setattr__(
            self, "explicit_forecast", _check_step_lists("explicit_forecast", self.explicit_forecast, self.reference_steps)
        )
        object.__setattr__(self, "correction", _check_correction(self.correction, self.reference_steps))

    @property
    def forecast_order(self) -> int:
        orders = [r.order or 1 for r in self.rules if r.mode == "forecast"]
        return orders[0] if orders else 1

    resolve_blocks = staticmethod(resolve_blocks)

    def for_run(self, guidance_scale: float | None, num_steps: int | None = None) -> PresetSpec:
        """The calibration of this preset made nearest to the run's settings: the nearest guidance scale
        first (it changes the trajectory most: benchmarks/shift_reference), then the nearest step count (by
        ratio); this one where the run's settings are unknown or on a tie."""
        if not self.variants:
            return self

        def distance(option: tuple[float, PresetSpec]) -> tuple[float, float]:
            g, p = option
            dg = 0.0 if guidance_scale is None or g is None else abs(g - float(guidance_scale))
            ds = 0.0 if num_steps is None or not p.reference_steps else abs(math.log(p.reference_steps / num_steps))
            return dg, ds

        return min([(self.guidance_scale, self), *self.variants], key=distance)[1]

    def check_steps(self, num_steps: int) -> None:
        """Raise a one-line ProfileError when the profile does not cover this step count."""
        ref, rule = self.reference_steps, self.step_rule
        label = f"profile {self.profile_name or self.name}"
        if not _is_int(num_steps) or num_steps < 1:
            raise ProfileError(f"{label}: the number of steps must be an integer >= 1; got {num_steps!r}")
        if ref is None:
            return
        if rule.mode == "exact":
            if num_steps != ref:
                raise ProfileError(
                    f"{label} is made for exactly {ref} steps (step_rule mode: exact); got {num_steps}: "
                    f"run {ref} steps or use a profile made for {num_steps}"
                )
            return
        lo, hi = rule.min_steps or 1, rule.max_steps or 10**9
        if not lo <= num_steps <= hi:
            raise ProfileError(
                f"{label} covers {lo}-{hi} steps; got {num_steps}: run a step count in that range "
                f"or use a profile made for {num_steps} steps"
            )

    def plan_for(self, num_steps: int) -> StepPlan:
        self.check_steps(num_steps)
        return StepPlan(num_steps=num_steps, reference_steps=self.reference_steps or num_steps)

    def to_dict(self, inherited_eb: ExposureBiasConfig | None = None) -> dict:
        d: dict[str, Any] = {
            "warmup_steps": self.warmup_steps,
            "final_steps": self.final_steps,
            "stage_threshold": self.stage_threshold,
            "rules": [r.to_dict() for r in self.rules],
        }
        if self.explicit:
            d["explicit"] = {c: {k: list(v) for k, v in pb.items()} for c, pb in self.explicit.items()}
        if self.explicit_forecast:
            d["explicit_forecast"] = {c: {k: list(v) for k, v in pb.items()} for c, pb in self.explicit_forecast.items()}
        if self.correction:
            d["correction"] = {c: {k: dict(v) for k, v in pb.items()} for c, pb in self.correction.items()}
        if self.exposure_bias is not None and self.exposure_bias != inherited_eb:
            d["exposure_bias"] = self.exposure_bias.to_dict()
        if self.block_runs is not None:
            d["block_runs"] = self.block_runs.to_dict()
        if self.forecast_gain != 1.0:
            d["forecast_gain"] = self.forecast_gain
        return d


@dataclass(frozen=True)
class CalibrationVariant:
    """A profile's presets calibrated again at another guidance scale or step count (`videocache profile
    --add-to`); `steps` None: the profile's."""

    guidance_scale: float
    presets: dict[str, PresetSpec]
    metadata: dict = field(default_factory=dict)
    steps: int | None = None

    def __post_init__(self) -> None:
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, int | float) or not g > 0:
            raise ValueError(f"guidance_scale must be a number > 0; got {g!r}")
        if self.steps is not None:
            _check_step_count(self.steps)

    def to_dict(self, inherited_eb: ExposureBiasConfig | None = None) -> dict:
        return {"guidance_scale": self.guidance_scale, **({"steps": self.steps} if self.steps is not None else {}),
                "presets": {k: p.to_dict(inherited_eb) for k, p in self.presets.items()},
                **({"metadata": self.metadata} if self.metadata else {})}


class SavedAsYaml:
    """`to_yaml` and `save` of a profile class, from its `to_dict`."""

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


@dataclass
class Profile(SavedAsYaml):
    name: str
    model: ModelSpec
    steps: int
    presets: dict[str, PresetSpec]
    default_preset: str
    calibrated: bool = False
    step_rule: StepRule = field(default_factory=StepRule)
    exposure_bias: ExposureBiasConfig = field(default_factory=ExposureBiasConfig)
    metadata: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    source: str = "<profile>"
    fgbg: FgBgProfile | None = None  # the fg/bg block profile the block-run presets were chosen from
    guard: GuardConfig | None = None  # the run-time guard's calibration (videocache.guard), for every preset
    guidance_scale: float | None = None  # the guidance scale the presets were calibrated at
    # the presets calibrated again at other guidance scales or step counts, chosen by the run's (PresetSpec.for_run)
    variants: tuple[CalibrationVariant, ...] = ()

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ProfileError(f"schema_version must be {SCHEMA_VERSION}; got {self.schema_version!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"name must be a non-empty string; got {self.name!r}")
        if not isinstance(self.calibrated, bool):
            raise ProfileError(f"calibrated must be true or false; got {self.calibrated!r}")
        _check_step_count(self.steps)
        rule = self.step_rule
        if rule.mode == "scale" and not (rule.min_steps or 1) <= self.steps <= (rule.max_steps or 10**9):
            raise ProfileError(
                f"steps ({self.steps}) lies outside step_rule {rule.min_steps}-{rule.max_steps}"
            )
        if not isinstance(self.metadata, dict):
            raise ProfileError("metadata must be a mapping")
        if self.fgbg is not None and len(self.fgbg.r_attn) != self.model.num_blocks:
            raise ProfileError(
                f"fgbg scores {len(self.fgbg.r_attn)} blocks; model.num_blocks is {self.model.num_blocks}"
            )
        if not self.presets:
            raise ProfileError("presets: a profile needs at least one preset")
        if self.default_preset not in self.presets:
            raise ProfileError(
                f"default_preset {self.default_preset!r} is not one of the presets ({', '.join(self.presets)})"
            )
        if self.variants and self.guidance_scale is None:
            raise ProfileError("variants need the guidance_scale the presets were calibrated at")
        if self.guidance_scale is not None and not (isinstance(self.guidance_scale, int | float)
                                                    and not isinstance(self.guidance_scale, bool) and self.guidance_scale > 0):
            raise ProfileError(f"guidance_scale must be a number > 0; got {self.guidance_scale!r}")
        settings = [(self.guidance_scale, self.steps), *map(self._made_at, self.variants)]
        if len(set(settings)) != len(settings):
            raise ProfileError("variants: each (guidance scale, steps) once, besides the profile's; got "
                               + ", ".join(f"({g}, {n})" for g, n in settings))
        variants = []
        for i, variant in enumerate(self.variants):
            with _where(f"variants[{i}]"):
                unknown = [k for k in variant.presets if k not in self.presets]
                if unknown:
                    raise ProfileError(f"preset {unknown[0]!r} is not one of the profile's ({', '.join(self.presets)})")
                variants.append(replace(variant, presets={k: self._filled(k, p, variant.steps) for k, p in variant.presets.items()}))
        self.variants = tuple(variants)
        filled: dict[str, PresetSpec] = {}
        for key, p in self.presets.items():
            p = replace(self._filled(key, p), guidance_scale=self.guidance_scale, variants=tuple(
                (v.guidance_scale, v.presets[key]) for v in self.variants if key in v.presets))
            filled[key] = p
        self.presets = filled

    def _made_at(self, variant: CalibrationVariant) -> tuple[float, int]:
        """(guidance scale, steps) a variant was calibrated at."""
        return variant.guidance_scale, variant.steps or self.steps

    def _filled(self, key: str, p: PresetSpec, steps: int | None = None) -> PresetSpec:
        """A preset with the profile's facts filled in (`steps`: a variant's own step count), checked against
        the model."""
        with _where(f"presets.{key}"):
            p = replace(
                p,
                name=key,
                reference_steps=steps or self.steps,
                step_rule=self.step_rule,
                source=self.source,
                profile_name=self.name,
                exposure_bias=p.exposure_bias if p.exposure_bias is not None else self.exposure_bias,
            )
            layout = self.model.layout
            for i, r in enumerate(p.rules):
                with _where(f"rules[{i}]"):
                    _check_component_names(r.components, layout, r.block_indices(self.model.num_blocks))
            for field_name, mapping in (("explicit", p.explicit), ("explicit_forecast", p.explicit_forecast),
                                        ("correction", p.correction)):
                for comp, per_blocks in mapping.items():
                    for spec in per_blocks:
                        with _where(f"{field_name}.{comp}.{spec}"):
                            _check_component_names([comp], layout, resolve_blocks(spec, self.model.num_blocks))
            if p.block_runs is not None:
                with _where("block_runs.blocks"):
                    p.block_runs.runs(self.model.num_blocks)
        return p

    # -- use ----------------------------------------------------------------------------------
    def preset(self, name: str | None = None) -> PresetSpec:
        key = self.default_preset if name is None else name
        if key not in self.presets:
            raise ProfileError(
                f"profile {self.name} has no preset {key!r}; valid presets: {', '.join(self.presets)}"
            )
        return self.presets[key]

    def check_model(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise a one-line ProfileError unless the model matches the architecture this profile is for."""
        want = self.model
        arch, blocks = fingerprint.get("architecture"), fingerprint.get("num_blocks")
        comps = tuple(fingerprint.get("components", want.components))
        if arch != want.architecture or blocks != want.num_blocks:
            raise ProfileError(
                f"profile {self.name} is for {want.architecture} with {want.num_blocks} blocks; this model is "
                f"{arch} with {blocks} blocks: use a profile made for it ({suggest_profiles(arch, blocks)})"
            )
        if want.groups is not None or fingerprint.get("groups") is not None:
            have = ModelSpec.from_fingerprint(fingerprint).layout.to_list()
            if have != want.layout.to_list():
                show = "; ".join(f"{g['name']} x{g['num_blocks']}: {'/'.join(g['components'])}" for g in have)
                raise ProfileError(
                    f"profile {self.name} was made for other block groups than this {arch} has ({show}): "
                    "recalibrate it with videocache profile"
                )
            return
        missing = [c for c in want.components if c not in comps]
        if missing:
            raise ProfileError(
                f"profile {self.name} caches {', '.join(missing)}, which this {arch} adapter does not expose "
                f"(it has {', '.join(comps)})"
            )

    def check_steps(self, num_steps: int) -> None:
        self.preset().check_steps(num_steps)

    def with_variant(self, other: Profile) -> Profile:
        """This profile with `other`'s presets (the same model, calibrated at another guidance scale or step
        count) added as a variant, replacing one made at the same settings."""
        own, theirs = (p.guidance_scale if p.guidance_scale is not None else p.metadata.get("settings", {}).get("guidance_scale")
                       for p in (self, other))
        if other.model != self.model:
            raise ProfileError(f"{other.name} is for another model than {self.name}: calibrate it for "
                               f"{self.model.architecture}")
        if theirs is None or own is None:
            raise ProfileError("both profiles must say the guidance scale they were calibrated at")
        if (theirs, other.steps) == (own, self.steps):
            raise ProfileError(f"{self.name} is already calibrated at guidance {own:g} and {self.steps} steps")
        variant = CalibrationVariant(theirs, {k: v for k, v in other.presets.items() if k != "full"},
                                     {k: other.metadata[k] for k in ("made_by", "calibration_prompts", "settings",
                                                                     "measured_on_calibration_prompts")
                                      if k in other.metadata}, None if other.steps == self.steps else other.steps)
        kept = [v for v in self.variants if self._made_at(v) != (theirs, other.steps)]
        return replace(self, guidance_scale=own, variants=tuple(
            sorted([*kept, variant], key=self._made_at)))

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "model": self.model.fingerprint(),
            "calibrated": self.calibrated,
            "steps": self.steps,
            "step_rule": {k: v for k, v in vars(self.step_rule).items() if v is not None},
            "default_preset": self.default_preset,
            "exposure_bias": self.exposure_bias.to_dict(),
            "presets": {k: p.to_dict(self.exposure_bias) for k, p in self.presets.items()},
            **({"fgbg": self.fgbg.to_dict()} if self.fgbg is not None else {}),
            **({"guard": self.guard.to_dict()} if self.guard is not None else {}),
            **({"guidance_scale": self.guidance_scale} if self.guidance_scale is not None else {}),
            **({"variants": [v.to_dict(self.exposure_bias) for v in self.variants]}
               if self.variants else {}),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<profile>") -> Profile:
        """Parse and validate; every error is a one-line ProfileError prefixed with `source`."""
        try:
            return cls._from_dict(data, source)
        except ProfileError as e:
            raise ProfileError(f"{source}: {e}") from None

    @classmethod
    def _from_dict(cls, data: Any, source: str) -> Profile:
        with _where("profile"):
            top = _check_keys(
                data,
                ("schema_version", "name", "model", "steps", "presets"),
                ("calibrated", "step_rule", "default_preset", "exposure_bias", "fgbg", "guard", "guidance_scale",
                 "variants", "metadata"),
            )
        with _where("model"):
            m = _check_keys(top["model"], ("architecture", "num_blocks"), ("components", "groups"))
            if "groups" in m and "components" in m:
                raise ValueError("give either components (one kind of block) or groups, not both")
            groups = m.get("groups")
            if groups is not None and (not isinstance(groups, list) or not groups):
                raise ValueError("groups must be a non-empty list of {name, num_blocks, components}")
            with _where("groups"):
                model = ModelSpec(m["architecture"], m["num_blocks"], tuple(m.get("components", COMPONENTS)),
                                  None if groups is None else tuple(_group_from_dict(g) for g in groups))
        with _where("step_rule"):
            sr = _check_keys(top.get("step_rule") or {}, (), ("mode", "min_steps", "max_steps"))
            step_rule = StepRule(**sr)
        with _where("exposure_bias"):
            eb = ExposureBiasConfig(**_check_eb(top.get("exposure_bias") or {}))
        presets = _parse_presets(top["presets"], eb, top["steps"])
        default = top.get("default_preset", next(iter(presets)))
        fgbg = None
        if top.get("fgbg") is not None:
            with _where("fgbg"):
                fgbg = FgBgProfile.from_dict(top["fgbg"])
        variants = []
        raw_variants = top.get("variants") or []
        if not isinstance(raw_variants, list):
            raise ProfileError("variants must be a list of {guidance_scale, steps, presets, metadata}")
        for i, raw in enumerate(raw_variants):
            with _where(f"variants[{i}]"):
                v = _check_keys(raw, ("guidance_scale", "presets"), ("steps", "metadata"))
                steps = v.get("steps")
                if steps is not None:  # before its presets are read against it
                    _check_step_count(steps)
                variants.append(CalibrationVariant(v["guidance_scale"], _parse_presets(v["presets"], eb, steps or top["steps"]),
                                                   v.get("metadata") or {}, steps))
        guard = None
        if top.get("guard") is not None:
            with _where("guard"):
                guard = GuardConfig.from_dict(top["guard"])
        return cls(
            name=top["name"],
            model=model,
            steps=top["steps"],
            presets=presets,
            default_preset=default,
            calibrated=top.get("calibrated", False),
            step_rule=step_rule,
            exposure_bias=eb,
            metadata=top.get("metadata") or {},
            fgbg=fgbg,
            guard=guard,
            guidance_scale=top.get("guidance_scale"),
            variants=tuple(variants),
            schema_version=top["schema_version"],
            source=source,
        )


def _check_eb(raw: Any) -> dict:
    return _check_keys(raw, (), ("enabled", "b_high", "b_low", "t_threshold", "sign"))


def preset_from_dict(name: str, raw: Any, steps: int | None = None) -> PresetSpec:
    """One preset from its profile-YAML mapping (for tools that build presets, e.g. calibration)."""
    with _where(f"preset {name!r}"):
        return _parse_preset(name, raw, ExposureBiasConfig(), steps)


def _parse_presets(raw: Any, profile_eb: ExposureBiasConfig, steps: Any) -> dict[str, PresetSpec]:
    """A `presets` mapping (the profile's, or a variant's) of name -> preset."""
    if not isinstance(raw, Mapping) or not raw:
        raise ProfileError("presets: must be a non-empty mapping of preset name -> preset")
    presets = {}
    for key, preset_raw in raw.items():
        with _where(f"presets.{key}"):
            presets[str(key)] = _parse_preset(str(key), preset_raw, profile_eb, steps)
    return presets


def _parse_preset(name: str, raw: Any, profile_eb: ExposureBiasConfig, steps: Any) -> PresetSpec:
    p = _check_keys(
        raw,
        (),
        ("warmup_steps", "final_steps", "stage_threshold", "rules", "explicit", "explicit_forecast", "correction",
         "exposure_bias", "block_runs", "forecast_gain"),
    )
    rules = []
    raw_rules = p.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ValueError("rules must be a list")
    for i, r in enumerate(raw_rules):
        with _where(f"rules[{i}]"):
            r = _check_keys(r, ("stage", "components", "interval"), ("blocks", "mode", "order"))
            rules.append(RuleSpec(**r))
    eb = None
    if p.get("exposure_bias") is not None:
        with _where("exposure_bias"):
            eb = replace(profile_eb, **_check_eb(p["exposure_bias"]))
    block_runs = None
    if p.get("block_runs") is not None:
        with _where("block_runs"):
            block_runs = BlockRunSpec(**_check_keys(p["block_runs"], ("blocks", "t_max", "t_min"), ("warmup_steps",)))
    return PresetSpec(
        name=name,
        warmup_steps=p.get("warmup_steps", 0),
        final_steps=p.get("final_steps", 0),
        stage_threshold=p.get("stage_threshold", 0.4),
        rules=tuple(rules),
        explicit=p.get("explicit") or {},
        explicit_forecast=p.get("explicit_forecast") or {},
        correction=p.get("correction") or {},
        exposure_bias=eb,
        block_runs=block_runs,
        forecast_gain=p.get("forecast_gain", 1.0),
        reference_steps=steps if _is_int(steps) else None,
    )
