"""reference-hunyuan: the shipped HunyuanVideo reference pipeline (issue 12), its loader, and the per-frame
colour gate of the reference checker."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from videocache.pipelines.generation import generate
from videocache.pipelines.loader import REFERENCE_DIR, REFERENCE_HUNYUAN_DIR, ModelLoadError, load_pipeline
from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import Caption, render_clip

requires_hunyuan = pytest.mark.skipif(
    not (REFERENCE_HUNYUAN_DIR / "model_index.json").is_file(),
    reason="shipped reference-hunyuan weights not present (scripts/train_reference.py --architecture hunyuan)",
)
PROMPT = "a green triangle moving up on a gray background"


@pytest.fixture(scope="module")
def hunyuan_pipe():
    if not (REFERENCE_HUNYUAN_DIR / "model_index.json").is_file():
        pytest.skip("shipped reference-hunyuan weights not present")
    pipe = load_pipeline("reference-hunyuan", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def record_contexts(pipe):
    """The cache_context name of every transformer call."""
    names: list[str | None] = []
    current: list[str | None] = [None]
    original = pipe.transformer.cache_context

    @contextlib.contextmanager
    def cache_context(name, **context):
        current[0] = name
        with original(name, **context):
            yield
        current[0] = None

    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: names.append(current[0]))
    pipe.transformer.cache_context = cache_context
    try:
        yield names
    finally:
        handle.remove()
        del pipe.transformer.cache_context


@requires_hunyuan
def test_loads_by_name_offline_and_generates_the_right_shapes(hunyuan_pipe):
    from diffusers import AutoencoderKLWan, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    pipe = hunyuan_pipe
    assert isinstance(pipe, HunyuanVideoPipeline) and type(pipe).__name__ == "ReferenceHunyuanVideoPipeline"
    assert isinstance(pipe.transformer, HunyuanVideoTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    assert not (REFERENCE_HUNYUAN_DIR / "vae").exists()  # the VAE ships once, in reference-wan
    assert not pipe.transformer.config.guidance_embeds
    for frames, size in ((17, 64), (9, 32)):
        video = generate(pipe, PROMPT, num_inference_steps=2, num_frames=frames, height=size, width=size,
                         guidance_scale=5.0, progress=False).frames
        assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
    latents = pipe(PROMPT, num_inference_steps=1, output_type="latent").frames
    assert latents.shape == (1, 16, 5, 16, 16)
    with pytest.raises(ValueError, match="divisible by 16"):  # VAE 4 x patch 4
        pipe(PROMPT, num_inference_steps=1, height=60)


@requires_hunyuan
def test_true_cfg_runs_cond_and_uncond_contexts(hunyuan_pipe):
    pipe = hunyuan_pipe
    with record_contexts(pipe) as names:
        guided = pipe(PROMPT, num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert names == ["cond", "uncond"] * 3
    with record_contexts(pipe) as names:
        plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    assert names == ["cond"] * 3
    assert not torch.allclose(guided.frames, plain.frames)
    # guidance_scale is the true-CFG scale unless true_cfg_scale is given
    explicit = pipe(PROMPT, num_inference_steps=3, true_cfg_scale=5.0, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(explicit.frames, guided.frames)


def test_per_frame_gate_fails_a_video_with_one_wrongly_coloured_frame():
    caption = Caption.parse("a red circle moving left on a black background")
    clip = render_clip(caption, seed=1)
    clean = check_video(clip.video)
    assert clean.every_frame_matches(caption) and clean.frame_colour_fraction(caption) == 1.0
    video = clip.video.copy()
    video[0][clip.mask[0]] = (235, 215, 40)  # the first frame shows a yellow shape
    result = check_video(video)
    assert result.matches(caption) == (True, True)  # the whole-video checks do not see it
    assert not result.every_frame_matches(caption)
    assert result.frame_colours[0] == "yellow" and result.frame_colour_fraction(caption) == pytest.approx(16 / 17)
    video[5] = video[5, 0, 0]  # a frame without the shape counts as a miss too
    assert check_video(video).frame_colours[5] is None


def broken_copy(tmp_path, source, how: str):
    """A copy of a shared-VAE reference folder without its transformer, or whose shared VAE moved away."""
    folder = tmp_path / f"broken-{source.name}"
    shutil.copytree(source, folder)
    meta = json.loads((folder / "videocache.json").read_text())
    meta["shared_components"]["vae"] = str(REFERENCE_DIR / "vae")  # the copy's relative path would miss it
    if how == "no-transformer":
        shutil.rmtree(folder / "transformer")
    else:  # the shared VAE moved away
        meta["shared_components"]["vae"] = "../nowhere/vae"
    (folder / "videocache.json").write_text(json.dumps(meta))
    return folder


def check_broken_folder_is_a_one_line_error(tmp_path, capsys, source, how: str, prompt: str) -> None:
    """Loading a broken copy of `source` (broken_copy) and generating from it are one-line errors."""
    from videocache.cli import main

    folder = broken_copy(tmp_path, source, how)
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(str(folder), device="cpu")
    assert "\n" not in str(info.value)
    assert main(["generate", "--prompt", prompt, "--model", str(folder), "--steps", "1", "--out",
                 str(tmp_path / "v.mp4")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading progress bar
    assert last.startswith("videocache: error:") and ("transformer/" if how == "no-transformer" else "VAE") in last


@requires_hunyuan
@pytest.mark.parametrize("how", ["no-transformer", "no-shared-vae"])
def test_broken_folder_is_a_one_line_error(tmp_path, how, capsys):
    check_broken_folder_is_a_one_line_error(tmp_path, capsys, REFERENCE_HUNYUAN_DIR, how, PROMPT)


@requires_hunyuan
@pytest.mark.parametrize("argv, message", [
    (["--transformer-config", '{"patch": 2}', "--architecture", "hunyuan"], "unknown keys patch"),
    (["--transformer-config", '{"patch_size": 2}'], "applies to --architecture hunyuan or opensora"),
    (["--transformer-config", "[2]", "--architecture", "hunyuan"], "must be a JSON object"),
])
def test_training_script_rejects_a_bad_transformer_config(tmp_path, argv, message, capsys):
    sys.path.insert(0, str(REFERENCE_DIR.parents[2] / "scripts"))
    import train_reference

    with pytest.raises(SystemExit):
        train_reference.main(["--work-dir", str(tmp_path), "--stages", "", *argv])
    assert message in capsys.readouterr().err


def test_cli_generates_with_reference_hunyuan(tmp_path):
    out, summary = tmp_path / "v.mp4", tmp_path / "v.json"
    cmd = [sys.executable, "-m", "videocache.cli", "generate", "--model", "reference-hunyuan", "--prompt", PROMPT,
           "--steps", "3", "--out", str(out), "--summary", str(summary), "--no-progress"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    data = json.loads(summary.read_text())
    assert (data["frames"], data["height"], data["width"], data["steps"]) == (17, 64, 64, 3)
    assert data["transformer_calls"] == 6  # true CFG: cond + uncond per step


def test_wan_tokenizer_is_unchanged_by_the_shared_builder():
    from transformers import AutoTokenizer

    from videocache.pipelines.reference.build import build_tokenizer

    shipped = AutoTokenizer.from_pretrained(REFERENCE_DIR / "tokenizer")
    built = build_tokenizer()
    for text in ("a red circle moving left on a black background", "", "an unknown WORD"):
        a = shipped(text, padding="max_length", max_length=16, truncation=True)
        b = built(text, padding="max_length", max_length=16, truncation=True)
        assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask


@pytest.mark.parametrize("extra", [[], ["--transformer-config", '{"patch_size": 2}', "--time-shift", "5"]])
def test_training_script_assembles_a_loadable_hunyuan_pipeline(tmp_path, extra):
    """Two transformer steps on stand-in latents, then --stages assemble: the folder loads through the
    loader with the shared VAE found by its relative path; --transformer-config reaches the saved config,
    and both options the reproduce line."""
    from videocache.pipelines.reference.data import split_captions

    sys.path.insert(0, str(REFERENCE_DIR.parents[2] / "scripts"))
    import train_reference

    train, _ = split_captions()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    torch.save({"latents": torch.randn(4, 16, 5, 16, 16), "captions": [c.text for c in train[:4]],
                "mean": torch.zeros(16), "std": torch.ones(16)}, work / "latents.pt")
    train_reference.main(["--architecture", "hunyuan", "--vae", str(REFERENCE_DIR), "--work-dir", str(work),
                          "--out", str(out), "--steps", "2", "--batch", "2", "--stages", "transformer,assemble",
                          *extra])
    assert not (out / "vae").exists()
    record = json.loads((out / "TRAINING.json").read_text())
    assert record["arguments"]["architecture"] == "hunyuan"
    patch = json.loads((out / "transformer" / "config.json").read_text())["patch_size"]
    assert patch == (2 if extra else 4)
    assert ("--transformer-config '{\"patch_size\": 2}'" in record["reproduce"]) == bool(extra)
    assert ("--time-shift 5.0" in record["reproduce"]) == bool(extra)
    pipe = load_pipeline(str(out), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe(PROMPT, num_inference_steps=1, num_frames=5, height=32, width=32, output_type="np").frames.shape == (
        1, 5, 32, 32, 3)
