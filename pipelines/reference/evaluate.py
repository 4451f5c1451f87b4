"""Quality measurements of a reference pipeline: prompt adherence and VAE reconstruction.

    python -m videocache.pipelines.reference.evaluate [--model reference-wan]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..generation import generate, takes_image
from .checker import check_video
from .data import MOTIONS, Caption, motion_vector, render_clip, split_captions
from .first_frames import first_frame
from .shared import load_vae_weights, vae_round_trip

GATES = {"colour_rate": 0.8, "direction_rate": 0.7, "every_frame_colour_rate": 0.8, "vae_psnr_mean": 28.0}
DEMO_PROMPT = "a red circle moving left on a black background"  # the README's demo (`videocache generate`, seed 0)


@dataclass
class AdherenceReport:
    prompts: int
    colour_rate: float
    direction_rate: float
    every_frame_colour_rate: float  # videos whose every frame shows the prompted colour (the per-frame gate)
    frame_colour_rate: float  # frames, over all videos, that show the prompted colour
    misses: list[dict]
    # image-to-video: PSNR of the generated first frame against the given one (each caption's rendered clip's)
    first_frame_psnr: list[float] | None = None


def frame_summary(result) -> str:
    """Per-frame colours in one short string, e.g. 'yellow x1, red x16'."""
    runs: list[list] = []
    for colour in result.frame_colours:
        if runs and runs[-1][0] == colour:
            runs[-1][1] += 1
        else:
            runs.append([colour, 1])
    return ", ".join(f"{c or 'none'} x{k}" for c, k in runs)


def frame_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 frames."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def given_frame(pipe, caption: Caption, seed: int) -> np.ndarray | None:
    """The first frame an image-to-video pipeline is given for this caption and seed; None for a text-only one."""
    return first_frame(caption, seed) if takes_image(pipe) else None


def prompt_adherence(pipe, captions: Sequence[Caption], steps: int = 25, guidance_scale: float = 5.0,
                     progress: bool = False, motion: str = "straight") -> AdherenceReport:
    """Generate one video per caption (seed = its index) and check its colour, direction and the colour of
    every frame. An image-to-video pipeline is given the first frame of the caption's clip rendered with that
    seed, and its generated first frame is compared with it. `motion` "diagonal" (the reference LoRA's): the
    direction counts where the motion is within 22.5 degrees of the caption's direction turned 45 degrees."""
    colour = direction = every_frame = 0
    frame_fraction = 0.0
    misses = []
    first = [] if takes_image(pipe) else None
    for i, caption in enumerate(tqdm(captions, desc="adherence", disable=not progress)):
        given = given_frame(pipe, caption, i)
        frames = generate(pipe, caption.text, seed=i, num_inference_steps=steps, num_frames=17, height=64,
                          width=64, guidance_scale=guidance_scale, progress=False, image=given).frames
        if first is not None:
            first.append(frame_psnr(frames[0], given))
        result = check_video(frames)
        colour_ok, direction_ok = result.matches(caption)
        if motion != "straight":
            direction_ok = result.moves_along(motion_vector(caption.direction, motion))
        frames_ok = result.every_frame_matches(caption)
        colour += colour_ok
        direction += direction_ok
        every_frame += frames_ok
        frame_fraction += result.frame_colour_fraction(caption)
        if not (colour_ok and direction_ok and frames_ok):
            misses.append({"prompt": caption.text, "seed": i, "colour": result.colour, "direction": result.direction,
                           "displacement": [round(v, 1) for v in result.displacement], "frames": frame_summary(result)})
    n = len(captions)
    return AdherenceReport(n, colour / n, direction / n, every_frame / n, frame_fraction / n, misses, first)


def demo_check(pipe, steps: int = 25, guidance_scale: float = 5.0) -> dict:
    """The README demo prompt as `videocache generate` runs it (seed 0): what each frame shows (image-to-video:
    given the first frame of its clip rendered with seed 0)."""
    caption = Caption.parse(DEMO_PROMPT)
    frames = generate(pipe, caption.text, seed=0, num_inference_steps=steps, num_frames=17, height=64, width=64,
                      guidance_scale=guidance_scale, progress=False, image=given_frame(pipe, caption, 0)).frames
    result = check_video(frames)
    return {"prompt": caption.text, "seed": 0, "colour": result.colour, "direction": result.direction,
            "every_frame_colour": result.every_frame_matches(caption), "frames": frame_summary(result)}


@torch.no_grad()
def vae_psnr(vae, captions: Sequence[Caption], seed: int = 10_000) -> list[float]:
    """PSNR (dB, uint8 peak 255) of encode -> decode on freshly rendered clips of the given captions."""
    psnrs = []
    for i, caption in enumerate(captions):
        video = render_clip(caption, seed=seed + i).video
        recon = vae_round_trip(vae, video)
        mse = float(np.mean((recon.astype(np.float64) - video.astype(np.float64)) ** 2))
        psnrs.append(10 * math.log10(255.0**2 / max(mse, 1e-10)))
    return psnrs


@torch.no_grad()
def expert_divergence(pipe, captions: Sequence[Caption], steps: int = 25, guidance_scale: float = 5.0) -> dict:
    """How far apart a two-expert pipeline's experts are (so that its switch is a real one): along each
    uncached generation every transformer call is made by the other expert too, on the same inputs, and
    ||v_transformer - v_transformer_2|| / ||v_running|| is taken per step (mean over both CFG branches and
    the captions); reported per expert's own steps and at the first step after the switch."""
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    per_step: dict[int, list[float]] = {}
    ran: dict[int, str] = {}
    busy = []

    def watch(name: str, other: torch.nn.Module):
        def hook(module, args, kwargs, output):
            if busy:  # the other expert's own call, made from here
                return
            busy.append(True)
            try:
                mine = output[0] if isinstance(output, tuple) else output.sample
                theirs = other(*args, **kwargs)
                theirs = theirs[0] if isinstance(theirs, tuple) else theirs.sample
            finally:
                busy.pop()
            step = pipe.scheduler.step_index or 0
            ran[step] = name
            per_step.setdefault(step, []).append(float((mine - theirs).norm() / mine.norm()))
        return hook

    handles = [experts[a].register_forward_hook(watch(a, experts[b]), with_kwargs=True)
               for a, b in (("transformer", "transformer_2"), ("transformer_2", "transformer"))]
    try:
        for i, caption in enumerate(captions):
            generate(pipe, caption.text, seed=i, num_inference_steps=steps, num_frames=17, height=64, width=64,
                     guidance_scale=guidance_scale, progress=False, image=given_frame(pipe, caption, i))
    finally:
        for handle in handles:
            handle.remove()
    mean = {t: float(np.mean(v)) for t, v in sorted(per_step.items())}
    switch = min(t for t, name in ran.items() if name == "transformer_2")
    return {
        "prompts": len(captions),
        "steps_of": {name: [t for t in mean if ran[t] == name] for name in experts},
        "relative_difference_per_step": {t: round(v, 4) for t, v in mean.items()},
        "mean_over_own_steps": {name: round(float(np.mean([v for t, v in mean.items() if ran[t] == name])), 4)
                                for name in experts},
        "at_switch": round(mean[switch], 4),
    }


def main() -> None:
    from pathlib import Path

    from videocache.weights import loaded_lora

    from ..loader import load_pipeline
    from ..lora import add_lora_arguments, lora_spec

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (the gates are set at 5.0)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--vae-weights", default=None,
                   help="a VAE checkpoint of scripts/train_reference.py to decode with instead of the shipped VAE")
    add_lora_arguments(p)
    p.add_argument("--motion", choices=MOTIONS, default="straight",
                   help="the motion the direction gate expects: diagonal for the reference LoRA reference-wan-diagonal")
    args = p.parse_args()
    lora = lora_spec(args.lora, args.lora_scale)
    pipe = load_pipeline(args.model, device="cpu", lora=lora)
    if args.vae_weights:
        load_vae_weights(pipe.vae, args.vae_weights)
    _, held_out = split_captions()
    held_out = held_out[: args.limit]
    psnrs = vae_psnr(pipe.vae, held_out)
    report = prompt_adherence(pipe, held_out, steps=args.steps, guidance_scale=args.guidance_scale, progress=True,
                              motion=args.motion)
    result = {
        "model": args.model,
        **({"lora": loaded_lora(pipe)} if lora else {}),
        "motion": args.motion,
        "held_out_prompts": report.prompts,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "vae_weights": args.vae_weights,
        "vae_psnr_mean": round(float(np.mean(psnrs)), 2),
        "vae_psnr_min": round(float(np.min(psnrs)), 2),
        "gates": GATES,
        **asdict(report),
        "demo": demo_check(pipe, steps=args.steps, guidance_scale=args.guidance_scale),
    }
    if getattr(pipe, "transformer_2", None) is not None:  # two experts: how different they are
        result["expert_divergence"] = expert_divergence(pipe, held_out[:4], args.steps, args.guidance_scale)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        rows = [("prompted colour found", f"{report.colour_rate:.0%}", ">= 80 %", report.colour_rate >= 0.8),
                (f"prompted direction found{' (turned 45 degrees: diagonal)' if args.motion != 'straight' else ''}",
                 f"{report.direction_rate:.0%}", ">= 70 %", report.direction_rate >= 0.7),
                ("every frame shows the prompted colour (videos)", f"{report.every_frame_colour_rate:.0%}", ">= 80 %",
                 report.every_frame_colour_rate >= 0.8),
                ("frames showing the prompted colour (all videos)", f"{report.frame_colour_rate:.1%}", "-", None),
                ("VAE PSNR, held-out clips (mean)", f"{result['vae_psnr_mean']:.2f} dB", ">= 28 dB",
                 result["vae_psnr_mean"] >= 28.0)]
        table = "\n".join(
            f"| {a} | {b} | {c} | {'' if ok is None else 'met' if ok else 'NOT met'} |" for a, b, c, ok in rows
        )
        demo = result["demo"]
        title = f"{args.model} + LoRA {result['lora']['name']}" if lora else args.model
        misses = "\n".join(f"- `{m['prompt']}` (seed {m['seed']}): colour {m['colour']}, direction {m['direction']}, "
                            f"frames {m['frames']}" for m in report.misses) or "- none"
        Path(args.out + ".md").write_text(
            f"# {title} quality "
            f"({report.prompts} held-out prompts, {args.steps} steps, CFG "
            f"{args.guidance_scale:g})\n\n`python -m videocache.pipelines.reference.evaluate --model {args.model}"
            + (f" --lora {args.lora}" + (f" --lora-scale {args.lora_scale:g}" if args.lora_scale is not None else "")
               if lora else "")
            + (f" --motion {args.motion}" if args.motion != "straight" else "")
            + (f" --guidance-scale {args.guidance_scale:g}" if args.guidance_scale != 5.0 else "")
            + (f" --vae-weights {args.vae_weights}" if args.vae_weights else "")
            + f" --out {args.out}`\n\n"
            "| measure | value | gate | |\n|---|---|---|---|\n" + table + "\n\n"
            f"README demo prompt `{demo['prompt']}` (seed 0): frames {demo['frames']}; colour {demo['colour']}, "
            f"direction {demo['direction']}.\n\nVideos missing a gate:\n{misses}\n" + first_frame_text(result)
            + divergence_text(result)
        )


def first_frame_text(result: dict) -> str:
    values = result.get("first_frame_psnr")
    if not values:
        return ""
    return (f"\nImage-to-video: the generated first frame against the given one (the first frame of each prompt's "
            f"clip rendered with its seed): PSNR mean {np.mean(values):.2f} dB, min {np.min(values):.2f} dB, "
            f"{np.mean(np.asarray(values) >= 25):.0%} of the videos at 25 dB or more.\n")


def divergence_text(result: dict) -> str:
    div = result.get("expert_divergence")
    if div is None:
        return ""
    own = div["mean_over_own_steps"]
    return (f"\nThe two experts on the same inputs ({div['prompts']} prompts; relative difference of their velocity "
            f"predictions, ||v_transformer - v_transformer_2|| / ||v_running||): {own['transformer']:.1%} over the "
            f"high-noise expert's steps {div['steps_of']['transformer'][0]}-{div['steps_of']['transformer'][-1]}, "
            f"{own['transformer_2']:.1%} over the low-noise expert's, {div['at_switch']:.1%} at the switch.\n")


if __name__ == "__main__":
    main()
