"""Foreground/background block profiling of a Wan pipeline (ProfilingDiT), written as a profile snippet.

    python scripts/profile_fgbg.py --model reference-wan --out runs/fgbg

Scores every block's R_attn on the pipeline's own generations (the conditional pass at the chosen steps)
and, for the reference pipeline, also on rendered clips with true masks, which measures the derived
masks' IoU. Writes OUT/fgbg.yaml (`fgbg:` scores and classes, `validation:`, and a `block_runs:` preset
entry caching the background blocks) and OUT/fgbg_*.png heatmaps (blocks x steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from videocache.fgbg import save_heatmap
from videocache.pipelines.attention_capture import SIGNALS, default_profile_steps, profile_pipeline
from videocache.pipelines.loader import defaults_of, load_pipeline, resolve_model
from videocache.pipelines.reference import is_reference


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--out", default="runs/fgbg", help="folder for fgbg.yaml and the heatmaps")
    p.add_argument("--steps", type=int_list, help="denoising steps to score (default: see default_profile_steps)")
    p.add_argument("--heads", type=int_list, help="attention heads to use (default: all)")
    p.add_argument(
        "--prompt",
        action="append",
        help="prompt to generate (repeatable); reference default: held-out captions",
    )
    p.add_argument(
        "--prompts", type=int, default=4, help="how many held-out captions to generate (reference)"
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument(
        "--clips", type=int, default=8, help="held-out captions rendered for the mask validation (0 = skip)"
    )
    p.add_argument("--clip-seeds", type=int, default=1, help="rendered clips per caption")
    p.add_argument(
        "--reference-data",
        action="store_true",
        help="treat --model (a folder) as a reference-architecture pipeline: validate on rendered clips",
    )
    p.add_argument(
        "--signal", choices=SIGNALS, default="x0", help="cut the mask from the velocity or the implied x0"
    )
    p.add_argument(
        "--border", type=int, default=1, help="latent positions at the frame edge left out of the mask"
    )
    p.add_argument(
        "--token-threshold",
        type=float,
        default=0.5,
        help="share of a token's latent positions that makes it foreground",
    )
    p.add_argument("--tau", type=float, help="R_attn threshold for foreground blocks (default: median)")
    p.add_argument("--chunk", type=int, default=1024, help="query chunk of the attention accumulation")
    p.add_argument("--warmup", type=int, default=2, help="block_runs warm-up steps to write")
    p.add_argument("--t-max", type=int, default=4, help="block_runs longest recompute interval to write")
    p.add_argument("--t-min", type=int, default=2, help="block_runs shortest recompute interval to write")
    args = p.parse_args(argv)

    try:
        source = resolve_model(args.model)
        pipe = load_pipeline(args.model, dtype=torch.float32)
    except ValueError as exc:
        print(f"profile_fgbg: error: {exc}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    gen = defaults_of(pipe, source)
    steps = args.steps or default_profile_steps(gen.num_inference_steps)
    reference = is_reference(source) or args.reference_data
    if args.prompt:
        prompts = args.prompt
    elif reference:
        from videocache.pipelines.reference.mask_validation import default_captions

        prompts = [c.text for c in default_captions(args.prompts)]
    else:
        print(
            "profile_fgbg: error: give --prompt for a model other than the reference pipeline",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "heads": args.heads,
        "chunk": args.chunk,
        "signal": args.signal,
        "border": args.border,
        "token_threshold": args.token_threshold,
        "tau": args.tau,
    }

    report: dict = {}
    started = time.time()
    if reference and args.clips > 0:
        from videocache.pipelines.reference.mask_validation import default_captions, validate_masks

        val = validate_masks(
            pipe,
            steps,
            captions=default_captions(args.clips),
            seeds=range(args.clip_seeds),
            num_inference_steps=gen.num_inference_steps,
            **common,
        )
        report["validation"] = {**val.to_dict(), "fgbg_on_clips": val.profile.to_dict()}
        save_heatmap(val.profile, out / "fgbg_clips.png", "R_attn on rendered clips (derived masks)")
        save_heatmap(
            val.profile_true_mask, out / "fgbg_clips_true_mask.png", "R_attn on rendered clips (true masks)"
        )
        print(f"mask IoU {val.mask_iou:.3f} per step {json.dumps(val.to_dict()['iou_per_step'])}")
    prof = profile_pipeline(
        pipe,
        prompts,
        steps,
        seeds=range(args.seeds),
        num_inference_steps=gen.num_inference_steps,
        num_frames=gen.num_frames,
        height=gen.height,
        width=gen.width,
        guidance_scale=gen.guidance_scale,
        **common,
    )
    if "validation" in report:
        prof = dataclasses.replace(prof, mask_iou=val.mask_iou)
    save_heatmap(prof, out / "fgbg_generated.png", "R_attn on generated videos")
    report = {
        "fgbg": prof.to_dict(),
        **report,
        "block_runs": prof.block_runs_preset(args.warmup, args.t_max, args.t_min),
        "settings": {
            "model": args.model,
            "prompts": prompts,
            "seeds": args.seeds,
            "seconds": round(time.time() - started, 1),
        },
    }
    (out / "fgbg.yaml").write_text(
        yaml.safe_dump(report, sort_keys=False, default_flow_style=None, width=110)
    )
    print(f"R_attn {[round(v, 3) for v in prof.r_attn]} tau {prof.tau:.3f} classes {list(prof.classes)}")
    print(f"wrote {out / 'fgbg.yaml'} and heatmaps in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
