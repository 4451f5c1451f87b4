"""Method specs, the FLOP counter, and every in-process method measured on a tiny random Wan pipeline."""

from __future__ import annotations

import math

import pytest
import torch

import videocache.eval_vbench.peers as m
from videocache.eval_vbench.comparison.report import pareto_front
from videocache.eval_vbench.comparison.run_store import Item, RunSettings, RunStore
from videocache.eval_vbench.comparison.worker import GroupRunner, frames_digest
from videocache.eval_vbench.metrics.cache_memory import tensor_bytes
from videocache.eval_vbench.metrics.flops import (
    ComponentCounter,
    cross_attention_flops,
    feed_forward_flops,
    self_attention_flops,
)
from videocache.eval_vbench.peers.cachedit import CacheDitDBCacheMethod
from videocache.eval_vbench.peers.diffusers_caches import (
    FBCacheMethod,
    MagCacheMethod,
    PABMethod,
    TaylorSeerMethod,
    parse_mag_ratios,
)
from videocache.eval_vbench.peers.videocache_engine import VideocacheMethod


# -- parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected, canonical",
    [
        ("none", m.NoCache(), "none"),
        (" NONE ", m.NoCache(), "none"),
        ("videocache:reference-wan", VideocacheMethod("reference-wan"), "videocache:reference-wan"),
        (
            "videocache:reference-wan:fast",
            VideocacheMethod("reference-wan", "fast"),
            "videocache:reference-wan:fast",
        ),
        ("diffusers:fbcache:0.05", FBCacheMethod(0.05), "diffusers:fbcache:0.05"),
        ("diffusers:taylorseer:3", TaylorSeerMethod(3), "diffusers:taylorseer:3"),
        ("diffusers:magcache:0.060", MagCacheMethod(0.06), "diffusers:magcache:0.06"),
        ("diffusers:pab:2", PABMethod(2), "diffusers:pab:2"),
        ("cachedit:dbcache:1:0:0.08", CacheDitDBCacheMethod(1, 0, 0.08), "cachedit:dbcache:1:0:0.08"),
        (
            "cachedit:dbcache-taylorseer:2:1:0.1",
            CacheDitDBCacheMethod(2, 1, 0.1, 1),
            "cachedit:dbcache-taylorseer:2:1:0.1:1",
        ),
        (
            "cachedit:dbcache-taylorseer:1:0:0.1:2",
            CacheDitDBCacheMethod(1, 0, 0.1, 2),
            "cachedit:dbcache-taylorseer:1:0:0.1:2",
        ),
    ],
)
def test_valid_specs(spec, expected, canonical):
    method = m.parse_method(spec)
    assert method == expected
    assert method.spec == canonical
    assert m.parse_method(method.spec) == method  # canonical forms parse back to the same method


def test_only_cachedit_needs_its_own_process_and_families():
    assert [m.parse_method(s).isolated for s in ("none", "diffusers:pab:2", "videocache:x")] == [False] * 3
    assert m.parse_method("cachedit:dbcache:1:0:0.1").isolated
    assert m.family_of(m.parse_method("cachedit:dbcache-taylorseer:1:0:0.1")) == "cachedit:dbcache-taylorseer"
    assert m.family_of(m.parse_method("diffusers:magcache:0.1")) == "diffusers:magcache"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("teacache:0.1", "unknown method spec"),
        ("diffusers:fastercache:1", "unknown method spec"),
        ("diffusers:fbcache", "expected diffusers:fbcache:THRESHOLD"),
        ("diffusers:fbcache:abc", "THRESHOLD must be a number"),
        ("diffusers:fbcache:-0.1", "THRESHOLD must be a positive number"),
        ("diffusers:magcache:nan", "THRESHOLD must be a positive number"),
        ("diffusers:fbcache:inf", "THRESHOLD must be a positive number"),
        ("diffusers:taylorseer:1", "INTERVAL must be an integer >= 2"),
        ("diffusers:taylorseer:2.5", "INTERVAL must be an integer >= 2"),
        ("diffusers:pab:0", "RANGE must be an integer >= 2"),
        ("videocache:", "expected videocache:PROFILE[:PRESET]"),
        ("videocache:a:b:c", "expected videocache:PROFILE[:PRESET]"),
        ("cachedit:dbcache:1:0", "expected cachedit:dbcache:Fn:Bn:THRESHOLD"),
        ("cachedit:dbcache:0:0:0.1", "Fn must be an integer >= 1"),
        ("cachedit:dbcache:1:-1:0.1", "Bn must be an integer >= 0"),
        ("cachedit:dbcache-taylorseer:1:0:0.1:9", "ORDER must be 1 to 4"),
        ("cachedit:other:1:0:0.1", "unknown method spec"),
    ],
)
def test_bad_specs_give_one_line_listing_valid_forms(spec, fragment):
    with pytest.raises(ValueError) as info:
        m.parse_method(spec)
    text = str(info.value)
    assert fragment in text
    assert "\n" not in text
    assert "valid forms: none, videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise], diffusers:fbcache:THRESHOLD" in text


