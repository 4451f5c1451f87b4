"""Where a resampled preset puts its compute steps at other step counts, and what it costs in fidelity.

`StepPlan.resample` keeps a preset's share of compute steps at every step count; this compares placements of
those computes on the reference pipeline, PSNR against the uncached video on held-out prompts:

* `slices` (shipped): the j-th compute goes to the middle of the j-th equal slice of the profile's compute
  mass, each profile step spanning an equal part of the run. Runs of skipped steps stay runs and stretch
  with the step count (a 7-step skip run of a 25-step preset is 14 steps long at 50 steps).
* `spread`: the cumulative compute count runs linearly between the profile's compute steps, so the computes
  that fall into a stretched skip run are spread through it (shorter skip runs at more steps).
* `nearest`: the step-by-step reading of the profile before resampling (the share drifts).

    python benchmarks/experiments/resample_placement.py                 # 15 and 50 steps, slow/balanced/fast

Writes OUT.json and OUT.md (default benchmarks/experiments/resample_placement).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import command, environment, markdown_table, write_results  # noqa: E402
from benchmarks.experiments.shift_attribution import generate, preset_table, psnr  # noqa: E402
from benchmarks.shift_reference import CALIBRATION, held_out_tail  # noqa: E402

OUT = Path(__file__).resolve().with_name("resample_placement")


def spread(plan, reference):
    """The `spread` placement (see the module docstring), same share and partial step as `slices`."""
    n, r = plan.num_steps, len(reference)
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

    def skip_action(s):
        ref = plan.reference_step(s)
        return reference[ref] if reference[ref] != 0 else reference[min(skipped, key=lambda i: abs(i - ref))]

    actions = [0 if s in computes else skip_action(s) for s in range(n)]
    shares = {}
    if k > 1 and exact < k - 1e-9:
        last = max(computes)
        actions[last] = skip_action(last)
        shares[last] = exact - (k - 1)
    return actions, shares


def nearest(plan, reference):
    return [reference[plan.reference_step(s)] for s in range(plan.num_steps)], {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--steps", type=int, nargs="+", default=[15, 50])
    p.add_argument("--presets", nargs="+", default=["slow", "balanced", "fast"])
    p.add_argument("--prompts-count", type=int, default=4)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from videocache.pipelines.loader import load_pipeline
    from videocache.profile.schema import StepPlan

    shipped = StepPlan.resample
    placements = {"slices": shipped, "spread": spread, "nearest": nearest}
    prompts = held_out_tail(args.prompts_count)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = {"model": args.model, "prompts": prompts, "command": command(__file__, argv),
              "environment": environment(), "runs": {}}
    try:
        for steps in args.steps:
            s = {**CALIBRATION, "steps": steps}
            refs = [generate(pipe, prompt, s) for prompt in prompts]
            for preset in args.presets:
                for name, placement in placements.items():
                    StepPlan.resample = placement
                    table = preset_table(pipe, args.model, preset, steps)
                    actions = np.asarray(table.actions)
                    runs = "".join("C" if (row == 0).all() else "p" if (row == 0).any() else "s" for row in actions)
                    scores = [psnr(generate(pipe, prompt, s, table), ref) for prompt, ref in zip(prompts, refs, strict=True)]
                    result["runs"][f"{steps}/{preset}/{name}"] = {
                        "steps": steps, "preset": preset, "placement": name, "psnr": float(np.mean(scores)),
                        "cell_fraction": float((actions == 0)[:, table.layout.present].mean()),
                        "longest_skip_run": max(len(x) for x in runs.replace("p", "C").split("C")), "schedule": runs}
                    write_results(args.out, result, render(result))
    finally:
        StepPlan.resample = shipped
    return 0


def render(result: dict) -> list[str]:
    lines = [f"# Placing a resampled preset's compute steps ({result['model']})", "",
             f"PSNR against the uncached video, mean over {len(result['prompts'])} held-out prompts; 25-step "
             "calibrated presets run at other step counts (C: every cell computes, p: a partial step, s: skipped).",
             "", f"    {result['command']}", ""]
    rows = [[r["steps"], r["preset"], r["placement"], f"{r['cell_fraction']:.3f}", f"{r['psnr']:.2f}",
             r["longest_skip_run"], f"`{r['schedule']}`"] for r in result["runs"].values()]
    return lines + markdown_table(["steps", "preset", "placement", "cell fraction", "PSNR (dB)", "longest skip run",
                                   "schedule"], rows, "rllrrrl")


if __name__ == "__main__":
    sys.exit(main())
