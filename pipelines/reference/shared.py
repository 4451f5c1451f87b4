"""Components a reference pipeline folder names instead of storing (reference-wan's VAE, shipped once).

A folder's videocache.json may hold `shared_components: {"vae": "../reference-wan/vae"}` (paths relative to
the folder). `load_shared_vae` fills the `vae` keyword of a `from_pretrained` call from there, and
`decode_wan_latents` decodes normalised latents the way WanPipeline does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

SHARED_COMPONENTS_KEY = "shared_components"


def shared_component_paths(folder: str | Path) -> dict[str, Path]:
    """Components stored outside a pipeline folder, from its videocache.json (paths relative to the folder)."""
    meta = Path(folder) / "videocache.json"
    if not meta.is_file():
        return {}
    entries = json.loads(meta.read_text()).get(SHARED_COMPONENTS_KEY, {})
    return {name: (Path(folder) / rel).resolve() for name, rel in entries.items()}


def load_shared_vae(folder: str | Path, kwargs: dict) -> dict:
    """`kwargs` with `vae` loaded from the folder's shared components (unless passed). A component other
    than the VAE is refused (ValueError) and a missing shared folder is a one-line FileNotFoundError."""
    for name, path in shared_component_paths(folder).items():
        if kwargs.get(name) is not None:
            continue
        if name != "vae":
            raise ValueError(f"{folder}: cannot share component {name!r} (only the vae)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shared VAE of {folder} is missing at {path} (it ships with reference-wan)")
        dtype = kwargs.get("torch_dtype")
        kwargs = {**kwargs, name: AutoencoderKLWan.from_pretrained(path, **({"torch_dtype": dtype} if dtype is not None else {}))}
    return kwargs


def decode_wan_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> video in [-1, 1], as WanPipeline decodes (x * std + mean, then the VAE)."""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, vae.dtype)
    std = torch.tensor(config.latents_std).view(shape).to(latents.device, vae.dtype)
    return vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]


def decoded_frames(video: torch.Tensor):
    """A decoded (1, 3, F, H, W) video in [-1, 1] as (F, H, W, 3) uint8 frames, as the checker reads them."""
    return ((video[0].float().cpu().permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKLWan, video):
    """Rendered (F, H, W, 3) uint8 frames encoded (latent mode) and decoded again, as uint8 frames."""
    x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1).to(vae.device, vae.dtype)
    return decoded_frames(vae.decode(vae.encode(x).latent_dist.mode()).sample)


def load_vae_weights(vae: AutoencoderKLWan, checkpoint: str | Path) -> None:
    """Swap a loaded pipeline's VAE weights for a `scripts/train_reference.py` checkpoint (decoder experiments
    measured before the shipped VAE changes)."""
    vae.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
