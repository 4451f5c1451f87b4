"""Foreground/background block profiling: attention capture, masks, R_attn, classes, heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from videocache import fgbg
from videocache.pipelines.attention_capture import SelfAttentionCapture, profile_pipeline
from videocache.pipelines.wan.probes import wan_query_key


@pytest.fixture(scope="module")
def transformer():
    from videocache.pipelines.reference import build

    torch.manual_seed(0)
    return build.build_transformer().eval()


def direct_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) materialised in full, (..., Nq, Nk)."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


# -- attention received ---------------------------------------------------------------------------
def test_chunked_column_means_equal_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 37, 8, generator=g), torch.randn(2, 3, 37, 8, generator=g)
    full = direct_attention(q, k).mean(dim=-2)
    for chunk in (1, 5, 37, 1024):
        assert torch.allclose(fgbg.attention_received(q, k, chunk=chunk), full, atol=1e-6)
    assert torch.allclose(full.sum(-1), torch.ones(2, 3))  # every query spreads exactly 1
    with pytest.raises(ValueError, match="chunk must be"):
        fgbg.attention_received(q, k, chunk=0)
    with pytest.raises(ValueError, match="must agree"):
        fgbg.attention_received(q, k[..., :4])


def test_wan_query_key_reproduces_the_attention_module(transformer):
    attn = transformer.blocks[0].attn1
    rotary = transformer.rope(torch.zeros(1, 16, 2, 8, 8))
    h = torch.randn(1, 32, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, k = wan_query_key(attn, h, rotary)
        v = attn.to_v(h).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        a = direct_attention(q.transpose(1, 2), k.transpose(1, 2))
        mine = attn.to_out[0]((a @ v).transpose(1, 2).flatten(2))
        assert torch.allclose(mine, attn(h, None, None, rotary), atol=1e-5)


def test_capture_matches_full_softmax_on_a_head_subset(transformer):
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3))
    inputs: dict[int, tuple] = {}
    handles = [
        blk.attn1.register_forward_pre_hook(lambda m, args, b=b: inputs.__setitem__(b, args))
        for b, blk in enumerate(transformer.blocks)
    ]
    try:
        with torch.no_grad(), SelfAttentionCapture(transformer, heads=[3, 1], chunk=7) as cap:
            transformer(x, torch.tensor([500.0]), text)
            assert cap.take() == {}  # not armed: nothing recorded
            cap.armed = True
            transformer(x, torch.tensor([500.0]), text)
            got = cap.take()
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == list(range(len(transformer.blocks)))
    for b, (hidden, _, _, rotary) in inputs.items():
        q, k = wan_query_key(transformer.blocks[b].attn1, hidden, rotary)
        want = direct_attention(q[:, :, [1, 3]].transpose(1, 2), k[:, :, [1, 3]].transpose(1, 2))
        assert torch.allclose(got[b], want.mean(dim=-2).mean(dim=1), atol=1e-6)
    assert all(not blk.attn1._forward_pre_hooks for blk in transformer.blocks)
    with pytest.raises(ValueError, match="heads must be indices in 0-3"):
        SelfAttentionCapture(transformer, heads=[4])


def test_capture_chunk_is_bounded_in_bytes(transformer):
    """A chunk's float32 logits stay within max_chunk_bytes: unchanged at small sizes, fewer queries at
    Wan2.1-1.3B's 480p x 81 frames (12 heads x 32,760 tokens), and the same attention either way."""
    cap = SelfAttentionCapture(transformer)
    assert cap.chunk_for((1, 32, 4, 32)) == 1024  # the reference model: as before
    wan = cap.chunk_for((1, 32760, 12, 128))
    assert wan == 682 and 4 * 12 * 32760 * wan <= 2**30 < 4 * 12 * 32760 * (wan + 1)
    assert SelfAttentionCapture(transformer, max_chunk_bytes=None).chunk_for((1, 32760, 12, 128)) == 1024
    assert SelfAttentionCapture(transformer, max_chunk_bytes=1).chunk_for((1, 32760, 12, 128)) == 1
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(3))
    got = []
    for max_bytes in (None, 4 * 4 * 32 * 5):  # 5 queries of 4 heads x 32 tokens per chunk
        with torch.no_grad(), SelfAttentionCapture(transformer, max_chunk_bytes=max_bytes) as cap:
            assert cap.chunk_for((1, 32, 4, 32)) == (1024 if max_bytes is None else 5)
            cap.armed = True
            transformer(x, torch.tensor([500.0]), text)
            got.append(cap.take())
    for b in got[0]:
        assert torch.allclose(got[0][b], got[1][b], atol=1e-6)
    with pytest.raises(ValueError, match="max_chunk_bytes must be"):
        SelfAttentionCapture(transformer, max_chunk_bytes=0)


