"""LoRA weights (`--lora PATH [--lora-scale S]`): loaded through diffusers' own LoRA loader, fused at the scale,
recorded on the pipeline and in the profiles calibrated on it; a profile of other weights warns in one line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from diffusers import WanPipeline
from peft.utils import get_peft_model_state_dict

import videocache
from videocache.cli import main as cli_main
from videocache.eval_vbench.comparison.run_store import RunSettings
from videocache.pipelines.loader import load_pipeline
from videocache.pipelines.lora import WEIGHT_NAME, LoraError, LoraSpec, load_lora, lora_spec
from videocache.pipelines.reference.build import build_transformer
from videocache.pipelines.reference.training.transformer import LORA_TARGETS, add_lora
from videocache.weights import LORA_ATTR, loaded_lora

from .conftest import requires_reference

pytestmark = requires_reference


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A rank-4 LoRA of reference-wan's transformer with random (non-zero) weights, saved as diffusers saves one."""
    transformer = build_transformer()
    add_lora(transformer, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    out = tmp_path_factory.mktemp("lora")
    WanPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


def velocity(pipe) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(1, 16, 5, 16, 16)
    text = torch.randn(1, 8, 64)
    with torch.no_grad():
        return pipe.transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]


def test_fused_lora_equals_diffusers_unfused_adapter_and_leaves_a_plain_model(lora_dir):
    base = load_pipeline("reference-wan", device="cpu")
    v_base = velocity(base)
    base.load_lora_weights(str(lora_dir), adapter_name="check")
    base.set_adapters(["check"], [0.7])
    v_adapter = velocity(base)
    fused = load_pipeline("reference-wan", device="cpu", lora=LoraSpec(str(lora_dir), 0.7))
    v_fused = velocity(fused)
    assert (v_adapter - v_base).abs().max() > 1e-2  # the LoRA changes what the model computes
    torch.testing.assert_close(v_fused, v_adapter, atol=2e-5, rtol=1e-4)
    assert type(fused.transformer.blocks[0].attn1.to_q) is torch.nn.Linear  # no peft layer left
    assert loaded_lora(fused) == {"name": lora_dir.name, "sha256": LoraSpec(str(lora_dir)).record()["sha256"],
                                  "scale": 0.7}
    assert loaded_lora(base) == {"adapters": ["check"]}  # an unfused diffusers adapter is seen too


def test_scale_zero_is_the_base_model_bit_for_bit(lora_dir):
    base = velocity(load_pipeline("reference-wan", device="cpu"))
    assert torch.equal(velocity(load_pipeline("reference-wan", device="cpu", lora=LoraSpec(str(lora_dir), 0.0))), base)


def test_every_adapted_module_is_one_of_the_training_targets(lora_dir):
    from safetensors.torch import load_file

    keys = load_file(lora_dir / WEIGHT_NAME)
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert len(modules) == 8 * 10  # 8 blocks: 4 projections in each of the 2 attentions, the MLP's 2 layers
    assert all(m.startswith("transformer.blocks.") and m.endswith(LORA_TARGETS) for m in modules)


