"""STDiT3's parallel plan (`videocache.pipelines.opensora.parallel`: DSP, frames split for spatial blocks,
positions for temporal attention, an all-to-all between) on 2 and 4 gloo processes on the CPU, against
one process: the tiny random STDiT3Model called directly and the tiny OpenSoraPipeline, with grids that
split evenly and unevenly, CFG parallelism alone and with DSP, and the cache on (a PAB-like profile preset,
and a table whose uniform steps take the fused skip of the whole stack).

Measured (largest difference / output scale, every rank, CPU float32): 0 everywhere, i.e. bit-identical
to one process: DSP on 2 ranks (even and uneven grids, two captions in a batch), on 4 ranks, pipeline
latents uncached and cached (PAB preset and fused-skip table, with the same executed calls as one
process), CFG, CFG x DSP. DSP changes no reduction: every attention sees the same rows in the same order
and the rest is token-wise. The tolerance is still Ulysses' (1e-5 of the scale, tests/test_parallel.py),
since other devices may pick other kernels for other row counts; CFG is asserted bit-identical. Without
the all-to-all (a plan with no `switch`) the error is 7.1e-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .test_parallel import _init_rank, _spawn

TOLERANCE = 1e-5
STEPS = 4  # pipeline runs
TEXT = 12  # caption tokens of the direct calls
DEPTH = 2  # tiny_pipeline()'s spatial and temporal blocks each

# name -> latent (frames, height, width) and valid caption tokens per sample; grid T x S = f x (h/2 * w/2)
CASES = {
    "even": ((4, 8, 8), (TEXT,)),  # 4 x 16: 2 frames and 8 positions per rank
    "uneven": ((5, 6, 10), (7,)),  # 5 x 15: frames 3/2, positions 8/7
    "uneven_batch2": ((3, 6, 6), (5, TEXT)),  # 3 x 9, two captions padded differently
}
# pipeline sizes: (num_frames, height, width) -> latent grid
SIZES = {
    "even": (34, 64, 64),  # 10 latent frames x 16 positions
    "uneven": (17, 48, 80),  # 5 x 15
}


def _model():
    from videocache.pipelines.opensora.model import STDiT3Model
    from videocache.pipelines.opensora.model.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    return STDiT3Model(**TINY_TRANSFORMER).eval()


def _inputs(case: str, seed: int = 1, timestep: float = 700.0) -> dict:
    latent, valid = CASES[case]
    g = torch.Generator().manual_seed(seed)
    batch = len(valid)
    mask = torch.zeros(batch, TEXT, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return {
        "hidden_states": torch.randn(batch, 4, *latent, generator=g),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
        "encoder_attention_mask": mask,
        "height": latent[1] * 8, "width": latent[2] * 8,
        "return_dict": False,
    }


def _pipe():
    from videocache.pipelines.opensora.model.tiny import tiny_pipeline

    return tiny_pipeline()


def _generate(pipe, size: str) -> torch.Tensor:
    frames, height, width = SIZES[size]
    with torch.no_grad():
        return pipe("a red ball", num_frames=frames, height=height, width=width, num_inference_steps=STEPS,
                    guidance_scale=7.0, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def _profile(transformer, folder: Path) -> Path:
    """PAB's Open-Sora setting as a profile preset (tests/test_opensora_adapter.py's): spatial attention
    recomputed every 2nd step, temporal every 4th, cross-attention every 5th, after one warm-up step."""
    from videocache.pipelines.opensora.adapter import OpenSoraAdapter

    data = {
        "schema_version": 1, "name": "tiny-opensora", "model": OpenSoraAdapter().fingerprint(transformer),
        "steps": STEPS,
        "presets": {"pab": {"warmup_steps": 1, "rules": [
            {"stage": "all", "components": ["spatial_attn"], "interval": 2},
            {"stage": "all", "components": ["temporal_attn"], "interval": 4},
            {"stage": "all", "components": ["cross_attn"], "interval": 5}]}},
    }
    path = folder / "tiny-opensora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stack_table(transformer):
    """Steps 2 and 3 reuse every cell of step 1: uniform steps, which the engine skips as one fused skip
    of the whole stack (the blocks are still called, and return their input)."""
    from videocache import Action, BlockLayout, CacheTable
    from videocache.adapters import get_adapter

    layout = BlockLayout.from_fingerprint(get_adapter(transformer).fingerprint(transformer))
    actions = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    actions[2:] = int(Action.REUSE)
    return CacheTable(actions, layout=layout)


def _cached(pipe, size: str, folder: Path, preset: str, make_parallel=None) -> dict:
    """The latents and the engine's figures of a cached run (the cache applied first, as CFG needs)."""
    import videocache

    if preset == "pab":
        engine = videocache.apply(pipe, _profile(pipe.transformer, folder), "pab")
    else:
        engine = videocache.apply(pipe, table=_stack_table(pipe.transformer))
    par = make_parallel() if make_parallel else None
    temporal = []  # temporal attention calls: under DSP each is two all-to-alls
    counters = [b.attn.register_forward_hook(lambda *a: temporal.append(1)) for b in pipe.transformer.temporal_blocks]
    try:
        latents = _generate(pipe, size)
        stats = engine.stats()
    finally:
        for handle in counters:
            handle.remove()
        videocache.remove(pipe)
        if par is not None:
            par.remove()
    return {"latents": latents, "calls": dict(stats["calls"]), "fraction": stats["computed_fraction"],
            "fallbacks": stats["fallbacks"], "temporal_attn": len(temporal)}


