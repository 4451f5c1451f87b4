"""Benchmark: what the run-time guard (videocache.guard) costs when it is on, on the CPU and on paper.

The guard reads one signal per step: the relative L1 change of the denoiser's input latent (two sums over
the latent, read to the host once per step), and keeps a copy of the latent. Two measurements:

- **Generation**: reference-wan's balanced preset at the calibration settings (25 steps, CFG 5, 17 frames
  64x64), the guard off against the guard on with a threshold it never crosses (both run the same table; the
  difference is the guard's own work, and the skipped steps run block by block: fused skips are off under the
  guard). Rows interleave per round; per row the median over rounds
  of the round's minimum over `--repeats`; the ratio is taken per round and its median reported.
- **Signal at Wan2.1-1.3B size**: `TableGuard.decide` on a 480p x 81-frame latent (1 x 16 x 21 x 60 x 104),
  per step, on the CPU, against the uncached step of that size on an H100 (31.1 s per 25-step generation with
  CFG: `benchmarks/profile_at_scale.md`) (on paper: the difference, two norms and a copy of a 2.1 M-value latent per step).

    python benchmarks/guard_cost.py --rounds 5 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import command, environment, markdown_table, write_results  # noqa: E402

OUT = Path(__file__).resolve().with_name("guard_cost")
WAN_480P_81_LATENT = (1, 16, 21, 60, 104)
H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 bandwidth
H100_STEP_S = 31.1 / 25  # Wan2.1-1.3B 480p x 81 frames, CFG, uncached, per step (benchmarks/profile_at_scale.md)


def generation_cost(rounds: int, repeats: int) -> dict:
    import videocache
    from eval_vbench.calibration.guard import drift_rates
    from eval_vbench.calibration.runs import CalibrationSettings, generate_frames
    from pipelines.loader import load_pipeline
    from pipelines.reference.data import split_captions
    from videocache.guard import GuardConfig

    pipe = load_pipeline("reference-wan", device="cpu")
    profile = videocache.load_profile("reference-wan")
    s = CalibrationSettings(steps=25, frames=17, height=64, width=64, guidance_scale=5.0)
    prompt = split_captions()[0][0].text
    sigmas, rates = drift_rates(pipe, [prompt], s, generate_frames)
    never = GuardConfig(tuple(sigmas), tuple(rates), threshold=1e9)  # measures, never forces

    def timed(guard) -> tuple[float, dict]:
        engine = videocache.apply(pipe, profile, preset="balanced", guard=guard, trace=False)
        try:
            t0 = time.perf_counter()
            generate_frames(pipe, prompt, s)
            return time.perf_counter() - t0, engine.stats()
        finally:
            videocache.remove(pipe)

    timed(False), timed(never)  # warm-up
    per_round = []
    for r in range(rounds):
        order = [("off", False), ("on", never)][:: 1 if r % 2 == 0 else -1]
        best = {}
        for name, guard in order:
            runs = [timed(guard) for _ in range(repeats)]
            best[name] = min(t for t, _ in runs)
            if name == "on":
                stats = runs[0][1]
        per_round.append({**best, "ratio": best["on"] / best["off"]})
    return {"seconds_off": statistics.median(p["off"] for p in per_round),
            "seconds_on": statistics.median(p["on"] for p in per_round),
            "ratio": statistics.median(p["ratio"] for p in per_round), "per_round": per_round,
            "computed_fraction_on": stats.get("computed_fraction"), "forced_on": stats.get("guard_forced")}


def signal_cost(repeats: int) -> dict:
    from videocache.guard import GuardConfig, TableGuard
    from videocache.table import Action, BlockLayout, CacheTable

    steps = 50
    layout = BlockLayout.uniform(30)
    actions = np.full((steps, 30, 3), int(Action.COMPUTE), dtype=np.int8)
    table = CacheTable(actions, layout=layout)
    sigmas = np.linspace(1.0, 0.02, steps).tolist()
    guard = TableGuard(GuardConfig((1.0, 0.0), (1.0, 1.0), 1e9), lambda: np.ones((30, 3)), lambda: None)
    guard.start(table, sigmas)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(WAN_480P_81_LATENT, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    guard.decide(0, latents[0])
    times = []
    for i in range(1, min(steps, 1 + repeats)):
        t0 = time.perf_counter()
        guard.decide(i, latents[i % 2])
        times.append(time.perf_counter() - t0)
    values = int(np.prod(WAN_480P_81_LATENT))
    # bf16: the difference (two reads, a write), the two norms (two reads), the copy (a read and a write)
    bytes_per_step = values * 2 * 7
    return {"latent": list(WAN_480P_81_LATENT), "values": values, "dtype": "bfloat16",
            "cpu_ms_per_step": 1e3 * statistics.median(times), "bytes_per_step": bytes_per_step,
            "h100_us_per_step_on_paper": 1e6 * bytes_per_step / H100_BYTES_PER_S}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(OUT), help="writes OUT.json and OUT.md (default: benchmarks/guard_cost)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    gen, sig = generation_cost(args.rounds, args.repeats), signal_cost(20)
    result = {"command": command(__file__, argv), "environment": environment(), "generation": gen, "signal": sig}
    lines = ["# What the run-time guard costs", "", f"`{result['command']}` (1 torch thread). The guard on with a "
             "threshold it never crosses runs the same table as the guard off; the difference is its own work (one "
             "signal and one host read per step) and the skipped steps run block by block (fused skips are off under "
             "the guard).", ""]
    lines += markdown_table(
        ["measurement", "guard off", "guard on", "on / off"],
        [["reference-wan balanced, 25 steps CFG 5, 17x64x64 (s per generation)", f"{gen['seconds_off']:.3f}",
          f"{gen['seconds_on']:.3f}", f"{gen['ratio']:.3f}"]], "lrrr")
    lines += ["", f"At Wan2.1-1.3B 480p x 81 frames the latent is {sig['values']:,} values: `TableGuard.decide` takes "
              f"{sig['cpu_ms_per_step']:.1f} ms per step on this CPU; on paper an H100 moves its "
              f"{sig['bytes_per_step'] / 1e6:.0f} MB in {sig['h100_us_per_step_on_paper']:.0f} us, against an uncached "
              f"step of {H100_STEP_S:.2f} s at that size ({1e-6 * sig['h100_us_per_step_on_paper'] / H100_STEP_S:.1e} of it; "
              "benchmarks/profile_at_scale.md). Its host read waits for the step's "
              "kernels, so the host cannot queue the next step's launches ahead: at this size a step's kernels run "
              "far longer than they take to launch, so that costs one launch latency per step."]
    write_results(args.out, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
