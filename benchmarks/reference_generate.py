"""Benchmark: one 17-frame 64x64 video, 25 steps with classifier-free guidance, on the reference pipeline.

Reports the median wall time of several runs after one warm-up (target: at most 10 s on the 2-core CPU).

    python benchmarks/reference_generate.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from videocache.pipelines.generation import generate
from videocache.pipelines.loader import load_pipeline

PROMPT = "a green circle moving right on a gray background"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).with_name("reference_generate")))
    args = p.parse_args()
    pipe = load_pipeline("reference-wan", device="cpu")
    settings = dict(num_inference_steps=25, num_frames=17, height=64, width=64, guidance_scale=5.0, progress=False)
    generate(pipe, PROMPT, seed=0, **settings)  # warm-up
    runs = [generate(pipe, PROMPT, seed=i, **settings).summary for i in range(args.runs)]
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
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(
        "# Reference pipeline generation speed\n\n"
        f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['torch_threads']} torch threads).\n\n"
        "| video | steps | runs | median wall s | median transformer s | target |\n|---|---|---|---|---|---|\n"
        f"| 17x64x64, CFG 5.0 | 25 | {args.runs} | {result['median_wall_s']:.2f} | {result['median_transformer_s']:.2f} | <= 10 s: "
        f"{'met' if result['meets_target'] else 'NOT met'} |\n"
    )
    print(json.dumps({k: result[k] for k in ("median_wall_s", "median_transformer_s", "meets_target")}))


if __name__ == "__main__":
    main()