@torch.no_grad()
def _single_process(folder: Path) -> dict:
    model = _model()
    res = {case: model(**_inputs(case))[0] for case in CASES}
    pipe = _pipe()
    for size in SIZES:
        res[f"pipe/{size}"] = _generate(pipe, size)
        for preset in ("pab", "stack"):
            res[f"cached/{preset}/{size}"] = _cached(pipe, size, folder, preset)
    return res


# -- the spawned ranks ------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    import dataclasses

    from videocache.distributed import ParallelConfigError, parallelize, process_state
    from videocache.family import family_of, register_family, unregister_family

    state = process_state()
    folder = Path(out_dir) / f"work{rank}"
    folder.mkdir()
    model = _model()
    res: dict = {}
    with torch.no_grad():
        par = parallelize(model, ulysses=2)
        res["describe"] = par.describe()
        try:
            for case in CASES:
                res[f"dsp/{case}"] = model(**_inputs(case))[0]
            one_frame = {**_inputs("even"), "hidden_states": torch.randn(1, 4, 1, 8, 8)}
            try:
                model(**one_frame)
            except ParallelConfigError as exc:
                res["one_frame_error"] = str(exc)
        finally:
            par.remove()
        try:
            parallelize(model, ring=2)
        except ParallelConfigError as exc:
            res["ring_error"] = str(exc)
        # the plan without its all-to-alls: temporal attention over the rank's own frames only
        family = family_of(model)
        no_switch = lambda t: dataclasses.replace(  # noqa: E731
            family.parallel_plan(t), axes=dataclasses.replace(family.parallel_plan(t).axes, switch={}))
        register_family(dataclasses.replace(family, parallel_plan=no_switch))  # in this process only
        par = parallelize(model, ulysses=2)
        try:
            res["no_switch/even"] = model(**_inputs("even"))[0]
        finally:
            par.remove()
            unregister_family(family.name)
    pipe = _pipe()
    for mode, kw in (("dsp", {"ulysses": 2}), ("cfg", {"cfg": 2})):
        for size in SIZES:
            par = parallelize(pipe, **kw)
            try:
                res[f"{mode}/pipe/{size}"] = _generate(pipe, size)
            finally:
                par.remove()
            for preset in ("pab", "stack"):
                res[f"{mode}/cached/{preset}/{size}"] = _cached(
                    pipe, size, folder, preset, lambda kw=kw: parallelize(pipe, **kw)
                )
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


