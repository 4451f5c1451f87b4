"""Train the embedded reference pipeline (tiny Wan2.1 architecture) on procedural videos.

Stages, each resumable from its checkpoint in --work-dir:
  1. vae          AutoencoderKLWan on short random crops of procedural clips (it is fully convolutional
                  and causal, so it carries over to full 17-frame 64x64 clips);
  2. latents      encode the training clips once, and measure per-channel latent statistics;
  3. transformer  WanTransformer3DModel with Wan's rectified-flow objective (velocity eps - x0);
  4. assemble     WanPipeline.save_pretrained(--out) plus a TRAINING.json record.

    python scripts/train_reference.py --out pipelines/reference/reference-wan

--architecture hunyuan trains reference-hunyuan (HunyuanVideoTransformer3DModel, Llama + CLIP text encoders,
true CFG) on the same clips and latents, encoded by a shipped pipeline's VAE (--vae; no vae/decoder
stages), and assembles a ReferenceHunyuanVideoPipeline folder that names that VAE instead of copying it:

    python scripts/train_reference.py --architecture hunyuan --vae pipelines/reference/reference-wan \
        --work-dir runs/reference_hunyuan --out pipelines/reference/reference-hunyuan \
        --stages clips,latents,transformer,assemble

--architecture wan22 fine-tunes reference-wan22 from reference-wan: two experts (the high-noise one at
sigma >= --boundary-ratio, the low-noise one below), run by WanPipeline with transformer_2 and boundary_ratio
(the command is in pipelines/reference/README.md).

--lora-rank R --init-transformer FOLDER trains a LoRA of the base's frozen transformer and saves it in diffusers'
format, loaded by `pipe.load_lora_weights` and by videocache's --lora (reference-wan-diagonal: clips of --motion
diagonal; the command is in pipelines/reference/README.md).

--architecture opensora trains reference-opensora the same way (our STDiT3Model and a tiny T5, Open-Sora's
time shift and x0 - noise velocity, caption dropout to the model's null caption) and assembles a
ReferenceOpenSoraPipeline folder that names the shared VAE too.
"""


from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

# The stages and what each --architecture changes in them live in the package; this script parses the
# command line and runs the stages it names.
from videocache.pipelines.reference.data import MOTIONS
from videocache.pipelines.reference.training.architectures import ARCHITECTURES
from videocache.pipelines.reference.training.assemble import assemble
from videocache.pipelines.reference.training.clips import render_bank
from videocache.pipelines.reference.training.decoder import train_decoder
from videocache.pipelines.reference.training.latents import encode_conditions, encode_latents
from videocache.pipelines.reference.training.transformer import train_transformer
from videocache.pipelines.reference.training.vae import train_vae


def check_transformer_config(parser: argparse.ArgumentParser, args) -> None:
    """--transformer-config names keys of the architecture's transformer config (reference-wan's is fixed)."""
    if not isinstance(args.transformer_config, dict):
        parser.error("--transformer-config must be a JSON object")
    if not args.transformer_config:
        return
    known = ARCHITECTURES[args.architecture].transformer_config
    if known is None:
        configurable = " or ".join(name for name, a in ARCHITECTURES.items() if a.transformer_config is not None)
        parser.error(f"--transformer-config applies to --architecture {configurable}")
    unknown = sorted(set(args.transformer_config) - set(known))
    if unknown:
        parser.error(f"--transformer-config: unknown keys {', '.join(unknown)} (known: {', '.join(known)})")


