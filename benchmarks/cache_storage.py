"""Benchmark: what low-precision storage of kept outputs costs in fidelity, and what split tables hold at
Wan2.1-1.3B / 480p x 81 frames (32,760 tokens), on the CPU.

A table whose cells differ per block or component (here a preset run blockwise, `fuse_skipped_steps=False`)
keeps one tensor per block, component, CFG branch and forecast point. Two parts:

1. Fidelity (reference pipeline, held-out prompts, 25 steps, CFG 5): reference-wan `fast` blockwise with
   kept outputs stored as produced (float32 here), in bfloat16, and in float8 e4m3 with one scale per
   token row; PSNR against the uncached video, and the loss against storage as produced.
   An int8 variant with one scale per 64 channels is measured too.
2. Memory at real size, from the engine's own count: the Wan2.1-1.3B profile's presets run blockwise on a
   30-block Wan of tiny width (random weights, CFG: cond and uncond contexts, the profile's step count);
   every kept tensor is tokens x hidden, so the peak number of kept tensors is exact here and the bytes at
   32,760 tokens x 1536 channels follow for each storage format, with an 8 GB device budget and the rest
   offloaded to pinned host memory.

    python benchmarks/cache_storage.py --prompts 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import videocache
from videocache.eval_vbench.metrics.fidelity import psnr
from videocache.pipelines.reference.build import tiny_wan_transformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    WAN_1_3B_HIDDEN,
    WAN_480P_81_TOKENS,
    command,
    environment,
    generate_with,
    held_out_prompts,
    markdown_table,
    reference_pipeline,
    write_results,
)

FORMATS = {"as produced": None, "bfloat16": torch.bfloat16, "float8 e4m3 + row scale": torch.float8_e4m3fn,
           "int8 + scale per 64 channels": torch.int8}
REAL_TOKENS, REAL_HIDDEN = WAN_480P_81_TOKENS, WAN_1_3B_HIDDEN
BUDGET = 8 * 2**30
GIB = 2**30


def fidelity(prompts: list[str], preset: str) -> list[dict]:
    pipe = reference_pipeline()
    rows = {name: {"format": name, "psnr": [], "cache_peak_bytes": 0, "computed_fraction": None} for name in FORMATS}
    for i, prompt in enumerate(prompts):
        reference = generate_with(pipe, prompt, seed=i)[0].frames
        for name, dtype in FORMATS.items():
            result, stats = generate_with(pipe, prompt, preset, seed=i, fuse_skipped_steps=False, cache_dtype=dtype)
            frames = result.frames
            row = rows[name]
            row["psnr"].append(psnr(np.asarray(reference), np.asarray(frames)))
            row["cache_peak_bytes"] = max(row["cache_peak_bytes"], stats["cache_peak_bytes"])
            row["computed_fraction"] = stats["computed_fraction"]
        print(f"prompt {i + 1}/{len(prompts)}: " + ", ".join(f"{n} {rows[n]['psnr'][-1]:.2f} dB" for n in FORMATS),
              flush=True)
    base = float(np.mean(rows["as produced"]["psnr"]))
    for row in rows.values():
        row["mean_psnr"] = round(float(np.mean(row["psnr"])), 3)
        row["psnr_loss_db"] = round(base - row["mean_psnr"], 3)
        row["psnr"] = [round(p, 3) for p in row["psnr"]]
    return list(rows.values())


def kept_tensors(profile: str, preset: str) -> dict:
    """Peak number of kept tensors (all contexts) of a preset run blockwise on a tiny 30-block Wan."""
    model = tiny_wan_transformer(30)
    prof = videocache.load_profile(profile)
    steps = prof.steps
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Wan2.1's flow shift at 480p
    scheduler.set_timesteps(steps)
    engine = videocache.apply_to_transformer(model, scheduler, prof, preset, fuse_skipped_steps=False)
    x = torch.randn(1, 4, 3, 8, 8)
    text = torch.randn(1, 6, 16)
    tokens, hidden = 3 * 4 * 4, 16
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            for ctx in ("cond", "uncond"):
                with model.cache_context(ctx, step_index=i, num_inference_steps=steps):
                    model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)
    stats = engine.stats()
    videocache.remove(model)
    count = stats["cache_peak_bytes"] / (tokens * hidden * 4)
    assert count == int(count), "kept something that is not one tokens x hidden tensor"
    return {"profile": profile, "preset": preset, "steps": steps, "computed_fraction": stats["computed_fraction"],
            "peak_kept_tensors": int(count)}


def at_real_size(count: int) -> list[dict]:
    rows = []
    for name, bytes_per_value, scale_bytes in (("bfloat16 (as produced)", 2, 0), ("float8 e4m3 + row scale", 1, 4),
                                               ("int8 + scale per 64 channels", 1, 4 * REAL_HIDDEN // 64)):
        total = count * REAL_TOKENS * (REAL_HIDDEN * bytes_per_value + scale_bytes)
        device = min(total, BUDGET)
        rows.append({"format": name, "total_gib": round(total / GIB, 2),
                     "device_gib_with_8gib_budget_and_offload": round(device / GIB, 2),
                     "host_gib": round((total - device) / GIB, 2)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--preset", default="fast")
    p.add_argument("--real-profile", default="wan2.1-t2v-1.3b")
    p.add_argument("--out", default=str(Path(__file__).with_name("cache_storage")))
    args = p.parse_args()
    torch.set_num_threads(2)
    prompts = held_out_prompts(args.prompts)
    real = []
    prof = videocache.load_profile(args.real_profile)
    for preset in prof.presets:
        counted = kept_tensors(args.real_profile, preset)
        counted["at_32760_tokens"] = at_real_size(counted["peak_kept_tensors"])
        real.append(counted)
        print(f"{args.real_profile} {preset}: fraction {counted['computed_fraction']:.3f}, "
              f"{counted['peak_kept_tensors']} kept tensors at peak", flush=True)
    rows = fidelity(prompts, args.preset)
    result = {
        "benchmark": "kept-output storage formats: fidelity on the reference pipeline (blockwise), bytes at "
                     "Wan2.1-1.3B 480p x 81 frames",
        "command": command(__file__),
        "environment": environment(),
        "fidelity": {"model": "reference-wan", "preset": f"{args.preset} (blockwise)", "prompts": prompts,
                     "settings": "25 steps, 17 frames 64x64, CFG 5, seed = prompt index", "rows": rows},
        "real_size": {"tokens": REAL_TOKENS, "hidden": REAL_HIDDEN, "device_budget_gib": BUDGET / GIB,
                      "presets": real},
    }
    env = result["environment"]
    lines = [
        "# Kept-output storage: fidelity and memory",
        "",
        f"`{result['command']}` ({env['machine']}, torch {env['torch']})",
        "",
        f"## Fidelity: reference-wan `{args.preset}` blockwise, {len(prompts)} held-out prompts",
        "",
        *markdown_table(["storage", "computed fraction", "cache peak", "mean PSNR vs uncached", "loss vs as produced"],
                        ([r["format"], f"{r['computed_fraction']:.3f}", f"{r['cache_peak_bytes'] / 2**20:.2f} MiB",
                          f"{r['mean_psnr']:.2f} dB", f"{r['psnr_loss_db']:+.2f} dB"] for r in rows), "lrrrr"),
    ]
    lines += [
        "",
        f"## Memory at {REAL_TOKENS:,} tokens x {REAL_HIDDEN} (Wan2.1-1.3B, 480p x 81 frames, CFG), blockwise",
        "",
        "Peak kept tensors counted by the engine on a tiny 30-block Wan running the profile's presets; bytes "
        "follow exactly (each kept tensor is tokens x hidden). With an 8 GiB device budget and "
        "`offload_to_cpu=True`, what does not fit spills to pinned host memory.",
        "",
        *markdown_table(
            ["preset", "computed fraction", "kept tensors at peak", "storage", "total", "on the device", "on the host"],
            ([r["preset"], f"{r['computed_fraction']:.3f}", r["peak_kept_tensors"], s["format"], f"{s['total_gib']:.2f} GiB",
              f"{s['device_gib_with_8gib_budget_and_offload']:.2f} GiB", f"{s['host_gib']:.2f} GiB"]
             for r in real for s in r["at_32760_tokens"]), "lrrlrrr"),
    ]
    write_results(args.out, result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
