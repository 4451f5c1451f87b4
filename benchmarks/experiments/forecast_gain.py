"""Experiment: how much of a forecast-heavy table's error is the straight extrapolation overshooting? A profile's
own presets (calibrated at guidance 5 and 25 steps, plain forecasts; no variants) run with every forecast damped
to last + g (extrapolated - last), on held-out prompts, at the calibration settings and at shifted ones.

    python benchmarks/experiments/forecast_gain.py                     # reference-opensora
    python benchmarks/experiments/forecast_gain.py --model reference-wan --cases calibration guidance8

Writes OUT.json and OUT.md (default benchmarks/experiments/forecast_gain_MODEL). The held-out prompts only
diagnose here: the shipped gains are chosen by `videocache profile` on its calibration prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.common, benchmarks.shift_reference
from benchmarks.common import command, environment, markdown_table, write_results  # noqa: E402
from benchmarks.shift_reference import CASES, PRESETS, case_settings, held_out_tail  # noqa: E402

GAINS = (1.0, 0.8, 0.6, 0.4)


def main(argv: list[str] | None = None) -> None:
    import videocache
    from eval_vbench.calibration.runs import CalibrationSettings, generate_frames
    from eval_vbench.metrics.fidelity import psnr
    from videocache.pipelines.loader import load_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference-opensora")
    p.add_argument("--cases", nargs="+", default=["calibration", "steps15", "guidance8", "guidance8_frames25"],
                   choices=sorted(CASES))
    p.add_argument("--prompts-count", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    profile = videocache.load_profile(args.model)
    prompts = held_out_tail(args.prompts_count)
    rows, result = [], {"model": args.model, "prompts": prompts, "gains": GAINS, "cases": {},
                        "command": command(__file__, argv), "environment": environment()}
    for case in args.cases:
        c = case_settings(case)
        s = CalibrationSettings(steps=c["steps"], frames=c["frames"], height=c["height"], width=c["width"],
                                guidance_scale=c["guidance_scale"])
        refs = [generate_frames(pipe, prompt, s) for prompt in prompts]
        result["cases"][case] = {}
        for preset in PRESETS:
            scores = []
            for gain in GAINS:
                damped = dataclasses.replace(profile, presets={
                    **profile.presets, preset: dataclasses.replace(profile.presets[preset], forecast_gain=gain)})
                values = []
                for prompt, ref in zip(prompts, refs, strict=True):
                    engine = videocache.apply(pipe, damped, preset=preset, trace=False, variants=False)
                    try:
                        values.append(psnr(generate_frames(pipe, prompt, s), ref))
                        fraction = engine.stats()["computed_fraction"]
                    finally:
                        videocache.remove(pipe)
                scores.append(round(sum(values) / len(values), 2))
                print(case, preset, f"gain {gain:g}", f"computed {fraction:.3f}", f"PSNR {scores[-1]:.2f}", flush=True)
            result["cases"][case][preset] = {"computed_fraction": round(fraction, 3), "psnr": scores}
            best = max(range(len(GAINS)), key=scores.__getitem__)
            rows.append([case, preset, f"{fraction:.3f}", *[f"{v:.2f}" for v in scores],
                         f"{GAINS[best]:g} ({scores[best] - scores[0]:+.2f})"])
    md = [f"# Forecast gains on {args.model}'s own presets (no variants)", "",
          f"Mean PSNR (dB) against the uncached video on {len(prompts)} held-out prompts, every forecast damped to "
          "last + g (extrapolated - last).", "", f"    {result['command']}", "",
          *markdown_table(["case", "preset", "computed", *[f"g = {g:g}" for g in GAINS], "best (gain over g = 1)"],
                          rows, "llr" + "r" * (len(GAINS) + 1))]
    write_results(args.out or Path(__file__).resolve().with_name(f"forecast_gain_{args.model}"), result, md)


if __name__ == "__main__":
    main()
