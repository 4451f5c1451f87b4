"""Stage `vae`: AutoencoderKLWan trained from scratch on crops of the clip bank, and the VAE the later stages
load (this run's checkpoint, or a shipped pipeline's with --vae)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from tqdm.auto import tqdm

from videocache.pipelines.reference import build

from .common import save_checkpoint, to_tensor


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan's frame-by-frame causal decode without the final clamp to [-1, 1].

    The clamp in `vae.decode` zeroes the gradient of every pixel that overshoots, which stalls
    training; inference keeps the clamp.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def vae_phases(args) -> list[dict]:
    """Curriculum: short windows first (cheap), then full-length clips so that the causal cache is
    trained over every temporal chunk a 17-frame video has (short-window training alone leaves the
    later chunks at ~9 dB)."""
    return [
        {"name": "short", "steps": args.vae_steps, "frames": args.vae_frames, "batch": args.vae_batch},
        {"name": "full", "steps": args.vae_full_steps, "frames": 17, "batch": args.vae_full_batch,
         "schedule_steps": args.vae_full_schedule_steps or args.vae_full_steps},
    ]


def train_vae(args, device, work: Path) -> None:
    final = work / "vae_final.pt"
    if final.exists():
        return
    ckpt_path = work / "vae_ckpt.pt"
    vae = build.build_vae().to(device)
    videos = torch.load(work / "clips.pt", weights_only=False)["videos"].numpy()
    total = sum(ph["steps"] for ph in vae_phases(args))
    step = 0
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        step = ckpt["step"]
    bar = tqdm(total=total, initial=step, desc="vae", dynamic_ncols=True)
    vae.train()
    begin = 0
    for phase in vae_phases(args):
        end = begin + phase["steps"]
        if step >= end:
            begin = end
            continue
        # Each phase has its own optimiser and cosine schedule, so a resumed run follows the same curriculum.
        opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        if ckpt is not None and ckpt.get("phase") == phase["name"]:
            opt.load_state_dict(ckpt["opt"])
        rng = np.random.default_rng(args.seed + step)
        while step < end:
            local = step - begin
            batch = []
            for _ in range(phase["batch"]):
                video = videos[rng.integers(len(videos))]
                t = rng.integers(0, video.shape[0] - phase["frames"] + 1)
                y, x = rng.integers(0, video.shape[1] - args.vae_crop + 1, size=2)
                window = video[t : t + phase["frames"], y : y + args.vae_crop, x : x + args.vae_crop]
                batch.append(to_tensor(np.ascontiguousarray(window)))
            x = torch.stack(batch).to(device)
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * local / phase.get("schedule_steps", phase["steps"])))
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * min(1.0, (local + 1) / 100) * cosine
            posterior = vae.encode(x).latent_dist
            recon = decode_unclamped(vae, posterior.sample())
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + args.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
            bar.update(1)
            bar.set_postfix(phase=phase["name"], loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
            if step % args.ckpt_every == 0 or step == end:
                save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step, phase=phase["name"])
        begin = end
    bar.close()
    save_checkpoint(final, model=vae.state_dict())


def load_trained_vae(args, device, work: Path, checkpoint: str):
    """The VAE of this run (its checkpoint in --work-dir), or a shipped pipeline's (--vae FOLDER)."""
    if args.vae:
        return AutoencoderKLWan.from_pretrained(Path(args.vae) / "vae").to(device)
    vae = build.build_vae().to(device)
    vae.load_state_dict(torch.load(work / checkpoint, map_location=device)["model"])
    return vae