def test_parse_methods_puts_none_first_once_and_drops_duplicates():
    methods = m.parse_methods(["diffusers:fbcache:0.10", "none", "diffusers:fbcache:0.1", "diffusers:pab:2"])
    assert [x.spec for x in methods] == ["none", "diffusers:fbcache:0.1", "diffusers:pab:2"]


def test_parse_mag_ratios_averages_the_printed_contexts():
    printed = (
        "noise\n\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n"
        "[1.0, 0.9, 1.1]\n\n\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n"
        "[1.0, 0.7, 1.3]\n\n"
    )
    assert parse_mag_ratios(printed) == pytest.approx([1.0, 0.8, 1.2])
    with pytest.raises(RuntimeError, match="printed no ratios"):
        parse_mag_ratios("nothing here")


# -- FLOPs, memory, Pareto -----------------------------------------------------------------------------
def test_flop_formulas_by_hand():
    assert self_attention_flops(n=3, d=2) == 2 * (4 * 3 * 4 + 2 * 9 * 2)  # 168
    assert self_attention_flops(3, 2) == 168
    assert cross_attention_flops(n=3, m=5, d=2) == 2 * (2 * 3 * 4 + 2 * 5 * 4 + 2 * 3 * 5 * 2)  # 248
    assert feed_forward_flops(n=3, d=2, f=8) == 2 * (2 * 3 * 2 * 8)  # 192