def build_parser() -> argparse.ArgumentParser:
    """The command line; its order is the order of the options in TRAINING.json's reproduce line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pipelines/reference/reference-wan", help="pipeline folder to write")
    p.add_argument("--work-dir", default="runs/reference", help="checkpoints and intermediate data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-frames", type=int, default=9)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--vae-full-steps", type=int, default=1000, help="second phase on full 17-frame windows")
    p.add_argument("--vae-full-batch", type=int, default=4)
    p.add_argument("--vae-full-schedule-steps", type=int, default=None,
                   help="length of the full phase's cosine schedule (default: --vae-full-steps)")
    p.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only fine-tuning steps")
    p.add_argument("--decoder-schedule-steps", type=int, default=None,
                   help="length of the decoder's cosine schedule (default: --decoder-steps)")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--decoder-fg-weight", type=float, default=4.0,
                   help="loss weight of the moving shape's pixels relative to the background's")
    p.add_argument("--decoder-frame0-noise", type=float, default=0.0,
                   help="decoder fine-tuning: largest std of the noise added to latent frame 0 (normalised latent units)")
    p.add_argument("--decoder-noise", type=float, default=0.0,
                   help="decoder fine-tuning: largest std of the noise added to every latent frame (normalised units)")
    p.add_argument("--decoder-clean-fraction", type=float, default=0.0,
                   help="decoder fine-tuning: chance that each noise draw (--decoder-noise, --decoder-frame0-noise) "
                   "skips a clip, so that some clips decode from clean latents as in a round trip")
    p.add_argument("--decoder-frame0-weight", type=float, default=1.0,
                   help="decoder fine-tuning: loss weight of image frame 0 relative to the others")
    p.add_argument("--decoder-weigh-halos", action="store_true",
                   help="decoder fine-tuning: weigh background pixels the reconstruction moves off the background "
                   "colour like shape pixels (--decoder-fg-weight), against colour fringes")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--clips-per-caption", type=int, default=6)
    p.add_argument("--steps", type=int, default=3000, help="transformer optimisation steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps2", type=int, default=0, help="second transformer phase (warm restart), steps")
    p.add_argument("--lr2", type=float, default=3e-4, help="second transformer phase, peak learning rate")
    p.add_argument("--steps2-schedule", type=int, default=None,
                   help="length of the second phase's cosine schedule (default: --steps2)")
    p.add_argument("--time-shift", type=float, default=None,
                   help="shift of the training times (default: the sampler's; larger puts more at high noise)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--text-encoder", default=None,
                   help="load the frozen text encoder from this saved pipeline folder instead of building it from the seed")
    p.add_argument("--architecture", choices=("wan", "wan22", "wan22-i2v", "hunyuan", "opensora"), default="wan",
                   help="wan: reference-wan (WanTransformer3DModel); wan22: reference-wan22 (two WanTransformer3DModel "
                   "experts split at --boundary-ratio, Wan2.2 A14B's layout); wan22-i2v: the same, image-to-video (the "
                   "first frame's latent in channels, stage conditions); hunyuan: reference-hunyuan "
                   "(HunyuanVideoTransformer3DModel, Llama + CLIP text encoders, true CFG)")
    p.add_argument("--boundary-ratio", type=float, default=None,
                   help="wan22 (needed there): the high-noise expert denoises at sigma >= this, the low-noise one below "
                   "(Wan2.2 T2V-A14B's is 0.875)")
    p.add_argument("--init-transformer", default=None,
                   help="start the transformer (each expert) from this saved pipeline folder's transformer (a fine-tune)")
    p.add_argument("--frame0-weight", type=float, default=None,
                   help="loss weight of latent frame 0 relative to the others (the transformer stage; default 1)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train a LoRA adapter of this rank on --init-transformer's frozen transformer instead of the "
                   "whole model; assemble saves it in diffusers' LoRA format (pytorch_lora_weights.safetensors)")
    p.add_argument("--motion", choices=MOTIONS, default=None,
                   help="how the clips move for their captions' directions (stage clips): straight (default), or "
                   "diagonal (turned 45 degrees counter-clockwise), what the reference LoRA teaches")
    p.add_argument("--transformer-config", type=json.loads, default={},
                   help="JSON overrides of the hunyuan or opensora transformer's config, e.g. "
                   "'{\"patch_size\": 2}' (more video tokens); the assembled folder's config records them")
    p.add_argument("--vae", default=None,
                   help="use the trained VAE of this saved pipeline folder (no vae/decoder stages); "
                   "--architecture hunyuan needs it: reference-hunyuan shares reference-wan's VAE")
    p.add_argument("--stages", default="clips,vae,latents,transformer,decoder,assemble")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    check_transformer_config(p, args)
    if (args.boundary_ratio is not None) != bool(ARCHITECTURES[args.architecture].experts):
        p.error("--boundary-ratio goes with an architecture of two experts (wan22), and wan22 needs it")
    if args.lora_rank is not None and (args.lora_rank < 1 or not args.init_transformer or args.architecture != "wan"):
        p.error("--lora-rank takes a positive rank, with --architecture wan and --init-transformer (the base it adapts)")
    if args.boundary_ratio is not None and not 0 < args.boundary_ratio < 1:
        p.error(f"--boundary-ratio must lie between 0 and 1; got {args.boundary_ratio}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    history_path = work / "commands.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    history_path.write_text(json.dumps([*history, {"command": command, "started_unix": time.time()}], indent=1))
    timings_path = work / "timings.json"
    stages = {"clips": lambda: render_bank(args, work), "vae": lambda: train_vae(args, device, work),
              "latents": lambda: encode_latents(args, device, work), "transformer": lambda: train_transformer(args, device, work),
              "conditions": lambda: encode_conditions(args, device, work),
              "decoder": lambda: train_decoder(args, device, work)}
    for name in args.stages.split(","):
        if name == "assemble":
            assemble(args, work, command)
            continue
        t0 = time.time()
        stages[name]()
        # Re-read: stages may run as separate processes at the same time. Resumed runs add up.
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        timings[name] = round(timings.get(name, 0.0) + time.time() - t0, 1)
        timings_path.write_text(json.dumps(timings))


if __name__ == "__main__":
    main()
