"""Benchmark: `videocache profile --quick` against the full calibration, on prompts neither saw.

For a shipped reference pipeline: the full calibration (budgets 0.6 / 0.5 / 0.33, its run-time guard where the
model has one: what `profiles/MODEL.yaml` was made with, without its variants) and the quick one within a tenth
of the full one's generations (`--max-generations`), each counting the generations of every phase; then both
profiles' presets on the 16 held-out prompts in one comparison run.
The quick presets hold when each is within 1 dB of the full preset of the same budget at no higher computed
fraction, with at most a tenth of the full calibration's generations. Profiles and the comparison go to
OUT/MODEL/ (per-run records and logs are not committed); the summary to OUT/MODEL.json/.md.

    python benchmarks/quick_calibration.py --model reference-wan
    python benchmarks/quick_calibration.py --model reference-wan22    # two experts: no guard
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import command, held_out_prompts, markdown_table, publish  # noqa: E402

BUDGETS = {"slow": 0.6, "balanced": 0.5, "fast": 0.33}  # the shipped profiles' presets
WITHIN_DB, GENERATION_SHARE = 1.0, 0.1  # issue 26's bar: within 1 dB, at most a tenth of the generations


def calibrate(model: str, out: Path, max_generations: int | None, images: Path | None,
              extra: tuple[str, ...] = ()) -> dict:
    """Run `videocache profile` into `out` unless it is there (quick within `max_generations` where given); its
    report."""
    from videocache.cli import main as videocache_main

    if not out.is_file():
        argv = ["profile", "--model", model, "--out", str(out), "--no-progress", "--preset-names", *BUDGETS]
        for budget in BUDGETS.values():
            argv += ["--budget", f"{budget:g}"]
        argv += ["--max-generations", str(max_generations)] if max_generations is not None else []
        argv += ["--image", str(images)] if images is not None else []
        argv += list(extra)
        if videocache_main(argv) != 0:
            raise SystemExit(f"videocache profile failed for {out}")
    return json.loads(out.with_suffix(".json").read_text())


def interpolation_error(quick: dict, full: dict) -> dict:
    """How well the quick calibration's step sensitivities at the steps it did not perturb (interpolated, or
    another calibration's) match the full calibration's, measured at every step: relative error after scaling
    the quick weights onto the full ones where both measured (normalisation aside, those are the same runs)."""
    q, f = np.asarray(quick["step_sensitivity"]), np.asarray(full["step_sensitivity"])
    measured = [t for t in quick["perturbed_steps"] if f[t] > 0]
    predicted = [t for t in range(1, len(f)) if t not in quick["perturbed_steps"] and f[t] > 0]
    counts = {"perturbed": len(quick["perturbed_steps"]), "predicted": len(predicted)}
    if not predicted:
        return {**counts, "median_relative_error": None, "max_relative_error": None, "max_at_step": None}
    on = measured or predicted
    q = q * f[on].sum() / q[on].sum()
    error = np.abs(q[predicted] - f[predicted]) / f[predicted]
    worst = int(np.argmax(error))
    return {**counts, "median_relative_error": round(float(np.median(error)), 3),
            "max_relative_error": round(float(error[worst]), 3), "max_at_step": predicted[worst]}


def main(argv: list[str] | None = None) -> int:
    from videocache.cli import main as videocache_main
    from videocache.pipelines.generation import source_takes_image
    from videocache.pipelines.loader import resolve_model
    from videocache.pipelines.reference.data import split_captions
    from videocache.pipelines.reference.first_frames import calibration_captions, write_first_frames

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--prompts-count", type=int, default=16)
    p.add_argument("--out", default=str(Path(__file__).resolve().with_name("quick_calibration")))
    p.add_argument("--sensitivity-from", default=None, metavar="PROFILE",
                   help="the quick calibration reuses PROFILE's sensitivities (as for a fine-tune of its model): "
                        "written as quick-from-PROFILE.yaml and MODEL-from-PROFILE.md")
    p.add_argument("--max-generations", type=int, default=None, metavar="N",
                   help="give the quick calibration N generations instead of a tenth of the full one's: written as "
                        "quick-N.yaml and MODEL-N.md")
    args = p.parse_args(argv)
    quick = "quick" if args.sensitivity_from is None else f"quick-from-{args.sensitivity_from}"
    if args.max_generations is not None:
        quick += f"-{args.max_generations}"

    folder = Path(args.out) / args.model
    folder.mkdir(parents=True, exist_ok=True)
    image_to_video = source_takes_image(resolve_model(args.model))
    calibration_frames = write_first_frames(calibration_captions(), folder / "calibration_frames") \
        if image_to_video else None
    reports = {"full": calibrate(args.model, folder / "full.yaml", None, calibration_frames)}
    allowed = args.max_generations or int(reports["full"]["generations"]["total"] * GENERATION_SHARE)  # a tenth
    reports["quick"] = calibrate(args.model, folder / f"{quick}.yaml", allowed, calibration_frames,
                                 () if args.sensitivity_from is None else ("--sensitivity-from", args.sensitivity_from))
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(held_out_prompts(args.prompts_count, "--prompts-count")) + "\n")
    methods = [f"videocache:{folder / kind}.yaml:{preset}" for kind in ("full", quick) for preset in BUDGETS]
    compare = ["compare", "--model", args.model, "--prompts", str(prompts), "--out", str(folder / "compare"),
               "--repeats", "1", "--no-progress", "--methods", *methods]
    if image_to_video:
        compare += ["--images", str(write_first_frames(split_captions()[1][:args.prompts_count], folder / "images"))]
    if videocache_main(compare) != 0:
        return 1

    held_out = {m["method"]: m for m in json.loads((folder / "compare" / "report.json").read_text())["methods"]}
    generations = {kind: reports[kind]["generations"] for kind in reports}
    presets = []
    for preset, budget in BUDGETS.items():
        full, fast = (held_out[f"videocache:{folder / kind}.yaml:{preset}"] for kind in ("full", quick))
        presets.append({
            "preset": preset, "budget": budget,
            "full": {"computed_fraction": full["computed_fraction"], "psnr": round(full["psnr"], 3)},
            "quick": {"computed_fraction": fast["computed_fraction"], "psnr": round(fast["psnr"], 3)},
            "quick_minus_full_db": round(fast["psnr"] - full["psnr"], 3),
            "holds": fast["psnr"] >= full["psnr"] - WITHIN_DB
            and fast["computed_fraction"] <= full["computed_fraction"] + 1e-9,
        })
    share = generations["quick"]["total"] / generations["full"]["total"]
    sensitivities = interpolation_error(reports["quick"], reports["full"])
    result = {"command": command(__file__, argv), "model": args.model, "prompts": args.prompts_count,
              "generations": generations, "generation_share": round(share, 4), "step_sensitivity": sensitivities,
              "seconds": {kind: reports[kind]["seconds"] for kind in reports},
              "within_db": WITHIN_DB, "presets": presets,
              "holds": all(p["holds"] for p in presets) and share <= GENERATION_SHARE}
    phases = ("fgbg", "record", "sensitivity", "search", "guard", "total")
    lines = [f"# Quick against full calibration on {args.model} ({args.prompts_count} held-out prompts)"
             + ("" if args.sensitivity_from is None else f", sensitivities from {args.sensitivity_from}"), "",
             f"    {result['command']}", "",
             *markdown_table(("calibration", *phases, "seconds"),
                             [(kind, *(f"{generations[kind].get(ph, 0):g}" for ph in phases),
                               f"{result['seconds'][kind]:.0f}") for kind in ("full", "quick")], "lrrrrrrr"),
             "", f"Generations: quick / full = {share:.3f} (bar: {GENERATION_SHARE:g}).", "",
             f"Step sensitivities: quick perturbed {sensitivities['perturbed']} steps and predicted "
             f"{sensitivities['predicted']}"
             + ("." if not sensitivities["predicted"] else
                f"; against the full calibration's measured ones the predicted weights are off by "
                f"{100 * sensitivities['median_relative_error']:.0f} % (median), at most "
                f"{100 * sensitivities['max_relative_error']:.0f} % (step {sensitivities['max_at_step']})."), "",
             *markdown_table(("preset", "full: computed, PSNR", "quick: computed, PSNR", "quick - full", "holds"),
                             [(p["preset"], f"{p['full']['computed_fraction']:.3f}, {p['full']['psnr']:.2f} dB",
                               f"{p['quick']['computed_fraction']:.3f}, {p['quick']['psnr']:.2f} dB",
                               f"{p['quick_minus_full_db']:+.2f} dB", "yes" if p["holds"] else "no")
                              for p in presets], "lrrrl")]
    name = args.model if args.sensitivity_from is None else f"{args.model}-from-{args.sensitivity_from}"
    publish(Path(args.out) / (name if args.max_generations is None else f"{name}-{args.max_generations}"), result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