def counted_run(pipe, steps: int):
    """One tiny guided generation (5 frames 32x32) under the component counter; returns its counts."""
    with ComponentCounter(pipe.transformer) as counter:
        pipe(
            "a red circle moving left on a black background",
            num_inference_steps=steps,
            num_frames=5,
            height=32,
            width=32,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    return counter.counts


def test_counter_counts_an_uncached_run(tiny_random_pipe):
    pipe, steps = tiny_random_pipe, 2
    counts = counted_run(pipe, steps)
    calls = steps * 2 * len(pipe.transformer.blocks)  # cond + uncond passes
    assert dict(counts.calls) == {"attn1": calls, "attn2": calls, "ffn": calls}
    n = 2 * 4 * 4  # 5 frames -> 2 latent frames, 32x32 -> 8x8 latents -> 4x4 patches
    d, f, text = 128, 512, 512  # hidden, ffn width, Wan's padded text length
    assert counts.flops["attn1"] == calls * self_attention_flops(n, d)
    assert counts.flops["attn2"] == calls * cross_attention_flops(n, text, d)
    assert counts.flops["ffn"] == calls * feed_forward_flops(n, d, f)


def test_tensor_bytes_dedupes_storages_and_skips_modules():
    t = torch.zeros(10, 4)  # 160 bytes
    holder = {
        "a": t,
        "view": t[2:],
        "list": [torch.zeros(3, dtype=torch.float64)],
        "module": torch.nn.Linear(100, 100),
    }
    assert tensor_bytes([holder, (t,)]) == 160 + 24


def test_pareto_front():
    points = [(1.0, math.inf), (0.5, 30.0), (0.6, 29.0), (0.3, 25.0), (0.3, 20.0), (0.8, 35.0)]
    assert pareto_front(points) == [3, 1, 5, 0]


# -- methods measured on a tiny random pipeline (in-process; cache-dit only checks its input here) -------
def _runner(pipe, tmp_path, steps: int) -> tuple[GroupRunner, Item]:
    settings = RunSettings(model="tiny", steps=steps, frames=5, height=32, width=32, guidance_scale=5.0)
    item = Item("a red circle moving left on a black background", seed=0)
    return GroupRunner(pipe, settings, RunStore(tmp_path), first_item=item), item


def test_diffusers_methods_skip_measured_work_and_remove_cleanly(tiny_random_pipe, tmp_path):
    specs = [
        "none",
        "diffusers:fbcache:0.2",
        "diffusers:taylorseer:2",
        "diffusers:magcache:0.1",
        "diffusers:pab:2",
    ]
    runner, item = _runner(tiny_random_pipe, tmp_path, steps=6)
    messages = []
    runner.run_item(item, [m.parse_method(s) for s in specs], send=messages.append)
    assert [x["type"] for x in messages] == ["done"] * len(specs), messages
    records = {s: runner.store.read_record(s, item) for s in specs}
    assert records["none"]["computed_fraction"] == 1.0 and records["none"]["psnr"] == math.inf
    for spec in specs[1:]:
        r = records[spec]
        assert r["computed_fraction"] < 1.0, spec  # measured from executed modules
        assert math.isfinite(r["psnr"]) and r["ssim"] < 1.0, spec
        assert r["baseline_sha1"] == records["none"]["frames_sha1"]
        assert r["cache_peak_bytes"] > 0, spec
    # TaylorSeer really forecasts every component between full steps (with Wan identifiers)
    executed = records["diffusers:taylorseer:2"]["executed"]["calls"]
    assert set(executed) == {"attn1", "attn2", "ffn"} and all(v < 6 * 2 * 8 for v in executed.values())
    # MagCache was calibrated once, on the first prompt, and the ratios kept for reruns
    ratios = RunStore(tmp_path).load_calibration()["magcache_ratios_6"]
    assert len(ratios) == 6 and ratios[0] == 1.0
    assert records["diffusers:magcache:0.1"]["info"]["mag_ratios"] == pytest.approx(ratios, abs=1e-6)
    # every hook is gone: the pipeline is uncached again, bit for bit
    again, _ = runner._generate(item)
    assert records["none"]["frames_sha1"] == frames_digest(again.frames)


def test_diffusers_taylorseer_default_identifiers_would_skip_nothing(tiny_random_pipe):
    """Why the Wan identifiers are passed: with diffusers' defaults TaylorSeer hooks nothing on Wan."""
    from diffusers import TaylorSeerCacheConfig

    pipe = tiny_random_pipe
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2))
    try:
        counts = counted_run(pipe, steps=6)
    finally:
        pipe.transformer.disable_cache()
    assert dict(counts.calls) == {"attn1": 96, "attn2": 96, "ffn": 96}


def test_cachedit_rejects_fn_bn_covering_every_block(tiny_random_pipe):
    method = m.parse_method("cachedit:dbcache:6:2:0.1")
    with pytest.raises(ValueError, match="leaves none of the model's 8 blocks"):
        method.apply(tiny_random_pipe, m.MethodSetup(num_inference_steps=6))


