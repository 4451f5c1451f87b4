"""Shared fixtures: the shipped reference pipeline and tiny random pipelines of the real classes."""

from __future__ import annotations

import pytest
import torch

from videocache.pipelines.loader import REFERENCE_DIR

requires_reference = pytest.mark.skipif(
    not (REFERENCE_DIR / "model_index.json").is_file(),
    reason="shipped reference weights not present (run scripts/train_reference.py)",
)


@pytest.fixture(scope="session")
def reference_pipe():
    if not (REFERENCE_DIR / "model_index.json").is_file():
        pytest.skip("shipped reference weights not present (run scripts/train_reference.py)")
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(REFERENCE_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_random_pipe():
    """Random-init tiny Wan pipeline built from the reference architecture (no weights needed)."""
    from diffusers import WanPipeline

    from videocache.pipelines.reference import build

    tokenizer = build.build_tokenizer()
    torch.manual_seed(0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build.build_text_encoder(len(tokenizer), 0),
        vae=build.build_vae(),
        scheduler=build.build_scheduler(),
        transformer=build.build_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
