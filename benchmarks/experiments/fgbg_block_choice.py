"""Benchmark: does block-run caching of the profiler's background blocks keep fidelity better than caching
the same number of other blocks? (ProfilingDiT's premise, checked on the reference pipeline.)

Every block set is cached with the same block-run schedule (warm-up, T_max -> T_min), so all have the same
computed fraction; fidelity is PSNR of the decoded video against the uncached one (same prompt and seed).
The background/foreground sets are read from a `scripts/profile_fgbg.py` result.

    python scripts/profile_fgbg.py --out benchmarks/experiments/fgbg_reference --clips 20 --clip-seeds 2 --prompts 8
    python benchmarks/experiments/fgbg_block_choice.py --fgbg benchmarks/experiments/fgbg_reference/fgbg.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

import videocache as vc
from videocache.pipelines.reference.mask_validation import default_captions
from videocache.profile import Profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.common
from benchmarks.common import REFERENCE_VIDEO, command, environment, reference_pipeline, write_json  # noqa: E402


def block_sets(fgbg: dict, num_blocks: int) -> dict[str, list[int]]:
    """Background and foreground blocks of both profiles in the result, plus two depth-neutral controls."""
    sets = {}
    for name, prof in (
        ("generated", fgbg["fgbg"]),
        ("clips", fgbg.get("validation", {}).get("fgbg_on_clips")),
    ):
        if prof:
            sets[f"bg_{name}"] = [b for b, c in enumerate(prof["classes"]) if c == "bg"]
            sets[f"fg_{name}"] = [b for b, c in enumerate(prof["classes"]) if c == "fg"]
    sets["even"] = list(range(0, num_blocks, 2))
    sets["odd"] = list(range(1, num_blocks, 2))
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.relpath(Path(__file__).resolve().with_name("fgbg_reference"))  # no machine paths in results
    p.add_argument("--fgbg", default=os.path.join(here, "fgbg.yaml"))
    p.add_argument("--prompts", type=int, default=4, help="held-out captions, taken after the profiled ones")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--t-max", type=int, default=4)
    p.add_argument("--t-min", type=int, default=2)
    p.add_argument("--out", default=os.path.join(here, "block_choice.json"))
    args = p.parse_args()
    pipe = reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    num_blocks = len(pipe.transformer.blocks)
    fgbg = yaml.safe_load(Path(args.fgbg).read_text())
    prompts = [c.text for c in default_captions(20)[-args.prompts :]]

    def generate(prompt: str) -> np.ndarray:
        out = pipe(prompt=prompt, **REFERENCE_VIDEO, generator=torch.Generator().manual_seed(0), output_type="np")
        return np.asarray(out.frames[0], dtype=np.float64)

    base = {q: generate(q) for q in prompts}
    results = {}
    for name, blocks in block_sets(fgbg, num_blocks).items():
        runs = {"blocks": blocks, "warmup_steps": args.warmup, "t_max": args.t_max, "t_min": args.t_min}
        profile = Profile.from_dict(
            {
                "schema_version": 1,
                "name": f"fgbg-{name}",
                "steps": 25,
                "model": {"architecture": "WanTransformer3DModel", "num_blocks": num_blocks},
                "presets": {"runs": {"block_runs": runs}},
            }
        )
        engine = vc.apply(pipe, profile, "runs")
        psnr = [
            float(10 * np.log10(1.0 / max(np.mean((generate(q) - base[q]) ** 2), 1e-12))) for q in prompts
        ]
        stats = engine.stats()
        vc.remove(pipe)
        results[name] = {
            "blocks": blocks,
            "psnr_db": round(float(np.mean(psnr)), 2),
            "computed_fraction": round(stats["computed_fraction"], 4),
        }
        print(name, results[name])
    record = {
        "benchmark": "fgbg block choice, reference-wan 17x64x64, 25 steps, CFG 5.0",
        "command": command(__file__),
        "schedule": vars(args),
        "prompts": prompts,
        "results": results,
        "environment": environment(),
    }
    write_json(args.out, record)


if __name__ == "__main__":
    main()
