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
import json
import platform
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

import videocache
from videocache.pipelines.generation import generate
from videocache.pipelines.loader import load_pipeline
from videocache.pipelines.reference.build import TEXT_DIM, Z_DIM

PROMPT = "a green circle moving right on a gray background"
PRESETS = ("slow", "balanced", "fast")


def wide_transformer(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=Z_DIM,
        out_channels=Z_DIM, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=8960, num_layers=8, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    ).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=str(Path(__file__).with_name("overhead_wide")))
    args = p.parse_args()
    pipe = load_pipeline("reference-wan", device="cpu")
    pipe.transformer = wide_transformer()
    settings = dict(num_inference_steps=args.steps, num_frames=17, height=64, width=64, guidance_scale=5.0,
                    progress=False)

    def transformer_s(preset: str | None) -> tuple[float, float | None]:
        engine = videocache.apply(pipe, "reference-wan", preset=preset) if preset else None
        try:
            seconds = generate(pipe, PROMPT, seed=0, **settings).summary["transformer_s"]
            return seconds, engine.stats()["computed_fraction"] if engine else None
        finally:
            if engine:
                videocache.remove(pipe)

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
        "command": f"python benchmarks/overhead_wide.py --repeats {args.repeats}",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "presets": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Engine overhead with Wan2.1-1.3B-sized blocks",
        "",
        f"`{result['command']}` ({result['torch_threads']} torch threads). {result['benchmark']}.",
        "",
        "| preset | computed fraction | transformer speedup | target 0.9 / fraction | |",
        "|---|---:|---:|---:|---|",
        *(f"| {r['preset']} | {r['computed_fraction']:.3f} | {r['transformer_speedup']:.2f}x | {r['target']:.2f}x | "
          f"{'met' if r['met'] else 'NOT met'} |" for r in rows),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
