"""A data-dependent cache decision under sequence parallelism is taken together by the ranks.

Uneven token shards (243 tokens over 2 ranks: 122 and 121) hold different byte counts, so a byte budget
that fits the smaller shard's kept outputs but not the larger one's would let one rank reuse a cell that
the other computes. With the ranks' agreement (an all_reduce over a gloo group) both refuse the same
store and fall back at the same cell; without it (the agreement removed) their decisions differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .test_parallel import ODD_LATENT, _free_port, _init_rank, _load, _odd_inputs, _spawn

STEPS = 4
BLOCKS = 8
TENSOR_BYTES_SMALL_SHARD = 121 * 128 * 4  # one float32 MLP output of the 121-token shard


def _table():
    from videocache import Action, CacheTable

    actions = np.zeros((STEPS, BLOCKS, 3), dtype=np.int8)
    actions[2, :, 2] = int(Action.REUSE)  # every block's MLP reuses step 1: 8 outputs kept at step 1
    return CacheTable(actions)


@torch.no_grad()
def _run(transformer, agree: bool) -> dict:
    import videocache
    from videocache.distributed.parallel import AGREE_ATTR

    kept_agreement = getattr(transformer, AGREE_ATTR)
    if not agree:
        delattr(transformer, AGREE_ATTR)
    engine = videocache.apply_to_transformer(transformer, None, _table(), max_cache_bytes=BLOCKS * TENSOR_BYTES_SMALL_SHARD)
    inputs = _odd_inputs(16, 64, ODD_LATENT)
    try:
        for step in range(STEPS):
            with transformer.cache_context("cond", step_index=step, num_inference_steps=STEPS):
                out = transformer(**inputs)[0]
        stats = engine.stats()
    finally:
        videocache.remove(transformer)
        setattr(transformer, AGREE_ATTR, kept_agreement)
    return {"refused": stats["refused_stores"], "fallbacks": stats["fallbacks"], "out": out,
            "fraction": stats["computed_fraction"], "calls": dict(stats["calls"])}


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    from videocache.distributed import parallelize, process_state

    state = process_state()
    transformer = _load().transformer
    par = parallelize(transformer, ulysses=2)
    # MLP outputs are per token, so no collective waits on a disagreeing rank: the run ends either way
    res = {"agreed": _run(transformer, agree=True), "alone": _run(transformer, agree=False)}
    par.remove()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


def test_budget_decisions_are_agreed_across_ranks(tmp_path):
    assert _free_port()
    _spawn(_rank_main, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    alone = [r["alone"] for r in ranks]
    # each rank alone: the 121-token shard keeps all 8 outputs, the 122-token shard refuses the last
    assert sorted(a["refused"] for a in alone) == [0, 1]
    assert sorted(a["fallbacks"] for a in alone) == [0, 1]
    agreed = [r["agreed"] for r in ranks]
    assert agreed[0]["refused"] == agreed[1]["refused"] == 1
    assert agreed[0]["fallbacks"] == agreed[1]["fallbacks"] == 1
    assert agreed[0]["calls"] == agreed[1]["calls"]
    # (FLOPs are counted on each rank's own shard, so the fractions differ in the 4th digit)
    assert agreed[0]["fraction"] == pytest.approx(agreed[1]["fraction"], rel=1e-3) and agreed[0]["fraction"] < 1
    assert torch.equal(agreed[0]["out"], agreed[1]["out"])  # every rank ends with the gathered output
