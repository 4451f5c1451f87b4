"""Stage `assemble`: the trained pipeline's save_pretrained(--out), with TRAINING.json (what ran, and one
command that reproduces it) and videocache.json (generation defaults) beside the weights."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import time
from pathlib import Path

import torch

from videocache.pipelines.reference.shared import SHARED_COMPONENTS_KEY

from .architectures import ARCHITECTURES


def assemble(args, work: Path, command: str) -> None:
    """A shared-VAE architecture's folder leaves the VAE out: it is --vae's, named in videocache.json's
    shared_components relative to --out, so its weights ship once. A LoRA run (--lora-rank) saves the adapter
    alone, in diffusers' LoRA format."""
    if args.lora_rank:
        assemble_lora(args, work, command)
        return
    architecture = ARCHITECTURES[args.architecture]
    if architecture.shares_vae and not args.vae:
        raise SystemExit(f"--architecture {args.architecture} needs --vae FOLDER (the pipeline whose VAE it shares)")
    pipe = architecture.pipeline(args, work)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = {}
    if architecture.shares_vae:
        shutil.rmtree(out / "vae")
        shared = Path(os.path.relpath(Path(args.vae).resolve() / "vae", out.resolve())).as_posix()
        meta = {SHARED_COMPONENTS_KEY: {"vae": shared}}
    write_records(args, work, command, out, meta)


def assemble_lora(args, work: Path, command: str) -> None:
    """--out/pytorch_lora_weights.safetensors (WanPipeline.save_lora_weights of the adapter's EMA weights, as
    diffusers' own LoRA training scripts save) and TRAINING.json; the base is --init-transformer's pipeline."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from .transformer import add_lora

    transformer = ARCHITECTURES[args.architecture].build_transformer()
    add_lora(transformer, args.lora_rank)
    missing = transformer.load_state_dict(torch.load(work / "transformer_final.pt", map_location="cpu")["model"], strict=False)
    if missing.unexpected_keys or any("lora_" in k for k in missing.missing_keys):
        raise SystemExit(f"{work / 'transformer_final.pt'} does not hold a rank-{args.lora_rank} LoRA of this transformer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    write_records(args, work, command, out, None)


def reproduce_command(args) -> str:
    """One command that runs the same recipe end to end: every argument but --stages and --work-dir (and
    the default architecture), in the parser's order; a switch (store_true) appears alone when set."""
    parts = []
    for k, v in vars(args).items():
        if k in ("stages", "work_dir") or v is None or v == {} or v is False or (k == "architecture" and v == "wan"):
            continue
        flag = f"--{k.replace('_', '-')}"
        parts.append(flag if v is True else f"{flag} {shlex.quote(json.dumps(v) if isinstance(v, dict) else str(v))}")
    return "python scripts/train_reference.py " + " ".join(parts)


def write_records(args, work: Path, command: str, out: Path, meta: dict | None) -> None:
    """TRAINING.json (what ran) and videocache.json (generation defaults, plus `meta`; None: a LoRA folder,
    which has no videocache.json) beside the weights."""
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}
    record = {
        "command": command,
        # One command that runs the same recipe end to end (the stages as run are in `invocations`).
        "reproduce": reproduce_command(args),
        "invocations": json.loads((work / "commands.json").read_text()),
        "seed": args.seed,
        "arguments": vars(args),
        "stage_seconds": timings,
        "total_training_seconds": round(sum(timings.values()), 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "finished_unix": time.time(),
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    if meta is not None:
        defaults = {"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 5.0, "fps": 8}
        (out / "videocache.json").write_text(json.dumps({"generation_defaults": defaults, **meta}, indent=2) + "\n")
    print(f"saved {'reference pipeline' if meta is not None else 'LoRA'} to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
