"""STDiT3, the Open-Sora 1.2 transformer, as a diffusers model (`STDiT3Model`).

The module tree mirrors the official one (Open-Sora 1.2, `hpcai-tech/OpenSora-STDiT-v3`), so the hub's
`model.safetensors` loads with no key mapping and `strict=True` (see `load_stdit3`). Written from the
specification in /work/shared/OPENSORA.md (sections 1.2-1.5, 1.9):

- 28 spatial and 28 temporal blocks, run S0, T0, S1, T1, ...; every block has a self-attention (`attn`),
  a cross-attention to the T5 caption (`cross_attn`) and an MLP (`mlp`) as separate sub-modules, and a
  per-block `scale_shift_table` (6, C). The block's forward does the modulation and the gated residual
  adds around the sub-module calls, so a cache can hook or serve each sub-module on its own:
  `x += gate_msa * attn(mod(norm1(x)))`, `x += cross_attn(x, y)` (no gate), `x += gate_mlp * mlp(mod(norm2(x)))`.
- The per-block gates are `scale_shift_table[None] + t_mlp.view(B, 6, C)`, where `t_mlp` (B, 6C) is the
  shared `t_block` output (adaLN-single): `STDiT3Block.modulation(t_mlp)` gives the six (B, 1, C) parts.
- Self-attention: fused qkv, per-head RMSNorm on q and k, then (temporal blocks only) RoPE with
  interleaved pairs (2k, 2k+1) over the frame axis; attention runs through diffusers'
  `dispatch_attention_fn` (torch SDPA by default; flash / xformers when selected and installed). The
  cross-attention with a caption mask runs torch SDPA with the mask (flash-attn and SageAttention take none).
  Spatial attention groups the tokens by frame ((B*T), S), temporal attention by position ((B*S), T);
  both modules take and return (B, T*S, C) so that cached outputs share the stream's layout.
- Spatial position: an additive 2D sin-cos embedding (first half the column, second half the row), scaled
  by sqrt(height*width)/input_sq_size, identical for every frame.

Not implemented: the i2v/extension `x_mask` path (its t0 branch is a no-op for text-to-video),
dropout/drop-path (inference only). Sequence parallelism (DSP) is applied from outside, by hooks on the
blocks and attentions: `parallel.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_MODEL_TYPE = "STDiT3"


class OpenSoraLoadError(ValueError):
    """A checkpoint or folder that does not fit the model; the message is one line that says what to fix."""


# --------------------------------------------------------------------------------------------------------
# small pieces


class Mlp(nn.Module):
    """fc1, GELU(tanh), fc2 (timm's Mlp key names); the block MLP is C -> 4C -> C, the caption one 4096 -> C -> C."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """RMS norm over the last dim, statistics in float32, cast back before the learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def sinusoid(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) float32 embedding, cos first: [cos(v f_k), sin(v f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=values.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar per sample (timestep in [0, 1000], or fps) -> (B, C): sinusoid(256) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(sinusoid(values, self.frequency_embedding_size).to(dtype))


class CaptionEmbedder(nn.Module):
    """T5 features (.., 4096) -> (.., C); `y_embedding` (L, 4096) is the learned null caption used for CFG."""

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    """(B, C_in, T, H, W) -> (B, T'*H'*W', C): zero-pad each axis at its end to a multiple of the patch, conv."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        pad = (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt)
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(
    height: int, width: int, dim: int, scale: float, base_size: int, device=None
) -> torch.Tensor:
    """Open-Sora's additive 2D embedding (float32, (H*W, dim)), token (row j, col i) at j*W + i.

    Coordinates: col_i = i / scale * base_size / W, row_j = j / scale * base_size / H. The first dim/2
    channels encode the column as [sin(col w), cos(col w)], the last dim/2 the row likewise, with
    w_k = 10000^(-2k / (dim/2)), k = 0 .. dim/4 - 1."""
    half = dim // 2
    omega = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
    rows = torch.arange(height, dtype=torch.float32, device=device) / scale * (base_size / height)
    cols = torch.arange(width, dtype=torch.float32, device=device) / scale * (base_size / width)
    row_grid = rows[:, None].expand(height, width).reshape(-1)
    col_grid = cols[None, :].expand(height, width).reshape(-1)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    return torch.cat([axis(col_grid), axis(row_grid)], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE frequencies for the temporal attention: `freqs` (head_dim/2,) = theta^(-2k/head_dim), a frozen
    parameter as in the official checkpoint (key `rope.freqs`)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(self.default_freqs(), requires_grad=False)

    def default_freqs(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))

    def angles(self, length: int, device, dtype) -> torch.Tensor:
        """(length, head_dim) angles p * f_k, each repeated for the pair (2k, 2k+1)."""
        positions = torch.arange(length, device=device, dtype=self.freqs.dtype)
        angles = positions[:, None] * self.freqs.to(device)[None]
        return angles.repeat_interleave(2, dim=-1).to(dtype)


def apply_rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs along the sequence dim -2 (GPT-J layout, not the half-split one):
    out[2k] = x[2k] cos - x[2k+1] sin, out[2k+1] = x[2k+1] cos + x[2k] sin. `angles`: (L, D)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------------------
# attention, MLP, block


class SelfAttention(nn.Module):
    """Self-attention within a frame (spatial) or along time at one position (temporal, with RoPE).

    Input and output (B, T*S, C) with token index t*S + s; `num_frames` = T."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, temporal: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.temporal = temporal
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int, rope_angles: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        frames, per_frame = num_frames, tokens // num_frames
        x = x.view(batch, frames, per_frame, channels)
        if self.temporal:
            x = x.transpose(1, 2)  # (B, S, T, C)
        groups, length = x.shape[0] * x.shape[1], x.shape[2]
        qkv = self.qkv(x.reshape(groups, length, channels)).view(groups, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # (G, L, heads, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.temporal and rope_angles is not None:
            # RoPE along L: the rotation acts on (.., L, d) with L at dim -2 and heads kept apart.
            q = apply_rope_interleaved(q.transpose(1, 2), rope_angles).transpose(1, 2)
            k = apply_rope_interleaved(k.transpose(1, 2), rope_angles).transpose(1, 2)
        out = dispatch_attention_fn(q, k, v)  # (G, L, heads, d)
        out = self.proj(out.reshape(groups, length, channels))
        out = out.view(batch, *x.shape[1:3], channels)
        if self.temporal:
            out = out.transpose(1, 2)
        return out.reshape(batch, tokens, channels)


class CrossAttention(nn.Module):
    """Every video token attends to its sample's valid caption tokens (key-padding mask from T5's mask)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q = self.q_linear(x).view(batch, tokens, self.num_heads, self.head_dim)
        k, v = self.kv_linear(context).view(batch, context.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        if context_mask is None:
            out = dispatch_attention_fn(q, k, v)
        else:
            # With a key-padding mask: torch SDPA, whatever backend is selected (flash-attn and SageAttention
            # refuse masks; the caption is short, this attention is a small part of the block).
            mask = context_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            out = out.transpose(1, 2)
        return self.proj(out.reshape(batch, tokens, channels))


class STDiT3Block(nn.Module):
    """One spatial or temporal block (the same class; `temporal` picks the attention grouping and RoPE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, temporal: bool = False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, qk_norm=qk_norm, temporal=temporal)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulation(self, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, 1, C):
        this block's `scale_shift_table` plus the shared `t_block` output `t_mlp` (B, 6C)."""
        table = self.scale_shift_table[None] + t_mlp.view(t_mlp.shape[0], 6, -1)
        return table.chunk(6, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        t_mlp: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        num_frames: int,
        rope_angles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = hidden_states
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mlp)
        attn_out = self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, num_frames, rope_angles)
        x = x + gate_msa * attn_out
        x = x + self.cross_attn(x, encoder_hidden_states, encoder_attention_mask)
        mlp_out = self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + gate_mlp * mlp_out


class FinalLayer(nn.Module):
    """LayerNorm (no affine), modulated by (scale_shift_table + t) (t, not t_mlp), then Linear C -> p*C_out."""

    def __init__(self, dim: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------------------
# the model


class STDiT3Model(ModelMixin, ConfigMixin, CacheMixin):
    """Open-Sora 1.2's STDiT3 (see the module docstring). Defaults are the released STDiT3-XL/2.

    forward(hidden_states (B, C_in, T, H, W) latents, timestep (B,) in [0, 1000], encoder_hidden_states
    (B, L, 4096) or (B, 1, L, 4096) T5 features, encoder_attention_mask (B, L) (1 = valid token),
    fps (B,) or a number, height/width (pixels; only the first is used, for the position-embedding scale))
    -> (B, out_channels, T, H, W) float32; out_channels = 2 * in_channels with pred_sigma (the sampler uses
    the first in_channels: the velocity x0 - noise)."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["STDiT3Block"]
    _repeated_blocks = ["STDiT3Block"]  # compile_repeated_blocks() compiles each block class once

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        pred_sigma: bool = True,
        caption_channels: int = 4096,
        model_max_length: int = 300,
        qk_norm: bool = True,
        input_sq_size: int = 512,
        vae_scale_factor_spatial: int = 8,
    ):
        super().__init__()
        patch_size = tuple(patch_size)
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        self.rope = RotaryEmbedding(hidden_size // num_heads)
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=False) for _ in range(depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, mlp_ratio, qk_norm, temporal=True) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, math.prod(patch_size), self.out_channels)

    # ---- the three stages (a cache adapter can call or hook them apart)

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: Any = None,
        width: Any = None,
    ) -> dict[str, Any]:
        """Everything before the blocks: tokens x (B, N, C) with the position embedding added, t (B, C),
        t_mlp (B, 6C), the caption y (B, L, C) and its mask, the patch grid (T, H, W) and RoPE angles."""
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        batch, _, frames, lat_h, lat_w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (-(-frames // pt), -(-lat_h // ph), -(-lat_w // pw))
        height = lat_h * cfg.vae_scale_factor_spatial if height is None else height
        width = lat_w * cfg.vae_scale_factor_spatial if width is None else width
        scale = math.sqrt(_first(height) * _first(width)) / cfg.input_sq_size
        base_size = round(math.sqrt(grid[1] * grid[2]))

        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        timestep = _per_sample(timestep.reshape(-1), batch)
        t = self.t_embedder(timestep.to(dtype), dtype)
        fps = torch.as_tensor(24.0 if fps is None else fps, device=hidden_states.device)
        fps = _per_sample(fps.reshape(-1), batch)
        t = t + self.fps_embedder(fps.to(dtype), dtype)
        t_mlp = self.t_block(t)

        y = encoder_hidden_states
        if y.ndim == 4:
            y = y.squeeze(1)
        y = self.y_embedder(y.to(dtype))
        mask = None
        if encoder_attention_mask is not None:
            mask = encoder_attention_mask.to(device=y.device).bool()
            mask = _per_sample(mask, batch)

        x = self.x_embedder(hidden_states.to(dtype))
        pos = sincos_pos_embed_2d(grid[1], grid[2], cfg.hidden_size, scale, base_size, device=x.device).to(dtype)
        x = (x.view(batch, grid[0], grid[1] * grid[2], -1) + pos[None, None]).flatten(1, 2)
        rope = self.rope.angles(grid[0], x.device, dtype)
        return {"x": x, "t": t, "t_mlp": t_mlp, "y": y, "mask": mask, "grid": grid, "rope": rope}

    def blocks(self) -> list[STDiT3Block]:
        """The 2 * depth blocks in execution order: spatial 0, temporal 0, spatial 1, ..."""
        return [b for pair in zip(self.spatial_blocks, self.temporal_blocks, strict=True) for b in pair]

    def finish(self, x: torch.Tensor, t: torch.Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
        """Final layer and unpatchify: (B, N, C) -> (B, out_channels, *size) float32 (cropped to `size`)."""
        x = self.final_layer(x, t)
        batch = x.shape[0]
        pt, ph, pw = self.config.patch_size
        x = x.view(batch, *grid, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, self.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)
        return x[:, :, : size[0], : size[1], : size[2]].float()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        fps: torch.Tensor | float | None = None,
        height: Any = None,
        width: Any = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        state = self.embed(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, fps, height, width)
        x, frames = state["x"], state["grid"][0]
        for block in self.blocks():
            x = block(x, state["y"], state["t_mlp"], state["mask"], frames, state["rope"] if block.temporal else None)
        out = self.finish(x, state["t"], state["grid"], tuple(hidden_states.shape[2:]))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    # ---- the official folder layout (config.json of model_type STDiT3 + model.safetensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a folder laid out like `hpcai-tech/OpenSora-STDiT-v3` (what `save_pretrained` writes too):
        strict, with a one-line OpenSoraLoadError for a folder or checkpoint that does not fit.
        Loader keywords of diffusers that do not apply here (device_map, variant, ...) are ignored."""
        return load_folder(cls, pretrained_model_name_or_path, kwargs.get("subfolder"), read_official_config,
                           lambda model, path: load_stdit3(model, path, assign=True), torch_dtype)

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """Write the official layout: config.json (the STDiT3Config field names, model_type STDiT3, and this
        class's name) and model.safetensors with the official key names."""
        if is_main_process:
            config = {"architectures": ["STDiT3"], "model_type": OFFICIAL_MODEL_TYPE,
                      "_class_name": type(self).__name__, **plain_config(self)}
            write_official(self, save_directory, config)


def _per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows for every sample: a (1, ...) or (n, ...) tensor with n dividing the batch is repeated, as the
    official model repeats fps and the caption mask over the CFG rows it was not given."""
    if values.shape[0] != batch and values.shape[0] > 0 and batch % values.shape[0] == 0:
        return values.repeat(batch // values.shape[0], *([1] * (values.ndim - 1)))
    return values


def _first(value: Any) -> float:
    """height/width may be a number or a (B,) tensor (the official model reads element 0)."""
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    if isinstance(value, (list, tuple)):
        return float(value[0])
    return float(value)


# Fields of the official STDiT3Config that shape the weights, and the overrides the reference
# inference config passes at load time (in_channels = the VAE's 4 latent channels, qk_norm on, ...).
_CONFIG_FIELDS = (
    "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "pred_sigma",
    "caption_channels", "model_max_length", "qk_norm", "input_sq_size", "vae_scale_factor_spatial",
)
REFERENCE_OVERRIDES = {"qk_norm": True, "in_channels": 4, "caption_channels": 4096, "model_max_length": 300}


def read_config_json(folder: Path, model_type: str, what: str) -> dict[str, Any]:
    """A transformers-style config.json of the given `model_type`, or a one-line OpenSoraLoadError."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise OpenSoraLoadError(f"{folder} is not an Open-Sora {what} folder (no {CONFIG_NAME} in it)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OpenSoraLoadError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("model_type") != model_type:
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise OpenSoraLoadError(f"{path} is not an Open-Sora 1.2 {what} config (model_type {kind!r}, expected {model_type!r})")
    return raw


def write_official(model: ModelMixin, folder: str | Path, config: dict[str, Any]) -> None:
    """config.json (`config`) and model.safetensors (the state dict, official key names) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def plain_config(model: ModelMixin) -> dict[str, Any]:
    """The model's registered config as JSON-ready values (tuples as lists, no private keys)."""
    return {key: (list(value) if isinstance(value, tuple) else value) for key, value in dict(model.config).items()
            if not key.startswith("_")}


def load_folder(cls, path, subfolder, read_config, load_weights, torch_dtype=None):
    """Shared from_pretrained: config from the folder, the model built on the meta device, the weights
    assigned from model.safetensors (strictly, by `load_weights(model, path)`), then cast to `torch_dtype`."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    config = read_config(folder)
    with torch.device("meta"):
        model = cls(**config)
    load_weights(model, folder / WEIGHTS_NAME)
    if torch_dtype is not None:
        nn.Module.to(model, torch_dtype)  # not ModelMixin.to, which warns about casting outside from_pretrained
    return model.eval()


def read_official_config(folder: Path) -> dict[str, Any]:
    """Model kwargs from a transformers-style STDiT3 config.json (one-line OpenSoraLoadError otherwise).

    A config written by the hub (no `_class_name`) gets the reference inference overrides
    (REFERENCE_OVERRIDES); one written by `save_pretrained` is taken as it is."""
    raw = read_config_json(folder, OFFICIAL_MODEL_TYPE, "STDiT3")
    config = {key: raw[key] for key in _CONFIG_FIELDS if key in raw}
    if "_class_name" not in raw:
        config.update(REFERENCE_OVERRIDES)
    if "patch_size" in config:
        config["patch_size"] = tuple(config["patch_size"])
    return config


def expected_shapes(config: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for a config, computed on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = STDiT3Model(**(config or {}))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def describe_mismatch(missing, unexpected, wrong) -> str:
    """'3 missing (e.g. a), 1 unexpected (e.g. b), 1 with another shape (e.g. c [2, 3] vs [3, 3])'."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {sorted(missing)[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[0]})")
    if wrong:
        key, got, want = sorted(wrong)[0]
        parts.append(f"{len(wrong)} with another shape (e.g. {key}: checkpoint {list(got)}, model {list(want)})")
    return ", ".join(parts)


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a one-line OpenSoraLoadError (missing or unreadable file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise OpenSoraLoadError(f"{path.parent} has no {path.name} (the {what} weights)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpenSoraLoadError(f"{path} is not a readable safetensors file ({first})") from exc


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str, assign: bool = False) -> None:
    """load_state_dict(strict=True) after a check that names the first missing / unexpected / reshaped key
    in a one-line OpenSoraLoadError ("{source} does not fit {what}: ...")."""
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
             if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise OpenSoraLoadError(f"{source} does not fit {what}: {describe_mismatch(missing, unexpected, wrong)}")
    model.load_state_dict(state, strict=True, assign=assign)


def load_stdit3(model: STDiT3Model, checkpoint: str | Path | dict[str, torch.Tensor], assign: bool = False) -> None:
    """Load an official-layout state dict strictly. The one tolerance: `rope.freqs` (deterministic) is
    recomputed when a checkpoint does not store it. Mismatch -> one-line OpenSoraLoadError."""
    if isinstance(checkpoint, dict):
        state, source = dict(checkpoint), "checkpoint"
    else:
        state, source = read_safetensors(checkpoint, "STDiT3"), str(checkpoint)
    if "rope.freqs" not in state:
        state["rope.freqs"] = model.rope.default_freqs()
    cfg = model.config
    what = f"STDiT3Model(depth={cfg.depth}, hidden_size={cfg.hidden_size}, num_heads={cfg.num_heads})"
    load_strict(model, state, source, what, assign=assign)
    model.rope.freqs.requires_grad_(False)


def _register_with_diffusers_hooks() -> None:
    """diffusers' block caches (First-Block-Cache, MagCache) find a block's hidden-states argument and output
    through its `TransformerBlockRegistry`: STDiT3Block takes `hidden_states` first and returns the video
    stream alone (the caption is not updated), as Wan's block does."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    TransformerBlockRegistry.register(model_class=STDiT3Block, metadata=metadata)


_register_with_diffusers_hooks()
