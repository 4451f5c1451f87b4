"""Open-Sora 1.2 VAE (key layout, sizes, causal temporal decoding, strict loading) and the rectified-flow
schedule through FlowMatchEulerDiscreteScheduler against the official formulas (OPENSORA.md 1.6, 1.8)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from videocache.pipelines.opensora.model import OpenSoraLoadError, OpenSoraVAE
from videocache.pipelines.opensora.model.schedule import (
    base_sigmas,
    default_scheduler,
    set_opensora_timesteps,
    shift_ratio,
)
from videocache.pipelines.opensora.model.tiny import TINY_VAE
from videocache.pipelines.opensora.model.vae import read_official_vae_config


def official_temporal_keys(filters=128, blocks=4, mult=(1, 2, 2, 4), down=(False, True, True), c=4, z=4):
    """VAE_Temporal_SD's checkpoint keys (prefix temporal_vae.), written out from the official structure."""
    keys = {}

    def conv(name, cin, cout, k, bias=True):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k, k)
        if bias:
            keys[f"{name}.conv.bias"] = (cout,)

    def res(name, cin, cout):
        keys[f"{name}.norm1.weight"] = keys[f"{name}.norm1.bias"] = (cin,)
        conv(f"{name}.conv1", cin, cout, 3, bias=False)
        keys[f"{name}.norm2.weight"] = keys[f"{name}.norm2.bias"] = (cout,)
        conv(f"{name}.conv2", cout, cout, 3, bias=False)
        if cin != cout:
            conv(f"{name}.conv3", cin, cout, 1, bias=False)

    e = "temporal_vae.encoder"
    conv(f"{e}.conv_in", c, filters, 3, bias=False)
    prev = filters
    for i, m in enumerate(mult):
        for j in range(blocks):
            res(f"{e}.block_res_blocks.{i}.{j}", prev, filters * m)
            prev = filters * m
        if i < len(mult) - 1 and down[i]:
            conv(f"{e}.conv_blocks.{i}", prev, prev, 3)
    for j in range(blocks):
        res(f"{e}.res_blocks.{j}", prev, prev)
    keys[f"{e}.norm1.weight"] = keys[f"{e}.norm1.bias"] = (prev,)
    conv(f"{e}.conv2", prev, 2 * z, 1)
    conv("temporal_vae.quant_conv", 2 * z, 2 * z, 1)
    conv("temporal_vae.post_quant_conv", z, z, 1)
    d = "temporal_vae.decoder"
    top = filters * mult[-1]
    conv(f"{d}.conv1", z, top, 3)
    for j in range(blocks):
        res(f"{d}.res_blocks.{j}", top, top)
    prev = top
    for i in reversed(range(len(mult))):
        for j in range(blocks):
            res(f"{d}.block_res_blocks.{i}.{j}", prev, filters * mult[i])
            prev = filters * mult[i]
        if i > 0 and down[i - 1]:
            conv(f"{d}.conv_blocks.{i - 1}", prev, 2 * prev, 3)
    keys[f"{d}.norm1.weight"] = keys[f"{d}.norm1.bias"] = (prev,)
    conv(f"{d}.conv_out", prev, c, 3)
    return keys


def test_real_vae_layout_on_meta():
    with torch.device("meta"):
        vae = OpenSoraVAE(**read_official_vae_config_from({"micro_frame_size": 17}))
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    temporal = {k: v for k, v in shapes.items() if k.startswith("temporal_vae.")}
    assert temporal == official_temporal_keys()
    assert shapes["scale"] == shapes["shift"] == (1, 4, 1, 1, 1)
    assert all(k.startswith(("spatial_vae.module.", "temporal_vae.")) or k in ("scale", "shift") for k in shapes)
    assert shapes["spatial_vae.module.decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert sum(p.numel() for p in vae.spatial_vae.parameters()) == 83_653_863  # the SDXL VAE
    assert sum(p.numel() for p in vae.temporal_vae.parameters()) == 309_687_144
    assert len(shapes) == 517


def read_official_vae_config_from(raw, tmp=None):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps({"model_type": "VideoAutoencoderPipeline", **raw}))
    return read_official_vae_config(folder)


def test_hub_vae_config_maps_to_the_released_architecture():
    raw = {"architectures": ["VideoAutoencoderPipeline"], "micro_frame_size": 17,
           "shift": [-0.1, 0.34, 0.27, 0.98], "scale": [3.85, 2.32, 2.33, 3.06],
           "vae_2d": {"type": "VideoAutoencoderKL", "micro_batch_size": 4}, "vae_temporal": {"type": "VAE_Temporal_SD"}}
    config = read_official_vae_config_from(raw)
    assert config == {"micro_frame_size": 17, "latent_shift": (-0.1, 0.34, 0.27, 0.98),
                      "latent_scale": (3.85, 2.32, 2.33, 3.06)}