def _rank_main_4(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    from videocache.distributed import parallelize, process_state

    state = process_state()
    model = _model()
    res: dict = {}
    with torch.no_grad():
        par = parallelize(model, ulysses=4)
        try:
            for case in ("even", "uneven"):
                res[f"dsp4/{case}"] = model(**_inputs(case))[0]
        finally:
            par.remove()
    pipe = _pipe()
    par = parallelize(pipe, ulysses=2, cfg=2)
    try:
        res["cfg_dsp/uneven"] = _generate(pipe, "uneven")
    finally:
        par.remove()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    torch.set_num_threads(1)
    return _single_process(tmp_path_factory.mktemp("opensora_single"))


@pytest.fixture(scope="module")
def ranks(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_opensora")
    _spawn(_rank_main, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ranks4(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_opensora4")
    _spawn(_rank_main_4, 4, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    err = (got - want).abs().max().item() / want.abs().max().item()
    print(f"relative max error {err:.2e}")
    return err


# -- the plan and the moves, one process --------------------------------------------------------------
def test_plan_shape():
    from videocache.distributed import get_parallel_plan

    model = _model()
    plan = get_parallel_plan(model)  # the registered Open-Sora adapter's
    inputs = _inputs("uneven")
    assert plan.axes.grid(model, (), inputs) == (5, 15)
    assert plan.sequence_length(model, (), inputs) == 75
    assert plan.empty_output(model, (), inputs).shape == (1, 8, 5, 6, 10)
    assert plan.axes.switch == {"temporal_blocks.*.attn": "x"}
    assert plan.axes.local_rows == {"spatial_blocks.*": "num_frames"}
    assert plan.axes.split == {"spatial_blocks.0": "hidden_states"} and plan.axes.gather == ("final_layer",)


def test_shard_sizes():
    from videocache.distributed.dsp import shard_sizes

    assert shard_sizes(5, 2) == [3, 2] and shard_sizes(15, 4) == [4, 4, 4, 3] and shard_sizes(16, 2) == [8, 8]
    assert shard_sizes(5, 2) == [len(p) for p in torch.arange(5).tensor_split(2)]


# -- 2 processes == one process ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_dsp_equals_one_process(single, ranks, case):
    for res in ranks:  # every rank ends with the whole prediction
        assert _rel_error(res[f"dsp/{case}"], single[case]) <= TOLERANCE


@pytest.mark.parametrize("size", list(SIZES))
def test_dsp_pipeline_equals_one_process(single, ranks, size):
    for res in ranks:
        assert _rel_error(res[f"dsp/pipe/{size}"], single[f"pipe/{size}"]) <= TOLERANCE


@pytest.mark.parametrize("size", list(SIZES))
def test_cfg_parallel_equals_one_process(single, ranks, size):
    for res in ranks:
        assert torch.equal(res[f"cfg/pipe/{size}"], single[f"pipe/{size}"])


@pytest.mark.parametrize("preset", ["pab", "stack"])
@pytest.mark.parametrize("size", list(SIZES))
def test_cached_dsp_equals_one_process(single, ranks, preset, size):
    """The cache engine on every rank's frame shard: the same decisions (executed calls) as one process and
    the same latents; with the PAB preset the served temporal attentions skip their all-to-alls, with the
    stack table the uniform steps take the fused skip."""
    want = single[f"cached/{preset}/{size}"]
    assert want["fraction"] < 1.0 and want["fallbacks"] == 0
    for res in ranks:
        got = res[f"dsp/cached/{preset}/{size}"]
        assert _rel_error(got["latents"], want["latents"]) <= TOLERANCE
        assert got["calls"] == want["calls"]
        assert got["fallbacks"] == 0
        # the temporal attentions (and their all-to-alls) the cache serves are not run
        assert got["temporal_attn"] == want["temporal_attn"] < 2 * STEPS * DEPTH


def test_dsp_needs_the_all_to_all(single, ranks):
    """Without the switch to positions the temporal attention sees the rank's own frames only: wrong."""
    for res in ranks:
        assert _rel_error(res["no_switch/even"], single["even"]) > 1e-3


@pytest.mark.parametrize("preset", ["pab", "stack"])
def test_cached_cfg_parallel_equals_one_process(single, ranks, preset):
    """Each rank of a CFG pair keeps its branch's cache: the latents are one process's bit for bit."""
    for size in SIZES:
        want = single[f"cached/{preset}/{size}"]
        for res in ranks:
            assert torch.equal(res[f"cfg/cached/{preset}/{size}"]["latents"], want["latents"])


def test_parallelism_says_it_is_dsp(ranks):
    assert [res["describe"]["dsp"] for res in ranks] == [True, True]
    assert [res["describe"]["ulysses_rank"] for res in ranks] == [0, 1]


def test_impossible_configurations_are_one_line_errors(ranks):
    for res in ranks:
        message = res["one_frame_error"]
        assert "1 latent frames cannot be split over 2 sequence-parallel ranks" in message and "\n" not in message
        message = res["ring_error"]
        assert "no ring variant" in message and "--ulysses 2" in message and "\n" not in message


# -- 4 processes: DSP over 4 ranks, and CFG x DSP -----------------------------------------------------
@pytest.mark.parametrize("case", ["even", "uneven"])
def test_dsp_over_4_ranks_equals_one_process(single, ranks4, case):
    for res in ranks4:
        assert _rel_error(res[f"dsp4/{case}"], single[case]) <= TOLERANCE


def test_cfg_x_dsp_equals_one_process(single, ranks4):
    for res in ranks4:
        assert _rel_error(res["cfg_dsp/uneven"], single["pipe/uneven"]) <= TOLERANCE
