"""HunyuanVideo's attention probe for foreground/background profiling: the joint video + text attention `attn`
of the dual- and single-stream blocks, queries over the video tokens and keys over all of them, formed as
HunyuanVideoAttnProcessor2_0 forms them; padded prompt tokens masked as the model masks them."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..attention_capture import AttentionProbe


def hunyuan_query_key(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Video queries and all keys (video, then text), (B, N, heads, head_dim), of a HunyuanVideo joint
    attention as HunyuanVideoAttnProcessor2_0 forms them: the dual-stream blocks project text with the
    `add_*` projections, the single-stream blocks project the joined tokens with one; RoPE on the video."""
    video = hidden_states.shape[1]
    if attn.add_q_proj is None:
        joined = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q = attn.norm_q(attn.to_q(joined).unflatten(2, (attn.heads, -1)))[:, :video]
        k = attn.norm_k(attn.to_k(joined).unflatten(2, (attn.heads, -1)))
        k_video, k_text = k[:, :video], k[:, video:]
    else:
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        k_video = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)))
        k_text = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
    if rotary_emb is not None:
        q = apply_rotary_emb(q, rotary_emb, sequence_dim=1)
        k_video = apply_rotary_emb(k_video, rotary_emb, sequence_dim=1)
    return q, torch.cat([k_video, k_text], dim=1)


def _hunyuan_qk(module, args, kwargs):
    bound = dict(zip(("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"), args,
                     strict=False)) | kwargs
    hidden, mask = bound["hidden_states"], bound.get("attention_mask")
    q, k = hunyuan_query_key(module, hidden, bound["encoder_hidden_states"], bound.get("image_rotary_emb"))
    key_mask = None if mask is None else mask.reshape(mask.shape[0], 1, -1)  # (B, 1 head, keys)
    return q, k, key_mask, hidden.shape[1]


def hunyuan_attention_probe(transformer: torch.nn.Module) -> AttentionProbe:
    config = transformer.config
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    patch = (int(config.patch_size_t), int(config.patch_size), int(config.patch_size))
    return AttentionProbe([b.attn for b in blocks], _hunyuan_qk, patch)
