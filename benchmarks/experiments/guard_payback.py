"""Experiment: does the run-time guard (videocache.guard) help reference-wan's balanced preset where the
guidance scale breaks the table? Its drift rates are measured on two calibration prompts at the calibration
settings; then, on two held-out prompts at guidance 8 (17 and 25 frames), the table alone, the guard with its
pay-back (the shipped rule: forced steps paid back by skipping a later whole-compute step) and the guard
without pay-back (forced steps only: the computed fraction rises), at two thresholds.

    python benchmarks/experiments/guard_payback.py

Prints per prompt (computed fraction, PSNR against the uncached video, forced steps, skipped steps); the
figures are in benchmarks/shift_reference/README.md.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.shift_reference


def main() -> None:
    import videocache
    import videocache.guard as vg
    from benchmarks.shift_reference import held_out_tail
    from eval_vbench.calibration.guard import drift_rates
    from eval_vbench.calibration.runs import CalibrationSettings, generate_frames
    from eval_vbench.metrics.fidelity import psnr
    from pipelines.loader import load_pipeline
    from pipelines.reference.data import split_captions
    from videocache.guard import GuardConfig
    from videocache.table import Action, CacheTable

    pipe = load_pipeline("reference-wan", device="cpu")
    prof = videocache.load_profile("reference-wan")
    base = CalibrationSettings(steps=25, frames=17, height=64, width=64, guidance_scale=5.0)
    sigmas, rates = drift_rates(pipe, [c.text for c in split_captions()[0][::61][:2]], base, generate_frames)
    prompts = held_out_tail(2)
    pay_back = vg.TableGuard._forced

    def no_pay_back(self, step):  # the forced step alone: the computed fraction rises
        arr = self.table.actions.copy()
        arr[step] = Action.COMPUTE
        t = self.table
        return CacheTable(arr, t.forecast_order, t.block_runs, t.run_actions, t.reuse_scale, t.layout, t.forecast_gain)

    for name, s in (("guidance 8, 25 frames", dataclasses.replace(base, guidance_scale=8.0, frames=25)),
                    ("guidance 8", dataclasses.replace(base, guidance_scale=8.0))):
        refs = [generate_frames(pipe, p, s) for p in prompts]
        for mode, thresholds in (("table alone", [None]), ("no pay-back", [0.05, 0.2]), ("pay-back", [0.05, 0.2])):
            for threshold in thresholds:
                vg.TableGuard._forced = no_pay_back if mode == "no pay-back" else pay_back
                guard = False if threshold is None else GuardConfig(tuple(sigmas), tuple(rates), threshold)
                rows = []
                for prompt, ref in zip(prompts, refs, strict=True):
                    engine = videocache.apply(pipe, prof, preset="balanced", guard=guard, trace=False,
                                              variants=False)
                    video = generate_frames(pipe, prompt, s)
                    st = engine.stats()
                    videocache.remove(pipe)
                    rows.append((round(st["computed_fraction"], 3), round(psnr(video, ref), 2),
                                 st.get("guard_forced"), st.get("guard_dropped")))
                print(name, mode, threshold, rows, flush=True)


if __name__ == "__main__":
    main()
