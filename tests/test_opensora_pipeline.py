"""OpenSoraPipeline on a tiny random pipeline (nothing downloads): generation, cache contexts of the CFG
branches, the null caption, save/load through the loader and the CLI, one-line errors for bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from videocache.pipelines.loader import ModelLoadError, generation_defaults, load_pipeline, pipeline_class
from videocache.pipelines.opensora.model import OpenSoraPipeline
from videocache.pipelines.opensora.model.text import (
    MAX_SEQUENCE_LENGTH,
    clean_prompt,
    encode_prompts,
    with_scores,
)
from videocache.pipelines.opensora.model.tiny import tiny_pipeline

SMALL = {"height": 32, "width": 48, "num_frames": 17, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("opensora") / "tiny-opensora"
    pipe.save_pretrained(folder)
    return folder


class Recorder:
    """Wraps transformer.cache_context and forward to record the contexts and the captions of each call."""

    def __init__(self, transformer):
        self.calls = []
        self.context = None
        original_context, original_forward = transformer.cache_context, transformer.forward

        def cache_context(name, **kwargs):
            self.context = (name, kwargs)
            return original_context(name, **kwargs)

        def forward(*args, **kwargs):
            self.calls.append((self.context, kwargs["encoder_hidden_states"].clone(), kwargs["encoder_attention_mask"].clone()))
            return original_forward(*args, **kwargs)

        transformer.cache_context, transformer.forward = cache_context, forward
        self.restore = lambda: (delattr(transformer, "cache_context"), delattr(transformer, "forward"))


def test_generates_frames_with_cfg_contexts(pipe):
    recorder = Recorder(pipe.transformer)
    try:
        out = pipe("a red circle moving left", generator=torch.Generator().manual_seed(0), **SMALL)
    finally:
        recorder.restore()
    assert out.frames.shape == (1, 17, 32, 48, 3) and 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    names = [c[0][0] for c in recorder.calls]
    assert names == ["cond", "uncond", "cond", "uncond"]
    sigmas = pipe.scheduler.sigmas.tolist()
    for i, (context, _, _) in enumerate(recorder.calls):
        assert context[1] == {"step_index": i // 2, "sigma": sigmas[i // 2], "num_inference_steps": 2}
    # uncond: the checkpoint's null caption under the prompt's mask (the reference's CFG)
    (_, y_cond, mask_cond), (_, y_null, mask_null) = recorder.calls[:2]
    assert torch.equal(y_null[0], pipe.transformer.y_embedder.y_embedding)
    assert torch.equal(mask_cond, mask_null) and mask_cond.shape == (1, MAX_SEQUENCE_LENGTH)
    assert int(mask_cond.sum()) == len("a red circle moving left aesthetic score: 6.5.".split()) + 1  # + </s>


def test_no_guidance_runs_one_call_per_step(pipe):
    recorder = Recorder(pipe.transformer)
    try:
        out = pipe("a red circle", guidance_scale=1.0, output_type="latent", **SMALL)
    finally:
        recorder.restore()
    assert [c[0][0] for c in recorder.calls] == ["cond", "cond"]
    assert out.frames.shape == (1, 4, 5, 4, 6)


def test_prompt_processing():
    assert with_scores("a cat") == "a cat aesthetic score: 6.5."
    assert with_scores("a cat", None) == "a cat"
    assert with_scores("a cat", 7) == "a cat aesthetic score: 7.0."
    assert with_scores("a cat aesthetic score: 5.0.") == "a cat aesthetic score: 5.0."
    assert clean_prompt("  A Cat  ", clean_caption=False) == "a cat"
    p = tiny_pipeline(seed=0)
    embeds, mask = encode_prompts(["a red circle", "a blue square moving down"], p.tokenizer, p.text_encoder, "cpu")
    assert embeds.shape == (2, 300, 16) and mask.shape == (2, 300)
    assert mask.sum(1).tolist() == [3 + 3 + 1, 5 + 3 + 1]  # words, "aesthetic score: 6.5.", </s>


def test_save_load_round_trip_through_the_loader(pipe, saved):
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "OpenSoraPipeline"
    assert json.loads((saved / "transformer" / "config.json").read_text())["model_type"] == "STDiT3"
    assert json.loads((saved / "vae" / "config.json").read_text())["model_type"] == "VideoAutoencoderPipeline"
    assert pipeline_class(str(saved)) is OpenSoraPipeline
    defaults = generation_defaults(str(saved))
    assert (defaults.num_frames, defaults.height, defaults.width, defaults.num_inference_steps) == (51, 480, 854, 30)
    loaded = load_pipeline(str(saved), device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, OpenSoraPipeline)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(1), **SMALL).frames
    b = loaded("a red circle", generator=torch.Generator().manual_seed(1), **SMALL).frames
    assert (abs(a - b)).max() == 0.0


def test_hub_assembled_folder_without_videocache_json(saved, tmp_path):
    """A folder put together from the hub repos (tokenizer inside text_encoder/, no scheduler/, no
    videocache.json) loads; its generation defaults come from the class."""
    folder = tmp_path / "assembled"
    shutil.copytree(saved, folder)
    for name in ("scheduler", "videocache.json"):
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for item in (folder / "tokenizer").iterdir():
        shutil.move(str(item), folder / "text_encoder" / item.name)
    (folder / "tokenizer").rmdir()
    assert generation_defaults(str(folder)).num_inference_steps == 30
    loaded = load_pipeline(str(folder), device="cpu")
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("damage", ["no_transformer", "bad_checkpoint", "wrong_vae_type"])
def test_broken_folder_is_a_one_line_error(saved, tmp_path, damage):
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    if damage == "no_transformer":
        shutil.rmtree(folder / "transformer")
        expect = "transformer/config.json is missing"
    elif damage == "bad_checkpoint":
        (folder / "transformer" / "model.safetensors").write_bytes(b"not a checkpoint")
        expect = "not a readable safetensors file"
    else:
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, "model_type": "AutoencoderKL"}))
        expect = "not an Open-Sora 1.2 VAE config"
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(str(folder), device="cpu")
    assert expect in str(info.value) and "\n" not in str(info.value)


def test_cli_generate_and_its_one_line_error(saved, tmp_path, capsys):
    from videocache.cli import main

    out, summary = tmp_path / "v.mp4", tmp_path / "v.json"
    args = ["generate", "--prompt", "a red circle moving left", "--model", str(saved), "--steps", "2", "--frames",
            "17", "--height", "32", "--width", "48", "--out", str(out), "--summary", str(summary), "--no-progress",
            "--device", "cpu"]
    assert main(args) == 0
    data = json.loads(summary.read_text())
    assert (data["frames"], data["height"], data["width"], data["transformer_calls"]) == (17, 32, 48, 4)
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    capsys.readouterr()
    assert main([*args[:4], str(broken), *args[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videocache: error:") and "\n" not in err and "vae/config.json is missing" in err


def test_bad_inputs_are_refused(pipe):
    with pytest.raises(ValueError, match="num_frames must be 1 or at least 17"):
        pipe("x", height=32, width=48, num_frames=9, num_inference_steps=2)


def test_step_callback_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, values):
        seen.append((i, sorted(values)))
        return {"latents": torch.zeros_like(values["latents"])}

    out = pipe("a red circle", output_type="latent", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "velocity"], **SMALL)
    assert seen == [(0, ["latents", "velocity"]), (1, ["latents", "velocity"])]
    assert torch.equal(out.frames, torch.zeros_like(out.frames))


def test_attention_backend_is_used_by_the_model(pipe, monkeypatch):
    """The model's attention goes through diffusers' dispatch: another backend is selected and used (its
    kernel, counted through diffusers' registry, runs every self-attention; native runs none)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from videocache.pipelines.loader import attention_backend_of, set_attention_backend

    calls = {AttentionBackendName.NATIVE: 0, AttentionBackendName._NATIVE_MATH: 0}

    def counting(name, kernel):
        def counted(**kwargs):
            calls[name] += 1
            return kernel(**kwargs)
        return counted

    for name in calls:
        monkeypatch.setitem(_AttentionBackendRegistry._backends, name, counting(name, _AttentionBackendRegistry._backends[name]))
    args = dict(output_type="latent", guidance_scale=1.0, **SMALL)
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).frames
    try:
        set_attention_backend(pipe, "_native_math")
        assert attention_backend_of(pipe) == "_native_math"
        calls.update(dict.fromkeys(calls, 0))  # the selection's probe call is not the model's
        other = pipe("a red circle", generator=torch.Generator().manual_seed(0), **args).frames
        during_the_run = dict(calls)
    finally:
        set_attention_backend(pipe, "native")
    self_attentions = SMALL["num_inference_steps"] * 2 * pipe.transformer.config.depth
    assert during_the_run == {AttentionBackendName.NATIVE: 0, AttentionBackendName._NATIVE_MATH: self_attentions}
    assert (other - base).abs().max() < 1e-4


