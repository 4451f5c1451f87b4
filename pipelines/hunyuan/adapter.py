"""HunyuanVideo adapter: where the cacheable parts of HunyuanVideoTransformer3DModel are, per block type.

Two block groups (facts checked against diffusers 0.42: ../shared/HUNYUAN.md):

* `dual` (`transformer_blocks`, HunyuanVideoTransformerBlock): `attn`, the joint attention, whose output is
  the pair (video, text), each already projected; `ff`, the video feed-forward; `ff_context`, the text one.
  Each output is multiplied by its own gate (video and text are modulated apart) before the residual add.
* `single` (`single_transformer_blocks`, HunyuanVideoSingleTransformerBlock): attention and MLP meet in one
  linear `proj_out(cat(attn, mlp))` over the joined [video, text] tokens, then one gate. Since `proj_out`
  is linear, its output is the sum of an attention part `attn @ W[:, :C]^T` and an MLP part
  `mlp @ W[:, C:]^T + b`; caching those two parts apart gives FEB-style split caching (attention and MLP
  reused at different steps) in the single-stream blocks too.

Cached values are taken before the gate and residual add, and the current step's gates are applied to
them. Text tokens are cached like the video tokens, per step: the token refiner takes the timestep, so the
text stream changes from step to step and is never treated as constant.

No fused skip: every gate is the block's own linear map of the shared `temb` (`norm.linear(silu(temb))`),
not a per-block part plus a shared one, so the stack's output on a skipped step cannot be formed from a
few per-step sums (it would take one sum per channel of temb). Uniform skip steps go block by block.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..adapter_helpers import denoiser_inputs, flow_scheduler_sigmas, linear_macs, module_macs

DUAL = ("attn", "ff", "ff_context")
SINGLE = ("attn", "mlp")
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "attention_mask")


def _bind(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """(hidden_states, encoder_hidden_states, temb, attention_mask, rotary embedding) of a block call; the
    dual block names the rotary embedding `freqs_cis`, the single block `image_rotary_emb`."""
    bound = dict(zip((*_BLOCK_ARGS, "rope"), args, strict=False)) | kwargs
    rope = bound.get("rope", bound.get("freqs_cis", bound.get("image_rotary_emb")))
    return bound["hidden_states"], bound["encoder_hidden_states"], bound["temb"], bound.get("attention_mask"), rope


def _modulation(norm: torch.nn.Module, temb: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """AdaLayerNormZero(Single)'s shift/scale/gate chunks from the shared conditioning."""
    return norm.linear(norm.silu(temb)).chunk(chunks, dim=1)


