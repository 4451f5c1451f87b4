"""Skipping the whole block stack at once on steps whose cells are all skipped alike."""

from __future__ import annotations

import pytest
import torch

import videocache as vc
from videocache import CacheTable

from .test_engine import BLOCKS, STEPS, TENSOR_BYTES, run, table


def aligned(letters: str) -> CacheTable:
    """Every (block, component) follows the same schedule of C / R / F letters."""
    return table({(c, None): letters for c in range(3)})


def test_uniform_skip_steps_and_what_they_read():
    t = aligned("CCRCFCFC")
    assert t.uniform_skips == {2: (1, (1,), 1.0), 4: (2, (1, 3), 1.0), 6: (2, (3, 5), 1.0)}
    assert t.sum_last_use == {1: 4, 3: 6, 5: 6}
    # no non-uniform step reads anything, so no cell keeps its own output
    assert all(last is None for row in t.cell_last_use for cells in row for last in cells)
    mixed = table({(0, None): "CCRCCCCC", (2, 0): "CCFCCCCC"})
    assert mixed.uniform_skips == {}
    assert mixed.cell_last_use[1][0][0] == 2


@pytest.mark.parametrize("letters", ["CCRCFCFC", "CCFCRRCF"])
def test_fused_skips_match_block_by_block(clean, letters):
    engine = vc.apply(clean, table=aligned(letters))
    fused = run(clean)
    fused_stats, fused_trace = engine.stats(), engine.trace()
    vc.remove(clean)
    engine = vc.apply(clean, table=aligned(letters), fuse_skipped_steps=False)
    plain = run(clean)
    plain_stats = engine.stats()
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-5)
    for key in ("computed_fraction", "computed_fraction_by_component", "calls", "executed_flops", "fallbacks"):
        assert fused_stats[key] == pytest.approx(plain_stats[key]), key
    assert fused_trace == engine.trace()
    # one float32 sum per term (base, self-attention gate, MLP gate) instead of every block's outputs
    assert fused_stats["cache_peak_bytes"] < plain_stats["cache_peak_bytes"]
    assert fused_stats["cache_current_bytes"] == 0


def test_fused_skips_do_not_run_blocks(clean):
    inner = [0]
    handle = clean.transformer.blocks[5].norm1.register_forward_hook(lambda *_: inner.__setitem__(0, inner[0] + 1))
    try:
        vc.apply(clean, table=aligned("CCRCFCFC"))
        run(clean)
    finally:
        handle.remove()
    assert inner[0] == 2 * 5  # computed steps only, cond and uncond


def test_budget_refusing_the_sums_falls_back_to_computing(clean):
    engine = vc.apply(clean, table=aligned("CCRCCCCC"), max_cache_bytes=2 * TENSOR_BYTES)
    with pytest.warns(UserWarning, match="nothing kept to reuse"):
        out = run(clean, guidance_scale=1.0)
    stats = engine.stats()
    assert stats["cache_peak_bytes"] <= 2 * TENSOR_BYTES
    assert stats["fallbacks"] == BLOCKS * 3  # every cell of the reuse step computed instead
    vc.remove(clean)
    vc.apply(clean, table=aligned("C" * STEPS))
    assert torch.equal(out, run(clean, guidance_scale=1.0))