# -- masks ----------------------------------------------------------------------------------------
def synthetic_video(frames: int = 4, size: int = 14, channels: int = 16, seed: int = 0):
    """Background noise, a rounded 4x4 blob moving right with a fixed feature offset, per-frame global
    shifts and a strong artefact on the outer ring of positions."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(frames, size, size, channels, generator=g)
    truth = torch.zeros(frames, size, size, dtype=torch.bool)
    offset = torch.randn(channels, generator=g)
    offset = 2 * offset / offset.norm()
    blob = torch.ones(4, 4, dtype=torch.bool)
    blob[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    for f in range(frames):
        truth[f, 4:8, 2 + 2 * f : 6 + 2 * f] = blob
        x[f] += torch.randn(channels, generator=g)  # frame-wide shift: not subject
    x[truth] += offset
    ring = torch.ones(size, size, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    x[:, ring] += 3 * torch.randn(channels, generator=g)
    return x, truth


def test_pca_mask_recovers_a_known_region():
    x, truth = synthetic_video()
    mask = fgbg.foreground_mask(x, border=1)
    assert fgbg.mask_iou(mask, truth) == pytest.approx(1.0)
    # without leaving out the edge, the ring artefact dominates the first component
    assert fgbg.mask_iou(fgbg.foreground_mask(x, border=0), truth) < 0.5
    with pytest.raises(ValueError, match="border must be"):
        fgbg.foreground_mask(x, border=7)


def test_otsu_and_majority_filter():
    v = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1])
    assert 0.2 < fgbg.otsu_threshold(v) < 5.0
    assert fgbg.otsu_threshold(torch.full((4,), 2.0)) == 2.0
    m = torch.zeros(1, 6, 6, dtype=torch.bool)
    m[0, 1:4, 1:4] = True
    m[0, 2, 2] = False  # a hole
    m[0, 5, 5] = True  # an isolated token
    cleaned = fgbg.majority_filter(m)
    assert cleaned[0, 2, 2] and not cleaned[0, 5, 5]


def test_pixel_masks_map_to_the_token_grid():
    mask = np.zeros((17, 64, 64), dtype=bool)
    mask[0, 0:8, 0:8] = True  # latent frame 0 is pixel frame 0 alone
    mask[1:5, 8:16, 8:16] = True  # latent frame 1 = pixel frames 1-4
    mask[5:7, 16:24, 16:24] = True  # half of latent frame 2's frames: coverage 0.5 counts
    mask[9, 24:32, 24:32] = True  # a quarter of latent frame 3's frames: does not
    grid = fgbg.mask_to_token_grid(mask)
    assert grid.shape == (5, 8, 8)
    assert [tuple(map(int, torch.nonzero(g)[0])) if g.any() else None for g in grid] == [
        (0, 0),
        (1, 1),
        (2, 2),
        None,
        None,
    ]
    assert int(grid.sum()) == 3
    with pytest.raises(ValueError, match="mask must be"):
        fgbg.mask_to_token_grid(np.zeros((16, 64, 64), dtype=bool))
    latent = torch.zeros(2, 4, 4, dtype=torch.bool)
    latent[0, 0, 0:2] = True  # half a 2x2 patch
    latent[1, 0, 0] = True  # a quarter
    assert fgbg.pool_mask(latent, (1, 2, 2)).tolist() == [[[True, False], [False, False]], [[False] * 2] * 2]


# -- scores ---------------------------------------------------------------------------------------
def test_r_attn_on_a_synthetic_attention_map():
    received = torch.full((2, 16), 1.0)
    received[0, [1, 2]] = 9.0  # frame 0: two tokens stand out
    received[1, [5]] = 9.0
    high = fgbg.high_attention(received)
    assert high[0].nonzero().flatten().tolist() == [1, 2] and high[1].nonzero().flatten().tolist() == [5]
    fg = torch.zeros(2, 4, 4, dtype=torch.bool)
    fg.view(2, 16)[0, [1, 3, 4, 6]] = True  # 1 of 4 foreground tokens is high
    fg.view(2, 16)[1, [5, 7]] = True  # 1 of 2
    assert fgbg.r_attn(high, fg) == pytest.approx((0.25 + 0.5) / 2)
    assert fgbg.r_attn(high, torch.zeros_like(fg)) is None
    scores = fgbg.block_scores({0: received.flatten(), 3: torch.ones(32)}, fg)
    assert scores[0] == pytest.approx(0.375) and scores[3] == 0.0


def test_classification_and_background_runs():
    tau, classes = fgbg.classify([0.1, 0.5, 0.2, 0.6, 0.05])
    assert tau == pytest.approx(0.2) and classes == ("bg", "fg", "fg", "fg", "bg")
    assert fgbg.classify([0.1, 0.5], tau=0.6)[1] == ("bg", "bg")
    prof = fgbg.FgBgProfile((0.1, 0.05, 0.5, 0.01), ("bg", "bg", "fg", "bg"), 0.2, (3,))
    assert prof.background_blocks == [0, 1, 3] and prof.background_runs == [(0, 1), (3, 3)]
    assert prof.block_runs_preset(2, 6, 2) == {"blocks": [0, 1, 3], "warmup_steps": 2, "t_max": 6, "t_min": 2}
    with pytest.raises(ValueError, match="classes must be"):
        fgbg.FgBgProfile((0.1,), ("background",), 0.1, (0,))


def test_accumulated_profile_dict_and_heatmap(tmp_path):
    acc = fgbg.ScoreAccumulator(3, (4, 8))
    acc.add(4, {0: 0.2, 1: 0.6, 2: None})
    acc.add(8, {0: 0.4, 1: 0.4, 2: 0.1})
    acc.add(8, {0: 0.0, 1: 0.8, 2: 0.2})
    prof = acc.result(heads=[0, 2], mask_iou=0.61)
    assert prof.r_attn == pytest.approx((0.2, 0.6, 0.15))
    assert prof.classes == ("fg", "fg", "bg") and prof.tau == pytest.approx(0.2)
    d = yaml.safe_load(yaml.safe_dump({"fgbg": prof.to_dict()}))["fgbg"]
    assert d["steps_used"] == [4, 8] and d["heads_used"] == [0, 2] and d["mask_iou"] == 0.61
    assert d["per_step"][2] == [None, 0.15]
    png = fgbg.save_heatmap(prof, tmp_path / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = fgbg.ScoreAccumulator(2, (0,))
    empty.add(0, {0: 0.5, 1: None})
    with pytest.raises(ValueError, match="block 1 has no R_attn"):
        empty.result()


def test_profile_pipeline_scores_the_conditional_pass(tiny_random_pipe):
    pipe = tiny_random_pipe
    prof = profile_pipeline(
        pipe,
        ["a red circle moving left on a black background"],
        steps=[1, 3],
        heads=[0, 2],
        num_inference_steps=4,
        num_frames=9,
        height=48,
        width=48,
        guidance_scale=5.0,
        max_sequence_length=16,
    )
    assert len(prof.r_attn) == len(pipe.transformer.blocks) and prof.steps_used == (1, 3)
    assert prof.heads_used == (0, 2) and prof.samples == 1
    assert set(prof.classes) <= {"fg", "bg"} and all(0.0 <= r <= 1.0 for r in prof.r_attn)
    reg = getattr(pipe.transformer, "_diffusers_hook", None)
    assert reg is None or "videocache_fgbg_probe" not in reg.hooks
    assert all(not blk.attn1._forward_pre_hooks for blk in pipe.transformer.blocks)
