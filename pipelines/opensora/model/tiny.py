"""Tiny random OpenSoraPipeline for tests (nothing downloads): the real classes at toy sizes, a small T5
encoder and an offline word-level tokenizer over the reference vocabulary (T5's pad/eos/unk roles); and a
tiny STDiT3Model of any depth with its inputs, for adapter tests and for counting what the engine runs
(`videocache.pipelines.opensora.presets`)."""

from __future__ import annotations

import torch
from transformers import T5Config, T5EncoderModel

from ...reference.build import VOCABULARY, word_level_tokenizer
from .pipeline import OpenSoraPipeline
from .schedule import default_scheduler
from .text import MAX_SEQUENCE_LENGTH
from .transformer import STDiT3Model
from .vae import OpenSoraVAE

TINY_SPATIAL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
    "block_out_channels": [8, 8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TINY_TRANSFORMER = {"hidden_size": 32, "depth": 2, "num_heads": 2, "caption_channels": 16}
TINY_VAE = {"spatial_config": TINY_SPATIAL_VAE, "filters": 8, "num_res_blocks": 1, "num_groups": 4}
TINY_TEXT = 8  # caption tokens of `tiny_transformer` and `tiny_inputs`
TINY_FRAMES, TINY_SIZE = 3, 8  # `tiny_inputs`' latent (4, 3, 8, 8): T = 3 frames of S = 16 tokens


def tiny_t5(d_model: int = 16, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(VOCABULARY) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


def tiny_pipeline(seed: int = 0) -> OpenSoraPipeline:
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(("<pad>", "</s>", "<unk>"), "$A </s>", MAX_SEQUENCE_LENGTH,
                                     pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    transformer = STDiT3Model(**TINY_TRANSFORMER).eval()
    vae = OpenSoraVAE(**TINY_VAE).eval()
    text_encoder = tiny_t5(TINY_TRANSFORMER["caption_channels"], seed)
    pipe = OpenSoraPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                            scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_transformer(depth: int = 2, seed: int = 0) -> STDiT3Model:
    """TINY_TRANSFORMER with `depth` spatial and `depth` temporal blocks and TINY_TEXT caption tokens."""
    torch.manual_seed(seed)
    return STDiT3Model(**{**TINY_TRANSFORMER, "depth": depth, "model_max_length": TINY_TEXT}).eval()


def tiny_inputs(seed: int = 1, pad: int = 3) -> dict:
    """`tiny_transformer`'s call arguments but the timestep: a (1, 4, 3, 8, 8) latent and TINY_TEXT caption
    tokens of which the last `pad` are masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, TINY_TEXT, dtype=torch.long)
    mask[:, TINY_TEXT - pad:] = 0
    return {
        "hidden_states": torch.randn(1, 4, TINY_FRAMES, TINY_SIZE, TINY_SIZE, generator=g),
        "encoder_hidden_states": torch.randn(1, TINY_TEXT, TINY_TRANSFORMER["caption_channels"], generator=g),
        "encoder_attention_mask": mask,
    }
