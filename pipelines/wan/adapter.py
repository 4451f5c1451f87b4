"""Wan2.1 adapter: tells the videocache engine where the cacheable modules of WanTransformer3DModel are.

Each WanTransformerBlock runs `attn1` (self-attention), `attn2` (cross-attention to the text, plus the
image tokens in I2V) and `ffn`, and multiplies attn1's and ffn's outputs by the step's gates only after
they return, so caching these module outputs is caching "before the gated residual add".
Declared by the Wan family (`videocache.pipelines.wan`) for `WanTransformer3DModel` (Wan2.1 T2V 1.3B / 14B
and the I2V variants).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from videocache.table import COMPONENTS

from ..adapter_helpers import denoiser_inputs, flow_scheduler_sigmas, linear_macs, module_macs

# WanAttnProcessor splits the cross-attention context as [image tokens, 512 text tokens] in I2V models.
WAN_TEXT_CONTEXT_LENGTH = 512
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")


def _bind_block_args(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """(hidden_states, encoder_hidden_states, temb, rotary_emb) of a WanTransformerBlock call."""
    bound = dict(zip(_BLOCK_ARGS, args, strict=False)) | kwargs
    return tuple(bound[name] for name in _BLOCK_ARGS)


class WanAdapter:
    """FLOPs count the matrix multiplications (projections and attention), 2 FLOPs per multiply-add;
    norms, RoPE, activations and biases are left out (well under 1 % at Wan's sizes).

    Under Ulysses sequence parallelism the blocks see a token shard, so the counts are per rank and the
    attention term (computed from the local token count) understates the gathered attention; the
    computed fraction stays a consistent per-rank measure, but absolute FLOPs need the SP degree.
    """

    architecture = "WanTransformer3DModel"

    def __init__(self) -> None:
        self._mlp_macs: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()

    def blocks(self, transformer: torch.nn.Module) -> Sequence[torch.nn.Module]:
        return list(transformer.blocks)

    def component_modules(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {"self_attn": block.attn1, "cross_attn": block.attn2, "mlp": block.ffn}

    def fingerprint(self, transformer: torch.nn.Module) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "num_blocks": len(transformer.blocks),
            "components": list(COMPONENTS),
        }

    def component_flops(self, component: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        if component == "mlp":
            macs = self._mlp_macs.get(module)
            if macs is None:
                macs = self._mlp_macs[module] = module_macs(module)
            return 2.0 * batch * tokens * macs
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        image_tokens = 0
        if context is None:  # self-attention
            kv_tokens = tokens
        else:
            kv_tokens = int(context.shape[1])
            if getattr(module, "add_k_proj", None) is not None:
                image_tokens = kv_tokens - WAN_TEXT_CONTEXT_LENGTH
                kv_tokens = WAN_TEXT_CONTEXT_LENGTH
        inner = module.to_q.out_features  # heads * head_dim
        flops = 2.0 * tokens * (linear_macs(module.to_q) + linear_macs(module.to_out[0]))
        flops += 2.0 * kv_tokens * (linear_macs(module.to_k) + linear_macs(module.to_v))
        flops += 4.0 * tokens * kv_tokens * inner  # Q K^T and A V
        if image_tokens > 0:
            flops += 2.0 * image_tokens * (linear_macs(module.add_k_proj) + linear_macs(module.add_v_proj))
            flops += 4.0 * tokens * image_tokens * inner
        return batch * flops

    def constant_modules(self, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
        """The text projection sees the same prompt embeddings at every step of a context; RoPE depends on
        the latent shape only."""
        return {"text_embedder": (transformer.condition_embedder.text_embedder, "tensor"), "rope": (transformer.rope, "shape")}

    def block_flops(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        """FLOPs of the block's self-attention, cross-attention and MLP for these block inputs."""
        hidden, context, _, _ = _bind_block_args(args, kwargs)
        return (
            self.component_flops("self_attn", block.attn1, (hidden,), {}),
            self.component_flops("cross_attn", block.attn2, (hidden, context), {}),
            self.component_flops("mlp", block.ffn, (hidden,), {}),
        )

    def block_compute(
        self, block: torch.nn.Module, args: tuple, kwargs: dict, served: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """WanTransformerBlock.forward (diffusers 0.35-0.42) with the outputs of some components given:
        `served[c]` (in COMPONENTS order) replaces component c's output, and its input (norm and
        modulation) is not even prepared; the others are computed and returned (None where served). The
        step's gates apply to every output, served or not, and the arithmetic on the residual stream is
        the block's own, in the same order and dtypes. A pure function of tensors (the engine compiles
        it), whose only Python inputs are which components are served."""
        hidden, context, temb, rotary_emb = _bind_block_args(args, kwargs)
        if temb.ndim == 4:  # per-token modulation (Wan2.2 TI2V): (batch, tokens, 6, dim)
            mods = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
            mods = [m.squeeze(2) for m in mods]
        else:
            mods = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mods
        sa, ca, mlp = served
        h = hidden
        computed_sa = computed_ca = computed_mlp = None
        if sa is None:
            sa = computed_sa = block.attn1((block.norm1(h.float()) * (1 + scale) + shift).type_as(h), None, None, rotary_emb)
        h = (h.float() + sa * gate).type_as(h)
        if ca is None:
            ca = computed_ca = block.attn2(block.norm2(h.float()).type_as(h), context, None, None)
        h = h + ca
        if mlp is None:
            mlp = computed_mlp = block.ffn((block.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h))
        h = (h.float() + mlp.float() * c_gate).type_as(h)
        return h, (computed_sa, computed_ca, computed_mlp)

    def residual_gates(self, block: torch.nn.Module) -> tuple[int | None, ...]:
        """Per component, the index of the gate part that all blocks share (the step's time projection
        `temb`, chunk 2 for self-attention and 5 for the MLP; each gate is `scale_shift_table_b + temb`),
        or None for the ungated cross-attention."""
        return (2, None, 5)

    def shared_gates(self, args: tuple, kwargs: dict, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A block call's hidden states and the shared gate parts at `indices`, shaped to broadcast over
        the tokens."""
        hidden, _, temb, _ = _bind_block_args(args, kwargs)
        temb = temb.float()
        if temb.ndim == 4:  # per-token modulation (Wan2.2 TI2V): (batch, tokens, 6, dim)
            return hidden, [temb[:, :, i] for i in indices]
        return hidden, [temb[:, i : i + 1] for i in indices]

    def scheduler_sigmas(self, pipe_or_scheduler: Any, num_steps: int | None = None) -> list[float]:
        return flow_scheduler_sigmas(pipe_or_scheduler, num_steps)

    def denoiser_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        return denoiser_inputs(args, kwargs)

