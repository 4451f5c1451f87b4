"""ReferenceHunyuanVideoPipeline: diffusers' HunyuanVideoPipeline with reference-wan's VAE (AutoencoderKLWan).

The denoising loop is HunyuanVideoPipeline's own (its progress bar, `cache_context("cond")` and
`cache_context("uncond")` calls and callbacks unchanged). What this subclass changes, and why:

- `__init__`: the parent reads `vae.temporal_compression_ratio`, which AutoencoderKLWan lacks; the scale
  factors come from `vae.config.scale_factor_temporal/spatial` (4 and 4) instead.
- decoding: the parent divides by `vae.config.scaling_factor`; a Wan VAE de-normalises with its per-channel
  `latents_mean/latents_std`, so the loop runs with `output_type="latent"` and this class decodes.
- `check_inputs`: sizes must be multiples of spatial factor x patch (4 x 4 = 16 here; 4 x 2 = 8 for a
  patch-2 transformer), which the parent hard-codes as 16.
- defaults: the prompt template is the bare prompt (`{}`, no system prompt), 16 Llama tokens, the empty
  negative prompt, and true classifier-free guidance at `true_cfg_scale = guidance_scale` (5.0): the
  transformer has no guidance embedding (`guidance_embeds=False`), so `guidance_scale` means what it means
  for WanPipeline. `guidance_scale <= 1` runs one call per step (no "uncond" context).
- `from_pretrained`: the VAE is not stored in the folder; `videocache.json`'s `shared_components` names
  where it is (`../reference-wan/vae`), so the 7.5 MB of VAE weights ship once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline
from diffusers.pipelines.hunyuan_video.pipeline_output import HunyuanVideoPipelineOutput
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModel, LlamaModel, PreTrainedTokenizerFast

from .build_hunyuan import MAX_SEQUENCE_LENGTH, PROMPT_TEMPLATE
from .shared import decode_wan_latents, load_shared_vae, shared_component_paths


class ReferenceHunyuanVideoPipeline(HunyuanVideoPipeline):
    """HunyuanVideoPipeline whose VAE is an AutoencoderKLWan (see the module docstring)."""

    def __init__(
        self,
        text_encoder: LlamaModel,
        tokenizer: PreTrainedTokenizerFast,
        transformer: HunyuanVideoTransformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder_2: CLIPTextModel,
        tokenizer_2: PreTrainedTokenizerFast,
    ):
        DiffusionPipeline.__init__(self)  # not HunyuanVideoPipeline.__init__: it needs a Hunyuan VAE's attributes
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
            scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 4
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the folder; a component named in videocache.json's shared_components (the VAE) is loaded from
        there unless passed. A missing shared folder raises FileNotFoundError with a one-line message."""
        folder = Path(pretrained_model_name_or_path)
        shared = shared_component_paths(folder)
        if (folder / "model_index.json").is_file():  # name the missing component (diffusers names a config.json)
            index = json.loads((folder / "model_index.json").read_text())
            for name, spec in index.items():
                stored = isinstance(spec, list) and spec[0] is not None and name not in shared
                if stored and kwargs.get(name) is None and not (folder / name).is_dir():
                    raise FileNotFoundError(f"{folder} has no {name}/ folder (the {spec[1]} weights); reinstall or retrain it")
        kwargs = load_shared_vae(folder, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def check_inputs(self, prompt, prompt_2, height, width, *args, **kwargs):
        patch = self.transformer.config.patch_size if self.transformer is not None else 2
        multiple = self.vae_scale_factor_spatial * patch
        if height % multiple != 0 or width % multiple != 0:
            raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}.")
        # The parent's remaining checks (prompt/embeds consistency, template); its fixed %16 test is done above.
        super().check_inputs(prompt, prompt_2, 16, 16, *args, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = "",
        negative_prompt_2: str | list[str] | None = None,
        height: int = 64,
        width: int = 64,
        num_frames: int = 17,
        num_inference_steps: int = 25,
        sigmas: list[float] | None = None,
        true_cfg_scale: float | None = None,
        guidance_scale: float = 5.0,
        output_type: str | None = "pil",
        return_dict: bool = True,
        prompt_template: dict[str, Any] | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        **kwargs,
    ) -> HunyuanVideoPipelineOutput | tuple:
        """HunyuanVideoPipeline.__call__ with the defaults above; `true_cfg_scale` defaults to `guidance_scale`."""
        if isinstance(prompt, list) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        latents = super().__call__(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps, sigmas=sigmas,
            true_cfg_scale=guidance_scale if true_cfg_scale is None else true_cfg_scale, guidance_scale=guidance_scale,
            output_type="latent", return_dict=False, prompt_template=prompt_template or PROMPT_TEMPLATE,
            max_sequence_length=max_sequence_length, **kwargs,
        )[0]
        if output_type == "latent":
            video = latents
        else:
            video = self.decode_latents(latents)
            video = self.video_processor.postprocess_video(video, output_type=output_type)
            self.maybe_free_model_hooks()
        return HunyuanVideoPipelineOutput(frames=video) if return_dict else (video,)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video in [-1, 1], as WanPipeline decodes."""
        return decode_wan_latents(self.vae, latents)
