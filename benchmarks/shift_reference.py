"""Benchmark: do the calibrated presets hold when the settings change? Our presets and the adaptive peers on a
reference pipeline under settings other than the ones its profile was calibrated for (25 steps, guidance 5,
17 frames, 64x64): other step counts, guidance scales, no CFG, other lengths and sizes.

Each case is one `videocache compare` run (uncached reference, fidelity against it, FLOP-weighted computed
fraction counted at the model family's FLOP points) on held-out prompts the calibration never saw (by default
the last four of the 20 held-out captions; `benchmarks/compare_reference` uses the first 16). Peers run at
four settings each, spanning computed fractions about 0.55 to below 0.33; MagCache is
calibrated on each case's own settings (its ratios come from one run of that case), an advantage over a table
made for other settings. Per case and preset the report gives the margin: the preset's PSNR minus the best
PSNR of a peer that computes no more (within 0.02), and whether a peer dominates it (computes no more and is
no worse).

    python benchmarks/shift_reference.py                                  # reference-wan, every case
    python benchmarks/shift_reference.py --model reference-hunyuan --cases guidance8 frames33 guidance8_frames25
    python benchmarks/shift_reference.py --cases steps15 --prompts "a red circle moving left on a black background"

Per-case comparisons go to OUT/MODEL/CASE/ (report.md and report.json are kept, run records are not); the
summary to OUT/results.json and OUT/README.md. Reruns resume what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import command, environment, fail, markdown_table, write_results  # noqa: E402

CALIBRATION = {"steps": 25, "guidance_scale": 5.0, "frames": 17, "height": 64, "width": 64}
CASES = {  # name -> the settings that differ from the calibration's
    "calibration": {},
    "steps15": {"steps": 15},
    "steps50": {"steps": 50},
    "guidance3": {"guidance_scale": 3.0},
    "guidance8": {"guidance_scale": 8.0},
    "no_cfg": {"guidance_scale": 1.0},
    "frames9": {"frames": 9},
    "frames33": {"frames": 33},
    "size48": {"height": 48, "width": 48},
    "size96": {"height": 96, "width": 96},
    "guidance8_frames25": {"guidance_scale": 8.0, "frames": 25},
    # a check after the variants were settled: settings no calibration or earlier case used (unchosen/)
    "guidance7_steps20_frames21": {"guidance_scale": 7.0, "steps": 20, "frames": 21},
}
PRESETS = ("slow", "balanced", "fast")  # calibrated for computed fractions 0.60 / 0.48 / 0.32
PEERS = (  # four settings each, from about 0.55 down to below 0.33 computed at the calibration settings
    "diffusers:magcache:0.12", "diffusers:magcache:0.24", "diffusers:magcache:0.6", "diffusers:magcache:1.2",
    "diffusers:fbcache:0.1", "diffusers:fbcache:0.2", "diffusers:fbcache:0.4", "diffusers:fbcache:0.8",
    "diffusers:taylorseer:2", "diffusers:taylorseer:3", "diffusers:taylorseer:4", "diffusers:taylorseer:5",
    "cachedit:dbcache:1:0:0.16", "cachedit:dbcache:1:0:0.3", "cachedit:dbcache:1:0:0.6", "cachedit:dbcache:1:0:1.0",
)
SAME_BUDGET = 0.02  # a peer "computes no more" when its fraction is at most ours + this
OUT = Path(__file__).resolve().with_name("shift_reference")


def held_out_tail(count: int) -> list[str]:
    """The last `count` held-out captions (the calibration saw none; compare_reference uses the first 16)."""
    from videocache.pipelines.reference.data import split_captions

    held_out = [c.text for c in split_captions()[1]]
    if not 1 <= count <= len(held_out):
        fail(f"--prompts-count must be 1-{len(held_out)}, got {count}")
    return held_out[-count:]


def case_settings(case: str) -> dict:
    return {**CALIBRATION, **CASES[case]}


def run_case(model: str, case: str, prompts: list[str], out: Path, methods: list[str]) -> dict:
    """One comparison; returns its report's methods by spec."""
    from videocache.cli import main as videocache_main

    s = case_settings(case)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    argv = ["compare", "--model", model, "--prompts", str(out / "prompts.txt"), "--out", str(out),
            "--steps", str(s["steps"]), "--frames", str(s["frames"]), "--height", str(s["height"]),
            "--width", str(s["width"]), "--guidance-scale", str(s["guidance_scale"]), "--repeats", "1",
            "--methods", *methods, "--no-progress"]
    code = videocache_main(argv)
    report = out / "report.json"
    if not report.is_file():
        fail(f"case {case}: the comparison wrote no report (exit {code})")
    return {e["method"]: e for e in json.loads(report.read_text())["methods"]}


