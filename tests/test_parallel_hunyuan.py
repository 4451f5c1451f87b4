"""HunyuanVideo's parallel plan (`videocache.pipelines.hunyuan.parallel`) on 2 and 4 gloo processes on the
CPU, against one process: a tiny random HunyuanVideoTransformer3DModel (HUNYUAN.md section 4) called
directly, with prompts padded and not, even and uneven shards, Ulysses, ring, Ulysses x ring, CFG and
CFG x Ulysses parallelism, and the cache on (the HunyuanVideo adapter's block hooks, Ulysses and ring).

The padded prompt is the case diffusers' plan format cannot express: the model's key mask
`[B, 1, 1, Nv + Nt]` is laid out [all video, all text], which after the split is not where the keys are;
the plan declares it (`key_masks`) and each block gets it reordered for the ranks. A plan without the
reordering is shown to be wrong on a padded prompt (1.1e-2 of the output's scale) and right on an
unpadded one, whose mask is all True. Ring attention gives each key/value block its own slice of the
reordered mask (CPU); with uneven shards it refuses the mask in one line.

Measured (largest difference / output scale, every rank): Ulysses 1.7e-7 to 2.9e-7 (uneven shards
included), ring 1.7e-7 to 2.3e-7, Ulysses x ring 1.7e-7 to 2.3e-7, CFG bit-identical, CFG x Ulysses
2.1e-7, cached Ulysses and ring 1.7e-7 to 2.8e-7 per step with the same executed calls as one process.
Tolerances as in tests/test_parallel.py: Ulysses 1e-5 of the scale, ring 1e-4, CFG bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from .test_parallel import _init_rank, _spawn

TOLERANCE = {"ulysses": 1e-5, "ring": 1e-4}
TEXT = 32  # prompt tokens (padded length)
TEXT_DIM = 32
STEPS = 4  # cached runs


def tiny_hunyuan():
    """HUNYUAN.md's CPU configuration (2 heads x 16, patch 2/1, rope axes (4, 6, 6)), 2 dual- and 2
    single-stream blocks; the same weights in every process."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=32, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()


# name -> (latent (frames, height, width), prompt tokens, valid tokens per sample); video tokens = f*h/2*w/2
CASES = {
    "full": ((5, 8, 8), TEXT, (TEXT,)),  # 80 video + 32 text tokens, no padding: the mask is all True
    "padded": ((5, 8, 8), TEXT, (9,)),  # 9 of 32 prompt tokens valid (HUNYUAN.md's check)
    "padded_batch2": ((5, 8, 8), TEXT, (9, 20)),  # two prompts padded differently in one batch
    "padded_uneven": ((3, 6, 10), 31, (9,)),  # 45 video and 31 text tokens: uneven shards (23/22, 16/15)
}
RING_CASES = ("full", "padded", "padded_batch2")


