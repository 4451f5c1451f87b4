"""Where a preset's error comes from under shifted settings, and what the uncached trajectory does differently.

For a reference pipeline, a preset and a few settings (by default the calibration's and guidance 8), on
held-out prompts:

* repair attribution: the preset's table with one thing computed instead of skipped (one skipped step; one
  component at every skipped step; the first or second half of the blocks at every skipped step), and the
  PSNR against the uncached video that each repair gains. Large gains say where the error comes from.
* the uncached trajectory: per step, the relative change of the conditional and unconditional predictions
  and of the guided velocity u + g (c - u) from the previous step (what a reused output misses), and how much
  of the guided velocity the guidance term g (c - u) is.

    python benchmarks/experiments/shift_attribution.py                       # balanced, guidance 5 and 8
    python benchmarks/experiments/shift_attribution.py --preset fast --case steps50 --case guidance8

Writes OUT.json and OUT.md (default benchmarks/experiments/shift_attribution).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.common, benchmarks.shift_reference
from benchmarks.common import command, environment, markdown_table, write_results  # noqa: E402
from benchmarks.shift_reference import CASES, case_settings, held_out_tail  # noqa: E402

OUT = Path(__file__).resolve().with_name("shift_attribution")


def generate(pipe, prompt: str, s: dict, table=None) -> np.ndarray:
    import videocache

    if table is not None:
        videocache.apply(pipe, table=table)
    try:
        out = pipe(prompt, num_inference_steps=s["steps"], num_frames=s["frames"], height=s["height"],
                   width=s["width"], guidance_scale=s["guidance_scale"], generator=torch.Generator().manual_seed(0),
                   output_type="np")
    finally:
        videocache.remove(pipe)
    return out.frames[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def preset_table(pipe, profile: str, preset: str, steps: int):
    import copy

    import videocache

    prof = videocache.load_profile(profile)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    adapter = videocache.get_adapter(pipe.transformer)
    sigmas = adapter.scheduler_sigmas(scheduler, steps)
    layout = prof.model.layout
    return videocache.build_table(prof.preset(preset), sigmas, prof.model.num_blocks, layout)


def repaired(table, steps=None, component=None, blocks=None):
    """The table with the selected skipped cells computed instead."""
    from videocache import CacheTable

    actions = np.array(table.actions)
    rows = slice(None) if steps is None else steps
    cols = slice(None) if blocks is None else blocks
    comps = slice(None) if component is None else component
    sub = actions[rows, cols, comps]
    actions[rows, cols, comps] = np.where(sub != 0, 0, sub)
    return CacheTable(actions, table.forecast_order, table.block_runs, table.run_actions, None, table.layout,
                      table.forecast_gain)


def trajectory(pipe, prompt: str, s: dict) -> dict:
    """Per step: relative change of cond, uncond and guided predictions from the previous step, and the share
    of the guidance term in the guided velocity."""
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    calls = {"n": 0}

    def hook(module, args, kwargs, out):  # WanPipeline calls cond, then uncond: the order says the branch
        sample = out[0] if isinstance(out, tuple) else out.sample
        outputs[calls["n"]] = sample.detach().float().clone()
        calls["n"] += 1

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        generate(pipe, prompt, s)
    finally:
        handle.remove()
    g = s["guidance_scale"]
    per_step = 2 if g > 1 else 1  # WanPipeline: cond, then uncond, per step
    cond = [outputs[i] for i in range(0, len(outputs), per_step)]
    uncond = [outputs[i + 1] for i in range(0, len(outputs), per_step)] if per_step == 2 else cond
    guided = [u + g * (c - u) if per_step == 2 else c for c, u in zip(cond, uncond, strict=True)]

    def change(seq):
        return [None] + [float((b - a).norm() / b.norm()) for a, b in zip(seq, seq[1:], strict=False)]

    share = [float((g * (c - u)).norm() / v.norm()) if per_step == 2 else 0.0
             for c, u, v in zip(cond, uncond, guided, strict=True)]
    return {"cond_change": change(cond), "uncond_change": change(uncond), "guided_change": change(guided),
            "guidance_share": share}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--profile", default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--case", action="append", choices=list(CASES), default=None)
    p.add_argument("--prompts-count", type=int, default=4)
    p.add_argument("--prompts-from", choices=["head", "tail"], default="tail",
                   help="held-out captions from the head (compare_reference's) or the tail (shift_reference's)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    from benchmarks.common import held_out_prompts
    from videocache.pipelines.loader import load_pipeline

    cases = args.case or ["calibration", "guidance8"]
    prompts = held_out_prompts(args.prompts_count) if args.prompts_from == "head" else held_out_tail(args.prompts_count)
    profile = args.profile or args.model
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = {"model": args.model, "profile": profile, "preset": args.preset, "prompts": prompts,
              "command": command(__file__, argv), "environment": environment(), "cases": {}}
    for case in cases:
        s = case_settings(case)
        table = preset_table(pipe, profile, args.preset, s["steps"])
        actions = np.asarray(table.actions)
        skipped = [int(t) for t in range(actions.shape[0]) if (actions[t] != 0).any()]
        variants = {"table": table}
        for t in skipped:
            variants[f"step {t}"] = repaired(table, steps=[t])
        for c, name in enumerate(table.layout.names):
            variants[f"component {name}"] = repaired(table, component=c)
        half, blocks = actions.shape[1] // 2, actions.shape[1]
        variants[f"blocks 0-{half - 1}"] = repaired(table, blocks=list(range(half)))
        variants[f"blocks {half}-{blocks - 1}"] = repaired(table, blocks=list(range(half, blocks)))
        scores = {name: [] for name in variants}
        fractions = {name: float((np.asarray(t.actions) == 0)[:, t.layout.present].mean()) for name, t in variants.items()}
        traj = []
        for prompt in prompts:
            ref = generate(pipe, prompt, s)
            for name, t in variants.items():
                scores[name].append(psnr(generate(pipe, prompt, s, t), ref))
            traj.append(trajectory(pipe, prompt, s))
        base = float(np.mean(scores["table"]))
        result["cases"][case] = {
            "settings": s, "skipped_steps": skipped,
            "psnr": {name: float(np.mean(v)) for name, v in scores.items()},
            "gain_db": {name: float(np.mean(v)) - base for name, v in scores.items() if name != "table"},
            "cell_fraction": fractions,
            "trajectory": {k: [None if v is None else float(np.mean([t[k][i] for t in traj]))
                               for i, v in enumerate(traj[0][k])] for k in traj[0]},
        }
        write_results(args.out, result, render(result))
    return 0


def render(result: dict) -> list[str]:
    lines = [f"# Where the {result['preset']} preset's error comes from ({result['model']})", "",
             "PSNR against the uncached video, mean over the prompts; a repair computes the named cells at every "
             "step the table skips them (a step repair: every cell of that step). Gain: the repair's PSNR minus "
             "the table's.", "", f"    {result['command']}", ""]
    for case, r in result["cases"].items():
        lines += [f"## {case} ({', '.join(f'{k} {v:g}' for k, v in r['settings'].items())})", "",
                  f"Table: {r['psnr']['table']:.2f} dB at cell fraction {r['cell_fraction']['table']:.3f}.", ""]
        rows = sorted(r["gain_db"].items(), key=lambda kv: -kv[1])
        lines += markdown_table(["repair", "gain (dB)", "cell fraction"],
                                [[n, f"{g:+.2f}", f"{r['cell_fraction'][n]:.3f}"] for n, g in rows], "lrr")
        t = r["trajectory"]
        lines += ["", "Uncached trajectory, per step: relative change from the previous step of the conditional, "
                  "unconditional and guided predictions; share of the guidance term in the guided velocity.", ""]
        lines += markdown_table(["step", "cond", "uncond", "guided", "guidance share"],
                                [[i, *("" if v is None else f"{v:.3f}" for v in (t["cond_change"][i], t["uncond_change"][i],
                                                                             t["guided_change"][i], t["guidance_share"][i]))]
                                 for i in range(len(t["cond_change"]))], "rrrrr")
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