def _modulate(norm: torch.nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


class HunyuanVideoAdapter:
    """FLOPs count the matrix multiplications (projections and attention), 2 per multiply-add.

    Single-stream blocks: the `attn` FLOPs are the q/k/v projections, the attention and the attention
    columns of `proj_out`; the `mlp` FLOPs are `proj_mlp` and the MLP columns of `proj_out`.

    Under sequence parallelism the blocks see a token shard and the attention term is computed from the
    local tokens (as for Wan): the computed fraction stays a consistent per-rank measure, a little off the
    single-process one (0.685 against 0.697 in tests/test_parallel_hunyuan.py's cached run), while the
    decisions are the same on every rank."""

    architecture = "HunyuanVideoTransformer3DModel"

    def __init__(self) -> None:
        self._macs: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()

    # -- layout -------------------------------------------------------------------------------------
    def blocks(self, transformer: torch.nn.Module) -> Sequence[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def component_modules(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The modules whose outputs are cached; in a single-stream block the engine caches the two parts of
        `proj_out`, which only `block_compute` can split, so that block reports its attention alone."""
        if hasattr(block, "ff_context"):
            return {"attn": block.attn, "ff": block.ff, "ff_context": block.ff_context}
        return {"attn": block.attn}

    def fingerprint(self, transformer: torch.nn.Module) -> dict[str, Any]:
        dual, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        groups = [{"name": "dual", "num_blocks": dual, "components": list(DUAL)}] if dual else []
        if single:
            groups.append({"name": "single", "num_blocks": single, "components": list(SINGLE)})
        return {"architecture": self.architecture, "num_blocks": dual + single, "groups": groups}

    # -- FLOPs --------------------------------------------------------------------------------------
    def _module_macs(self, module: torch.nn.Module) -> int:
        macs = self._macs.get(module)
        if macs is None:
            macs = self._macs[module] = module_macs(module)
        return macs

    def block_flops(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, ...]:
        hidden, context, _, _, _ = _bind(args, kwargs)
        batch, nv, nt = int(hidden.shape[0]), int(hidden.shape[1]), int(context.shape[1])
        attn = block.attn
        inner = attn.to_q.out_features
        attention = 4.0 * (nv + nt) ** 2 * inner  # Q K^T and A V over the joined tokens
        if hasattr(block, "ff_context"):
            video = linear_macs(attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
            text = linear_macs(attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out)
            return (
                batch * (2.0 * (nv * video + nt * text) + attention),
                2.0 * batch * nv * self._module_macs(block.ff),
                2.0 * batch * nt * self._module_macs(block.ff_context),
            )
        dim = attn.to_q.in_features
        qkv = linear_macs(attn.to_q, attn.to_k, attn.to_v)
        tokens = nv + nt
        mlp_in = block.proj_mlp.out_features
        return (
            batch * (2.0 * tokens * (qkv + inner * dim) + attention),
            2.0 * batch * tokens * (dim * mlp_in + mlp_in * dim),
        )

    def component_flops(self, component: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        """FLOPs of a component module call (the engine's per-module path; the block path uses block_flops)."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        nv, nt = int(hidden.shape[1]), 0 if context is None else int(context.shape[1])
        if component == "attn":
            inner = module.to_q.out_features
            per_token = linear_macs(module.to_q, module.to_k, module.to_v)
            out = 0 if module.to_out is None else linear_macs(module.to_out[0])
            add = linear_macs(module.add_q_proj, module.add_k_proj, module.add_v_proj, module.to_add_out)
            text_macs = add if add else per_token
            return hidden.shape[0] * (2.0 * (nv * (per_token + out) + nt * text_macs) + 4.0 * (nv + nt) ** 2 * inner)
        return 2.0 * hidden.shape[0] * nv * self._module_macs(module)

    # -- the block with served components -------------------------------------------------------------
    def block_compute(
        self, block: torch.nn.Module, args: tuple, kwargs: dict, served: Sequence[Any]
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[Any, ...]]:
        """The block's forward (diffusers 0.42) with some components' outputs given (`served`, in the
        group's component order: DUAL or SINGLE); the others are computed, their inputs (norms,
        modulation) prepared only for them, and returned. The step's gates apply to every output."""
        if hasattr(block, "ff_context"):
            return self._dual(block, args, kwargs, served)
        return self._single(block, args, kwargs, served)

    def _dual(self, block, args, kwargs, served):
        h, c, temb, mask, rope = _bind(args, kwargs)
        attn, ff, ff_context = served
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods = _modulation(block.norm1, temb, 6)
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods = _modulation(block.norm1_context, temb, 6)
        computed_attn = computed_ff = computed_ff_context = None
        if attn is None:
            attn = computed_attn = block.attn(
                hidden_states=_modulate(block.norm1.norm, h, mods[0], mods[1]),
                encoder_hidden_states=_modulate(block.norm1_context.norm, c, c_mods[0], c_mods[1]),
                attention_mask=mask,
                image_rotary_emb=rope,
            )
        h = h + attn[0] * gate_msa.unsqueeze(1)
        c = c + attn[1] * c_gate_msa.unsqueeze(1)
        if ff is None:
            ff = computed_ff = block.ff(_modulate(block.norm2, h, shift_mlp, scale_mlp))
        if ff_context is None:
            ff_context = computed_ff_context = block.ff_context(_modulate(block.norm2_context, c, c_shift_mlp, c_scale_mlp))
        h = h + gate_mlp.unsqueeze(1) * ff
        c = c + c_gate_mlp.unsqueeze(1) * ff_context
        return (h, c), (computed_attn, computed_ff, computed_ff_context)

    def _single(self, block, args, kwargs, served):
        h, c, temb, mask, rope = _bind(args, kwargs)
        text = c.shape[1]
        x = torch.cat([h, c], dim=1)
        attn_part, mlp_part = served
        shift, scale, gate = _modulation(block.norm, temb, 3)
        computed_attn = computed_mlp = None
        if attn_part is None or mlp_part is None:
            normed = _modulate(block.norm.norm, x, shift, scale)
            dim = normed.shape[-1]
            weight = block.proj_out.weight
            if mlp_part is None:
                mlp = block.act_mlp(block.proj_mlp(normed))
                mlp_part = computed_mlp = F.linear(mlp, weight[:, dim:], block.proj_out.bias)
            if attn_part is None:
                a, ca = block.attn(
                    hidden_states=normed[:, :-text], encoder_hidden_states=normed[:, -text:],
                    attention_mask=mask, image_rotary_emb=rope,
                )
                attn_part = computed_attn = F.linear(torch.cat([a, ca], dim=1), weight[:, :dim])
        x = gate.unsqueeze(1) * (attn_part + mlp_part) + x
        return (x[:, :-text], x[:, -text:]), (computed_attn, computed_mlp)

    def block_streams(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual streams a block call carries and returns, in its output order: (video, text)."""
        hidden, context, _, _, _ = _bind(args, kwargs)
        return hidden, context

    # -- run-level facts ----------------------------------------------------------------------------
    def constant_modules(self, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
        """RoPE depends on the latent shape only. (The text path does not qualify: the token refiner and
        the conditioning embedder take the timestep.)"""
        return {"rope": (transformer.rope, "shape")}

    def scheduler_sigmas(self, pipe_or_scheduler: Any, num_steps: int | None = None) -> list[float]:
        return flow_scheduler_sigmas(pipe_or_scheduler, num_steps)

    def denoiser_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        return denoiser_inputs(args, kwargs)


