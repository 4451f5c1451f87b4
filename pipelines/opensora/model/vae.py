"""The Open-Sora 1.2 VAE (`OpenSoraVAE`): diffusers' `AutoencoderKL` per frame, then a causal temporal VAE.

Key layout of `hpcai-tech/OpenSora-VAE-v1.2` (OPENSORA.md 1.6): `spatial_vae.module.<AutoencoderKL names>`,
`temporal_vae.{encoder,decoder,quant_conv,post_quant_conv}.*` (every causal conv wraps its Conv3d as `.conv`),
and the per-channel normalisation buffers `scale`, `shift` (1, 4, 1, 1, 1).

- Spatial: an SDXL-architecture AutoencoderKL applied to every frame, latents times 0.18215 (not the SDXL
  config's 0.13025), decoded in micro-batches of 4 frames.
- Temporal (MAGVIT-v2 style, 4x in time, no spatial change): causal 3D convs that pad time on the left only,
  GroupNorm/SiLU residual blocks, strided convs down, conv + depth-to-space up. Encoding pads the front of
  time to a multiple of 4; decoding drops those frames again.
- Micro-frames: 17-frame pixel chunks are encoded apart (5 latent frames each); decoding decodes each
  5-latent chunk apart with min(17, frames left) frames.
- Normalisation: encode (z - shift) / scale; decode z * scale + shift first.

Written from the specification; decoding is what text-to-video needs, encoding is there for round trips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .transformer import (
    load_folder,
    load_strict,
    plain_config,
    read_config_json,
    read_safetensors,
    write_official,
)

OFFICIAL_VAE_TYPE = "VideoAutoencoderPipeline"

# The spatial VAE of Open-Sora 1.2: PixArt-Sigma's SDXL VAE (`PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers`,
# subfolder vae), whose architecture the hub checkpoint's `spatial_vae.module.*` weights fit.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "sample_size": 1024,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.13025, "force_upcast": True,
}
SHIFT = (-0.10, 0.34, 0.27, 0.98)
SCALE = (3.85, 2.32, 2.33, 3.06)


class CausalConv3d(nn.Module):
    """Conv3d padded causally in time ((k_t - 1) * dilation + 1 - stride_t zeros in front) and by k // 2 in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride_t: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, (kt - 1) + (1 - stride_t), 0)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3 (no biases), plus a 1x1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.activate = nn.SiLU()
        if in_channels != out_channels:
            self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.activate(self.norm1(x)))
        h = self.conv2(self.activate(self.norm2(h)))
        return h + (self.conv3(x) if hasattr(self, "conv3") else x)


def _stage_res_blocks(in_channels: int, out_channels: int, count: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(count)])


