"""The comparison's peers on Open-Sora 1.2 (STDiT3) with the tiny random OpenSoraPipeline: the FLOP counter
against a hand count, diffusers' caches attached to STDiT3's interleaved spatial / temporal blocks (First-
Block-Cache, MagCache, TaylorSeer, Pyramid Attention Broadcast), cache-dit's DBCache through one block list
in execution order, and the benchmark's Open-Sora method list."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import videocache.eval_vbench.peers as m
from videocache.eval_vbench.metrics.cache_memory import CachePeakProbe
from videocache.eval_vbench.metrics.flops import ComponentCounter
from videocache.eval_vbench.peers.diffusers_caches import (
    FBCacheMethod,
    PABMethod,
    TaylorSeerMethod,
    _diffusers_finds_blocks,
)
from videocache.pipelines.opensora.model.tiny import TINY_TRANSFORMER, tiny_pipeline
from videocache.pipelines.opensora.model.transformer import STDiT3Block

STEPS = 8
SETTINGS = dict(prompt="a red ball", num_frames=17, height=64, width=64, num_inference_steps=STEPS,
                guidance_scale=7.0, output_type="latent")
PEERS = ["diffusers:fbcache:0.3", "diffusers:magcache:0.3", "diffusers:taylorseer:2", "diffusers:taylorseer:3:attn",
         "diffusers:pab:2", "diffusers:pab:2:4:6"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def generate(pipe, steps: int = STEPS) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**(SETTINGS | {"num_inference_steps": steps}), generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def uncached(pipe):
    with ComponentCounter(pipe.transformer) as counter:
        latents = generate(pipe)
    return latents, counter.counts


# -- the FLOP counter ------------------------------------------------------------------------------------
def test_flop_counter_matches_a_hand_count(pipe):
    """Two steps with CFG (4 transformer calls) on the tiny model: 5 latent frames of 4x4 tokens, hidden 32,
    MLP 128, a 300-token caption. Spatial attention: 5 frames of 16 tokens; temporal: 16 positions of 5 frames."""
    with ComponentCounter(pipe.transformer) as counter:
        latents = generate(pipe, steps=2)
    t, s, c, f, text = latents.shape[2], 16, TINY_TRANSFORMER["hidden_size"], 4 * TINY_TRANSFORMER["hidden_size"], 300
    assert (t, latents.shape[3] * latents.shape[4] // 4) == (5, s)
    n, depth, calls = t * s, TINY_TRANSFORMER["depth"], 4
    spatial = t * (2 * 4 * s * c * c + 2 * 2 * s * s * c)  # q, k, v, out projections + QK^T and AV, per frame
    temporal = s * (2 * 4 * t * c * c + 2 * 2 * t * t * c)  # the same per position over the frames
    cross = 2 * (n * c * c + text * 2 * c * c + n * c * c) + 2 * 2 * n * text * c  # q, kv (text), out; attention
    mlp = 2 * 2 * n * c * f
    counts = counter.counts
    assert dict(counts.calls) == {"spatial_attn": depth * calls, "temporal_attn": depth * calls,
                                  "cross_attn": 2 * depth * calls, "mlp": 2 * depth * calls}
    assert counts.flops["spatial_attn"] == depth * calls * spatial
    assert counts.flops["temporal_attn"] == depth * calls * temporal
    assert counts.flops["cross_attn"] == 2 * depth * calls * cross
    assert counts.flops["mlp"] == 2 * depth * calls * mlp


def test_flop_counter_agrees_with_the_engine_adapter(pipe):
    """The counter's total for one transformer call equals the adapter's block_flops (which the engine's
    computed fraction uses) summed over the blocks."""
    from videocache.adapters import get_adapter

    adapter, captured = get_adapter(pipe.transformer), []
    handles = [b.register_forward_pre_hook(lambda mod, args, c=captured: c.append((mod, args)))
               for b in pipe.transformer.blocks()]
    try:
        with ComponentCounter(pipe.transformer) as counter:
            generate(pipe, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert counter.counts.total_flops == pytest.approx(sum(sum(adapter.block_flops(b, a, {})) for b, a in captured))


# -- diffusers' caches -------------------------------------------------------------------------------------
def test_block_class_is_registered_with_diffusers_hooks():
    from diffusers.hooks._helpers import TransformerBlockRegistry

    metadata = TransformerBlockRegistry.get(STDiT3Block)
    assert (metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index) == (0, None)


def test_diffusers_does_not_find_stdit3_blocks_by_name(pipe):
    """Why FBCache and MagCache get their hooks from us: diffusers looks for children named `blocks`,
    `transformer_blocks`, ..., and plain enable_cache fails on STDiT3 (when this changes, re-check)."""
    from diffusers import FirstBlockCacheConfig

    assert not _diffusers_finds_blocks(pipe.transformer)
    with pytest.raises(IndexError):
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    pipe.transformer.disable_cache()  # not enabled: a warning only
    for module in pipe.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks


@pytest.mark.parametrize("spec", PEERS)
def test_peer_runs_changes_the_output_and_skips_work(pipe, uncached, spec):
    base, base_counts = uncached
    applied = m.parse_method(spec).apply(pipe, m.MethodSetup(num_inference_steps=STEPS, calibrate=lambda: generate(pipe)))
    probe = CachePeakProbe(pipe.transformer, applied.cache_bytes)  # the pipeline clears the hooks' state at its end
    try:
        with ComponentCounter(pipe.transformer) as counter:
            latents = generate(pipe)
    finally:
        held = probe.close()
        applied.remove()
    assert torch.isfinite(latents).all() and not torch.equal(latents, base)
    assert float((latents - base).norm() / base.norm()) < 0.5
    assert counter.counts.total_flops < base_counts.total_flops
    assert held > 0
    assert torch.equal(generate(pipe), base)  # removed: the uncached pipeline again


def test_first_block_cache_head_and_tail_in_execution_order(pipe):
    """Head = spatial block 0 (runs first), tail = the last temporal block (runs last); a skipped call runs
    the head alone."""
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

    t = pipe.transformer
    applied = FBCacheMethod(1e6).apply(pipe, m.MethodSetup(num_inference_steps=STEPS))
    try:
        assert t.spatial_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) is not None
        assert t.temporal_blocks[-1]._diffusers_hook.get_hook(_FBC_BLOCK_HOOK).is_tail
        assert not any(b._diffusers_hook.get_hook(_FBC_BLOCK_HOOK).is_tail for b in t.blocks()[1:-1])
        with ComponentCounter(t) as counter:
            generate(pipe)
    finally:
        applied.remove()
    # threshold far above any change: each branch computes its first call, then runs spatial block 0 only
    depth = TINY_TRANSFORMER["depth"]
    assert counter.counts.calls["temporal_attn"] == 2 * depth
    assert counter.counts.calls["spatial_attn"] == 2 * depth + 2 * (STEPS - 1)


def test_taylorseer_hooks_every_component_or_the_attentions(pipe):
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    def hooked(method):
        applied = method.apply(pipe, m.MethodSetup(num_inference_steps=STEPS))
        try:
            return sorted(name.split(".", 2)[2] for name, mod in pipe.transformer.named_modules()
                          if getattr(mod, "_diffusers_hook", None) and mod._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK))
        finally:
            applied.remove()

    blocks = 2 * TINY_TRANSFORMER["depth"]
    assert hooked(TaylorSeerMethod(2)) == sorted(["attn", "cross_attn", "mlp"] * blocks)
    assert hooked(TaylorSeerMethod(2, scope="attn")) == sorted(["attn", "cross_attn"] * blocks)


def test_pab_pyramid_hooks_each_attention_kind_with_its_range_and_keeps_the_branches_apart(pipe):
    """PAB's Open-Sora setting: spatial 2, temporal 4, cross 6 in 450 < t < 930; the cond and uncond calls
    keep their own counters and outputs (a shared state would hand uncond the cond call's attention)."""
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK as PAB

    t = pipe.transformer
    applied = m.parse_method("diffusers:pab:2:4:6").apply(pipe, m.MethodSetup(num_inference_steps=STEPS))
    try:
        assert applied.info["hooked"] == {"spatial": 2, "temporal": 2, "cross": 4}
        hooks = {"spatial": t.spatial_blocks[0].attn, "temporal": t.temporal_blocks[0].attn,
                 "cross": t.spatial_blocks[0].cross_attn}
        hooks = {kind: mod._diffusers_hook.get_hook(PAB) for kind, mod in hooks.items()}
        assert {k: h.block_skip_range for k, h in hooks.items()} == {"spatial": 2, "temporal": 4, "cross": 6}
        assert {tuple(h.timestep_skip_range) for h in hooks.values()} == {(450, 930)}
        mlp_hooks = getattr(t.spatial_blocks[0].mlp, "_diffusers_hook", None)
        assert mlp_hooks is None or not mlp_hooks.hooks  # diffusers has no MLP broadcast
        seen = {}  # the states after the last call (the pipeline clears them at its end)
        handle = t.register_forward_hook(lambda *_: seen.update(
            {k: (v.iteration, v.cache) for k, v in hooks["cross"].states._state_cache.items()}))
        generate(pipe)
        handle.remove()
        assert set(seen) == {"cond", "uncond"} and seen["cond"][0] == seen["uncond"][0] == STEPS
        assert not torch.equal(seen["cond"][1], seen["uncond"][1])
    finally:
        applied.remove()
    assert not any(getattr(mod, "_diffusers_hook", None) and mod._diffusers_hook.get_hook(PAB) for mod in t.modules())


# -- cache-dit ----------------------------------------------------------------------------------------------
def test_one_block_list_for_cachedit_runs_the_model_bit_for_bit_and_detaches(pipe, uncached):
    """The execution-order list cache-dit wraps: the same blocks (S0, T0, S1, T1), the same output; detached,
    the class's forward and the state dict's keys are back."""
    from videocache.pipelines.opensora import peers as cachedit

    t, keys = pipe.transformer, list(pipe.transformer.state_dict())
    blocks = cachedit.attach(t)
    try:
        assert list(blocks) == [t.spatial_blocks[0], t.temporal_blocks[0], t.spatial_blocks[1], t.temporal_blocks[1]]
        assert torch.equal(generate(pipe), uncached[0])
    finally:
        cachedit.detach(t)
    assert "forward" not in vars(t) and list(t.state_dict()) == keys


CACHEDIT_RUN = """
import json, sys, torch
import videocache.eval_vbench.peers as m
from videocache.eval_vbench.metrics.flops import ComponentCounter
from tests.test_opensora_peers import STEPS, generate
from videocache.pipelines.opensora.model.tiny import tiny_pipeline
pipe = tiny_pipeline()
with ComponentCounter(pipe.transformer) as counter:
    base = generate(pipe)
result = {}
for spec in sys.argv[1:]:
    applied = m.parse_method(spec).apply(pipe, m.MethodSetup(num_inference_steps=STEPS))
    try:
        with ComponentCounter(pipe.transformer) as cached:
            latents = generate(pipe)
    finally:
        applied.remove()
    result[spec] = {"fraction": cached.counts.total_flops / counter.counts.total_flops,
                    "change": float((latents - base).norm() / base.norm()),
                    "restored": torch.equal(generate(pipe), base), "adapter": applied.info.get("adapter", "")}
print(json.dumps(result))
"""


@pytest.mark.skipif(importlib.util.find_spec("cache_dit") is None, reason="cache-dit is not installed")
def test_cachedit_dbcache_attaches_to_stdit3():
    """In a process of its own (cache-dit patches the pipeline class for the process), as the comparison
    runs it: DBCache with and without its TaylorSeer calibrator skips work and changes the output;
    removed, the uncached output is back."""
    specs = ["cachedit:dbcache:1:0:0.3", "cachedit:dbcache-taylorseer:1:0:0.3"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", CACHEDIT_RUN, *specs], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for spec in specs:
        assert result[spec]["fraction"] < 0.9 and 0 < result[spec]["change"] < 0.5, result[spec]
        assert result[spec]["restored"] and "execution order" in result[spec]["adapter"]


def test_cachedit_parallelism_refuses_stdit3_in_one_line(pipe):
    from videocache.distributed import ParallelSettings

    setup = m.MethodSetup(num_inference_steps=STEPS, parallel=ParallelSettings(ulysses=2))
    with pytest.raises(ValueError, match="cache-dit's context parallelism plans only") as info:
        m.parse_method("cachedit:dbcache:1:0:0.1").parallelize_pipeline(pipe, setup)
    assert "\n" not in str(info.value) and "forward" not in vars(pipe.transformer)


# -- specs and the benchmark's method list -------------------------------------------------------------------
def test_pab_pyramid_spec():
    method = m.parse_method("diffusers:pab:2:4:6")
    assert method == PABMethod(2, 4, 6) and method.spec == "diffusers:pab:2:4:6"
    assert m.parse_method("diffusers:pab:3") == PABMethod(3)
    for bad, fragment in (("diffusers:pab:2:1:6", "TEMPORAL must be an integer >= 2"),
                          ("diffusers:pab:2:4", "expected diffusers:pab")):
        with pytest.raises(m.MethodSpecError, match=fragment):
            m.parse_method(bad)


def test_compare_reference_opensora_methods_and_folder():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_reference.py"
    spec = importlib.util.spec_from_file_location("compare_reference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    methods = bench.default_methods("reference-opensora")
    assert bench.DEFAULT_OUT["reference-opensora"] == "compare_opensora"
    assert "videocache:reference-opensora:balanced" in methods and "diffusers:pab:2:4:6" in methods
    assert "cachedit:dbcache:1:0:0.16" in methods
    for spec_text in methods:
        m.parse_method(spec_text)
    assert len(bench.default_methods("reference-wan")) == len(bench.DEFAULT_METHODS)
    hunyuan = bench.default_methods("reference-hunyuan")  # settings that reach 0.5 and 0.33 computed there
    assert "diffusers:fbcache:0.8" in hunyuan and len(hunyuan) == len(set(hunyuan))
    for spec_text in hunyuan:
        m.parse_method(spec_text)
