"""Benchmark: every cache method side by side on the shipped reference pipeline (reference-wan).

A thin wrapper over `videocache compare`: 16 held-out prompts of the grammar
`a {colour} {shape} moving {direction} on a {background} background` (never seen in training),
25 steps, 2 timed repeats (the minimum counts), the uncached pipeline as reference, and every peer at
two or more settings. Results (report.json, report.md, pareto.png, per-run records) go to --out;
rerunning resumes what is missing. Expect about half an hour on the 2-core CPU.

    python benchmarks/compare_reference.py                       # the committed results
    python benchmarks/compare_reference.py --prompts-count 4 --out /tmp/cmp   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_METHODS = (
    "videocache:reference-wan:full",  # computes everything: must reproduce the uncached video bit-exactly
    "videocache:reference-wan:slow",
    "videocache:reference-wan:fast",
    "videocache:reference-wan:slow:eb",  # exposure-bias correction b(t) (FEB-Cache, re-derived for flow matching)
    "videocache:reference-wan:fast:eb",
    "videocache:reference-wan:fast:eb-inv",  # the opposite direction (1 / b(t))
    "diffusers:fbcache:0.05",
    "diffusers:fbcache:0.1",
    "diffusers:fbcache:0.2",
    "diffusers:taylorseer:2",
    "diffusers:taylorseer:3",
    "diffusers:magcache:0.06",
    "diffusers:magcache:0.12",
    "diffusers:magcache:0.24",
    "diffusers:pab:2",
    "diffusers:pab:3",
    "cachedit:dbcache:1:0:0.08",
    "cachedit:dbcache:1:0:0.16",
    "cachedit:dbcache-taylorseer:1:0:0.08",
    "cachedit:dbcache-taylorseer:1:0:0.16",
)
DEFAULT_OUT = Path(__file__).resolve().with_name("compare_reference")


def held_out_prompts(count: int) -> list[str]:
    """The first `count` held-out captions of the reference data (there are 20)."""
    from videocache.pipelines.reference.data import split_captions

    held_out = split_captions()[1]
    if not 1 <= count <= len(held_out):
        raise SystemExit(f"compare_reference: --prompts-count must be 1-{len(held_out)}, got {count}")
    return [caption.text for caption in held_out[:count]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--prompts-count", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per (method, item); the minimum counts")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--save-videos", action="store_true")
    p.add_argument("--low-memory", action="store_true")
    args, extra = p.parse_known_args(argv)  # anything else goes to `videocache compare` unchanged

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text(
        "# held-out reference prompts (videocache.pipelines.reference.data.split_captions()[1])\n"
        + "\n".join(held_out_prompts(args.prompts_count))
        + "\n"
    )
    command = [
        "compare",
        "--model", args.model,
        "--prompts", str(prompts),
        "--out", str(out),
        "--steps", str(args.steps),
        "--repeats", str(args.repeats),
        "--seeds", *map(str, args.seeds),
        "--methods", *args.methods,
        *(["--save-videos"] if args.save_videos else []),
        *(["--low-memory"] if args.low_memory else []),
        *extra,
    ]  # fmt: skip
    from videocache.cli import main as videocache_main

    return videocache_main(command)


if __name__ == "__main__":  # required: the comparison's worker processes are spawned
    sys.exit(main())
