"""Image-to-video through diffusers' WanImageToVideoPipeline, on tiny random configurations of the real classes:
Wan2.1 I2V (CLIP image tokens in the cross-attention), Wan2.2 I2V A14B (the image latent concatenated in
channels, two experts) and Wan2.2 TI2V-5B (`expand_timesteps`: a timestep per token, so per-token modulation;
the Wan2.2 VAE with 48 latent channels), the last also as text-to-video through WanPipeline. The I2V pipeline
opens its cache contexts with a name only, so the engine takes each step from the scheduler. A full-compute table and `remove` are bit-identical to uncached, a caching table computes
fewer components, and the CFG branches keep their own state."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import videocache as vc
from videocache.table import Action, CacheTable

STEPS = 10


def _pipeline(kind: str, num_layers: int = 4):
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from videocache.pipelines.reference import build

    base = build.build_pipeline(seed=0)
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    # 16 noise channels + 4 of the first-frame mask + 16 of the image latent; TI2V: the 48 of the Wan2.2 VAE
    config.update(in_channels=36, num_layers=num_layers)
    vae, components = base.vae, {}
    torch.manual_seed(0)
    if kind == "wan2.1-i2v":
        config.update(image_dim=32, added_kv_proj_dim=config["num_attention_heads"] * config["attention_head_dim"])
        components.update(
            image_encoder=CLIPVisionModel(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, intermediate_size=37,
                                                           patch_size=8)),
            image_processor=CLIPImageProcessor(crop_size=32, size=32))
    elif kind.startswith("wan2.2-ti2v"):
        config.update(in_channels=48, out_channels=48)
        vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
        components["expand_timesteps"] = True
    transformers = [WanTransformer3DModel(**config) for _ in range(2 if kind == "wan2.2-i2v-a14b" else 1)]
    if len(transformers) == 2:
        components.update(transformer_2=transformers[1], boundary_ratio=0.9)
    cls = WanPipeline if kind == "wan2.2-ti2v-5b-t2v" else WanImageToVideoPipeline
    pipe = cls(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae, scheduler=base.scheduler,
               transformer=transformers[0], **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    size = 64 if pipe.vae.config.z_dim == 48 else 32  # the Wan2.2 VAE compresses 16x
    image = {} if "image" not in inspect.signature(pipe.__call__).parameters else {
        "image": Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype(np.uint8))}
    return pipe(prompt="a red circle moving right", num_inference_steps=STEPS, num_frames=9, height=size, width=size,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np", **image).frames[0]


def _caching_table(num_blocks: int) -> CacheTable:
    actions = np.zeros((STEPS, num_blocks, 3), dtype=np.int8)
    actions[[2, 4, 6, 8]] = Action.REUSE
    actions[[5, 9]] = Action.FORECAST
    return CacheTable(actions)


@pytest.mark.parametrize("kind", ["wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "wan2.2-ti2v-5b-t2v"])
def test_image_to_video_is_cached_with_steps_from_the_scheduler(kind):
    pipe = _pipeline(kind)
    experts = kind == "wan2.2-i2v-a14b"
    names = ["transformer", "transformer_2"] if experts else ["transformer"]
    blocks = len(pipe.transformer.blocks)
    reference = _run(pipe)

    full = {n: CacheTable.full_compute(STEPS, blocks) for n in names}
    vc.apply(pipe, table=full if experts else full["transformer"])
    assert np.array_equal(_run(pipe), reference)
    vc.remove(pipe)

    tables = {n: _caching_table(blocks) for n in names}
    engine = vc.apply(pipe, table=tables if experts else tables["transformer"])
    cached = _run(pipe)
    stats = engine.stats()
    parts = stats["experts"] if experts else {"transformer": stats}
    for part in parts.values():
        assert part["fallbacks"] == 0 and part["calls"]["compute"] < part["calls"]["transformer"] * blocks * 3
    trace = engine.trace()
    assert {r["context"] for r in trace} == {"cond", "uncond"}  # the CFG branches, each its own state
    steps = sorted({r["step"] for r in trace})
    assert steps == list(range(STEPS))  # every step located from the scheduler (no step_index in the context)
    if experts:  # Wan2.2 I2V's boundary 0.9: the high-noise expert runs the first steps, then the other
        by_expert = {n: sorted({r["step"] for r in trace if r["expert"] == n}) for n in names}
        assert by_expert["transformer"] == list(range(len(by_expert["transformer"])))
        assert by_expert["transformer"] + by_expert["transformer_2"] == list(range(STEPS))
    assert not np.array_equal(cached, reference)
    vc.remove(pipe)
    assert np.array_equal(_run(pipe), reference)


def test_generate_takes_an_image_for_an_image_to_video_model_and_caches_both_experts(tmp_path):
    """`videocache generate --image` on a Wan2.2 I2V A14B layout (two experts, the image latent in channels) saved
    as a diffusers folder, with a profile holding a table per expert; a text-only model is a one-line error."""
    import json

    from videocache.cli import main

    pipe = _pipeline("wan2.2-i2v-a14b", num_layers=8)  # reference-wan's block count: its profile fits each expert
    folder = tmp_path / "i2v"
    pipe.save_pretrained(folder)
    profile = vc.load_profile("reference-wan")
    vc.ExpertsProfile.of("i2v", {"transformer": profile, "transformer_2": profile}, 0.9).save(tmp_path / "i2v.yaml")
    image = tmp_path / "first.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)).save(image)
    common = ["--prompt", "a red circle moving right", "--steps", "10", "--frames", "9", "--height", "32", "--width",
              "32", "--guidance-scale", "5", "--no-progress"]
    summary = tmp_path / "s.json"
    assert main(["generate", "--model", str(folder), "--image", str(image), "--profile", str(tmp_path / "i2v.yaml"),
                 "--preset", "fast", "--out", str(tmp_path / "v.mp4"), "--summary", str(summary), *common]) == 0
    by_expert = json.loads(summary.read_text())["computed_fraction_by_expert"]
    assert set(by_expert) == {"transformer", "transformer_2"} and all(0 < f < 1 for f in by_expert.values())
    assert main(["generate", "--image", str(image), "--out", str(tmp_path / "t.mp4"), *common]) == 2
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "none.png"), *common]) == 2


def test_profile_calibrates_an_image_to_video_model_from_a_first_frame(tmp_path):
    """`videocache profile --image` on the Wan2.2 I2V A14B layout: every calibration run starts from the given first
    frame, and the result is a profile with a table per expert; without --image it is a one-line error."""
    from videocache.cli import main

    pipe = _pipeline("wan2.2-i2v-a14b")
    folder = tmp_path / "i2v"
    pipe.save_pretrained(folder)
    image = tmp_path / "first.png"
    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)).save(image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a black background\n")
    out = tmp_path / "i2v.yaml"
    argv = ["profile", "--model", str(folder), "--prompts", str(prompts), "--budget", "0.6", "--steps", "8",
            "--frames", "5", "--height", "32", "--width", "32", "--guidance-scale", "5", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 2 and not out.exists()  # no --image
    assert main([*argv, "--image", str(image)]) == 0
    profile = vc.load_profile(out)
    assert isinstance(profile, vc.ExpertsProfile) and profile.boundary_ratio == 0.9
    assert profile.metadata["settings"]["image"] == str(image)


def test_compare_gives_each_prompt_its_first_frame(tmp_path):
    """`videocache compare --images DIR` on the Wan2.2 I2V A14B layout: each prompt's run starts from its own first
    frame (p000.png, ...), the cache and a peer run on both experts; a missing frame is a one-line error."""
    import json

    from videocache.cli import main

    pipe = _pipeline("wan2.2-i2v-a14b", num_layers=8)
    folder = tmp_path / "i2v"
    pipe.save_pretrained(folder)
    profile = vc.load_profile("reference-wan")
    vc.ExpertsProfile.of("i2v", {"transformer": profile, "transformer_2": profile}, 0.9).save(tmp_path / "i2v.yaml")
    images = tmp_path / "frames"
    images.mkdir()
    for i in range(2):
        Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype(np.uint8)).save(images / f"p{i:03d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a black background\na blue square moving up on a white background\n")
    argv = ["compare", "--model", str(folder), "--prompts", str(prompts), "--images", str(images), "--steps", "10",
            "--frames", "9", "--height", "32", "--width", "32", "--no-progress",
            "--methods", f"videocache:{tmp_path / 'i2v.yaml'}:fast", "diffusers:fbcache:0.2"]
    assert main([*argv, "--out", str(tmp_path / "cmp")]) == 0
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    fractions = {m["method"]: m["computed_fraction"] for m in report["methods"]}
    assert fractions["none"] == 1.0 and all(0 < f < 1 for k, f in fractions.items() if k != "none")
    (images / "p001.png").unlink()
    assert main([*argv, "--out", str(tmp_path / "cmp2")]) == 2


def test_profile_takes_a_first_frame_per_calibration_prompt(tmp_path, monkeypatch, capsys):
    """`videocache profile --image DIR`: calibration prompt i starts from DIR/p00i.png (every run of it: the uncached
    recording, the perturbations, the measurements); a folder short of a frame is a one-line error before loading."""
    import videocache.pipelines.loader as loader
    from videocache.cli import main
    from videocache.eval_vbench.calibration.runs import CalibrationSettings
    from videocache.pipelines.reference.first_frames import calibration_captions, write_first_frames

    captions = calibration_captions()
    frames = write_first_frames(captions[:2], tmp_path / "frames")
    prompts = tuple(c.text for c in captions[:2])
    s = CalibrationSettings(steps=8, frames=5, height=32, width=32, guidance_scale=5.0, image=str(frames),
                            prompts=prompts)
    for i, prompt in enumerate(prompts):
        given = np.asarray(Image.open(frames / f"p{i:03d}.png").convert("RGB"))
        assert s.image_for(prompt) == str(frames / f"p{i:03d}.png")
        assert np.array_equal(np.asarray(s.call(prompt)["image"]), given)
    assert not np.array_equal(np.asarray(s.call(prompts[0])["image"]), np.asarray(s.call(prompts[1])["image"]))
    assert "prompts" not in s.recorded() and s.recorded()["image"] == str(frames)
    one = CalibrationSettings(steps=8, frames=5, height=32, width=32, guidance_scale=5.0, image=str(frames / "p000.png"))
    assert one.image_for(prompts[1]) == str(frames / "p000.png")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_pipeline", no_loading)
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(c.text for c in captions[:3]) + "\n")
    assert main(["profile", "--model", "reference-wan22", "--prompts", str(file), "--image", str(frames),
                 "--budget", "0.5", "--out", str(tmp_path / "p.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--image" in err and "p002.png is missing" in err


def test_exposure_bias_correction_reads_the_noisy_latent_of_an_image_to_video_input():
    """Wan I2V's transformer takes 36 channels (the noisy latent, then the first-frame mask and latent) and predicts
    16: the correction v' = (b - 1) x_t + (b (1 - s) + s) v uses the input's first 16 channels as x_t."""
    from videocache.exposure_bias import ExposureBiasConfig, correct_velocity

    pipe = _pipeline("wan2.1-i2v")
    reference = _run(pipe)
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((dict(kwargs), out[0] if isinstance(out, tuple) else out.sample)),
        with_kwargs=True)
    eb = ExposureBiasConfig(enabled=True)
    vc.apply(pipe, table=CacheTable.full_compute(STEPS, len(pipe.transformer.blocks)), exposure_bias=eb)
    corrected = _run(pipe)
    vc.remove(pipe)
    handle.remove()
    assert calls[0][0]["hidden_states"].shape[1] == 36 and calls[0][1].shape[1] == 16
    for i in (6, 7, 14):  # steps 3 and 7 (the conditional, then the unconditional call of each step)
        kwargs, got = calls[i]
        sigma = float(pipe.scheduler.sigmas[i // 2])
        with torch.no_grad():
            v = pipe.transformer(**kwargs)[0]  # uncorrected, on the same inputs
        want = correct_velocity(v, kwargs["hidden_states"][:, :16], sigma, eb.factor(sigma))
        assert not torch.allclose(want, v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(corrected, reference)


@pytest.mark.parametrize("command", ["generate", "profile", "compare"])
def test_a_first_frame_missing_or_given_to_a_text_model_is_a_one_line_error_before_loading(tmp_path, monkeypatch,
                                                                                            capsys, command):
    import videocache.pipelines.loader as loader
    from videocache.cli import main
    from videocache.pipelines.reference.first_frames import calibration_captions, write_first_frames

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_pipeline", no_loading)
    frames = write_first_frames(calibration_captions(), tmp_path / "frames")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left on a black background\n")
    flag, given = ("--images", str(frames)) if command == "compare" else ("--image", str(frames / "p000.png"))
    rest = {"generate": ["--prompt", "a red circle", "--out", str(tmp_path / "v.mp4")],
            "profile": ["--budget", "0.5", "--out", str(tmp_path / "p.yaml")],
            "compare": ["--prompts", str(prompts), "--methods", "diffusers:fbcache:0.2", "--out", str(tmp_path / "c")]}
    for model, extra, message in (("reference-wan22-i2v", [], "is an image-to-video model"),
                                  ("reference-wan22", [flag, given], "makes videos from text only")):
        assert main([command, "--model", model, *extra, *rest[command]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("videocache: error:") and "\n" not in err and message in err, err
