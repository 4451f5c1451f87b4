"""ReferenceOpenSoraPipeline: OpenSoraPipeline with reference-wan's VAE (AutoencoderKLWan).

The loop, prompt handling (aesthetic-score suffix, T5 mask, the learned null caption for CFG) and the
resolution-shifted rectified-flow schedule are OpenSoraPipeline's own. What this subclass changes, and why:

- the VAE is a Wan VAE (spatial 4, temporal 4, 16 normalised latent channels): `latent_frames` is
  (F - 1) / 4 + 1 and `decode_latents` de-normalises as WanPipeline does;
- `check_inputs`: sizes must be multiples of spatial factor x patch (4 x 4 = 16); 1 frame or 4k + 1 >= 17;
- defaults: 64x64, 17 frames, 25 steps, CFG 5, 8 fps, no PixArt caption cleaning (what the reference was
  trained on: lower-cased prompts, whether or not `bs4` and `ftfy` are installed);
- `from_pretrained`: the VAE is not stored in the folder; `videocache.json`'s `shared_components` names
  where it is (`../reference-wan/vae`), so its weights ship once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.video_processor import VideoProcessor

from ..opensora.model.pipeline import OpenSoraPipeline
from .build_opensora import FPS
from .shared import decode_wan_latents, load_shared_vae

GENERATION_DEFAULTS = {"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 5.0,
                       "fps": FPS}


class ReferenceOpenSoraPipeline(OpenSoraPipeline):
    """OpenSoraPipeline whose VAE is an AutoencoderKLWan (see the module docstring)."""

    generation_defaults = GENERATION_DEFAULTS

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler):
        DiffusionPipeline.__init__(self)  # not OpenSoraPipeline.__init__: it reads an OpenSoraVAE's attributes
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                              scheduler=scheduler)
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 4
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load the folder with the VAE named in videocache.json's shared_components (unless passed)."""
        kwargs = load_shared_vae(Path(pretrained_model_name_or_path), {**kwargs, "torch_dtype": torch_dtype})
        kwargs.pop("torch_dtype")
        return super().from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype, **kwargs)

    def check_inputs(self, prompt, height: int, width: int, num_frames: int, num_inference_steps: int):
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size[1]
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if (num_frames - 1) % self.vae_scale_factor_temporal or 1 < num_frames < 17:
            raise ValueError(f"num_frames must be 1 or {self.vae_scale_factor_temporal}k + 1 and at least 17 "
                             f"(Open-Sora's time shift is zero below 17 frames), got {num_frames}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_factor_temporal + 1

    def decode_latents(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        return decode_wan_latents(self.vae, latents)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height: int = 64, width: int = 64, num_frames: int = 17,
                 num_inference_steps: int = 25, guidance_scale: float = 5.0, fps: int = FPS, clean_caption: bool = False,
                 **kwargs):
        """OpenSoraPipeline.__call__ with the reference's defaults."""
        return super().__call__(prompt, negative_prompt=negative_prompt, height=height, width=width,
                                num_frames=num_frames, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, fps=fps, clean_caption=clean_caption, **kwargs)
