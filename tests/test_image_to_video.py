"""Image-to-video through diffusers' WanImageToVideoPipeline, on tiny random configurations of the real classes:
Wan2.1 I2V (CLIP image tokens in the cross-attention) and Wan2.2 I2V A14B (the image latent concatenated in
channels, two experts). The pipeline opens its cache contexts with a name only, so the engine takes each step
from the scheduler. A full-compute table and `remove` are bit-identical to uncached, a caching table computes
fewer components, and the CFG branches keep their own state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import videocache as vc
from videocache.table import Action, CacheTable

STEPS = 10


def _pipeline(*, image_tokens: bool, experts: bool):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from videocache.pipelines.reference import build

    base = build.build_pipeline(seed=0)
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    # 16 noise channels + 4 of the first-frame mask + 16 of the image latent
    config.update(in_channels=36, num_layers=4)
    if image_tokens:
        config.update(image_dim=32, added_kv_proj_dim=config["num_attention_heads"] * config["attention_head_dim"])
    torch.manual_seed(0)
    transformers = [WanTransformer3DModel(**config) for _ in range(2 if experts else 1)]
    encoder = processor = None
    if image_tokens:
        encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, intermediate_size=37, patch_size=8))
        processor = CLIPImageProcessor(crop_size=32, size=32)
    pipe = WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        image_processor=processor, image_encoder=encoder, transformer=transformers[0],
        transformer_2=transformers[1] if experts else None, boundary_ratio=0.9 if experts else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    return pipe(image=image, prompt="a red circle moving right", num_inference_steps=STEPS, num_frames=9, height=32,
                width=32, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


def _caching_table(num_blocks: int) -> CacheTable:
    actions = np.zeros((STEPS, num_blocks, 3), dtype=np.int8)
    actions[[2, 4, 6, 8]] = Action.REUSE
    actions[[5, 9]] = Action.FORECAST
    return CacheTable(actions)


@pytest.mark.parametrize("image_tokens, experts", [(True, False), (False, True)], ids=["wan2.1-i2v", "wan2.2-i2v-a14b"])
def test_image_to_video_is_cached_with_steps_from_the_scheduler(image_tokens, experts):
    pipe = _pipeline(image_tokens=image_tokens, experts=experts)
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