def test_bad_lora_input_is_a_one_line_error(tmp_path, lora_dir):
    with pytest.raises(LoraError, match="no such file or folder"):  # (and the shipped LoRAs' names)
        LoraSpec(str(tmp_path / "missing"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(LoraError, match="not a .safetensors file"):
        LoraSpec(str(tmp_path / "w.bin"))
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(LoraError, match="holds 2 .safetensors files"):
        LoraSpec(str(tmp_path))
    with pytest.raises(LoraError, match="--lora-scale goes with --lora"):
        lora_spec(None, 0.5)
    with pytest.raises(LoraError, match="finite"):
        lora_spec(str(lora_dir), float("nan"))
    assert lora_spec(str(lora_dir), None).scale == 1.0


def test_a_lora_the_pipeline_cannot_take_is_refused_in_one_line(lora_dir):
    wan22 = load_pipeline("reference-wan22", device="cpu")
    with pytest.raises(LoraError, match="two experts"):
        load_lora(wan22, LoraSpec(str(lora_dir)))
    opensora = load_pipeline("reference-opensora", device="cpu")
    with pytest.raises(LoraError, match="no diffusers LoRA loader"):
        load_lora(opensora, LoraSpec(str(lora_dir)))
    hunyuan = load_pipeline("reference-hunyuan", device="cpu")
    with pytest.raises(LoraError, match="could not load it .*not found in the base model; a LoRA of another model"):
        load_lora(hunyuan, LoraSpec(str(lora_dir)))
    assert not getattr(hunyuan.transformer, "_hf_peft_config_loaded", False) or not hunyuan.transformer.active_adapters()
    assert getattr(hunyuan, LORA_ATTR, None) is None


def _apply_warnings(pipe, profile) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        videocache.apply(pipe, profile, preset="balanced")
    videocache.remove(pipe)
    return [str(w.message) for w in caught if "calibrated on" in str(w.message)]


def test_a_profile_of_other_weights_warns_once_and_one_of_the_same_does_not(lora_dir):
    pipe = load_pipeline("reference-wan", device="cpu", lora=LoraSpec(str(lora_dir), 0.5))
    base_profile = videocache.load_profile("reference-wan")
    (message,) = _apply_warnings(pipe, base_profile)
    assert message.startswith("videocache: profile reference-wan was calibrated on the base weights; this pipeline "
                              f"runs LoRA {lora_dir.name} at scale 0.5")
    assert "\n" not in message
    same = base_profile.__class__.from_dict({**base_profile.to_dict(), "metadata": {"lora": loaded_lora(pipe)}})
    assert _apply_warnings(pipe, same) == []
    other_scale = base_profile.__class__.from_dict(
        {**base_profile.to_dict(), "metadata": {"lora": {**loaded_lora(pipe), "scale": 1.0}}})
    assert len(_apply_warnings(pipe, other_scale)) == 1
    plain = load_pipeline("reference-wan", device="cpu")
    (message,) = _apply_warnings(plain, same)
    assert "this pipeline runs the base weights" in message


def test_cli_generate_with_lora_and_a_base_profile_warns_in_one_line(tmp_path, lora_dir, capsys):
    summary = tmp_path / "s.json"
    code = cli_main(["generate", "--prompt", "a red circle moving left on a black background", "--steps", "10",
                     "--lora", str(lora_dir), "--profile", "reference-wan", "--out", str(tmp_path / "v.mp4"),
                     "--summary", str(summary), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    warned = [line for line in err.splitlines() if line.startswith("videocache: warning: profile reference-wan")]
    assert len(warned) == 1 and f"LoRA {lora_dir.name} at scale 1" in warned[0]
    assert json.loads(summary.read_text())["lora"]["name"] == lora_dir.name
    assert cli_main(["generate", "--prompt", "x", "--lora", str(tmp_path / "nope")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"videocache: error: --lora {tmp_path / 'nope'}: no such file or folder")


def test_quick_profile_with_a_lora_records_it_and_applies_to_it_silently(tmp_path, lora_dir, capsys):
    out = tmp_path / "my.yaml"
    code = cli_main(["profile", "--model", "reference-wan", "--lora", str(lora_dir), "--lora-scale", "0.8", "--quick",
                     "--max-generations", "14", "--budget", "0.5", "--steps", "8", "--out", str(out), "--no-progress",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning" not in err
    meta = yaml.safe_load(out.read_text())["metadata"]
    assert meta["lora"] == {"name": lora_dir.name, "sha256": LoraSpec(str(lora_dir)).record()["sha256"], "scale": 0.8}
    pipe = load_pipeline("reference-wan", device="cpu", lora=LoraSpec(str(lora_dir), 0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        videocache.apply(pipe, str(out))
    # --add-to on other weights than the profile's would mix two models' tables
    code = cli_main(["profile", "--model", "reference-wan", "--add-to", str(out), "--guidance-scale", "3",
                     "--out", str(tmp_path / "x.yaml"), "--device", "cpu"])
    assert code == 2
    assert "calibrated on LoRA" in capsys.readouterr().err


def test_comparisons_without_a_lora_resume_as_before():
    settings = RunSettings(model="reference-wan", steps=25, frames=17, height=64, width=64, guidance_scale=5.0)
    assert "lora" not in settings.comparable() and "lora_scale" not in settings.comparable()
    with_lora = RunSettings(model="reference-wan", steps=25, frames=17, height=64, width=64, guidance_scale=5.0,
                            lora="x", lora_scale=0.5)
    assert with_lora.comparable()["lora"] == "x" and with_lora.comparable()["lora_scale"] == 0.5


def test_the_shipped_lora_is_small_loads_with_diffusers_alone_and_moves_the_shapes_diagonally():
    from videocache.pipelines.generation import generate
    from videocache.pipelines.loader import REFERENCE_DIR
    from videocache.pipelines.reference.checker import check_video
    from videocache.pipelines.reference.data import motion_vector, split_captions

    spec = LoraSpec("reference-wan-diagonal")  # found by name among the shipped LoRAs
    assert spec.file.stat().st_size <= 2 * 2**20
    pipe = WanPipeline.from_pretrained(REFERENCE_DIR)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(spec.file.parent))  # plain diffusers, no videocache in between

    def motions() -> list[tuple[bool, bool]]:
        out = []
        for i, caption in enumerate(split_captions()[1][:3]):
            frames = generate(pipe, caption.text, seed=i, num_inference_steps=25, num_frames=17, height=64, width=64,
                              guidance_scale=5.0, progress=False).frames
            result = check_video(frames)
            out.append((result.moves_along(motion_vector(caption.direction, "diagonal")),
                        result.moves_along(motion_vector(caption.direction, "straight"))))
        return out

    assert motions() == [(True, False)] * 3  # every held-out shape turned 45 degrees
    pipe.unload_lora_weights()
    assert motions() == [(False, True)] * 3  # the base moves them as prompted


def test_compare_runs_every_method_on_the_lora_model(tmp_path, lora_dir):
    """`videocache compare --lora`: the workers fuse the LoRA before any method runs; the report records it."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left on a black background\n")
    code = cli_main(["compare", "--lora", str(lora_dir), "--lora-scale", "0.5", "--prompts", str(prompts),
                     "--methods", "videocache:reference-wan:full", "--steps", "10", "--out", str(tmp_path / "cmp"),
                     "--no-progress", "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert (report["settings"]["lora"], report["settings"]["lora_scale"]) == (str(lora_dir), 0.5)
    (full,) = [m for m in report["methods"] if m["method"] == "videocache:reference-wan:full"]
    assert float(full["psnr"]) == float("inf")  # computes everything: bit-identical to the LoRA model's own video
    logs = "".join(f.read_text() for f in (tmp_path / "cmp" / "logs").glob("*.log"))
    assert f"this pipeline runs LoRA {lora_dir.name} at scale 0.5" in logs  # the worker's model has it fused
