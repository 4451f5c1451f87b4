"""Wan's attention probe for foreground/background profiling: every block's self-attention `attn1`, its
query and key formed as WanAttnProcessor forms them (projections, q/k RMSNorm, rotary embedding)."""

from __future__ import annotations

import torch

from ..attention_capture import AttentionProbe


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]) as a complex multiply by cos + i sin; cos/sin
    hold each pair's angle twice (Wan's repeat-interleaved tables)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def wan_query_key(
    attn: torch.nn.Module, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of Wan's self-attention `attn` for this input, (B, N, heads, head_dim) each, as
    WanAttnProcessor forms them before the attention kernel."""
    if getattr(attn, "fused_projections", False):
        q, k, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
    return q, k


def _wan_qk(module, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    q, k = wan_query_key(module, hidden, args[3] if len(args) > 3 else kwargs.get("rotary_emb"))
    return q, k, None, hidden.shape[1]


def wan_attention_probe(transformer: torch.nn.Module) -> AttentionProbe:
    return AttentionProbe([b.attn1 for b in transformer.blocks], _wan_qk, tuple(transformer.config.patch_size))
