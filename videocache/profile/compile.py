"""Compiling a preset into the cache table of one run (its step count, sigmas and block layout)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..table import Action, BlockLayout, CacheTable, TableError, decreasing_interval_steps
from .schema import PresetSpec, ProfileError


def build_table(
    preset: PresetSpec, sigmas: Sequence[float], num_blocks: int, layout: BlockLayout | None = None
) -> CacheTable:
    """Expand a preset for a run with these per-step sigmas (1 = pure noise) and `num_blocks` blocks laid
    out as `layout` (default: one group of Wan's components). A component name applies to the blocks
    that have it, so a rule for `attn` covers every block group with an `attn` component.

    Order of precedence, low to high: rules (in order), explicit reuse lists, block runs (their blocks are
    cached whole, so component rules do not apply to them), warm-up/final steps.
    """
    sig = [float(s) for s in sigmas]
    num_steps = len(sig)
    plan = preset.plan_for(num_steps)  # checks the step count is covered and scales counts/intervals
    layout = layout or BlockLayout.uniform(num_blocks)
    if layout.num_blocks != num_blocks:
        raise ProfileError(f"block layout of {layout.num_blocks} blocks for a model of {num_blocks}")

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
    for rule, interval in zip(preset.rules, plan.intervals, strict=True):
        steps = stage_steps[rule.stage]
        if not steps:
            continue
        blocks = rule.block_indices(num_blocks)
        targets = [cell for c in rule.components for cell in cells(c, blocks)]
        skip = Action.FORECAST if rule.mode == "forecast" else Action.REUSE
        first = steps[0]
        for s in steps:
            value = Action.COMPUTE if (s - first) % interval == 0 else skip
            for members, c in targets:
                arr[s, members, c] = value

    for explicit, action in ((preset.explicit, Action.REUSE), (preset.explicit_forecast, Action.FORECAST)):
        for comp, per_blocks in explicit.items():
            for block_spec, ref_steps in per_blocks.items():
                targets = cells(comp, preset.resolve_blocks(block_spec, num_blocks))
                wanted = set(ref_steps)
                for s in range(num_steps):
                    if plan.reference_step(s) in wanted:
                        for members, c in targets:
                            arr[s, members, c] = action
    # calibrated correction factors hold for the step count they were measured at only
    scale = None
    if preset.correction and num_steps == plan.reference_steps:
        scale = np.ones(arr.shape, dtype=np.float32)
        for comp, per_blocks in preset.correction.items():
            for block_spec, factors in per_blocks.items():
                for members, c in cells(comp, preset.resolve_blocks(block_spec, num_blocks)):
                    for s, factor in factors.items():
                        scale[s, members, c] = factor

    runs: list[tuple[int, int]] = []
    run_actions = np.zeros((num_steps, 0), dtype=np.int8)
    if preset.block_runs is not None and plan.block_runs is not None:
        runs = preset.block_runs.runs(num_blocks)
        compute = decreasing_interval_steps(num_steps, *plan.block_runs)
        run_actions = np.repeat(np.where(compute, Action.COMPUTE, Action.REUSE)[:, None], len(runs), axis=1)
        for a, b in runs:
            arr[:, a : b + 1] = Action.COMPUTE

    arr[: plan.warmup_steps] = Action.COMPUTE
    run_actions[: plan.warmup_steps] = Action.COMPUTE
    if plan.final_steps:
        arr[num_steps - plan.final_steps :] = Action.COMPUTE
        run_actions[num_steps - plan.final_steps :] = Action.COMPUTE
    try:
        return CacheTable(arr, preset.forecast_order, tuple(runs), run_actions.astype(np.int8), scale, layout)
    except TableError as e:
        raise ProfileError(f"{preset.source}: preset {preset.name!r} for {num_steps} steps: {e}") from None
