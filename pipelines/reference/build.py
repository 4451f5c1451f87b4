"""Architecture of the embedded reference pipeline: tiny configurations of the real Wan2.1 classes.

The shapes are chosen so that the transformer sees 320 video tokens per sample (17 frames at 64x64,
VAE compression 4x4x4, patch 1x2x2) while a 25-step guided video still renders in seconds on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .data import VOCABULARY

Z_DIM = 16
TEXT_DIM = 64
SCHEDULER_SHIFT = 3.0
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default; training pads the same way

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def word_level_tokenizer(
    special_tokens: tuple[str, ...], template: str, model_max_length: int, **roles: str
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the reference vocabulary, built offline (no hub download).

    `special_tokens` come first (ids 0, 1, ...), then VOCABULARY; `template` is the single-sequence
    post-processor template (e.g. "$A </s>"); `roles` name the tokenizer's pad/eos/unk/bos tokens.
    Words outside the vocabulary map to `roles["unk_token"]`; padding is on the right."""
    vocab = {tok: i for i, tok in enumerate([*special_tokens, *VOCABULARY])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    used = [t for t in special_tokens if t in template.split()]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, padding_side="right", **roles)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the reference vocabulary, built offline (no hub download)."""
    return word_level_tokenizer(
        SPECIAL_TOKENS, "$A </s>", MAX_SEQUENCE_LENGTH, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_text_encoder(vocab_size: int, seed: int) -> UMT5EncoderModel:
    """A small UMT5 encoder; it stays at its (seeded) random initialisation and is frozen."""
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval().requires_grad_(False)


def build_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=16,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    )


def build_transformer(in_channels: int = Z_DIM) -> WanTransformer3DModel:
    """reference-wan's transformer; image-to-video (Wan2.2 I2V) takes 4 mask and Z_DIM image-latent channels more."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=in_channels,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=512,
        num_layers=8,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def tiny_wan_transformer(num_blocks: int, seed: int = 0) -> WanTransformer3DModel:
    """A random-init WanTransformer3DModel of tiny width (2 heads x 8, FFN 32, 4 latent and 16 text channels)
    with any number of blocks: a Wan2.1 1.3B (30 blocks) or 14B (40 blocks) stand-in whose profiles apply,
    for tests and benchmarks of what the engine does (not of what the model computes)."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_blocks, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)


def build_pipeline(seed: int = 0, with_transformer: bool = True) -> WanPipeline:
    """A reference pipeline at (seeded) random initialisation: the starting point of training, and a
    tiny real WanPipeline for tests that need no trained weights."""
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed)  # seeds torch; the modules below follow from it
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=build_vae(),
        scheduler=build_scheduler(),
        transformer=build_transformer() if with_transformer else None,
    )
