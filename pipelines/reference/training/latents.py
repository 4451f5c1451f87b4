"""Stage `latents`: encode the clip bank once, with the latent statistics the transformer normalises by; stage
`conditions` (image-to-video): encode each clip's first frame followed by blank frames, as WanImageToVideoPipeline
encodes the given image, normalised alike."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import save_checkpoint, to_tensor
from .vae import load_trained_vae


@torch.no_grad()
def encode_latents(args, device, work: Path) -> None:
    out = work / "latents.pt"
    if out.exists():
        return
    vae = load_trained_vae(args, device, work, "vae_final.pt").eval()
    bank = torch.load(work / "clips.pt", weights_only=False)
    videos = bank["videos"].numpy()
    partial = work / "latents_partial.pt"
    done: dict = torch.load(partial, weights_only=False) if partial.exists() else {"latents": []}
    for start in tqdm(range(len(done["latents"]) * 8, len(videos), 8), desc="encode", dynamic_ncols=True):
        x = torch.stack([to_tensor(v) for v in videos[start : start + 8]]).to(device)
        done["latents"].append(vae.encode(x).latent_dist.mode().cpu())
        if len(done["latents"]) % 20 == 0:
            save_checkpoint(partial, **done)
    latents = torch.cat(done["latents"])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    extra = {}
    if args.vae:  # a shipped VAE decodes with its own statistics: train on latents normalised by those
        extra = {"measured_mean": mean, "measured_std": std}
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype)
    save_checkpoint(out, latents=latents, captions=bank["captions"], mean=mean, std=std, **extra)
    partial.unlink(missing_ok=True)


@torch.no_grad()
def encode_conditions(args, device, work: Path) -> None:
    out = work / "conditions.pt"
    if out.exists():
        return
    vae = load_trained_vae(args, device, work, "vae_final.pt").eval()
    videos = torch.load(work / "clips.pt", weights_only=False)["videos"].numpy()
    stats = torch.load(work / "latents.pt", weights_only=False)
    mean, std = stats["mean"].view(1, -1, 1, 1, 1), stats["std"].view(1, -1, 1, 1, 1)
    encoded = []
    for start in tqdm(range(0, len(videos), 8), desc="conditions", dynamic_ncols=True):
        x = torch.stack([to_tensor(v) for v in videos[start : start + 8]])
        x[:, :, 1:] = 0.0  # the given first frame, then blank (zero) frames, as the pipeline builds it
        encoded.append(((vae.encode(x.to(device)).latent_dist.mode().cpu() - mean) / std).half())
    save_checkpoint(out, conditions=torch.cat(encoded))
