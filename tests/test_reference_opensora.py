"""reference-opensora: the shipped Open-Sora reference pipeline (issue 13, item 6) and its loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from videocache.pipelines.generation import generate
from videocache.pipelines.loader import REFERENCE_DIR, REFERENCE_OPENSORA_DIR, load_pipeline
from videocache.pipelines.reference import build_opensora

from tests.test_reference_hunyuan import check_broken_folder_is_a_one_line_error, record_contexts

requires_opensora = pytest.mark.skipif(
    not (REFERENCE_OPENSORA_DIR / "model_index.json").is_file(),
    reason="shipped reference-opensora weights not present (scripts/train_reference.py --architecture opensora)",
)
PROMPT = "a blue square moving right on a white background"


@pytest.fixture(scope="module")
def opensora_pipe():
    if not (REFERENCE_OPENSORA_DIR / "model_index.json").is_file():
        pytest.skip("shipped reference-opensora weights not present")
    pipe = load_pipeline("reference-opensora", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@requires_opensora
def test_loads_by_name_offline_and_generates_the_right_shapes(opensora_pipe):
    from diffusers import AutoencoderKLWan

    from videocache.pipelines.opensora.model.pipeline import OpenSoraPipeline
    from videocache.pipelines.opensora.model.transformer import STDiT3Model

    pipe = opensora_pipe
    assert isinstance(pipe, OpenSoraPipeline) and type(pipe).__name__ == "ReferenceOpenSoraPipeline"
    assert isinstance(pipe.transformer, STDiT3Model) and isinstance(pipe.vae, AutoencoderKLWan)
    assert not (REFERENCE_OPENSORA_DIR / "vae").exists()  # the VAE ships once, in reference-wan
    for frames, size in ((17, 64), (21, 32)):
        video = generate(pipe, PROMPT, num_inference_steps=2, num_frames=frames, height=size, width=size,
                         guidance_scale=5.0, progress=False).frames
        assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
    latents = pipe(PROMPT, num_inference_steps=1, output_type="latent").frames
    assert latents.shape == (1, 16, 5, 16, 16)
    with pytest.raises(ValueError, match="multiples of 16"):  # VAE 4 x patch 4
        pipe(PROMPT, num_inference_steps=1, height=60)
    for frames in (16, 9):
        with pytest.raises(ValueError, match="4k \\+ 1 and at least 17"):
            pipe(PROMPT, num_inference_steps=1, num_frames=frames)


@requires_opensora
def test_cfg_runs_cond_and_uncond_with_the_learned_null_caption(opensora_pipe):
    pipe = opensora_pipe
    with record_contexts(pipe) as names:
        guided = pipe(PROMPT, num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert names == ["cond", "uncond"] * 3
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                                        with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    null = pipe.transformer.y_embedder.y_embedding
    assert torch.equal(seen[1][0], null) and not torch.equal(seen[0][0], null)
    with record_contexts(pipe) as names:
        plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    assert names == ["cond"] * 3 and not torch.allclose(guided.frames, plain.frames)


@requires_opensora
def test_shipped_text_side_is_what_the_transformer_was_trained_with(opensora_pipe):
    """Training encoded the captions with build_opensora's seeded T5 and tokenizer: the shipped ones must
    give the same embeddings (a transformers upgrade that changed either would silently break the model)."""
    from videocache.pipelines.opensora.model.text import encode_prompts

    built = build_opensora.build_text_components(seed=0)
    pipe = opensora_pipe
    prompts = [PROMPT, "a red circle moving left on a black background"]
    size = build_opensora.MAX_SEQUENCE_LENGTH
    shipped = encode_prompts(prompts, pipe.tokenizer, pipe.text_encoder, "cpu", size, clean_caption=False)
    rebuilt = encode_prompts(prompts, built["tokenizer"], built["text_encoder"], "cpu", size, clean_caption=False)
    assert torch.equal(shipped[1], rebuilt[1]) and int(shipped[1][0].sum()) == 13  # 9 words, 3 score words, </s>
    torch.testing.assert_close(shipped[0], rebuilt[0])
    # The pipeline encodes without caption cleaning, as training did, whatever packages are installed.
    seen = []
    handle = pipe.text_encoder.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"]),
                                                     with_kwargs=True)
    try:
        pipe(PROMPT.upper() + "  ", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    assert torch.equal(seen[0].cpu(), pipe.tokenizer([PROMPT + " aesthetic score: 6.5."], max_length=size,
                                                     padding="max_length", return_tensors="pt").input_ids)


@requires_opensora
@pytest.mark.parametrize("how", ["no-transformer", "no-shared-vae"])
def test_broken_folder_is_a_one_line_error(tmp_path, how, capsys):
    check_broken_folder_is_a_one_line_error(tmp_path, capsys, REFERENCE_OPENSORA_DIR, how, PROMPT)


@requires_opensora
def test_cli_generates_with_reference_opensora(tmp_path):
    out, summary = tmp_path / "v.mp4", tmp_path / "v.json"
    cmd = [sys.executable, "-m", "videocache.cli", "generate", "--model", "reference-opensora", "--prompt", PROMPT,
           "--steps", "3", "--out", str(out), "--summary", str(summary), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    data = json.loads(summary.read_text())
    assert (data["frames"], data["height"], data["width"], data["steps"]) == (17, 64, 64, 3)
    assert data["transformer_calls"] == 6  # CFG: cond + uncond per step


def test_training_script_assembles_a_loadable_opensora_pipeline(tmp_path):
    """Two transformer steps on stand-in latents, then --stages assemble: the folder loads through the
    loader with the shared VAE found by its relative path, and the transformer is the trained one."""
    from videocache.pipelines.reference.data import split_captions

    sys.path.insert(0, str(REFERENCE_DIR.parents[2] / "scripts"))
    import train_reference

    train, _ = split_captions()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    torch.save({"latents": torch.randn(4, 16, 5, 16, 16), "captions": [c.text for c in train[:4]],
                "mean": torch.zeros(16), "std": torch.ones(16)}, work / "latents.pt")
    train_reference.main(["--architecture", "opensora", "--vae", str(REFERENCE_DIR), "--work-dir", str(work),
                          "--out", str(out), "--steps", "2", "--batch", "2", "--stages", "transformer,assemble"])
    assert not (out / "vae").exists()
    assert json.loads((out / "TRAINING.json").read_text())["arguments"]["architecture"] == "opensora"
    pipe = load_pipeline(str(out), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    trained = torch.load(work / "transformer_final.pt")["model"]
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert pipe(PROMPT, num_inference_steps=1, num_frames=17, height=32, width=32, output_type="np").frames.shape == (
        1, 17, 32, 32, 3)


def test_init_starts_every_block_as_the_identity():
    """The zero-initialised output projections: a fresh model's blocks leave their input unchanged except
    through the spatial self-attention and MLP (whose gates come from the zero-initialised parts too)."""
    model = build_opensora.build_transformer()
    for block in model.temporal_blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.fc2.weight.any()
    assert all(not block.cross_attn.proj.weight.any() for block in model.blocks())
    assert not model.final_layer.linear.weight.any()
    x = torch.randn(1, 16, 5, 16, 16)
    out = model(x, torch.tensor([500.0]), torch.randn(1, 16, 64), torch.ones(1, 16), fps=8, return_dict=False)[0]
    assert not out.any()  # the zero final layer
