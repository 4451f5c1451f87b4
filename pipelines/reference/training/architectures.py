"""What each --architecture changes in the training stages, one `Architecture` record each in ARCHITECTURES.

All three train on the same clips and latents with the same rectified-flow loop (transformer.py); they differ
in the transformer, the text side (how captions and the dropped caption are encoded and fed to the model),
the velocity's sign, the sampler's time shift, and the pipeline the assemble stage saves.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, HunyuanVideoPipeline, WanImageToVideoPipeline, WanPipeline
from transformers import CLIPTextModel, LlamaModel, T5EncoderModel, UMT5EncoderModel

from videocache.pipelines.opensora.model import schedule as opensora_schedule
from videocache.pipelines.opensora.model.text import encode_prompts as opensora_encode_prompts
from videocache.pipelines.reference import build, build_hunyuan, build_opensora
from videocache.pipelines.reference.pipeline_hunyuan import ReferenceHunyuanVideoPipeline
from videocache.pipelines.reference.pipeline_opensora import ReferenceOpenSoraPipeline

from .vae import load_trained_vae

# denoise(model, noisy latents, timesteps, caption ids) -> the model's velocity prediction
Denoise = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    """What the stages need to know about one --architecture choice."""

    build_transformer: Callable[..., torch.nn.Module]
    # the keys --transformer-config may override; None: the transformer's config is fixed
    transformer_config: dict | None
    # encodes every training caption (sorted, as the ids count them) and the dropped caption once, on the
    # device, and returns how the model is called on caption ids
    conditioning: Callable[[argparse.Namespace, list[str], torch.device], Denoise]
    # (ids of captions that caption dropout drops, number of captions) -> the ids they are trained with
    drop_captions: Callable[[torch.Tensor, int], torch.Tensor | int]
    velocity_sign: float  # the model predicts velocity_sign * (noise - x0)
    time_shift: float  # the sampler's shift of the times, which training draws from unless --time-shift
    # (args, work dir) -> the trained pipeline to save; a shared-VAE one names --vae's VAE instead of copying it
    pipeline: Callable[[argparse.Namespace, Path], DiffusionPipeline]
    shares_vae: bool
    experts: tuple[str, ...] = ()  # a two-expert model's experts ("high", "low"), trained one after the other
    image_condition: bool = False  # image-to-video: the first frame's latent and mask join the input channels


def _to_empty_caption(ids: torch.Tensor, num_captions: int) -> int:
    """The empty caption, encoded after the training captions (id num_captions)."""
    return num_captions


def _to_null_caption(ids: torch.Tensor, num_captions: int) -> torch.Tensor:
    """Open-Sora's null caption under caption i's mask: row num_captions + i."""
    return ids + num_captions


def transformer_from_run(build_transformer, args, work: Path, name: str = "transformer") -> torch.nn.Module:
    """The transformer stage's result (its EMA weights) in the architecture's transformer."""
    transformer = build_transformer(**args.transformer_config)
    transformer.load_state_dict(torch.load(work / f"{name}_final.pt", map_location="cpu")["model"])
    return transformer


# -- wan: WanTransformer3DModel, UMT5 text encoder, its own VAE --------------------------------------------------

def text_pipeline(args) -> WanPipeline:
    """Tokenizer and frozen text encoder, without a transformer.

    Built from the seed, or with the text encoder loaded from --text-encoder (a saved pipeline folder),
    so that a run under other library versions (a GPU machine, say) trains on the same embeddings.
    """
    pipe = build.build_pipeline(args.seed, with_transformer=False)
    if args.text_encoder:
        encoder = UMT5EncoderModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval().requires_grad_(False)
        pipe.register_modules(text_encoder=encoder)
    return pipe


def wan_conditioning(args, captions: list[str], device) -> Denoise:
    embeds, _ = text_pipeline(args).encode_prompt(
        captions + [""], do_classifier_free_guidance=False, max_sequence_length=build.MAX_SEQUENCE_LENGTH
    )
    embeds = embeds.to(device)

    def denoise(model, xt, t, cond):
        return model(xt, t, embeds[cond], return_dict=False)[0]
    return denoise


def wan_pipeline(args, work: Path) -> WanPipeline:
    """The text side, the fine-tuned decoder with the measured latent statistics, and the transformer."""
    pipe = text_pipeline(args)
    vae = build.build_vae()
    vae.load_state_dict(torch.load(work / "vae_decoder_final.pt", map_location="cpu")["model"])
    stats = torch.load(work / "latents.pt", weights_only=False)
    vae.register_to_config(latents_mean=stats["mean"].tolist(), latents_std=stats["std"].tolist())
    transformer = transformer_from_run(build.build_transformer, args, work)
    return WanPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=vae,
        scheduler=build.build_scheduler(),
        transformer=transformer,
    )


I2V_CHANNELS = 2 * build.Z_DIM + 4  # Wan2.2 I2V: the noisy latent, a 4-channel first-frame mask, the image latent


def wan22_pipeline(args, work: Path, image: bool = False) -> WanPipeline | WanImageToVideoPipeline:
    """Wan2.2 A14B's layout: the high-noise expert `transformer` above --boundary-ratio, the low-noise
    `transformer_2` below, --vae's VAE (`image`: WanImageToVideoPipeline, the first frame given in channels as
    Wan2.2 I2V takes it, no image encoder); the experts are stored in float16 (loaded back as float32), so that
    both ship in about the space of one."""
    pipe = text_pipeline(args)
    build_transformer = partial(build.build_transformer, in_channels=I2V_CHANNELS) if image else build.build_transformer
    experts = [transformer_from_run(build_transformer, args, work, f"transformer_{e}").to(torch.float16)
               for e in ("high", "low")]
    parts = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=load_trained_vae(args, "cpu", work, ""),
                 scheduler=build.build_scheduler(), transformer=experts[0], transformer_2=experts[1],
                 boundary_ratio=args.boundary_ratio)
    if image:
        return WanImageToVideoPipeline(image_processor=None, image_encoder=None, **parts)
    return WanPipeline(**parts)


# -- hunyuan: HunyuanVideoTransformer3DModel, Llama + CLIP text encoders, true CFG, --vae's VAE -------------------

def hunyuan_text_pipeline(args) -> HunyuanVideoPipeline:
    """HunyuanVideoPipeline's prompt encoding with the reference tokenizers and frozen text encoders (built
    from the seed, or loaded from --text-encoder), without transformer or VAE."""
    parts = build_hunyuan.build_text_components(args.seed)
    if args.text_encoder:
        parts["text_encoder"] = LlamaModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval()
        parts["text_encoder_2"] = CLIPTextModel.from_pretrained(Path(args.text_encoder) / "text_encoder_2").eval()
    return HunyuanVideoPipeline(transformer=None, vae=None, scheduler=build_hunyuan.build_scheduler(), **parts)


def hunyuan_conditioning(args, captions: list[str], device) -> Denoise:
    embeds, pooled, masks = hunyuan_text_pipeline(args).encode_prompt(
        captions + [""], prompt_template=build_hunyuan.PROMPT_TEMPLATE,
        max_sequence_length=build_hunyuan.MAX_SEQUENCE_LENGTH,
    )
    embeds, pooled, masks = embeds.to(device), pooled.to(device), masks.to(device)

    def denoise(model, xt, t, cond):
        return model(xt, t, embeds[cond], masks[cond], pooled[cond], return_dict=False)[0]
    return denoise


def hunyuan_pipeline(args, work: Path) -> ReferenceHunyuanVideoPipeline:
    vae = load_trained_vae(args, "cpu", work, "")
    transformer = transformer_from_run(build_hunyuan.build_transformer, args, work)
    text = hunyuan_text_pipeline(args)
    return ReferenceHunyuanVideoPipeline(
        text_encoder=text.text_encoder, tokenizer=text.tokenizer, text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.tokenizer_2, transformer=transformer, vae=vae, scheduler=build_hunyuan.build_scheduler(),
    )


# -- opensora: our STDiT3Model, a tiny T5, x0 - noise velocity, size-shifted times, --vae's VAE --------------------

def opensora_text_components(args) -> dict:
    """The reference T5 tokenizer and frozen encoder (built from the seed, or loaded from --text-encoder)."""
    parts = build_opensora.build_text_components(args.seed)
    if args.text_encoder:
        parts["text_encoder"] = T5EncoderModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval()
    return parts


def opensora_conditioning(args, captions: list[str], device) -> Denoise:
    # OpenSoraPipeline's own prompt encoding. A dropped caption is the model's null caption under the
    # prompt's own mask, as the sampler's unconditional branch sees it: row n + i is "caption i dropped".
    text = opensora_text_components(args)
    embeds, masks = opensora_encode_prompts(captions, text["tokenizer"], text["text_encoder"], "cpu",
                                            build_opensora.MAX_SEQUENCE_LENGTH, clean_caption=False)
    embeds, masks = embeds.repeat(2, 1, 1).to(device), masks.repeat(2, 1).to(device)

    def denoise(model, xt, t, cond):
        null = (cond >= len(captions))[:, None, None]
        y = torch.where(null, model.y_embedder.y_embedding[None].to(embeds.dtype), embeds[cond])
        return model(xt, t, y, masks[cond], fps=build_opensora.FPS, height=64, width=64, return_dict=False)[0]
    return denoise


def opensora_pipeline(args, work: Path) -> ReferenceOpenSoraPipeline:
    vae = load_trained_vae(args, "cpu", work, "")
    transformer = transformer_from_run(build_opensora.build_transformer, args, work)
    return ReferenceOpenSoraPipeline(**opensora_text_components(args), transformer=transformer.eval(), vae=vae,
                                     scheduler=opensora_schedule.default_scheduler())


ARCHITECTURES: dict[str, Architecture] = {
    "wan": Architecture(
        build_transformer=build.build_transformer, transformer_config=None, conditioning=wan_conditioning,
        drop_captions=_to_empty_caption, velocity_sign=1.0, time_shift=build.SCHEDULER_SHIFT,
        pipeline=wan_pipeline, shares_vae=False,
    ),
    "wan22": Architecture(
        build_transformer=build.build_transformer, transformer_config=None, conditioning=wan_conditioning,
        drop_captions=_to_empty_caption, velocity_sign=1.0, time_shift=build.SCHEDULER_SHIFT,
        pipeline=wan22_pipeline, shares_vae=True, experts=("high", "low"),
    ),
    "wan22-i2v": Architecture(
        build_transformer=partial(build.build_transformer, in_channels=I2V_CHANNELS), transformer_config=None,
        conditioning=wan_conditioning, drop_captions=_to_empty_caption, velocity_sign=1.0,
        time_shift=build.SCHEDULER_SHIFT, pipeline=partial(wan22_pipeline, image=True), shares_vae=True,
        experts=("high", "low"), image_condition=True,
    ),
    "hunyuan": Architecture(
        build_transformer=build_hunyuan.build_transformer, transformer_config=build_hunyuan.TRANSFORMER_CONFIG,
        conditioning=hunyuan_conditioning, drop_captions=_to_empty_caption, velocity_sign=1.0,
        time_shift=build_hunyuan.SCHEDULER_SHIFT, pipeline=hunyuan_pipeline, shares_vae=True,
    ),
    "opensora": Architecture(
        build_transformer=build_opensora.build_transformer, transformer_config=build_opensora.TRANSFORMER_CONFIG,
        conditioning=opensora_conditioning, drop_captions=_to_null_caption,
        velocity_sign=-1.0,  # Open-Sora predicts x0 - noise
        # Open-Sora's shift follows the video size relative to the model's base size (64x64, 17 frames at
        # base 64: 2.24, what 512x512 gets in the released model).
        time_shift=opensora_schedule.shift_ratio(64, 64, 17, base_size=build_opensora.TRANSFORMER_CONFIG["input_sq_size"]),
        pipeline=opensora_pipeline, shares_vae=True,
    ),
}
