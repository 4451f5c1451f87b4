"""OpenSoraPipeline: Open-Sora 1.2 text-to-video as a diffusers `DiffusionPipeline`.

Folder layout (what `from_pretrained` reads and `save_pretrained` writes; `videocache generate --model
FOLDER` resolves this class from model_index.json's `_class_name`):

    model_index.json        {"_class_name": "OpenSoraPipeline", ...}
    transformer/            the files of hpcai-tech/OpenSora-STDiT-v3 (config.json model_type STDiT3, model.safetensors)
    vae/                    the files of hpcai-tech/OpenSora-VAE-v1.2 (model_type VideoAutoencoderPipeline)
    text_encoder/           a transformers T5EncoderModel folder (DeepFloyd/t5-v1_1-xxl)
    tokenizer/              its tokenizer (optional: else the tokenizer files inside text_encoder/, as on the hub)
    scheduler/              optional FlowMatchEulerDiscreteScheduler config (else the default; the shift is per call)

The loop (OPENSORA.md 1.8): uniform base times shifted by the size/length ratio, Euler steps of the velocity
`v = x0 - noise` (the scheduler steps with -v), classifier-free guidance with the checkpoint's learned null
caption (`transformer.y_embedder.y_embedding`) under the prompt's T5 mask, the cond and uncond branches as
separate transformer calls inside `transformer.cache_context("cond")` / `("uncond")` with the step index,
sigma and step count, as WanPipeline passes them.

Differences from the reference, on purpose: noise is drawn in float32 (the reference draws it in the model
dtype); the shift ratio and position-embedding scale are computed in float unless `reference_rounding=True`
(the reference rounds height, width and the ratio to its bf16 model dtype); a non-empty `negative_prompt` is
encoded with T5 and replaces the null caption (the reference has no negative prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .schedule import default_scheduler, set_opensora_timesteps
from .text import DEFAULT_AESTHETIC_SCORE, encode_prompts
from .transformer import OpenSoraLoadError, STDiT3Model
from .vae import OpenSoraVAE

# Benchmark setting of the cache papers (480p "9:16" = H:W, 51 frames, 30 steps, cfg 7, 24 fps).
GENERATION_DEFAULTS = {"num_frames": 51, "height": 480, "width": 854, "num_inference_steps": 30,
                       "guidance_scale": 7.0, "fps": 24}


@dataclass
class OpenSoraPipelineOutput(BaseOutput):
    """`frames`: (B, F, H, W, 3) in [0, 1] for "np", lists of PIL images for "pil", a tensor for "pt"/"latent"."""

    frames: Any


class OpenSoraPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "velocity"]
    generation_defaults = GENERATION_DEFAULTS

    def __init__(self, tokenizer, text_encoder, transformer: STDiT3Model, vae: OpenSoraVAE,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                              scheduler=scheduler)
        self.vae_scale_factor_spatial = vae.spatial_scale_factor if vae is not None else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ---- loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load the folder described in the module docstring; components passed as keywords are used as
        they are. A folder that is not one raises OpenSoraLoadError (a ValueError) with one line."""
        from transformers import AutoTokenizer, T5EncoderModel

        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise OpenSoraLoadError(f"{folder} is not a folder (OpenSoraPipeline loads local folders only)")
        parts: dict[str, Any] = {}
        needed = {"transformer": "hpcai-tech/OpenSora-STDiT-v3", "vae": "hpcai-tech/OpenSora-VAE-v1.2",
                  "text_encoder": "DeepFloyd/t5-v1_1-xxl"}
        for name, hub in needed.items():
            if kwargs.get(name) is None and not (folder / name / "config.json").is_file():
                raise OpenSoraLoadError(f"{folder} is not an Open-Sora 1.2 folder: {name}/config.json is missing (the files of {hub})")
        dtype_kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        parts["transformer"] = kwargs.get("transformer") or STDiT3Model.from_pretrained(folder / "transformer", **dtype_kw)
        parts["vae"] = kwargs.get("vae") or OpenSoraVAE.from_pretrained(folder / "vae", **dtype_kw)
        parts["text_encoder"] = kwargs.get("text_encoder") or T5EncoderModel.from_pretrained(
            folder / "text_encoder", **({} if torch_dtype is None else {"dtype": torch_dtype})
        )
        if kwargs.get("tokenizer") is not None:
            parts["tokenizer"] = kwargs["tokenizer"]
        else:
            source = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder / "text_encoder"
            parts["tokenizer"] = AutoTokenizer.from_pretrained(source)
        if kwargs.get("scheduler") is not None:
            parts["scheduler"] = kwargs["scheduler"]
        elif (folder / "scheduler" / "scheduler_config.json").is_file():
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        else:
            parts["scheduler"] = default_scheduler()
        return cls(**parts)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' save (model_index.json and one folder per component) plus videocache.json with the
        generation defaults the CLI reads."""
        super().save_pretrained(save_directory, **kwargs)
        meta = {"generation_defaults": dict(self.generation_defaults)}
        (Path(save_directory) / "videocache.json").write_text(json.dumps(meta, indent=2) + "\n")

    # ---- generation

    def check_inputs(self, prompt, height: int, width: int, num_frames: int, num_inference_steps: int):
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        factor = self.vae_scale_factor_spatial
        if height < factor or width < factor:
            raise ValueError(f"height and width must be at least {factor} pixels, got {height}x{width}")
        if num_frames != 1 and num_frames < 17:
            raise ValueError(f"num_frames must be 1 or at least 17 for Open-Sora 1.2, got {num_frames}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` video frames (the VAE's temporal compression)."""
        return self.vae.latent_frames(num_frames)

    def decode_latents(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Latents -> video (B, 3, F, H, W) in [-1, 1], `num_frames` long."""
        return self.vae.decode(latents.to(self.vae.dtype), num_frames=num_frames)

    def null_caption(self, count: int) -> torch.Tensor:
        """The checkpoint's learned null caption, (count, L, 4096)."""
        null = self.transformer.y_embedder.y_embedding
        return null[None].expand(count, -1, -1)

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale of the current (or last) call, as diffusers pipelines expose it: a cache whose
        profile was calibrated at several guidance scales picks its table by it."""
        return getattr(self, "_guidance_scale", None)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 854,
        num_frames: int = 51,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.0,
        fps: int = 24,
        aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE,
        clean_caption: bool = True,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        reference_rounding: bool = False,
    ):
        """Generate videos. `reference_rounding=True` rounds the pixel height and width (position-embedding
        scale) and the shift ratio through the transformer's dtype, as the reference does with its bf16
        tensors (854 -> 856, ratio 4.84375 at 480p / 51 frames); off, they are exact. `max_sequence_length`
        defaults to the transformer's `model_max_length` (300 for the released model), its null caption's length."""
        self.check_inputs(prompt, height, width, num_frames, num_inference_steps)
        if max_sequence_length is None:
            max_sequence_length = self.transformer.config.model_max_length
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, mask = encode_prompts(prompts, self.tokenizer, self.text_encoder, device, max_sequence_length,
                                      aesthetic_score, clean_caption)
        embeds = embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        mask = mask.repeat_interleave(num_videos_per_prompt, dim=0)
        batch = embeds.shape[0]
        self._guidance_scale = guidance_scale
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            if negatives is None or all(not n for n in negatives):
                neg_embeds, neg_mask = self.null_caption(batch).to(embeds.dtype), mask  # the reference: prompt's mask
                if neg_embeds.shape[1] != embeds.shape[1]:
                    raise ValueError(f"max_sequence_length must be {neg_embeds.shape[1]} (the null caption's length)")
            else:
                neg_embeds, neg_mask = encode_prompts(list(negatives), self.tokenizer, self.text_encoder, device,
                                                      max_sequence_length, None, clean_caption)
                neg_embeds = neg_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
                neg_mask = neg_mask.repeat_interleave(num_videos_per_prompt, dim=0)

        channels = self.transformer.config.in_channels
        factor = self.vae_scale_factor_spatial
        shape = (batch, channels, self.latent_frames(num_frames), height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        dtype = self.transformer.dtype
        rounding = dtype if reference_rounding else None
        set_opensora_timesteps(self.scheduler, num_inference_steps, height, width, num_frames, device=device,
                               ratio_dtype=rounding, base_size=self.transformer.config.input_sq_size)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        sigmas = self.scheduler.sigmas.tolist()  # one host read before the loop, none inside it
        size = [float(torch.tensor(float(v), dtype=rounding)) if rounding else v for v in (height, width)]
        inputs = {"fps": fps, "height": size[0], "width": size[1], "attention_kwargs": attention_kwargs,
                  "return_dict": False}
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                timestep = t.expand(batch)
                context = {"step_index": i, "sigma": sigmas[i], "num_inference_steps": len(timesteps)}
                model_input = latents.to(dtype)
                with self.transformer.cache_context("cond", **context):
                    velocity = self.transformer(hidden_states=model_input, timestep=timestep, encoder_hidden_states=embeds,
                                                encoder_attention_mask=mask, **inputs)[0][:, :channels]
                if do_cfg:
                    with self.transformer.cache_context("uncond", **context):
                        uncond = self.transformer(hidden_states=model_input, timestep=timestep,
                                                  encoder_hidden_states=neg_embeds, encoder_attention_mask=neg_mask,
                                                  **inputs)[0][:, :channels]
                    velocity = uncond + guidance_scale * (velocity - uncond)
                # Open-Sora predicts x0 - noise; the flow-matching scheduler steps with noise - x0.
                latents = self.scheduler.step(-velocity.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    names = callback_on_step_end_tensor_inputs or ["latents"]
                    step_values = {"latents": latents, "prompt_embeds": embeds, "velocity": velocity}
                    unknown = [name for name in names if name not in step_values]
                    if unknown:
                        raise ValueError(f"callback_on_step_end_tensor_inputs: unknown {unknown}; choose from {sorted(step_values)}")
                    outputs = callback_on_step_end(self, i, t, {name: step_values[name] for name in names})
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            video = latents
        else:
            decoded = self.decode_latents(latents, num_frames)
            video = self.video_processor.postprocess_video(decoded.float(), output_type=output_type)
            if output_type == "np" and isinstance(video, np.ndarray):
                video = video.astype(np.float32)
        self.maybe_free_model_hooks()
        return OpenSoraPipelineOutput(frames=video) if return_dict else (video,)
