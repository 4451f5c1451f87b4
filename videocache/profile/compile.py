"""Compiling a preset into the cache table of one run (its step count, sigmas and block layout).

A preset is written for the profile's step count. At another step count (within its `step_rule`) its explicit
step lists are resampled (`StepPlan.resample`): every group of cells that share a schedule keeps its share of
compute steps, placed where the profile puts them and spread through its skip runs; warm-up and final counts keep their share of the run; rules
and block runs recompute every k-th step, a share already. So a preset's computed fraction holds at every step
count (tests/test_profile.py measures it for every shipped preset).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..forecast import gain_at
from ..table import Action, BlockLayout, CacheTable, TableError, decreasing_interval_steps
from .schema import PresetSpec, ProfileError


def build_table(
    preset: PresetSpec, sigmas: Sequence[float], num_blocks: int, layout: BlockLayout | None = None
) -> CacheTable:
    """Expand a preset for a run with these per-step sigmas (1 = pure noise) and `num_blocks` blocks laid
    out as `layout` (default: one group of the default components). A component name applies to the blocks
    that have it, so a rule for `attn` covers every block group with an `attn` component.

    Order of precedence, low to high: rules (in order), explicit reuse lists, block runs (their blocks are
    cached whole, so component rules do not apply to them), warm-up/final steps.
    """
    sig = [float(s) for s in sigmas]
    num_steps = len(sig)
    plan = preset.plan_for(num_steps)  # checks the step count is covered
    layout = layout or BlockLayout.uniform(num_blocks)
    if layout.num_blocks != num_blocks:
        raise ProfileError(f"block layout of {layout.num_blocks} blocks for a model of {num_blocks}")
    share = num_steps / plan.reference_steps

    def cells(name: str, blocks: Sequence[int]) -> list[tuple[list[int], int]]:
        if name not in layout.names:
            raise ProfileError(
                f"{preset.source}: preset {preset.name!r} names component {name!r}; this model has "
                f"{', '.join(layout.names)}"
            )
        return layout.cells_of(name, blocks)

    arr = np.zeros((num_steps, num_blocks, layout.width), dtype=np.int8)
    stage_steps = {
        "all": list(range(num_steps)),
        "early": [s for s in range(num_steps) if sig[s] >= preset.stage_threshold],
        "late": [s for s in range(num_steps) if sig[s] < preset.stage_threshold],
    }
    for rule in preset.rules:
        steps = stage_steps[rule.stage]
        if not steps:
            continue
        blocks = rule.block_indices(num_blocks)
        targets = [cell for c in rule.components for cell in cells(c, blocks)]
        skip = Action.FORECAST if rule.mode == "forecast" else Action.REUSE
        first = steps[0]
        for s in steps:
            value = Action.COMPUTE if (s - first) % rule.interval == 0 else skip
            for members, c in targets:
                arr[s, members, c] = value

    # explicit lists, per (component, blocks): the profile's schedule carried to this step count
    schedules: dict[tuple[str, Any], list[int]] = {}
    for explicit, action in ((preset.explicit, Action.REUSE), (preset.explicit_forecast, Action.FORECAST)):
        for comp, per_blocks in explicit.items():
            for block_spec, ref_steps in per_blocks.items():
                schedule = schedules.setdefault((comp, block_spec), [Action.COMPUTE] * plan.reference_steps)
                for step in ref_steps:
                    schedule[step] = action
    for (comp, block_spec), schedule in schedules.items():
        blocks = preset.resolve_blocks(block_spec, num_blocks)
        actions, partial = plan.resample(schedule)
        for s, action in enumerate(actions):
            if action != Action.COMPUTE:  # a partial compute step computes the first share of the blocks
                for members, c in cells(comp, blocks[round(partial.get(s, 0.0) * len(blocks)):]):
                    arr[s, members, c] = action
    scale = None
    if preset.correction and num_steps == plan.reference_steps:  # factors hold for their own step count only
        scale = np.ones(arr.shape, dtype=np.float32)
        for comp, per_blocks in preset.correction.items():
            for block_spec, factors in per_blocks.items():
                for members, c in cells(comp, preset.resolve_blocks(block_spec, num_blocks)):
                    for s, factor in factors.items():
                        scale[s, members, c] = factor

    runs: list[tuple[int, int]] = []
    run_actions = np.zeros((num_steps, 0), dtype=np.int8)
    if preset.block_runs is not None:
        br = preset.block_runs
        runs = br.runs(num_blocks)
        compute = decreasing_interval_steps(num_steps, _share(br.warmup_steps, share), br.t_max, br.t_min)
        run_actions = np.repeat(np.where(compute, Action.COMPUTE, Action.REUSE)[:, None], len(runs), axis=1)
        for a, b in runs:
            arr[:, a : b + 1] = Action.COMPUTE

    warmup, final = _share(preset.warmup_steps, share), _share(preset.final_steps, share)
    arr[:warmup] = Action.COMPUTE
    run_actions[:warmup] = Action.COMPUTE
    if final:
        arr[num_steps - final :] = Action.COMPUTE
        run_actions[num_steps - final :] = Action.COMPUTE
    try:
        return CacheTable(arr, preset.forecast_order, tuple(runs), run_actions.astype(np.int8), scale, layout,
                          gain_at(preset.forecast_gain, share))
    except TableError as e:
        raise ProfileError(f"{preset.source}: preset {preset.name!r} for {num_steps} steps: {e}") from None


def _share(count: int, share: float) -> int:
    """A count of steps (warm-up, final) at another step count: the same share of the run, at least 1."""
    return count if count == 0 else max(1, int(count * share + 0.5))


def written_out(preset: PresetSpec, sigmas: Sequence[float], layout: BlockLayout, inherited_eb: Any = None) -> dict:
    """The preset's YAML mapping with its rules and warm-up/final counts written out as explicit step lists
    at its own step count (`sigmas`: the calibration run's), the same table there. Rules keep their interval
    at other step counts, so a few-step run gains or loses up to a step per stage (0.065 of the cells at 11
    steps, measured on calibrated rule presets); explicit lists are resampled to the same share of compute
    steps (`StepPlan.resample`). Presets with block runs or higher-order forecasts are returned as they are.
    `inherited_eb`: the profile's exposure-bias setting (left out of the mapping where the preset's is the same)."""
    raw = preset.to_dict(inherited_eb)
    if (not preset.rules and not preset.warmup_steps and not preset.final_steps) or preset.block_runs is not None \
            or preset.forecast_order != 1:
        return raw
    table = build_table(preset, sigmas, layout.num_blocks, layout)
    explicit: dict[str, dict] = {}
    explicit_forecast: dict[str, dict] = {}
    for name in layout.names:
        per_block = {b: tuple(table.actions[:, b, c]) for members, c in layout.cells_of(name, range(layout.num_blocks))
                     for b in members}
        keys = {"all": next(iter(per_block.values()))} if len(set(per_block.values())) == 1 else per_block
        for key, actions in keys.items():
            reuse = [s for s, a in enumerate(actions) if a == Action.REUSE]
            forecast = [s for s, a in enumerate(actions) if a == Action.FORECAST]
            if reuse:
                explicit.setdefault(name, {})[key] = reuse
            if forecast:
                explicit_forecast.setdefault(name, {})[key] = forecast
    out = {k: v for k, v in raw.items() if k not in ("rules", "explicit", "explicit_forecast")}
    out.update(warmup_steps=0, final_steps=0, rules=[])
    if explicit:
        out["explicit"] = explicit
    if explicit_forecast:
        out["explicit_forecast"] = explicit_forecast
    return out
