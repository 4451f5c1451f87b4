"""Sequence (Ulysses) and CFG parallelism on 2 gloo processes on the CPU, against one process.

The 2-process runs are spawned by the tests themselves (torch.multiprocessing, and one `accelerate
launch` of scripts/generate.py), each with a time limit, so that a hang fails instead of blocking.
The single-process references run in the test process.

Measured on the 2-core CPU machine: Ulysses and CFG parallelism are bit-identical to one process (maximum
difference 0.0), uncached and cached, also for an odd token count and for 3 heads over 2 ranks. CFG
parallelism is exact by construction (each branch runs the same full-sequence arithmetic); Ulysses
computes each token's projections on a shard of the rows, which the tests accept within 1e-5 of the
output's scale in case another BLAS blocks rows differently. Ring attention sums the softmax in two
blocks merged by their log-sum-exp, a different float32 order: one transformer call differs by 4e-7 of
its scale, the latents after 4-10 sampling steps by 2.5e-5 (about 1e-5 of their scale); the tolerance is
1e-4 of the scale. The videos written by scripts/generate.py under accelerate launch are identical for
Ulysses and CFG; ring's differ in 2.6 % of the values (H.264 takes some other block decisions for the
slightly different frames; 59.3 dB PSNR, at most 8 grey levels), which the test accepts at >= 40 dB.
Bit identity also needs the weights at the same memory alignment in every process: on an AVX512 CPU MKL's
float32 matmuls round by alignment (see test_cpu_and_cpu0_load_the_same_weights_into_the_same_memory_layout).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left on a black background"
SIZE = {"num_frames": 17, "height": 64, "width": 64, "guidance_scale": 5.0}
STEPS = 4  # uncached runs
CACHED_STEPS = 10  # the reference-wan profile covers 10-100 steps
SPAWN_TIMEOUT_S = 240
TOLERANCE = {"cfg": 0.0, "ulysses": 1e-5, "ring": 1e-4}  # relative to the largest output value


# -- shared by the test process (one process) and the spawned ranks ---------------------------------
def _load():
    from videocache.pipelines.loader import load_pipeline

    pipe = load_pipeline("reference-wan", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, steps: int) -> torch.Tensor:
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(0), **SIZE)
    return out.frames


def _cached(pipe, make_parallel=None, parallel_first: bool = False):
    """Latents and the engine's figures of the `fast` preset, the cache applied before or after the
    parallelism; returns (latents, stats) or the one-line error of the first call."""
    import videocache

    par = make_parallel() if (make_parallel and parallel_first) else None
    engine = videocache.apply(pipe, "reference-wan", "fast", num_inference_steps=CACHED_STEPS)
    if make_parallel and not parallel_first:
        par = make_parallel()
    try:
        latents = _generate(pipe, CACHED_STEPS)
        stats = engine.stats()
        return latents, {k: stats[k] for k in ("computed_fraction", "cache_peak_bytes")}
    except RuntimeError as exc:
        return None, {"error": str(exc)}
    finally:
        videocache.remove(pipe)
        if par is not None:
            par.remove()


def _odd_inputs(in_channels: int, text_dim: int, latent: tuple[int, int, int]):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, in_channels, *latent, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 7, text_dim, generator=g),
        "return_dict": False,
    }


def _tiny_three_heads():
    """A random 3-head Wan (heads not divisible by the Ulysses degree), identical in every process."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()


# latent (frames, height, width) -> tokens = f * h/2 * w/2: 3 * 9 * 9 = 243 and 3 * 3 * 5 = 45, both odd
ODD_LATENT = (3, 18, 18)
TINY_LATENT = (3, 6, 10)


@torch.no_grad()
def _transformer_outputs(pipe, make_parallel=None) -> dict[str, torch.Tensor]:
    out = {}
    for name, model, inputs in (
        ("odd_tokens", pipe.transformer, _odd_inputs(16, 64, ODD_LATENT)),
        ("three_heads", _tiny_three_heads(), _odd_inputs(4, 32, TINY_LATENT)),
    ):
        par = make_parallel(model) if make_parallel else None
        try:
            out[name] = model(**inputs)[0]
        finally:
            if par is not None:
                par.remove()
    return out


