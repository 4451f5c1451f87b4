"""diffusers' First-Block-Cache under videocache's Ulysses on 2 gloo processes: the defect and the fix.

diffusers 0.42.1 decides from the local token shard (`mean|r_t - r_{t-1}| / mean|r_{t-1}|` of the first
block's residual, no collective). A first run that computes every step records both ranks' local
statistics: they differ. The test then picks a threshold at which, with everything before it computed
alike, the two ranks' local statistics fall on either side: diffusers alone would let one rank skip the
remaining blocks while the other computes them (a hang in the next all-to-all). With
`videocache.distributed.peers.agree_first_block_cache` the ranks decide on the all-reduced global
statistic: the same decisions on both ranks, at least one of which a shard alone would have taken the
other way, and the same latents as one process (within the Ulysses tolerance of tests/test_parallel.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .test_parallel import TOLERANCE, _generate, _init_rank, _load, _spawn

STEPS = 10


def _fbcache_run(pipe, threshold: float, parallel: bool):
    from diffusers import FirstBlockCacheConfig

    from videocache.distributed import parallelize
    from videocache.distributed.peers import agree_first_block_cache

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    agreement = agree_first_block_cache(pipe.transformer)
    par = parallelize(pipe, ulysses=2) if parallel else None
    try:
        latents = _generate(pipe, STEPS)
    finally:
        if par is not None:
            par.remove()
        agreement.remove()
        pipe.transformer.disable_cache()
    return latents, list(agreement.trace), agreement.local_disagreements


def straddling_threshold(local0: list[float], local1: list[float]) -> float | None:
    """A threshold at which diffusers' FBCache alone makes the two ranks disagree at some call k while
    both computed every call before it (so the run reaches call k exactly as in the all-compute run):
    min(local[k]) must be below every earlier local value and the other rank's local[k] above it. The
    decision is `diff > threshold`, so the rank whose value equals the threshold skips."""
    floor = float("inf")
    for a, b in zip(local0, local1, strict=True):
        low, high = min(a, b), max(a, b)
        if low < floor and high > low:
            return low
        floor = min(floor, low)
    return None


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    import torch.distributed as dist

    from videocache.distributed import process_state

    state = process_state()
    pipe = _load()
    _, every, _ = _fbcache_run(pipe, 1e-9, parallel=True)  # computes every call: each rank's local statistics
    traces: list = [None, None]
    dist.all_gather_object(traces, every)
    threshold = straddling_threshold([t[0] for t in traces[0]], [t[0] for t in traces[1]])
    res = {"every": every, "threshold": threshold}
    if threshold is not None:
        res["latents"], res["trace"], res["local_disagreements"] = _fbcache_run(pipe, threshold, parallel=True)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


def test_first_block_cache_decisions_are_agreed_across_ranks(tmp_path):
    _spawn(_rank_main, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    every = [r["every"] for r in ranks]
    # the defect: the shards' statistics differ, the agreed one is the same on both ranks
    assert len(every[0]) == len(every[1]) > 0
    assert max(abs(a[0] - b[0]) for a, b in zip(every[0], every[1], strict=True)) > 1e-3
    assert [a[1] for a in every[0]] == [b[1] for b in every[1]]
    threshold = ranks[0]["threshold"]
    assert threshold is not None and threshold == ranks[1]["threshold"], "no threshold makes the shards disagree"
    # at that threshold the ranks decide together, where a shard alone would have decided otherwise
    decisions = [[d for _, _, d in r["trace"]] for r in ranks]
    assert decisions[0] == decisions[1] and not all(decisions[0])  # the same skips on both ranks
    assert sum(r["local_disagreements"] for r in ranks) >= 1  # at the straddled call one shard says otherwise
    # and the agreed decision is the one process's: the same latents
    torch.set_num_threads(1)
    single, _, _ = _fbcache_run(_load(), threshold, parallel=False)
    scale = single.abs().max().item()
    for r in ranks:
        assert (r["latents"] - single).abs().max().item() <= TOLERANCE["ulysses"] * scale
