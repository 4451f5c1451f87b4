"""Ulysses, ring and CFG parallelism on the two-expert reference, reference-wan22 (diffusers' WanPipeline with
transformer_2 and boundary_ratio), both experts cached with its profile, on 2 gloo processes against one:
`parallelize(pipe)` spreads both experts, the latents match one process within the tolerances of
tests/test_parallel.py, and every rank computes the same fraction in each expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_parallel import _assert_close, _init_rank, _spawn

STEPS = 16
MODES = {"ulysses": {"ulysses": 2}, "ring": {"ring": 2}, "cfg": {"cfg": 2}}


def _two_experts():
    from videocache.pipelines.loader import load_pipeline

    pipe = load_pipeline("reference-wan22", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cached(pipe, make_parallel=None):
    import videocache

    engine = videocache.apply(pipe, "reference-wan22", "balanced")
    par = make_parallel() if make_parallel else None
    try:
        latents = pipe("a red circle moving left", negative_prompt="", num_inference_steps=STEPS, num_frames=9,
                       height=64, width=64, guidance_scale=5.0, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).frames
        return latents, engine.stats()["computed_fraction_by_expert"]
    finally:
        videocache.remove(pipe)
        if par is not None:
            par.remove()


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    from videocache.distributed import parallelize, process_state

    state = process_state()
    pipe = _two_experts()
    res = {mode: _cached(pipe, lambda kw=kw: parallelize(pipe, **kw)) for mode, kw in MODES.items()}
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    single = _cached(_two_experts())
    out = tmp_path_factory.mktemp("parallel_experts")
    _spawn(_rank_main, 2, str(out))
    return single, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("mode", list(MODES))
def test_both_experts_cached_under_parallelism_equal_one_process(runs, mode):
    (want, fractions), ranks = runs
    assert all(0 < f < 1 for f in fractions.values()) and list(fractions) == ["transformer", "transformer_2"]
    for rank in ranks:
        latents, got = rank[mode]
        _assert_close(latents, want, mode)
        assert got == pytest.approx(fractions)
