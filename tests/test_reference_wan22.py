"""reference-wan22, the shipped two-expert reference (Wan2.2 A14B's layout: diffusers' WanPipeline with
transformer_2 and boundary_ratio), tried as a new user would: loaded by name, generated offline with its own
profile by `videocache generate`, both experts computing fewer block components than uncached."""

from __future__ import annotations

import json

import pytest
import torch

import videocache as vc
from videocache.cli import main

PROMPT = "a green square moving up on a black background"


@pytest.fixture(scope="module")
def pipe():
    from videocache.pipelines.loader import load_pipeline

    pipe = load_pipeline("reference-wan22", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_reference_wan22_is_two_distinct_float32_experts_split_at_its_boundary(pipe):
    from diffusers import WanPipeline

    assert type(pipe) is WanPipeline and pipe.config.boundary_ratio == 0.875
    high, low = pipe.transformer, pipe.transformer_2
    assert high.dtype == low.dtype == torch.float32
    assert not torch.equal(high.blocks[0].attn1.to_q.weight, low.blocks[0].attn1.to_q.weight)
    spans = vc.experts.expert_steps(pipe, 25)
    assert spans["transformer"] == (0, spans["transformer_2"][0]) and spans["transformer_2"][1] == 25
    assert 0 < spans["transformer_2"][0] < 25


def test_generate_with_its_profile_caches_both_experts(tmp_path):
    summary_path = tmp_path / "fast.json"
    assert main(["generate", "--model", "reference-wan22", "--profile", "reference-wan22", "--preset", "fast",
                 "--prompt", PROMPT, "--out", str(tmp_path / "fast.mp4"), "--summary", str(summary_path),
                 "--no-progress"]) == 0
    summary = json.loads(summary_path.read_text())
    by_expert = summary["computed_fraction_by_expert"]
    assert set(by_expert) == {"transformer", "transformer_2"} and all(0 < f < 1 for f in by_expert.values())
    assert summary["computed_fraction"] < 1


def test_fewer_block_components_reach_each_expert_than_uncached(pipe):
    engine = vc.apply(pipe, "reference-wan22", "balanced")
    try:
        pipe(PROMPT, num_inference_steps=25, num_frames=17, height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        stats = engine.stats()
    finally:
        vc.remove(pipe)
    blocks = len(pipe.transformer.blocks)
    for part in stats["experts"].values():
        assert part["fallbacks"] == 0 and part["calls"]["compute"] < part["calls"]["transformer"] * blocks * 3