def test_latent_frame_counts():
    vae = OpenSoraVAE(**TINY_VAE)
    got = {f: vae.latent_frames(f) for f in (1, 17, 34, 51, 68, 102, 21)}
    assert got == {1: 1, 17: 5, 34: 10, 51: 15, 68: 20, 102: 30, 21: 6}


def test_tiny_vae_round_trip_and_causal_decoding(tmp_path):
    torch.manual_seed(0)
    vae = OpenSoraVAE(**TINY_VAE).eval()
    video = torch.rand(1, 3, 21, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, 4, 6, 2, 2)
        out = vae.decode(z, num_frames=21)
        assert out.shape == (1, 3, 21, 16, 16)
        # 17-frame chunks (5 latent frames) are decoded apart
        z2 = z.clone()
        z2[:, :, 4] += 1.0
        out2 = vae.decode(z2, num_frames=21)
        assert not torch.equal(out[:, :, :17], out2[:, :, :17]) and torch.equal(out[:, :, 17:], out2[:, :, 17:])
    vae.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "VideoAutoencoderPipeline" and config["micro_frame_size"] == 17
    again = OpenSoraVAE.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again.decode(z, num_frames=21), out)


def test_causal_conv_pads_time_on_the_left_only():
    from videocache.pipelines.opensora.model.vae import CausalConv3d

    torch.manual_seed(0)
    for stride in (1, 2):
        conv = CausalConv3d(2, 3, 3, stride_t=stride)
        x = torch.randn(1, 2, 8, 5, 5)
        y = conv(x)
        assert y.shape == (1, 3, 8 // stride, 5, 5)
        x2 = x.clone()
        x2[:, :, 5:] += 1.0  # frames from 5 on reach outputs at times >= 5 only
        y2 = conv(x2)
        first = 5 // stride if stride == 1 else 2  # stride 2: output j sees inputs 2j - 1 .. 2j + 1
        assert torch.equal(y[:, :, :first], y2[:, :, :first]) and not torch.equal(y[:, :, first:], y2[:, :, first:])


def test_decode_applies_scale_and_shift_first():
    vae = OpenSoraVAE(**TINY_VAE).eval()
    seen = {}

    def fake_decode(z, num_frames):
        seen["z"] = z
        return torch.zeros(1, 4, num_frames, 1, 1)

    vae.temporal_vae.decode = fake_decode
    vae.decode(torch.zeros(1, 4, 5, 1, 1), num_frames=17)
    want = torch.tensor([-0.10, 0.34, 0.27, 0.98]).view(1, 4, 1, 1, 1).expand(1, 4, 5, 1, 1)
    assert torch.allclose(seen["z"], want)


def test_wrong_vae_checkpoint_is_a_one_line_error(tmp_path):
    vae = OpenSoraVAE(**TINY_VAE)
    vae.save_pretrained(tmp_path)
    state = {k: v for k, v in vae.state_dict().items() if k != "temporal_vae.decoder.conv_out.conv.bias"}
    state["temporal_vae.decoder.conv1.conv.weight"] = torch.zeros(1, 4, 3, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(OpenSoraLoadError) as info:
        OpenSoraVAE.from_pretrained(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "1 missing (e.g. temporal_vae.decoder.conv_out.conv.bias)" in message
    assert "temporal_vae.decoder.conv1.conv.weight: checkpoint [1, 4, 3, 3, 3]" in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "STDiT3"}))
    with pytest.raises(OpenSoraLoadError, match="not an Open-Sora 1.2 VAE config"):
        OpenSoraVAE.from_pretrained(tmp_path)


# ---- schedule


@pytest.mark.parametrize("size, frames, ratio", [
    ((240, 426), 51, 2.419), ((360, 640), 51, 3.631), ((480, 854), 51, 4.843), ((480, 854), 102, 6.849),
    ((720, 1280), 51, 7.262), ((720, 1280), 102, 10.270), ((480, 854), 1, 1.2503),
])
def test_shift_ratio_matches_the_official_examples(size, frames, ratio):
    assert shift_ratio(*size, frames) == pytest.approx(ratio, abs=1e-3)



def test_shift_is_relative_to_the_models_base_size():
    """A model whose position-embedding base is 64 pixels (the reference) gets at 64x64 the shift the
    released model (base 512) gets at 512x512; the pipeline reads the base from the transformer."""
    from videocache.pipelines.opensora.model.tiny import tiny_pipeline

    assert shift_ratio(64, 64, 17, base_size=64) == pytest.approx(shift_ratio(512, 512, 17))
    pipe = tiny_pipeline()
    for base in (512, 64):
        pipe.transformer.register_to_config(input_sq_size=base)
        pipe("a red circle", height=64, width=64, num_frames=17, num_inference_steps=1, output_type="latent")
        assert pipe.scheduler.shift == pytest.approx(shift_ratio(64, 64, 17, base_size=base))