# -- the spawned ranks ------------------------------------------------------------------------------
def _init_rank(rank: int, world: int, port: int) -> None:
    """What every spawned rank sets first: the rendezvous, one thread, no library warnings."""
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    _init_rank(rank, world, port)
    from videocache.distributed import parallelize, process_state

    state = process_state()
    assert state.num_processes == world and state.process_index == rank
    pipe = _load()
    res: dict = {}
    for mode, kw in (("ulysses", {"ulysses": 2}), ("ring", {"ring": 2}), ("cfg", {"cfg": 2})):
        par = parallelize(pipe, **kw)
        res[mode] = _generate(pipe, STEPS)
        par.remove()
        res[f"{mode}_fast"] = _cached(pipe, lambda kw=kw: parallelize(pipe, **kw))
        res[f"{mode}_fast_parallel_first"] = _cached(pipe, lambda kw=kw: parallelize(pipe, **kw), parallel_first=True)
    res["transformer"] = _transformer_outputs(pipe, lambda model: parallelize(model, ulysses=2))
    res["transformer_ring"] = _transformer_outputs(pipe, lambda model: parallelize(model, ring=2))
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    state.wait_for_everyone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, nprocs: int, *args, timeout: float = SPAWN_TIMEOUT_S) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {nprocs} spawned ranks did not finish within {timeout:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single():
    """One process: the same runs without any parallelism."""
    torch.set_num_threads(1)
    pipe = _load()
    return {
        "uncached": _generate(pipe, STEPS),
        "fast": _cached(pipe),
        "transformer": _transformer_outputs(pipe),
    }


@pytest.fixture(scope="module")
def ranks(single, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    _spawn(_rank_main, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close(got: torch.Tensor, want: torch.Tensor, mode: str) -> None:
    assert got.shape == want.shape
    if TOLERANCE[mode] == 0.0:
        assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():.3g}"
    else:
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= TOLERANCE[mode] * scale


# -- uncached: parallel == one process ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ulysses", "ring", "cfg"])
def test_uncached_parallel_equals_one_process(single, ranks, mode):
    for res in ranks:  # every rank ends with the full latents
        _assert_close(res[mode], single["uncached"], mode)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
@pytest.mark.parametrize("case", ["odd_tokens", "three_heads"])
def test_awkward_sizes_equal_one_process(single, ranks, case, mode):
    """243 tokens over 2 ranks (uneven shards), and a 3-head model with 45 tokens (Ulysses pads the heads
    to 4)."""
    key = "transformer" if mode == "ulysses" else f"transformer_{mode}"
    for res in ranks:
        _assert_close(res[key][case], single["transformer"][case], mode)


# -- the cache on a parallel transformer ------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, order",
    [("ulysses", ""), ("ring", ""), ("cfg", ""), ("ulysses", "_parallel_first"), ("ring", "_parallel_first")],
)
def test_fast_preset_parallel_equals_one_process(single, ranks, mode, order):
    """The cache applied before the parallelism, or after it (sequence parallelism only)."""
    want, want_stats = single["fast"]
    for res in ranks:
        got, stats = res[f"{mode}_fast{order}"]
        _assert_close(got, want, mode)
        # decisions come from the table: the same computed fraction on every rank, and the same as one process
        assert stats["computed_fraction"] == pytest.approx(want_stats["computed_fraction"], abs=1e-12)
        # each rank keeps only its shard (Ulysses, ring) or its branch (CFG): half the single-process bytes
        assert 0 < stats["cache_peak_bytes"] <= 0.55 * want_stats["cache_peak_bytes"]


def test_cache_after_cfg_parallelism_is_a_clear_error(ranks):
    for res in ranks:
        got, info = res["cfg_fast_parallel_first"]
        assert got is None
        assert "apply the cache (videocache.apply) before videocache.distributed.parallelize" in info["error"]
        assert "\n" not in info["error"]


# -- configurations that cannot run: one line, before any model is loaded ----------------------------
def test_check_settings_one_line_errors():
    from videocache.distributed import ParallelConfigError, ParallelSettings, check_settings

    cases = [
        (ParallelSettings(ulysses=4), 2, {}, "needs 4 processes, but 2 were launched"),
        (ParallelSettings(ulysses=2, cfg=2), 2, {}, "needs 2 x 2 = 4 processes"),
        (ParallelSettings(ulysses=2), 1, {}, "but 1 was launched"),
        (ParallelSettings(ulysses=0), 1, {}, "--ulysses must be an integer >= 1"),
        (ParallelSettings(ulysses=8), 8, {"tokens": 5}, "splits the 5 video tokens of this size over 8 ranks, more ranks than tokens"),
        (ParallelSettings(ulysses=8), 8, {"heads": 12}, "12 attention heads cannot be spread over --ulysses 8"),
        (ParallelSettings(cfg=2), 2, {"guidance_scale": 1.0}, "turns guidance off"),
        (ParallelSettings(ulysses=2, ring=2, cfg=2), 4, {}, "--ulysses 2 --ring 2 --cfg-parallel needs 2 x 2 x 2 = 8"),
        (ParallelSettings(ring=0), 1, {}, "--ring must be an integer >= 1"),
        (ParallelSettings(ulysses=2, ring=2), 4, {"tokens": 243}, "needs a token count divisible by 4"),
        (ParallelSettings(ulysses=2, ring=2), 4, {"heads": 3}, "needs the 3 attention heads divisible by 2"),
    ]
    for settings, world, kw, message in cases:
        with pytest.raises(ParallelConfigError) as info:
            check_settings(settings, world, **kw)
        assert message in str(info.value) and "\n" not in str(info.value)
    check_settings(ParallelSettings(ulysses=2), 2, tokens=243, heads=3)  # uneven tokens and heads: padded
    check_settings(ParallelSettings(ulysses=4), 4, heads=12)  # Wan2.1-1.3B's 12 heads over 4
    check_settings(ParallelSettings(ring=8), 8, tokens=243, heads=12)  # ring splits tokens only, unevenly too
    check_settings(ParallelSettings(ulysses=4, ring=2, cfg=2), 16, tokens=32760, heads=12)


def test_reference_wan_geometry_from_config_files():
    from videocache.pipelines.loader import REFERENCE_DIR
    from videocache.pipelines.wan.loading import wan_geometry

    assert wan_geometry(str(REFERENCE_DIR), 17, 64, 64) == (4, 320)
    assert wan_geometry("Wan-AI/not-downloaded", 81, 480, 832) == (None, None)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ulysses", "2"], "--ulysses 2 needs 2 processes, but 1 was launched"),
        (["--cfg-parallel"], "--cfg-parallel needs 2 processes"),
        (["--ring", "2", "--ulysses", "2"], "--ulysses 2 --ring 2 needs 2 x 2 = 4 processes, but 1 was launched"),
        (["--ulysses", "400", "--frames", "17"], "needs 400 processes"),
    ],
)
def test_generate_parallel_flags_fail_before_loading(monkeypatch, capsys, flags, message):
    import videocache.pipelines.loader as loader
    from videocache.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load_pipeline", no_loading)
    assert main(["generate", "--prompt", PROMPT, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videocache: error:") and "\n" not in err and message in err


def test_accelerate_configs_ship_for_1_2_4_8_processes():
    import yaml

    for n in (1, 2, 4, 8):
        cfg = yaml.safe_load((ROOT / "distributed" / f"accelerate_{n}proc.yaml").read_text())
        assert cfg["num_processes"] == n and cfg["num_machines"] == 1
        assert cfg["distributed_type"] == ("NO" if n == 1 else "MULTI_GPU")  # MULTI_GPU also starts CPU processes


def test_cpu_and_cpu0_load_the_same_weights_into_the_same_memory_layout():
    """The ranks load on accelerate's 'cpu:0', one process on 'cpu'. Moving the weights to 'cpu:0' used to copy
    them out of their safetensors memory map (addresses 40 mod 64 there) into 64-byte-aligned memory, and on
    an AVX512 CPU MKL's float32 matmuls round differently for the two: the first transformer call differed
    by 2.6e-6, the latents by 4e-6 of their scale, the H.264 videos by up to 11 levels."""
    from videocache.pipelines.loader import load_pipeline

    cpu, cpu0 = load_pipeline("reference-wan", device="cpu"), load_pipeline("reference-wan", device="cpu:0")
    layout = [[p.data_ptr() % 64 for p in pipe.transformer.parameters()] for pipe in (cpu, cpu0)]
    assert layout[0] == layout[1]
    inputs = _odd_inputs(16, 64, TINY_LATENT)
    with torch.no_grad():
        assert torch.equal(cpu.transformer(**inputs)[0], cpu0.transformer(**inputs)[0])


# -- end to end: accelerate launch of scripts/generate.py ---------------------------------------------
E2E = ["--profile", "reference-wan", "--preset", "fast", "--steps", str(CACHED_STEPS), "--prompt", PROMPT, "--no-progress"]


@pytest.fixture(scope="module")
def one_process_video(tmp_path_factory):
    from videocache.cli import main

    out = tmp_path_factory.mktemp("one")
    assert main(["generate", *E2E, "--out", str(out / "one.mp4"), "--summary", str(out / "one.json")]) == 0
    return out / "one.mp4", json.loads((out / "one.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--ulysses", "2"], ["--ring", "2"], ["--cfg-parallel"]], ids=lambda f: f[0][2:])
def test_accelerate_launch_generate_writes_the_single_process_video(one_process_video, tmp_path, flags):
    import imageio.v3 as iio

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
         str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "generate.py"),
         *flags, *E2E, "--out", "two.mp4", "--summary", "two.json"],
        capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert proc.stdout.count('"video"') == 1  # rank 0 prints, once
    one_path, s1 = one_process_video
    one, two = iio.imread(one_path), iio.imread(tmp_path / "two.mp4")
    assert one.shape == two.shape
    diff = one.astype(float) - two.astype(float)
    if flags[0] == "--ring":  # latents within 1e-5 of their scale, but H.264 then takes other decisions here and there
        assert 10 * np.log10(255.0**2 / max((diff**2).mean(), 1e-12)) >= 40.0  # measured: 59.3 dB, 2.6 % of values differ
    else:  # bit-identical latents, the same video
        assert np.abs(diff).max() == 0
    s2 = json.loads((tmp_path / "two.json").read_text())
    per_rank = s2["parallel"]["per_rank"]
    assert s2["parallel"]["ranks_agree"] and len(per_rank) == 2
    assert all(r["computed_fraction"] == s1["computed_fraction"] for r in per_rank)
    assert all(r["cache_peak_bytes"] == s1["cache_peak_bytes"] // 2 for r in per_rank)
