"""Open-Sora 1.2's attention probe for foreground/background profiling: both self-attentions of STDiT3, in
execution order (spatial 0, temporal 0, spatial 1, ...: the adapter's block indices). They attend within
groups, the S tokens of a frame (spatial) or the T frames of a position (temporal, with RoPE), so a token
receives attention from its own group only: each group's column means sum to 1 over its L members (L = S
or T). To make spatial and temporal scores comparable they are scaled by L (1 = the uniform share; above
1, more than uniform). R_attn thresholds each frame's tokens against their own mean and spread, so the
scaling does not change it; in a temporal block a token's score says how much the frames at its position
look at its frame. The model predicts x0 - noise (with extra channels): the probe turns it into the flow
velocity noise - x0 that the mask is cut from."""

from __future__ import annotations

import torch

from ..attention_capture import AttentionProbe
from .model.transformer import apply_rope_interleaved


def opensora_query_key(attn: torch.nn.Module, hidden_states: torch.Tensor, num_frames: int,
                       rope_angles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of an STDiT3 self-attention (`SelfAttention`) for its input (B, T*S, C), as it forms
    them before the attention kernel: per group (G, L, heads, head_dim) with the groups the frames
    ((B*T), S) of a spatial block or the positions ((B*S), T) of a temporal one; fused qkv, per-head
    RMSNorm, then RoPE (interleaved pairs) in temporal blocks."""
    batch, tokens, channels = hidden_states.shape
    x = hidden_states.view(batch, num_frames, tokens // num_frames, channels)
    if attn.temporal:
        x = x.transpose(1, 2)
    groups, length = x.shape[0] * x.shape[1], x.shape[2]
    qkv = attn.qkv(x.reshape(groups, length, channels)).view(groups, length, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.temporal and rope_angles is not None:
        q = apply_rope_interleaved(q.transpose(1, 2), rope_angles).transpose(1, 2)
        k = apply_rope_interleaved(k.transpose(1, 2), rope_angles).transpose(1, 2)
    return q, k


def _opensora_bind(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    bound = dict(zip(("x", "num_frames", "rope_angles"), args, strict=False)) | kwargs
    return bound["x"], int(bound["num_frames"]), bound.get("rope_angles")


def _opensora_qk(module, args, kwargs):
    hidden, frames, rope = _opensora_bind(args, kwargs)
    q, k = opensora_query_key(module, hidden, frames, rope)
    return q, k, None, None


def _opensora_tokens(received: torch.Tensor, module, args, kwargs) -> torch.Tensor:
    """(G, L) group scores -> (B, T*S) in token order t*S + s, times L (1 = uniform; see the module doc)."""
    hidden, frames, _ = _opensora_bind(args, kwargs)
    batch, tokens = hidden.shape[:2]
    scaled = received * received.shape[-1]
    if module.temporal:  # groups (b, s), members t
        return scaled.view(batch, tokens // frames, frames).transpose(1, 2).reshape(batch, tokens)
    return scaled.reshape(batch, tokens)  # groups (b, t), members s


def opensora_attention_probe(transformer: torch.nn.Module) -> AttentionProbe:
    channels = int(transformer.config.in_channels)
    return AttentionProbe([b.attn for b in transformer.blocks()], _opensora_qk, tuple(transformer.config.patch_size),
                          _opensora_tokens, lambda out: -out[:, :channels])
