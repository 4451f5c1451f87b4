"""Ring attention on the CPU.

diffusers' ring attention (`TemplatedRingAttention`, and `TemplatedRingAnythingAttention` for uneven
shards) passes the key/value blocks of all ranks through each rank's queries and merges the partial
results with their log-sum-exp, so it asks the attention backend's forward op for the LSE. The native
backend's op refuses (`return_lse=True` raises). On the CPU, aten's own flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, the kernel torch's SDPA runs there) returns it, so
`install_cpu_lse` wraps diffusers' native forward op: calls that ask for the LSE of CPU tensors get it from
that kernel, every other call goes to diffusers' op unchanged. On CUDA use a backend that returns the LSE
(`flash`, `_native_cudnn`, ...): `parallelize` checks this before the first call.
"""

from __future__ import annotations

from typing import Any

import torch

_MARK = "_videocache_cpu_lse"


def install_cpu_lse() -> None:
    """Make diffusers' native attention forward op return the LSE for CPU tensors (idempotent)."""
    import diffusers.models.attention_dispatch as dispatch

    original = dispatch._native_attention_forward_op
    if getattr(original, _MARK, False):
        return

    def forward_op(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ):
        if not return_lse or query.device.type != "cpu":
            return original(
                ctx, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa, return_lse=return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config,
            )
        if attn_mask is not None or enable_gqa:
            raise ValueError("ring attention on the CPU supports neither an attention mask nor grouped-query attention")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, scale=scale
        )[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)  # model layout: (B, S, H, D), (B, S, H)

    setattr(forward_op, _MARK, True)
    dispatch._native_attention_forward_op = forward_op
