"""Ring attention on the CPU.

diffusers' ring attention (`TemplatedRingAttention`, and `TemplatedRingAnythingAttention` for uneven
shards) passes the key/value blocks of all ranks through each rank's queries and merges the partial
results with their log-sum-exp, so it asks the attention backend's forward op for the LSE. The native
backend's op refuses (`return_lse=True` raises). On the CPU, aten's own flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, the kernel torch's SDPA runs there) returns it, so
`install_cpu_lse` wraps diffusers' native forward op: calls that ask for the LSE of CPU tensors get it from
that kernel, every other call goes to diffusers' op unchanged. On CUDA use a backend that returns the LSE
(`flash`, `_native_cudnn`, ...): `parallelize` checks this before the first call.

Key masks (a plan's `key_masks`): diffusers' ring attention hands the same mask to the forward op for
every key/value block it passes round, which is right for a mask of the local keys only if every rank's
keys are masked alike. The sequence hooks give the attention the mask of all keys in the ranks' layout
(`sequence.ranks_key_order`): block j of the ring (ring rank j's keys; under Ulysses x ring, after the
Ulysses all-to-all, the keys of ring rank j's Ulysses group) is its j-th equal slice. The op here takes
the slice of the block it is given: diffusers' ring (0.42.1, `TemplatedRingAttention`) computes its own
block first (`_save_ctx=True`), then those of ring ranks rank+1, rank+2, ... (mod the ring degree). A
mask of the local key count is used as it is. Ring attention with a key mask therefore runs on the CPU
only (`parallelize` refuses it elsewhere), and with even shards only (diffusers' uneven ring refuses
masks; the sequence hooks say so in one line).
"""

from __future__ import annotations

from typing import Any

import torch

_MARK = "_videocache_cpu_lse"


def _block_mask(
    ctx: Any, mask: torch.Tensor, keys: int, first: bool, parallel_config: Any, dtype: torch.dtype
) -> torch.Tensor:
    """The part of `mask` for the key/value block of this ring iteration (see the module docstring), as
    the additive float mask aten's CPU flash kernel takes (0 where attended, -inf where masked)."""
    if mask.shape[-1] != keys:
        cp = parallel_config.context_parallel_config if parallel_config is not None else None
        degree = cp.ring_degree if cp is not None else 1
        if mask.shape[-1] != degree * keys:
            raise ValueError(
                f"a key mask over {mask.shape[-1]} keys fits neither this ring block's {keys} keys nor the "
                f"{degree} blocks of the ring"
            )
        step = 0 if first else ctx._videocache_ring_step + 1
        ctx._videocache_ring_step = step
        block = (cp._ring_local_rank + step) % degree
        mask = mask.narrow(-1, block * keys, keys)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask


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
        if enable_gqa:
            raise ValueError("ring attention on the CPU does not support grouped-query attention")
        if attn_mask is not None:
            attn_mask = _block_mask(ctx, attn_mask, key.shape[1], _save_ctx, _parallel_config, query.dtype)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D) -> (B, H, S, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)  # model layout: (B, S, H, D), (B, S, H)

    setattr(forward_op, _MARK, True)
    dispatch._native_attention_forward_op = forward_op