def test_every_attention_goes_through_diffusers_dispatch(pipe, monkeypatch):
    from videocache.pipelines.opensora.model import transformer as module

    calls = []
    original = module.dispatch_attention_fn
    monkeypatch.setattr(module, "dispatch_attention_fn", lambda *a, **k: calls.append(1) or original(*a, **k))
    pipe("a red circle", output_type="latent", guidance_scale=1.0, **SMALL)
    depth = pipe.transformer.config.depth
    # the self-attention of each of the 2 * depth blocks; the masked cross-attention runs torch SDPA
    assert len(calls) == SMALL["num_inference_steps"] * (2 * depth)


def test_masked_cross_attention_does_not_need_a_mask_capable_backend():
    """flash-attn / SageAttention refuse masks: the masked cross-attention does not go through them."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from videocache.pipelines.opensora.model.transformer import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(32, 2)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = attn(x, ctx, mask)
    previous = _AttentionBackendRegistry._active_backend
    try:
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.FLASH)
        got = attn(x, ctx, mask)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    assert torch.equal(got, want)
    alone = attn(x[:1, :, :], ctx[:1, :3], None)  # the first sample's 3 valid tokens, no mask
    assert torch.allclose(want[:1], alone, atol=1e-6)


def test_reference_rounding_passes_rounded_sizes():
    """With reference_rounding the model sees the pixel size as a bf16 model's reference would: 854 -> 856."""
    pipe = tiny_pipeline(seed=0)  # its own: the transformer is cast to bf16 here
    seen = []
    original = pipe.transformer.forward

    def forward(*args, **kwargs):
        seen.append((kwargs["height"], kwargs["width"]))
        return original(*args, **kwargs)

    pipe.transformer.forward = forward
    args = dict(height=32, width=854, num_frames=17, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    pipe("x", **args)
    pipe.transformer.to(torch.bfloat16)
    pipe("x", reference_rounding=True, **args)
    assert seen == [(32, 854), (32.0, 856.0)]
