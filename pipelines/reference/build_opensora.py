"""Architecture of the reference Open-Sora pipeline: a tiny STDiT3 (our `STDiT3Model`) with a tiny T5.

It shares reference-wan's VAE (AutoencoderKLWan, spatial 4 / temporal 4: 17 frames at 64x64 -> latents
16x5x16x16) and trains on the same latents, so the pipeline is `ReferenceOpenSoraPipeline`
(pipeline_opensora.py): OpenSoraPipeline's loop, prompt handling and schedule with a Wan VAE's latent shape
and decode. The patch is 1x4x4 (16 spatial tokens per frame, 80 per sample), as reference-hunyuan's: it was
trained on a 2-core CPU, where patch 2 ran at 32 samples/s and patch 4 at 113 (hidden 128, 4+4 blocks,
batch 32, measured side by side), i.e. 3.5x more training samples in the same hour.

The text side is what OpenSoraPipeline expects: a T5EncoderModel (tiny, seeded, frozen; T5's unit-scale
embedding init) behind a word-level tokenizer with T5's special tokens over the reference vocabulary,
16 tokens per prompt (the caption's 9 words, the aesthetic-score suffix's 3 unknown words, </s>).
`input_sq_size` = 64, the reference's pixel size, is the base of the position-embedding scale and of the
time shift, so that a 64x64 video gets the scale and the shift (2.24 at 17 frames) a 512x512 one gets in the
released model. (With the released base 512 the shift at 64x64 is 0.28: the sampler and the training draws
then spend 6 % of their times above sigma 0.8, where shapes form, and a first run trained that way made
backgrounds but no shapes.)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..opensora.model.transformer import STDiT3Model
from .build import Z_DIM, word_level_tokenizer

TEXT_DIM = 64  # T5 d_model = transformer caption_channels
MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt = the transformer's model_max_length (its null caption's length)
FPS = 8  # the procedural clips' frame rate, fed to the fps embedder in training and sampling
T5_SPECIAL = ("<pad>", "</s>", "<unk>")

TRANSFORMER_CONFIG = {
    "in_channels": Z_DIM,
    "patch_size": (1, 4, 4),
    "hidden_size": 128,
    "depth": 4,  # 4 spatial + 4 temporal blocks
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "pred_sigma": False,  # the released model's learned-sigma half is never used by the sampler
    "caption_channels": TEXT_DIM,
    "model_max_length": MAX_SEQUENCE_LENGTH,
    "qk_norm": True,
    "input_sq_size": 64,
    "vae_scale_factor_spatial": 4,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(T5_SPECIAL, "$A </s>", MAX_SEQUENCE_LENGTH,
                                pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_text_encoder(vocab_size: int, seed: int) -> T5EncoderModel:
    """2 layers, seeded, frozen."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval().requires_grad_(False)


def build_text_components(seed: int = 0) -> dict:
    tokenizer = build_tokenizer()
    return {"tokenizer": tokenizer, "text_encoder": build_text_encoder(len(tokenizer), seed)}


def init_weights(model: STDiT3Model) -> STDiT3Model:
    """The DiT/PixArt initialisation Open-Sora trains from: Xavier linears with zero biases, small normal
    timestep and caption projections, and zero output projections (final layer, every cross-attention,
    the temporal blocks' self-attention and MLP), so that each block starts as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    conv = model.x_embedder.proj
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    for linear in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.fps_embedder.mlp[0], model.t_block[1],
                   model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
        nn.init.normal_(linear.weight, std=0.02)
    zero = [model.final_layer.linear, model.fps_embedder.mlp[2]]
    zero += [block.cross_attn.proj for block in model.blocks()]
    zero += [m for block in model.temporal_blocks for m in (block.attn.proj, block.mlp.fc2)]
    for linear in zero:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return model


def build_transformer(**overrides) -> STDiT3Model:
    return init_weights(STDiT3Model(**{**TRANSFORMER_CONFIG, **overrides}))
