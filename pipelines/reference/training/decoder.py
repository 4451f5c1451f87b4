"""Stage `decoder`: fine-tune the VAE's decoder alone, on crops centred on the moving shape."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import save_checkpoint, to_tensor
from .vae import decode_unclamped, load_trained_vae

SHAPE_DISTANCE = 40.0  # RGB distance (0-255) from a clip's background colour that counts as its shape


def shape_crop(video: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A size x size crop of every frame that contains the moving shape in a random frame, the shape's
    mask (pixels far from the clip's median colour, which is the flat background) and that colour.

    Random crops mostly see background, and a plain pixel loss is dominated by it: the decoder then
    renders a red shape brown. Centring crops on the shape and weighting its pixels fixes both.
    """
    background = np.median(video.reshape(-1, 3), axis=0)
    fg = np.linalg.norm(video.astype(np.float32) - background, axis=-1) > SHAPE_DISTANCE
    height, width = video.shape[1:3]
    ys, xs = np.nonzero(fg[rng.integers(len(video))])
    if len(ys):
        i = rng.integers(len(ys))
        y = int(np.clip(ys[i] - rng.integers(size), 0, height - size))
        x = int(np.clip(xs[i] - rng.integers(size), 0, width - size))
    else:
        y, x = (int(v) for v in rng.integers(0, [height - size + 1, width - size + 1]))
    window = (slice(None), slice(y, y + size), slice(x, x + size))
    return np.ascontiguousarray(video[window]), fg[window].astype(np.float32), background


def train_decoder(args, device, work: Path) -> None:
    """Fine-tune only post_quant_conv + decoder on full clips, from the frozen encoder's posterior mean.

    The latents the transformer learns depend on the encoder alone, so this stage is independent of
    the transformer stage (they may run at the same time) and sharpens reconstruction for free.
    """
    final = work / "vae_decoder_final.pt"
    if final.exists():
        return
    vae = load_trained_vae(args, device, work, "vae_final.pt")  # with --vae, a shipped decoder continues
    latent_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    trainable = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    vae.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    ckpt_path = work / "decoder_ckpt.pt"
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    videos = torch.load(work / "clips.pt", weights_only=False)["videos"].numpy()
    rng = np.random.default_rng(args.seed + 7 + step)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 8 + step)
    bar = tqdm(total=args.decoder_steps, initial=step, desc="decoder", dynamic_ncols=True)
    while step < args.decoder_steps:
        crops, weights, backgrounds = [], [], []
        for _ in range(args.vae_full_batch):
            crop, fg, background = shape_crop(videos[rng.integers(len(videos))], args.vae_crop, rng)
            crops.append(to_tensor(crop))
            weights.append(torch.from_numpy(1.0 + (args.decoder_fg_weight - 1.0) * fg))
            backgrounds.append(torch.from_numpy(background).float().div(127.5).sub(1.0))
        x = torch.stack(crops).to(device)
        w = torch.stack(weights)[:, None].to(device)  # (B, 1, F, H, W), broadcast over RGB
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            # The causal decoder renders latent frame 0 alone, and small errors there (a transformer's) change
            # image frame 0's colour (benchmarks/experiments/decoder_frame_sensitivity.md): train it to decode
            # noisy latents into the clean clip. Noise std uniform in [0, max) per clip, normalised latent units.
            for frames, largest in ((slice(None), args.decoder_noise), (slice(0, 1), args.decoder_frame0_noise)):
                if largest > 0:
                    sigma = largest * torch.rand(len(z), 1, 1, 1, 1, generator=noise_gen, device=device)
                    if args.decoder_clean_fraction > 0:  # this draw skips some clips (both skip: a clean round trip)
                        clean = torch.rand(len(z), 1, 1, 1, 1, generator=noise_gen, device=device)
                        sigma = sigma * (clean >= args.decoder_clean_fraction)
                    noise = torch.randn(z[:, :, frames].shape, generator=noise_gen, device=device)
                    z[:, :, frames] += sigma * latent_std * noise
        recon = decode_unclamped(vae, z)
        if args.decoder_weigh_halos:
            # A colour fringe the decoder paints around the shape (a red square on white rendered with an orange
            # rim: benchmarks/experiments/vae_colour_roundtrip.md) lies on background pixels, weighted 1: weigh
            # every pixel the reconstruction moves off the background like a shape pixel.
            background = torch.stack(backgrounds).to(device).view(-1, 3, 1, 1, 1)
            halo = (recon.detach() - background).norm(dim=1, keepdim=True) > SHAPE_DISTANCE / 127.5
            w = torch.maximum(w, 1.0 + (args.decoder_fg_weight - 1.0) * halo.float())
        w[:, :, 0] *= args.decoder_frame0_weight  # image frame 0 is decoded from latent frame 0 alone
        err = recon - x
        loss = ((err.square() + 0.5 * err.abs()) * w).sum() / (w.sum() * x.shape[1])
        for g in opt.param_groups:
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / (args.decoder_schedule_steps or args.decoder_steps)))
            g["lr"] = args.decoder_lr * min(1.0, (step + 1) / 50) * cosine
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if step % args.ckpt_every == 0 or step == args.decoder_steps:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step)
    bar.close()
    save_checkpoint(final, model=vae.state_dict())
