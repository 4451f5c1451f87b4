"""Architecture of the reference HunyuanVideo pipeline: tiny configurations of the real HunyuanVideo classes.

It shares reference-wan's VAE (AutoencoderKLWan, spatial 4 / temporal 4: 17 frames at 64x64 -> latents
16x5x16x16) and trains on the same latents. The patch is 1x4x4, so the transformer sees 80 video tokens
(5 x 4 x 4) per sample, not reference-wan's 320: it was trained on a shared 2-core CPU, where patch 2 ran
at 2.5 s per step of 16 samples against 0.5 s for patch 4 (measured side by side), i.e. about 5x fewer
training samples in the same hour. The text side is what HunyuanVideoPipeline expects: a Llama encoder (hidden_states[-3]) and
a CLIP text encoder (pooled), both tiny, seeded and frozen, with word-level tokenizers over the reference
vocabulary (build.word_level_tokenizer). The transformer has no guidance embedding: it is trained with
caption dropout and sampled with true classifier-free guidance (two calls per step, "cond" and "uncond").
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from .build import SCHEDULER_SHIFT, Z_DIM, build_scheduler, word_level_tokenizer  # noqa: F401 - same schedule

TEXT_DIM = 64  # Llama hidden size = transformer text_embed_dim
POOLED_DIM = 64  # CLIP hidden size = transformer pooled_projection_dim
MAX_SEQUENCE_LENGTH = 16  # Llama tokens per prompt: "<s>" + the 9 words of a caption, right-padded
CLIP_MAX_LENGTH = 77  # HunyuanVideoPipeline always pads CLIP prompts to 77
PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}  # no system prompt: the words alone

LLAMA_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
CLIP_SPECIAL = ("<|endoftext|>", "<|startoftext|>", "<unk>")


def build_llama_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(
        LLAMA_SPECIAL, "<s> $A", MAX_SEQUENCE_LENGTH,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(
        CLIP_SPECIAL, "<|startoftext|> $A <|endoftext|>", CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
    )


def build_llama(vocab_size: int, seed: int) -> LlamaModel:
    """3 layers, so that hidden_states[-3] (what the pipeline reads) is the first layer's output: the
    token embedding plus one causal attention/MLP residual. Embeddings are drawn at unit scale (Llama's
    default 0.02 would hand the transformer a signal 50x below its other inputs); frozen."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaModel(config)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 1.0)
    return model.eval().requires_grad_(False)


def build_clip(vocab_size: int, seed: int, eos_token_id: int) -> CLIPTextModel:
    """The pooled output is the final-layer-normed state at the first <|endoftext|> (eos_token_id is the
    tokenizer's id, not the legacy 2, so CLIP's pooler looks for it); frozen."""
    torch.manual_seed(seed + 1)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=POOLED_DIM, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=POOLED_DIM,
        pad_token_id=eos_token_id, bos_token_id=1, eos_token_id=eos_token_id,
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_text_components(seed: int = 0) -> dict:
    """tokenizer/text_encoder (Llama) and tokenizer_2/text_encoder_2 (CLIP), as HunyuanVideoPipeline names them."""
    tokenizer, tokenizer_2 = build_llama_tokenizer(), build_clip_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": build_llama(len(tokenizer), seed),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": build_clip(len(tokenizer_2), seed, tokenizer_2.eos_token_id),
    }


TRANSFORMER_CONFIG = {
    "in_channels": Z_DIM,
    "out_channels": Z_DIM,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_layers": 2,  # dual-stream blocks
    "num_single_layers": 4,
    "num_refiner_layers": 1,
    "mlp_ratio": 4.0,
    "patch_size": 4,  # 80 video tokens per 17-frame 64x64 video (see the module docstring)
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": False,  # true CFG instead: guidance distillation cannot be trained here
    "text_embed_dim": TEXT_DIM,
    "pooled_projection_dim": POOLED_DIM,
    "rope_theta": 256.0,
    "rope_axes_dim": (8, 12, 12),  # sums to the head dim (t, h, w)
}


def build_transformer(**overrides) -> HunyuanVideoTransformer3DModel:
    return HunyuanVideoTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides})