class TemporalEncoder(nn.Module):
    def __init__(self, channels, latent_channels, filters, num_res_blocks, multipliers, downsample, groups):
        super().__init__()
        self.conv_in = CausalConv3d(channels, filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = filters
        for i, mult in enumerate(multipliers):
            width = filters * mult
            self.block_res_blocks.append(_stage_res_blocks(prev, width, num_res_blocks, groups))
            prev = width
            if i < len(multipliers) - 1:
                self.conv_blocks.append(CausalConv3d(prev, prev, 3, stride_t=2) if downsample[i] else nn.Identity())
        self.res_blocks = _stage_res_blocks(prev, prev, num_res_blocks, groups)
        self.norm1 = nn.GroupNorm(groups, prev)
        self.activate = nn.SiLU()
        self.conv2 = CausalConv3d(prev, latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, stage in enumerate(self.block_res_blocks):
            for block in stage:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.activate(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, channels, latent_channels, filters, num_res_blocks, multipliers, downsample, groups):
        super().__init__()
        self.downsample = tuple(downsample)
        top = filters * multipliers[-1]
        self.conv1 = CausalConv3d(latent_channels, top, 3)
        self.res_blocks = _stage_res_blocks(top, top, num_res_blocks, groups)
        # Stage i (multiplier i) is block_res_blocks[i]; after stage i > 0 runs, conv_blocks[i - 1] doubles
        # the channels and a depth-to-space moves them into time (when downsample[i - 1]).
        stages: list[nn.ModuleList] = [None] * len(multipliers)  # type: ignore[list-item]
        ups: list[nn.Module] = [None] * (len(multipliers) - 1)  # type: ignore[list-item]
        prev = top
        for i in reversed(range(len(multipliers))):
            width = filters * multipliers[i]
            stages[i] = _stage_res_blocks(prev, width, num_res_blocks, groups)
            prev = width
            if i > 0:
                ups[i - 1] = CausalConv3d(prev, prev * 2, 3) if downsample[i - 1] else nn.Identity()
        self.block_res_blocks = nn.ModuleList(stages)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(groups, prev)
        self.activate = nn.SiLU()
        self.conv_out = CausalConv3d(prev, channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.downsample[i - 1]:
                    # depth to space in time: channel index c * 2 + s -> frame t * 2 + s
                    b, c2, t, h, w = x.shape
                    x = x.view(b, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c2 // 2, t * 2, h, w)
        return self.conv_out(self.activate(self.norm1(x)))


class TemporalVAE(nn.Module):
    """Causal temporal VAE on the 2D latents (Open-Sora's VAE_Temporal_SD)."""

    def __init__(self, in_out_channels=4, latent_embed_dim=4, embed_dim=4, filters=128, num_res_blocks=4,
                 channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True), num_groups=32):
        super().__init__()
        self.time_factor = 2 ** sum(bool(d) for d in temporal_downsample)
        args = (filters, num_res_blocks, tuple(channel_multipliers), tuple(temporal_downsample), num_groups)
        self.encoder = TemporalEncoder(in_out_channels, 2 * latent_embed_dim, *args)
        self.quant_conv = CausalConv3d(2 * latent_embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(in_out_channels, latent_embed_dim, *args)

    def time_padding(self, frames: int) -> int:
        return (-frames) % self.time_factor

    def latent_frames(self, frames: int) -> int:
        return (frames + self.time_padding(frames)) // self.time_factor

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device="cpu", dtype=mean.dtype).to(mean.device)
        return mean + std * noise

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.time_padding(num_frames):]


class SpatialVAE(nn.Module):
    """Holds the AutoencoderKL as `.module` (the checkpoint prefix `spatial_vae.module.`)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.module = AutoencoderKL(**config)


class OpenSoraVAE(ModelMixin, ConfigMixin):
    """Open-Sora 1.2's video VAE: pixels (B, 3, F, H, W) in [-1, 1] <-> latents (B, 4, F', H/8, W/8)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        spatial_config: dict[str, Any] | None = None,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: tuple[int, ...] = (1, 2, 2, 4),
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        num_groups: int = 32,
        micro_frame_size: int = 17,
        micro_batch_size: int = 4,
        scaling_factor: float = 0.18215,
        latent_shift: tuple[float, ...] = SHIFT,
        latent_scale: tuple[float, ...] = SCALE,
    ):
        super().__init__()
        self.spatial_vae = SpatialVAE(dict(spatial_config or SDXL_VAE_CONFIG))
        self.temporal_vae = TemporalVAE(in_out_channels, latent_embed_dim, embed_dim, filters, num_res_blocks,
                                        channel_multipliers, temporal_downsample, num_groups)
        self.register_buffer("scale", torch.tensor(latent_scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(latent_shift, dtype=torch.float32).view(1, -1, 1, 1, 1))

    @property
    def spatial_scale_factor(self) -> int:
        return 2 ** (len(self.spatial_vae.module.config.block_out_channels) - 1)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for a pixel frame count: 5 per full 17-frame chunk, ceil(r / 4) for a remainder r."""
        size = self.config.micro_frame_size
        full, rest = divmod(num_frames, size)
        return full * self.temporal_vae.latent_frames(size) + (self.temporal_vae.latent_frames(rest) if rest else 0)

    # ---- spatial part, frame by frame

    def _frames(self, x: torch.Tensor, fn) -> torch.Tensor:
        batch, frames = x.shape[0], x.shape[2]
        flat = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
        step = self.config.micro_batch_size or flat.shape[0]
        out = torch.cat([fn(flat[i: i + step]) for i in range(0, flat.shape[0], step)])
        return out.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (posterior means unless `sample`)."""
        factor = self.config.scaling_factor

        def spatial(frames: torch.Tensor) -> torch.Tensor:
            dist = self.spatial_vae.module.encode(frames).latent_dist
            return (dist.sample(generator) if sample else dist.mode()) * factor

        x_z = self._frames(video, spatial)
        size = self.config.micro_frame_size
        chunks = [self.temporal_vae.encode(x_z[:, :, i: i + size], sample, generator) for i in range(0, x_z.shape[2], size)]
        z = torch.cat(chunks, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents -> (B, 3, num_frames, 8 h, 8 w) in about [-1, 1]."""
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        size = self.config.micro_frame_size
        step = self.temporal_vae.latent_frames(size)
        chunks, left = [], num_frames
        for i in range(0, z.shape[2], step):
            chunks.append(self.temporal_vae.decode(z[:, :, i: i + step], num_frames=min(size, left)))
            left -= size
        x_z = torch.cat(chunks, dim=2)
        factor = self.config.scaling_factor
        return self._frames(x_z, lambda f: self.spatial_vae.module.decode(f / factor).sample)

    # ---- the official folder layout (config.json of model_type VideoAutoencoderPipeline + model.safetensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a folder laid out like `hpcai-tech/OpenSora-VAE-v1.2` strictly (one-line OpenSoraLoadError)."""
        def load_weights(model, path):
            state = modern_attention_keys(read_safetensors(path, "Open-Sora VAE"))
            load_strict(model, state, str(path), "OpenSoraVAE", assign=True)

        return load_folder(cls, pretrained_model_name_or_path, kwargs.get("subfolder"), read_official_vae_config,
                           load_weights, torch_dtype)

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """Write the official layout (model_type VideoAutoencoderPipeline with micro_frame_size, shift and scale;
        this class's own sizes under `videocache`) and model.safetensors."""
        if is_main_process:
            cfg = plain_config(self)
            config = {"architectures": [OFFICIAL_VAE_TYPE], "model_type": OFFICIAL_VAE_TYPE,
                      "_class_name": type(self).__name__, "micro_frame_size": cfg["micro_frame_size"],
                      "shift": cfg["latent_shift"], "scale": cfg["latent_scale"], "videocache": cfg}
            write_official(self, save_directory, config)


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def modern_attention_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The AutoencoderKL mid-block attention under diffusers' current names (to_q, to_k, to_v, to_out.0):
    checkpoints saved by older diffusers versions name them query, key, value, proj_attn (a no-op otherwise)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv weights of the oldest layout
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def read_official_vae_config(folder: Path) -> dict[str, Any]:
    """OpenSoraVAE kwargs from a VideoAutoencoderPipeline config.json: the sizes this class wrote under
    `videocache`, else the released architecture (SDXL VAE + VAE_Temporal_SD) with the file's
    micro_frame_size / shift / scale."""
    raw = read_config_json(folder, OFFICIAL_VAE_TYPE, "VAE")
    if isinstance(raw.get("videocache"), dict):
        return dict(raw["videocache"])
    config: dict[str, Any] = {}
    if raw.get("micro_frame_size"):
        config["micro_frame_size"] = int(raw["micro_frame_size"])
    for key in ("shift", "scale"):
        if isinstance(raw.get(key), (list, tuple)):
            config[f"latent_{key}"] = tuple(float(v) for v in raw[key])
    return config
