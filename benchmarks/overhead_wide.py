"""Benchmark: engine overhead with Wan2.1-1.3B-sized blocks (random weights), on the CPU.

The reference model is tiny (hidden size 128), so the work a step does outside the blocks (patch and
time embeddings, output head: about 3 % of a step on the 2-core CPU) and the engine's per-block work
weigh far more than on a real model. This run keeps everything of the reference pipeline (text encoder,
scheduler, 17 frames 64x64, 25 steps, CFG) but swaps in a transformer with Wan2.1-T2V-1.3B's block
sizes (hidden 1536, 12 heads, FFN 8960) and 8 blocks, so that the reference-wan presets apply. Weights
are random: only the timing means something. Each preset's transformer time is compared with uncached
runs interleaved with it; the minimum over repeats counts.

    python benchmarks/overhead_wide.py --repeats 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    REFERENCE_VIDEO,
    WAN_1_3B,
    command,
    environment,
    generate_with,
    markdown_table,
    reference_pipeline,
    wan_transformer,
    write_results,
)

PROMPT = "a green circle moving right on a gray background"
PRESETS = ("slow", "balanced", "fast")


def wide_transformer(seed: int = 0):
    """Wan2.1-1.3B's block sizes, 8 blocks (the reference-wan profile's), the reference pipeline's channels."""
    return wan_transformer(8, WAN_1_3B, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=str(Path(__file__).with_name("overhead_wide")))
    args = p.parse_args()
    pipe = reference_pipeline()
    pipe.transformer = wide_transformer()
    settings = {**REFERENCE_VIDEO, "num_inference_steps": args.steps}

    def transformer_s(preset: str | None) -> tuple[float, float | None]:
        result, stats = generate_with(pipe, PROMPT, preset, settings=settings)
        return result.summary["transformer_s"], stats["computed_fraction"] if stats else None

    transformer_s(None)  # warm-up
    rows = []
    for preset in PRESETS:
        base, cached, fraction = [], [], None
        for _ in range(args.repeats):
            base.append(transformer_s(None)[0])
            t, fraction = transformer_s(preset)
            cached.append(t)
        speedup = min(base) / min(cached)
        rows.append({"preset": preset, "computed_fraction": round(fraction, 4), "uncached_s": base,
                     "cached_s": cached, "transformer_speedup": round(speedup, 3),
                     "target": round(0.9 / fraction, 3), "met": speedup >= 0.9 / fraction})
        print(f"{preset:9s} fraction {fraction:.3f}  speedup {speedup:.2f}x  target {0.9 / fraction:.2f}x")
    result = {
        "benchmark": "reference-wan presets on a transformer with Wan2.1-1.3B block sizes (8 blocks, random "
                     f"weights), 17 frames 64x64, {args.steps} steps, CFG 5.0, transformer time",
        "command": command(__file__, ["--repeats", str(args.repeats)]
                           + (["--steps", str(args.steps)] if args.steps != REFERENCE_VIDEO["num_inference_steps"] else [])),
        "environment": environment(),
        "presets": rows,
    }
    lines = [
        "# Engine overhead with Wan2.1-1.3B-sized blocks",
        "",
        f"`{result['command']}` ({result['environment']['torch_threads']} torch threads). {result['benchmark']}.",
        "",
        *markdown_table(["preset", "computed fraction", "transformer speedup", "target 0.9 / fraction", ""],
                        ([r["preset"], f"{r['computed_fraction']:.3f}", f"{r['transformer_speedup']:.2f}x",
                          f"{r['target']:.2f}x", "met" if r["met"] else "NOT met"] for r in rows), "lrrrl"),
    ]
    json_path, md_path = write_results(args.out, result, lines)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