def test_videocache_method_is_cross_checked_with_the_counter(tiny_random_pipe, tmp_path):
    runner, item = _runner(tiny_random_pipe, tmp_path, steps=10)  # the reference profile covers 10-100 steps
    runner.run_item(item, [m.NoCache(), m.parse_method("videocache:reference-wan:fast")])
    r = runner.store.read_record("videocache:reference-wan:fast", item)
    assert r["computed_fraction"] < 1.0
    assert r["engine_computed_fraction"] == pytest.approx(r["computed_fraction"], abs=5e-3)
    assert r["info"]["preset"] == "fast"
    assert r["cache_peak_bytes"] is not None and math.isfinite(r["psnr"])


def test_a_failing_method_is_reported_and_the_others_still_recorded(tiny_random_pipe, tmp_path):
    runner, item = _runner(tiny_random_pipe, tmp_path, steps=4)
    messages = []
    methods = [
        m.NoCache(),
        m.parse_method("videocache:no-such-profile"),
        m.parse_method("diffusers:fbcache:0.2"),
    ]
    runner.run_item(item, methods, send=messages.append)
    errors = [x for x in messages if x["type"] == "error"]
    assert len(errors) == 1 and errors[0]["method"] == "videocache:no-such-profile"
    assert "\n" not in errors[0]["message"]
    assert runner.store.read_record("videocache:no-such-profile", item) is None  # retried on the next run
    assert runner.store.read_record("diffusers:fbcache:0.2", item)["computed_fraction"] < 1.0
    assert runner.store.read_record("none", item)["psnr"] == math.inf


@pytest.mark.parametrize(
    "spec, preset, switch",
    [("videocache:reference-wan:fast:eb", "fast", "eb"), ("videocache:reference-wan:eb-inv", None, "eb-inv"),
     ("videocache:reference-wan:slow:noeb", "slow", "noeb"), ("videocache:reference-wan:fast", "fast", None)],
)
def test_videocache_spec_exposure_bias_switch(spec, preset, switch):
    method = m.parse_method(spec)
    assert (method.preset, method.exposure_bias, method.spec) == (preset, switch, spec)
    override = method.exposure_bias_override()
    if switch is None:
        assert override is None
    elif switch == "noeb":
        assert override is False
    else:
        assert override.enabled and override.sign == (-1 if switch == "eb-inv" else 1)


@pytest.mark.parametrize(
    "spec, switch, blockwise",
    [("videocache:reference-wan:fast:blockwise", None, True), ("videocache:reference-wan:fast:noeb:blockwise", "noeb", True),
     ("videocache:reference-wan:blockwise", None, True), ("videocache:reference-wan:fast", None, False)],
)
def test_videocache_spec_blockwise_switch(spec, switch, blockwise):
    method = m.parse_method(spec)
    assert (method.exposure_bias, method.blockwise, method.spec) == (switch, blockwise, spec)
    same = m.parse_method(spec.replace(":blockwise", ""))
    assert (method.config_digest() == same.config_digest()) == (not blockwise)  # a resumed compare reruns it


@pytest.mark.parametrize("scope, hooked", [("components", 2 * 3 + 3 * 3), ("attn", 5)])
def test_taylorseer_modules_on_hunyuanvideo(scope, hooked):
    """Attention only: diffusers' defaults hook the 5 blocks' attn; per component: the dual blocks' attn,
    ff and ff_context, and each single block's proj_out (cached) with its attn and proj_mlp (skipped)."""
    from types import SimpleNamespace

    from videocache.pipelines.hunyuan.tiny import tiny_hunyuan
    from videocache.pipelines.hunyuan.tiny import tiny_inputs as inputs

    method = m.parse_method("diffusers:taylorseer:2" + (":attn" if scope == "attn" else ""))
    assert method.scope == scope and m.parse_method(method.spec) == method
    model = tiny_hunyuan()
    pipe = SimpleNamespace(transformer=model)
    applied = method.apply(pipe, m.MethodSetup(num_inference_steps=4))
    try:
        names = [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks
                 and any("taylorseer" in k for k in m._diffusers_hook.hooks)]
        assert len(names) == hooked, names
        with torch.no_grad(), model.cache_context("cond"):
            model(**inputs(), timestep=torch.tensor([500.0]))
    finally:
        applied.remove()
