"""Benchmark: one 17-frame 64x64 video, 25 steps with classifier-free guidance, on the reference pipeline.

Reports the median wall time of several runs after one warm-up (target: at most 10 s on the 2-core CPU).

    python benchmarks/reference_generate.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    REFERENCE_VIDEO,
    environment,
    generate_with,
    markdown_table,
    reference_pipeline,
    write_results,
)

PROMPT = "a green circle moving right on a gray background"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).with_name("reference_generate")))
    args = p.parse_args()
    pipe = reference_pipeline()
    generate_with(pipe, PROMPT)  # warm-up
    runs = [generate_with(pipe, PROMPT, seed=i)[0].summary for i in range(args.runs)]
    wall = [r["wall_s"] for r in runs]
    transformer = [r["transformer_s"] for r in runs]
    result = {
        "benchmark": "reference-wan generate, 17 frames 64x64, 25 steps, CFG 5.0",
        "command": f"python benchmarks/reference_generate.py --runs {args.runs}",
        "runs": args.runs,
        "median_wall_s": statistics.median(wall),
        "median_transformer_s": statistics.median(transformer),
        "wall_s": wall,
        "transformer_s": transformer,
        "transformer_calls_per_video": runs[0]["transformer_calls"],
        "target_wall_s": 10.0,
        "meets_target": statistics.median(wall) <= 10.0,
        "environment": environment(),
    }
    env = result["environment"]
    video = f"{REFERENCE_VIDEO['num_frames']}x{REFERENCE_VIDEO['height']}x{REFERENCE_VIDEO['width']}"
    lines = [
        "# Reference pipeline generation speed",
        "",
        f"`{result['command']}` on {env['machine']} ({env['torch_threads']} torch threads).",
        "",
        *markdown_table(
            ["video", "steps", "runs", "median wall s", "median transformer s", "target"],
            [[f"{video}, CFG {REFERENCE_VIDEO['guidance_scale']}", REFERENCE_VIDEO["num_inference_steps"], args.runs,
              f"{result['median_wall_s']:.2f}", f"{result['median_transformer_s']:.2f}",
              f"<= 10 s: {'met' if result['meets_target'] else 'NOT met'}"]]),
    ]
    write_results(args.out, result, lines)
    print(json.dumps({k: result[k] for k in ("median_wall_s", "median_transformer_s", "meets_target")}))


if __name__ == "__main__":
    main()
