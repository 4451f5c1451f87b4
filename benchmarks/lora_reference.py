"""Benchmark: a LoRA of reference-wan under the base model's profile, under its own quick profile, and the peers.

The LoRA (default the shipped reference-wan-diagonal: every shape moves diagonally, which the base never draws)
changes what the blocks compute, so the base profile's tables were made for other weights. Calibrated on the
LoRA model itself (`videocache profile --lora PATH`): the full calibration, the quick one within a tenth of its
generations (`--max-generations`), and the quick one that reuses the base profile's sensitivities
(`--sensitivity-from reference-wan`: no sensitivity runs). Then one comparison on the LoRA model (16 held-out
prompts, uncached video as reference): the base profile's presets, each calibration's presets, and the peers at
four settings each (MagCache calibrated on the LoRA model itself). Per preset: the best peer that computes no
more (within 0.02) and the margin over it, and whether a peer dominates it.

    python benchmarks/lora_reference.py
    python benchmarks/lora_reference.py --lora my_lora.safetensors --lora-scale 0.8 --out /tmp/lora_bench

Profiles and the comparison go to OUT/ (per-run records and logs are not committed); the summary to
OUT/results.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import command, environment, held_out_prompts, markdown_table, write_results  # noqa: E402
from benchmarks.quick_calibration import BUDGETS, GENERATION_SHARE, calibrate  # noqa: E402
from benchmarks.shift_reference import PEERS, SAME_BUDGET, margins  # noqa: E402

MODEL = "reference-wan"
OUT = Path(__file__).resolve().with_name("lora_reference")


def main(argv: list[str] | None = None) -> int:
    from videocache.cli import main as videocache_main
    from videocache.pipelines.lora import LoraSpec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", default="reference-wan-diagonal")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--prompts-count", type=int, default=16)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora = ("--lora", args.lora, "--lora-scale", f"{args.lora_scale:g}")
    record = LoraSpec(args.lora, args.lora_scale).record()

    reports = {"full": calibrate(MODEL, out / "full.yaml", None, None, lora)}
    allowed = int(reports["full"]["generations"]["total"] * GENERATION_SHARE)
    reports["quick"] = calibrate(MODEL, out / "quick.yaml", allowed, None, lora)
    reports["quick-from-base"] = calibrate(MODEL, out / "quick-from-base.yaml", None, None,
                                           (*lora, "--sensitivity-from", MODEL))
    profiles = {"base profile": MODEL, **{kind: str(out / f"{kind}.yaml") for kind in reports}}
    ours = {kind: [f"videocache:{profile}:{preset}" for preset in BUDGETS] for kind, profile in profiles.items()}
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(held_out_prompts(args.prompts_count, "--prompts-count")) + "\n")
    specs = [s for kind in ours.values() for s in kind]
    compare = ["compare", "--model", MODEL, *lora, "--prompts", str(prompts), "--out", str(out / "compare"),
               "--repeats", "1", "--no-progress", "--methods", *specs, *PEERS]
    if videocache_main(compare) != 0:
        return 1
    entries = {e["method"]: e for e in json.loads((out / "compare" / "report.json").read_text())["methods"]}
    result = {"command": command(__file__, argv), "model": MODEL, "lora": record, "prompts": args.prompts_count,
              "generations": {kind: reports[kind]["generations"]["total"] for kind in reports},
              "seconds": {kind: reports[kind]["seconds"] for kind in reports},
              "presets": {kind: margins(entries, specs_of, list(PEERS)) for kind, specs_of in ours.items()},
              "peers": {q: {k: entries.get(q, {}).get(k) for k in ("computed_fraction", "psnr")} for q in PEERS},
              "environment": environment()}
    write_results(out / "results", result, render(result))
    return 0


def render(result: dict) -> list[str]:
    lora = result["lora"]
    lines = [f"# {result['model']} + LoRA {lora['name']} (scale {lora['scale']:g}): presets and peers", "",
             f"    {result['command']}", "",
             f"{result['prompts']} held-out prompts, the LoRA model's uncached video as reference. Margin: the preset's "
             f"PSNR minus the best peer's that computes no more (fraction within +{SAME_BUDGET}); dominated: a peer "
             "computes no more and is no worse.", "",
             *markdown_table(("calibration", "generations", "seconds"),
                             [(kind, f"{g:g}", f"{result['seconds'][kind]:.0f}") for kind, g in result["generations"].items()],
                             "lrr"), ""]
    rows = []
    for kind, presets in result["presets"].items():
        for spec, m in presets.items():
            preset = spec.rsplit(":", 1)[1]
            if "error" in m:
                rows.append([kind, preset, "error", "", "", "", m["error"]])
                continue
            peer = "none that cheap" if m["best_peer"] is None else (
                f"`{m['best_peer']}` {m['best_peer_fraction']:.3f} / {m['best_peer_psnr']:.2f}")
            margin = "" if m["margin_db"] is None else f"{m['margin_db']:+.2f}"
            rows.append([kind, preset, f"{m['computed_fraction']:.3f}", f"{m['psnr']:.2f}", peer, margin,
                         ", ".join(f"`{d}`" for d in m["dominated_by"]) or "no"])
    lines += markdown_table(["profile", "preset", "computed", "PSNR (dB)", "best peer computing no more",
                             "margin (dB)", "dominated by"], rows, "llrrlrl")
    lines += ["", "Peers:", "", *markdown_table(["peer", "computed", "PSNR (dB)"], [
        [f"`{q}`", "" if v["computed_fraction"] is None else f"{v['computed_fraction']:.3f}",
         "" if v["psnr"] is None else f"{v['psnr']:.2f}"] for q, v in result["peers"].items()], "lrr")]
    return lines


if __name__ == "__main__":  # required: the comparison's worker processes are spawned
    sys.exit(main())