def _inputs(case: str, seed: int = 1, timestep: float = 700.0, valid: tuple[int, ...] | None = None) -> dict:
    latent, text, case_valid = CASES[case]
    valid = case_valid if valid is None else valid
    g = torch.Generator().manual_seed(seed)
    batch = len(valid)
    mask = torch.zeros(batch, text, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1  # the pipeline's tokenizers pad on the right
    return {
        "hidden_states": torch.randn(batch, 16, *latent, generator=g),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, text, TEXT_DIM, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "guidance": torch.full((batch,), 6000.0),
        "return_dict": False,
    }


def _table(model):
    """Some reuse on every component of both block groups: steps 2 and 3 reuse step 1's attention
    (dual) and MLP part (single), step 3 also the dual feed-forwards."""
    from videocache import Action, BlockLayout, CacheTable
    from videocache.adapters import get_adapter

    layout = BlockLayout.from_fingerprint(get_adapter(model).fingerprint(model))
    actions = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    dual = len(model.transformer_blocks)
    actions[2:, :dual, 0] = int(Action.REUSE)  # dual attn
    actions[3, :dual, 1:3] = int(Action.REUSE)  # dual ff, ff_context
    actions[2:, dual:, 1] = int(Action.REUSE)  # single mlp part
    return CacheTable(actions, layout=layout)


@torch.no_grad()
def _cached(model, case: str) -> dict:
    """STEPS calls with falling timesteps under cache_context("cond"), the cache on."""
    import videocache

    engine = videocache.apply_to_transformer(model, None, _table(model))
    outs = []
    try:
        for step in range(STEPS):
            with model.cache_context("cond", step_index=step, num_inference_steps=STEPS):
                outs.append(model(**_inputs(case, timestep=1000.0 - 200 * step))[0])
        stats = engine.stats()
    finally:
        videocache.remove(model)
    return {"outs": outs, "fraction": stats["computed_fraction"], "calls": dict(stats["calls"]),
            "peak": stats["cache_peak_bytes"]}


@torch.no_grad()
def _cfg_steps(model) -> list[torch.Tensor]:
    """Two steps of true CFG: a cond call (9 prompt tokens) and an uncond call (another prompt, 3 tokens)."""
    outs = []
    for step in range(2):
        with model.cache_context("cond"):
            cond = model(**_inputs("padded", seed=1, timestep=900.0 - 300 * step))[0]
        with model.cache_context("uncond"):
            uncond = model(**_inputs("padded", seed=2, timestep=900.0 - 300 * step, valid=(3,)))[0]
        outs.append(uncond + 5.0 * (cond - uncond))
    return outs


@torch.no_grad()
def _single_process() -> dict:
    model = tiny_hunyuan()
    res = {case: model(**_inputs(case))[0] for case in CASES}
    res["cfg"] = _cfg_steps(model)
    res["cached"] = _cached(model, "padded")
    return res


# -- the spawned ranks ------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    import dataclasses

    from videocache.distributed import ParallelConfigError, parallelize, process_state
    from videocache.family import family_of, register_family, unregister_family

    state = process_state()
    model = tiny_hunyuan()
    res: dict = {}
    with torch.no_grad():
        for mode, cases in (("ulysses", CASES), ("ring", RING_CASES)):
            par = parallelize(model, **{mode: 2})
            try:
                for case in cases:
                    res[f"{mode}/{case}"] = model(**_inputs(case))[0]
            finally:
                par.remove()
        par = parallelize(model, ring=2)
        try:
            model(**_inputs("padded_uneven"))
        except ParallelConfigError as exc:
            res["ring_uneven_error"] = str(exc)
        finally:
            par.remove()
        # the plan without its key mask: diffusers' plan format alone
        family = family_of(model)
        register_family(dataclasses.replace(  # in this process, over the entry point's
            family, parallel_plan=lambda t: dataclasses.replace(family.parallel_plan(t), key_masks={})))
        par = parallelize(model, ulysses=2)
        try:
            for case in ("full", "padded"):
                res[f"no_key_mask/{case}"] = model(**_inputs(case))[0]
        finally:
            par.remove()
            unregister_family(family.name)
        par = parallelize(model, cfg=2)
        try:
            res["cfg"] = _cfg_steps(model)
        finally:
            par.remove()
    for mode in ("ulysses", "ring"):
        par = parallelize(model, **{mode: 2})
        try:
            res[f"cached/{mode}"] = _cached(model, "padded")
        finally:
            par.remove()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return _single_process()


@pytest.fixture(scope="module")
def ranks(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_hunyuan")
    _spawn(_rank_main, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item() / want.abs().max().item()


# -- the plan ---------------------------------------------------------------------------------------
def test_plan_shape():
    from videocache.distributed import get_parallel_plan

    model = tiny_hunyuan()
    plan = get_parallel_plan(model)  # the registered HunyuanVideo adapter's
    inputs = _inputs("padded_uneven")
    assert plan.segments(model, (), inputs) == {"video": 45, "text": 31}
    assert plan.sequence_length(model, (), inputs) == 45
    assert plan.empty_output(model, (), inputs).shape == (1, 16, 3, 6, 10)
    assert plan.key_masks == {"transformer_blocks.*": "attention_mask", "single_transformer_blocks.*": "attention_mask"}
    assert "transformer_blocks.0" in plan.sequence and "context_embedder" not in plan.sequence  # after the refiner


def test_ranks_key_order():
    from videocache.distributed.sequence import ranks_key_order

    keys = torch.arange(45 + 31)  # video 0..44, text 45..75
    got = ranks_key_order(keys, (45, 31), 2).tolist()
    assert got == [*range(0, 23), *range(45, 61), *range(23, 45), *range(61, 76)]
    mask = torch.ones(2, 1, 1, 80 + 32, dtype=torch.bool)
    mask[0, ..., 80 + 9:] = False
    got = ranks_key_order(mask, (80, 32), 2)
    assert got[0, 0, 0].tolist() == [True] * (40 + 9) + [False] * 7 + [True] * 40 + [False] * 16
    assert got[1].all()


# -- 2 processes == one process ---------------------------------------------------------------------
@pytest.mark.parametrize("mode, case", [("ulysses", c) for c in CASES] + [("ring", c) for c in RING_CASES])
def test_parallel_equals_one_process(single, ranks, mode, case):
    for res in ranks:  # every rank ends with the whole prediction
        assert _rel_error(res[f"{mode}/{case}"], single[case]) <= TOLERANCE[mode]


def test_padded_prompt_needs_the_reordered_key_mask(single, ranks):
    """Without the key mask's reordering the split is right for an all-True mask only."""
    for res in ranks:
        assert _rel_error(res["no_key_mask/full"], single["full"]) <= TOLERANCE["ulysses"]
        assert _rel_error(res["no_key_mask/padded"], single["padded"]) > 1e-3


def test_ring_with_uneven_shards_and_a_key_mask_is_a_one_line_error(ranks):
    for res in ranks:
        message = res["ring_uneven_error"]
        assert "ring attention over token counts that 2 does not divide (45 video and 31 text)" in message
        assert "use --ulysses" in message and "\n" not in message


def test_cfg_parallel_equals_one_process(single, ranks):
    for res in ranks:
        for got, want in zip(res["cfg"], single["cfg"], strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_cached_parallel_equals_one_process(single, ranks, mode):
    """The HunyuanVideo adapter's block hooks on the token shards of a padded prompt: the same decisions
    (executed calls) as one process. (The computed fraction is not compared: the adapter counts a shard's
    attention FLOPs against its own keys, (Nv + Nt)^2 per rank, so the per-rank fraction differs from one
    process's, 0.685 against 0.697 here.)"""
    want = single["cached"]
    assert want["fraction"] < 1.0  # the table reuses
    for res in ranks:
        got = res[f"cached/{mode}"]
        for g, w in zip(got["outs"], want["outs"], strict=True):
            assert _rel_error(g, w) <= TOLERANCE[mode]
        assert got["calls"] == want["calls"]  # the same decisions as one process
        assert 0 < got["peak"] <= 0.55 * want["peak"]  # each rank keeps its shard of video and text


# -- 4 processes: Ulysses x ring, and CFG x Ulysses -------------------------------------------------------
USP_CASES = ("full", "padded", "padded_batch2")  # 80 video and 32 text tokens: 20 and 8 per rank


def _rank_main_4(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    from videocache.distributed import parallelize, process_state

    state = process_state()
    model = tiny_hunyuan()
    res: dict = {}
    with torch.no_grad():
        par = parallelize(model, ulysses=2, ring=2)
        try:
            for case in USP_CASES:
                res[f"usp/{case}"] = model(**_inputs(case))[0]
        finally:
            par.remove()
        par = parallelize(model, ulysses=2, cfg=2)
        try:
            res["cfg_ulysses"] = _cfg_steps(model)
        finally:
            par.remove()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


@pytest.fixture(scope="module")
def ranks4(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_hunyuan4")
    _spawn(_rank_main_4, 4, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.mark.parametrize("case", USP_CASES)
def test_ulysses_x_ring_equals_one_process(single, ranks4, case):
    """Ring blocks of Ulysses groups: each ring block takes its group's slice of the reordered mask."""
    for res in ranks4:
        assert _rel_error(res[f"usp/{case}"], single[case]) <= TOLERANCE["ring"]


def test_cfg_x_ulysses_equals_one_process(single, ranks4):
    for res in ranks4:
        for got, want in zip(res["cfg_ulysses"], single["cfg"], strict=True):
            assert _rel_error(got, want) <= TOLERANCE["ulysses"]
