"""Open-Sora 1.2 adapter: where the cacheable parts of `STDiT3Model` are, for the videocache engine.

Blocks. The model runs its 28 spatial and 28 temporal blocks alternately (S0, T0, S1, T1, ...;
`STDiT3Model.blocks()`), and the engine's block index is that execution order (block 2i = spatial block
i, 2i + 1 = temporal block i): the fused skip starts at block 0 and closes at the last block, and block
runs (ProfilingDiT) cache a stretch of consecutive *executed* blocks, so the order cannot be changed to
"all spatial, then all temporal". Spatial and temporal blocks are two block groups, `spatial` (the even
blocks) and `temporal` (the odd ones): the groups list their block indices (`BlockGroup.blocks`), the
generic way for groups to interleave, so the table, the statistics and a profile's `model.groups` hold
them apart. (The alternatives do not fit: one group of 56 blocks would merge them; 56 one-block groups
would need 56 distinct names and make every rule list them.)

Components. Spatial blocks: `spatial_attn`, `cross_attn`, `mlp`; temporal blocks: `temporal_attn`,
`cross_attn`, `mlp`. A profile rule applies to every group that has the named component, so the two
self-attentions are addressed apart by name (PAB's finding, temporal attention the most reusable, is a
rule with a longer interval for `temporal_attn`), while `cross_attn` and `mlp` rules cover both groups
(PAB broadcasts the cross-attention in every block alike); a rule for one group's MLP alone selects the
even or odd blocks. Statistics and calibration are per component name, so they see spatial and temporal
attention apart, and FLOP weights per name stay exact: at 480p / 51 frames (23,850 tokens, S = 1590,
T = 15, batch 1) a spatial attention costs 428 GFLOPs and a temporal one 255, against 161 for a
cross-attention and 506 for an MLP (one shared `attn` name would give both attentions one weight).

Gates. Each block adds `gate_msa * attn(...)`, the ungated `cross_attn(...)` and `gate_mlp * mlp(...)`
to the stream, with every gate = the block's `scale_shift_table` row + the shared `t_block` output
(adaLN-single): `residual_gates` (chunks 2 and 5 of `t_mlp`) and `shared_gates` give the engine the
shared parts, so steps whose cells are all skipped alike skip the whole stack at once (the fused skip).
Cached outputs are taken before the gate and residual add and get the current step's gates.

Constant modules: the caption projection `y_embedder` (the T5 features of a context are the same tensor at
every step). The 2D position embedding and the RoPE angles depend on the shape only but are computed by
plain functions in `STDiT3Model.embed`, not modules the engine could answer; they are small.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..adapter_helpers import denoiser_inputs, flow_scheduler_sigmas, module_macs

SPATIAL = ("spatial_attn", "cross_attn", "mlp")
TEMPORAL = ("temporal_attn", "cross_attn", "mlp")
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "t_mlp", "encoder_attention_mask", "num_frames", "rope_angles")
_SHARED_GATES = (2, None, 5)  # chunks of t_mlp gating the self-attention and the MLP; cross-attention ungated


def _bind(args: tuple, kwargs: dict) -> tuple[Any, ...]:
    """(hidden_states, encoder_hidden_states, t_mlp, encoder_attention_mask, num_frames, rope_angles) of an
    STDiT3Block call."""
    bound = dict(zip(_BLOCK_ARGS, args, strict=False)) | kwargs
    return tuple(bound.get(name) for name in _BLOCK_ARGS)


class OpenSoraAdapter:
    """FLOPs count the matrix multiplications (projections and attention), 2 per multiply-add; norms,
    RoPE, activations and biases are left out. The self-attention's attention term is 4 B N L C with L the
    length of the sequences it attends within (S tokens of a frame for spatial blocks, T frames for
    temporal ones); the cross-attention counts every caption token it is given (the padded ones are
    masked but computed).

    The engine memoises a block's FLOPs by the shapes of its tensor arguments; the frame count is a plain
    int, so two calls with the same token count but another split into frames (not within one
    generation) would reuse the spatial blocks' first count."""

    architecture = "STDiT3Model"
    velocity_sign = -1  # STDiT3 predicts x0 - eps (the first 4 of its 8 channels); the engine's exposure-bias
    # correction is written for eps - x0

    def __init__(self) -> None:
        self._macs: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()

    # -- layout -------------------------------------------------------------------------------------
    def blocks(self, transformer: torch.nn.Module) -> Sequence[torch.nn.Module]:
        return transformer.blocks()

    def component_modules(self, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        attn = "temporal_attn" if block.temporal else "spatial_attn"
        return {attn: block.attn, "cross_attn": block.cross_attn, "mlp": block.mlp}

    def fingerprint(self, transformer: torch.nn.Module) -> dict[str, Any]:
        depth = len(transformer.spatial_blocks)
        return {
            "architecture": self.architecture,
            "num_blocks": 2 * depth,
            "groups": [
                {"name": "spatial", "num_blocks": depth, "components": list(SPATIAL), "blocks": list(range(0, 2 * depth, 2))},
                {"name": "temporal", "num_blocks": depth, "components": list(TEMPORAL), "blocks": list(range(1, 2 * depth, 2))},
            ],
        }

    # -- FLOPs --------------------------------------------------------------------------------------
    def _module_macs(self, module: torch.nn.Module) -> int:
        macs = self._macs.get(module)
        if macs is None:
            macs = self._macs[module] = module_macs(module)
        return macs

    def _attn_flops(self, module: torch.nn.Module, hidden: torch.Tensor, num_frames: int) -> float:
        batch, tokens, channels = (int(d) for d in hidden.shape)
        length = int(num_frames) if module.temporal else tokens // int(num_frames)
        return 2.0 * batch * tokens * self._module_macs(module) + 4.0 * batch * tokens * length * channels

    def _cross_flops(self, module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> float:
        batch, tokens, channels = (int(d) for d in hidden.shape)
        text = int(context.shape[-2])
        per_token = module_macs(module.q_linear) + module_macs(module.proj)
        return batch * (2.0 * (tokens * per_token + text * module_macs(module.kv_linear)) + 4.0 * tokens * text * channels)

    def _mlp_flops(self, module: torch.nn.Module, hidden: torch.Tensor) -> float:
        return 2.0 * int(hidden.shape[0]) * int(hidden.shape[1]) * self._module_macs(module)

    def block_flops(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[float, float, float]:
        """FLOPs of the block's self-attention, cross-attention and MLP for these block inputs."""
        hidden, context, _, _, frames, _ = _bind(args, kwargs)
        return (
            self._attn_flops(block.attn, hidden, frames),
            self._cross_flops(block.cross_attn, hidden, context),
            self._mlp_flops(block.mlp, hidden),
        )

    def component_flops(self, component: str, module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
        """FLOPs of one component module call (the engine's per-module path; the block path uses block_flops)."""
        if component == "mlp":
            return self._mlp_flops(module, args[0] if args else kwargs["x"])
        if component == "cross_attn":
            bound = dict(zip(("x", "context"), args, strict=False)) | kwargs
            return self._cross_flops(module, bound["x"], bound["context"])
        bound = dict(zip(("x", "num_frames"), args, strict=False)) | kwargs
        return self._attn_flops(module, bound["x"], bound["num_frames"])

    # -- the block with served components -------------------------------------------------------------
    def block_compute(
        self, block: torch.nn.Module, args: tuple, kwargs: dict, served: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """STDiT3Block.forward with some components' outputs given (`served`, in the group's component
        order: attention, cross-attention, MLP); the others are computed, their inputs (norm and
        modulation) prepared only for them, and returned (None where served). The step's gates apply to
        every output, and the arithmetic on the stream is the block's own, op for op, so with nothing
        served the output is the block's bit for bit. A pure function of tensors (the engine compiles it)
        whose Python inputs are which components are served and the frame count."""
        x, context, t_mlp, mask, frames, rope = _bind(args, kwargs)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(t_mlp)
        attn, cross, mlp = served
        computed_attn = computed_cross = computed_mlp = None
        if attn is None:
            attn = computed_attn = block.attn(block.norm1(x) * (1 + scale_msa) + shift_msa, frames, rope)
        x = x + gate_msa * attn
        if cross is None:
            cross = computed_cross = block.cross_attn(x, context, mask)
        x = x + cross
        if mlp is None:
            mlp = computed_mlp = block.mlp(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + gate_mlp * mlp, (computed_attn, computed_cross, computed_mlp)

    def residual_gates(self, block: torch.nn.Module) -> tuple[int | None, ...]:
        """Per component, the chunk of the shared `t_block` output (B, 6C) in its gate (each gate is the
        block's `scale_shift_table` row + that chunk): 2 for the self-attention, 5 for the MLP, None for the
        ungated cross-attention; the same in spatial and temporal blocks."""
        return _SHARED_GATES

    def shared_gates(self, args: tuple, kwargs: dict, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A block call's hidden states and the shared gate parts at `indices`, (B, 1, C) float32 each."""
        hidden, _, t_mlp, _, _, _ = _bind(args, kwargs)
        parts = t_mlp.float().view(t_mlp.shape[0], 6, -1)
        return hidden, [parts[:, i : i + 1] for i in indices]

    # -- run-level facts ----------------------------------------------------------------------------
    def constant_modules(self, transformer: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
        """The caption projection sees the same T5 features at every step of a context (when they come in
        the model's dtype, as from OpenSoraPipeline; otherwise the cast makes a new tensor per call and the
        projection simply runs)."""
        return {"caption_embedder": (transformer.y_embedder, "tensor")}

    def scheduler_sigmas(self, pipe_or_scheduler: Any, num_steps: int | None = None) -> list[float]:
        return flow_scheduler_sigmas(pipe_or_scheduler, num_steps)

    def denoiser_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        return denoiser_inputs(args, kwargs)