def margins(entries: dict, ours: list[str], peers: list[str]) -> dict:
    """Per preset: fraction, PSNR, the best peer that computes no more (within SAME_BUDGET) and the margin
    over it, and the peers that dominate it (no more compute, no less PSNR)."""
    def point(spec):
        e = entries.get(spec) or {}
        return e.get("computed_fraction"), e.get("psnr")

    out = {}
    for spec in ours:
        f, p = point(spec)
        if f is None or p is None:
            out[spec] = {"error": (entries.get(spec) or {}).get("error", "not run")}
            continue
        cheaper = [(q, *point(q)) for q in peers if point(q)[0] is not None and point(q)[1] is not None
                   and point(q)[0] <= f + SAME_BUDGET]
        best = max(cheaper, key=lambda t: t[2], default=None)
        dominated = [q for q, fq, pq in cheaper if fq <= f + 1e-9 and pq >= p]
        out[spec] = {"computed_fraction": f, "psnr": p, "best_peer": best[0] if best else None,
                     "best_peer_fraction": best[1] if best else None, "best_peer_psnr": best[2] if best else None,
                     "margin_db": (p - best[2]) if best and math.isfinite(p) else None, "dominated_by": dominated}
    return out


def render(result: dict) -> list[str]:
    lines = [f"# Presets under shifted settings ({result['model']})", "",
             f"Calibration settings: {CALIBRATION['steps']} steps, guidance {CALIBRATION['guidance_scale']}, "
             f"{CALIBRATION['frames']} frames {CALIBRATION['height']}x{CALIBRATION['width']}. Prompts: "
             f"{len(result['prompts'])} held-out captions ({'; '.join(result['prompts'])}). Margin: the preset's "
             f"PSNR minus the best peer's that computes no more (fraction within +{SAME_BUDGET}); dominated: a peer "
             "computes no more and is no worse. Per-case reports: the case folders.", "",
             f"    {result['command']}", ""]
    rows = []
    for case, per_case in result["cases"].items():
        changes = ", ".join(f"{k} {v:g}" for k, v in CASES[case].items()) or "as calibrated"
        for spec, m in per_case["presets"].items():
            if "error" in m:
                rows.append([case, changes, ":".join(spec.split(":")[2:]), "error", "", "", "", m["error"]])
                continue
            peer = "none that cheap" if m["best_peer"] is None else (
                f"`{m['best_peer']}` {m['best_peer_fraction']:.2f} / {m['best_peer_psnr']:.2f}")
            margin = "" if m["margin_db"] is None else f"{m['margin_db']:+.2f}"
            rows.append([case, changes, ":".join(spec.split(":")[2:]), f"{m['computed_fraction']:.3f}", f"{m['psnr']:.2f}",
                         peer, margin, ", ".join(f"`{d}`" for d in m["dominated_by"]) or "no"])
    lines += markdown_table(["case", "settings", "preset", "computed", "PSNR (dB)", "best peer computing no more",
                             "margin (dB)", "dominated by"], rows, "lllrrlrl")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                   help=f"default: all ({', '.join(CASES)})")
    p.add_argument("--prompts-count", type=int, default=4, help="the last N held-out captions (default 4)")
    p.add_argument("--prompts", nargs="+", default=None, help="these prompts instead")
    p.add_argument("--profile", default=None, help="the presets' profile (default: the model's own)")
    p.add_argument("--flags", nargs="*", default=[], choices=["guard", "noguard", "novariants"],
                   help="also run each preset with this method flag (guard: the run-time guard on; novariants: the "
                        "profile's own calibration whatever the case's guidance scale and step count)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    prompts = args.prompts or held_out_tail(args.prompts_count)
    profile = args.profile or args.model
    ours = [f"videocache:{profile}:{name}" for name in PRESETS]
    ours += [f"{spec}:{flag}" for flag in args.flags for spec in ours]
    out = Path(args.out)
    result = {"model": args.model, "profile": profile, "prompts": prompts, "calibration": CALIBRATION,
              "command": command(__file__, argv), "environment": environment(), "cases": {}}
    summary = out / f"results_{args.model}.json"
    if summary.is_file():  # cases of an earlier run with other --cases are kept
        result["cases"] = json.loads(summary.read_text()).get("cases", {})
    for case in args.cases:
        entries = run_case(args.model, case, prompts, out / args.model / case, [*ours, *PEERS])
        result["cases"][case] = {"settings": case_settings(case), "presets": margins(entries, ours, list(PEERS)),
                                 "peers": {q: {k: entries.get(q, {}).get(k) for k in ("computed_fraction", "psnr")}
                                           for q in PEERS}}
        write_results(out / f"results_{args.model}", result, render(result))
    return 0


if __name__ == "__main__":  # required: the comparison's worker processes are spawned
    sys.exit(main())