def official_schedule(steps, height, width, frames):
    """The reference's RFLOW timesteps, from its formulas (num_timesteps 1000, timestep transform on)."""
    space = (height * width / 512**2) ** 0.5
    time = 1.0 if frames == 1 else ((frames // 17) * 5) ** 0.5
    ratio = space * time
    base = [(1 - i / steps) * 1000 for i in range(steps)]
    return [1000 * ratio * (t / 1000) / (1 + (ratio - 1) * (t / 1000)) for t in base]


@pytest.mark.parametrize("steps, size, frames", [(30, (480, 854), 51), (30, (240, 426), 51), (50, (720, 1280), 102),
                                                 (10, (480, 854), 1)])
def test_scheduler_timesteps_match_the_official_formula(steps, size, frames):
    scheduler = default_scheduler()
    set_opensora_timesteps(scheduler, steps, *size, frames)
    want = official_schedule(steps, *size, frames)
    assert scheduler.timesteps.tolist() == pytest.approx(want, abs=1e-3)
    assert scheduler.sigmas[-1].item() == 0.0 and len(scheduler.sigmas) == steps + 1


def test_480p_51_frames_schedule_values():
    scheduler = default_scheduler()
    set_opensora_timesteps(scheduler, 30, 480, 854, 51)
    ints = [int(t) for t in scheduler.timesteps.tolist()]
    assert ints == [1000, 992, 985, 977, 969, 960, 950, 940, 930, 918, 906, 893, 879, 863, 846, 828, 809, 787, 763,
                    737, 707, 674, 637, 595, 547, 492, 426, 349, 257, 143]  # OPENSORA.md 1.8


def test_euler_steps_match_the_official_update():
    """scheduler.step(-v) == z + v (t_i - t_{i+1}) / 1000, the last step to 0."""
    scheduler = default_scheduler()
    set_opensora_timesteps(scheduler, 6, 480, 854, 51)
    official = official_schedule(6, 480, 854, 51) + [0.0]
    gen = torch.Generator().manual_seed(0)
    z_ours = z_ref = torch.randn(1, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(z_ours.shape, generator=gen, dtype=torch.float64)
        z_ours = scheduler.step(-v, t, z_ours, return_dict=False)[0]
        z_ref = z_ref + v * (official[i] - official[i + 1]) / 1000
    assert torch.allclose(z_ours, z_ref, atol=1e-5)


def test_frames_below_one_chunk_are_refused():
    with pytest.raises(ValueError, match="num_frames=16"):
        set_opensora_timesteps(default_scheduler(), 30, 480, 854, 16)
    assert base_sigmas(3) == pytest.approx([1.0, 2 / 3, 1 / 3])


def test_temporal_vae_matches_the_official_outputs():
    """Open-Sora v1.2.0's own VAE_Temporal (filters 8, 2 res blocks, 4 groups) on these weights and inputs
    (tests/data/opensora_official_outputs.safetensors): bit-identical encode means and decodes."""
    from safetensors.torch import load_file

    from videocache.pipelines.opensora.model.vae import TemporalVAE

    from tests.test_opensora_model import OFFICIAL_OUTPUTS, seeded_state

    data = load_file(str(OFFICIAL_OUTPUTS))
    vae = TemporalVAE(filters=8, num_res_blocks=2, num_groups=4).eval()
    vae.load_state_dict(seeded_state(vae, 2), strict=True)
    with torch.no_grad():
        assert torch.allclose(vae.decode(data["vae.z"], num_frames=17), data["vae.decode17"], atol=1e-5)
        assert torch.allclose(vae.decode(data["vae.z"][:, :, :3], num_frames=9), data["vae.decode9"], atol=1e-5)
        assert torch.allclose(vae.encode(data["vae.x"]), data["vae.encode"], atol=1e-5)


def test_legacy_attention_names_load(tmp_path):
    """A VAE checkpoint saved by an older diffusers (query/key/value/proj_attn) loads under today's names."""
    vae = OpenSoraVAE(**TINY_VAE)
    vae.save_pretrained(tmp_path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in vae.state_dict().items():
        for new, old in legacy.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value.contiguous()
    assert any(".query." in k for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    again = OpenSoraVAE.from_pretrained(tmp_path)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_reference_rounding_of_the_ratio():
    """The reference computes the ratio on bf16 tensors: 4.84375 at 480p / 51 frames (OPENSORA.md 1.9)."""
    assert shift_ratio(480, 854, 51, torch.bfloat16) == 4.84375
    assert shift_ratio(480, 854, 51, torch.float32) == pytest.approx(4.8431, abs=1e-4)
    scheduler = default_scheduler()
    assert set_opensora_timesteps(scheduler, 30, 480, 854, 51, ratio_dtype=torch.bfloat16) == 4.84375
    assert [int(t) for t in scheduler.timesteps.tolist()][:4] == [1000, 992, 985, 977]
