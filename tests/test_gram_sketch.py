"""The Gram recorder at scale: outputs beyond a size threshold are recorded as a fixed CountSketch.

At Wan2.1's 480p x 81 frames one component output holds 50 M values (402 MB in float64); keeping the last
band of them per cell, context and step does not fit a GPU. A linear sketch keeps every quantity the table
search reads (squared norms of linear combinations of one cell's outputs) within about sqrt(2 / k)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import videocache as vc
from videocache.calibrate import SKETCH_ABOVE, SKETCH_SIZE, GramRecorder, TableSearch, _combination_error

STEPS, BLOCKS, CONTEXTS = 8, 2, ("cond", "uncond")


def _outputs(shape: tuple[int, ...], seed: int = 0) -> dict:
    """Slowly drifting outputs, as in sampling: reuse errors are a few % of the outputs' norms, so the
    estimates below test the error itself, not the norms it is a difference of."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for ctx in CONTEXTS:
        for b in range(BLOCKS):
            for c in range(len(vc.COMPONENTS)):
                base, drift = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
                for s in range(STEPS):
                    wobble = 0.02 * torch.randn(shape, generator=g)
                    out[ctx, b, c, s] = (base + 0.05 * s * drift + 0.002 * s * s * base + wobble).to(torch.float32)
    return out


def _record(rec: GramRecorder, outputs: dict) -> np.ndarray:
    for s in range(STEPS):  # the engine's order: step by step, context by context, block by block
        for ctx in CONTEXTS:
            for b in range(BLOCKS):
                for c, comp in enumerate(vc.COMPONENTS):
                    rec(ctx, s, b, comp, outputs[ctx, b, c, s])
    return rec.gram


def _estimates(gram: np.ndarray) -> np.ndarray:
    """Squared errors of every reuse (from t-1), corrected reuse (least-squares factor) and order-1
    forecast (from t-2, t-1) the search can score, per block and component."""
    rows = []
    for b in range(BLOCKS):
        for c in range(len(vc.COMPONENTS)):
            g = gram[None, b, c]
            for t in range(2, STEPS):
                alpha = g[0, t, t - 1] / g[0, t - 1, t - 1]
                rows += [_combination_error(g, t, (t - 1,), (1.0,))[0],
                         _combination_error(g, t, (t - 1,), (alpha,))[0],
                         _combination_error(g, t, (t - 1, t - 2), (2.0, -1.0))[0]]
    return np.asarray(rows)


@pytest.mark.parametrize("sketch_size", [2**12, SKETCH_SIZE])
def test_sketched_reuse_errors_agree_with_exact(sketch_size):
    outputs = _outputs((1, 64, 1024))  # 65,536 values per output
    exact = _record(GramRecorder(STEPS, BLOCKS, band=3, sketch_above=None), outputs)
    rec = GramRecorder(STEPS, BLOCKS, band=3, sketch_above=4096, sketch_size=sketch_size)
    sketched = _record(rec, outputs)
    assert rec.sketched(65536) and not rec.sketched(4096)
    want, got = _estimates(exact), _estimates(sketched)
    assert (want > 0).all()
    rel = np.abs(got - want) / want
    sigma = math.sqrt(2 / sketch_size)  # std of a sketched squared norm, relative to the norm
    # every estimate within 5 standard deviations, the typical one within about one
    assert rel.max() < 5 * sigma and np.median(rel) < 1.5 * sigma, (rel.max(), np.median(rel), sigma)
    # what the search reads: per-cell relative errors (square roots) and the output scales
    search_exact = TableSearch(exact[None], np.ones((BLOCKS, 3)), [1.0] * STEPS, band=3)
    search_sketch = TableSearch(sketched[None], np.ones((BLOCKS, 3)), [1.0] * STEPS, band=3)
    np.testing.assert_allclose(search_sketch.scale, search_exact.scale, rtol=5 * sigma)
    for t in range(1, STEPS):
        e, s = search_exact.cell_error(1, 2, t, (t - 1,), (1.0,)), search_sketch.cell_error(1, 2, t, (t - 1,), (1.0,))
        np.testing.assert_allclose(s, e, rtol=5 * sigma)


def test_sketch_memory_per_output_is_bounded_by_the_sketch_size():
    rec = GramRecorder(STEPS, BLOCKS, band=3, sketch_above=4096, sketch_size=256)
    for shape in [(1, 64, 1024), (1, 256, 1024)]:  # 64 K and 256 K values per output: same kept bytes
        rec.clear()
        _record(rec, _outputs(shape))
        kept = [v for cell in rec._seen.values() for v in cell.values()]
        assert len(kept) == len(CONTEXTS) * BLOCKS * len(vc.COMPONENTS) * 4  # band + 1 steps per cell
        assert all(v.numel() == 256 and v.dtype == torch.float64 for v in kept)  # 2 KB each, whatever the size
        [(numel, _)] = rec._buckets  # one int32 bucket index per output size, shared by every cell
        assert numel == math.prod(shape) and rec._buckets[numel, torch.device("cpu")].dtype == torch.int32
    rec.clear()
    assert not rec._seen and not rec._buckets


def test_small_outputs_stay_exact_and_wan_sized_ones_are_sketched():
    outputs = _outputs((1, 16, 64))
    exact = _record(GramRecorder(STEPS, BLOCKS, band=3, sketch_above=None), outputs)
    default = _record(GramRecorder(STEPS, BLOCKS, band=3), outputs)  # 1,024 values: below the threshold
    assert np.array_equal(exact, default)  # bit for bit
    rec = GramRecorder(STEPS, BLOCKS)
    assert not rec.sketched(SKETCH_ABOVE) and rec.sketched(SKETCH_ABOVE + 1)
    assert rec.sketched(32760 * 1536)  # one Wan2.1-1.3B component output at 480p x 81 frames


def test_gram_from_steps_that_are_not_consecutive():
    """An observer of a cached run sees only computed steps; the Gram entries are still the dot products."""
    rec = GramRecorder(num_steps=5, num_blocks=1, band=3)
    outs = {s: torch.randn(3, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 2, 3, 4)}
    for s, out in outs.items():
        rec("cond", s, 0, "self_attn", out)
    flat = {s: o.reshape(-1).double() for s, o in outs.items()}
    for t in outs:
        for s in outs:
            want = float(flat[t] @ flat[s]) if abs(t - s) <= 3 else 0.0
            assert rec.gram[0, 0, t, s] == pytest.approx(want, rel=1e-12, abs=1e-12)
