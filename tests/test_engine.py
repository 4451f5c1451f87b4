"""The cache engine on a tiny random-init WanPipeline built from the real diffusers classes."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

import videocache as vc
from videocache import COMPONENTS, Action, CacheTable
from videocache.engine import BLOCK_HOOK, COMPONENT_HOOK, TRANSFORMER_HOOK
from videocache.table import TableError

PROMPT = "a red circle moving left on a black background"
STEPS = 8
SA, CA, MLP = (COMPONENTS.index(c) for c in ("self_attn", "cross_attn", "mlp"))
# shapes seen by the blocks: 5 frames at 32x32 -> latent 2x8x8 -> patches (1,2,2) -> 32 tokens
TOKENS, TEXT_TOKENS, DIM, FFN, BLOCKS = 32, 16, 128, 512, 8
TENSOR_BYTES = TOKENS * DIM * 4  # one float32 component output, batch 1


def run(pipe, guidance_scale: float = 5.0, **kw) -> torch.Tensor:
    return pipe(
        prompt=PROMPT,
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kw,
    ).frames


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe)


def table(cells: dict[tuple[int, ...], str] | None = None, steps: int = STEPS, order: int = 1,
          gain: float = 1.0) -> CacheTable:
    """All-compute table with `{(comp, block_or_None): "letters per step"}` overrides."""
    arr = np.zeros((steps, BLOCKS, 3), dtype=np.int8)
    for (comp, block), col in (cells or {}).items():
        for s, ch in enumerate(col):
            if ch != ".":
                arr[s, slice(None) if block is None else block, comp] = "CRF".index(ch)
    return CacheTable(arr, forecast_order=order, forecast_gain=gain)


def weights() -> dict[str, float]:
    """FLOPs per call, by hand from the tiny config (the adapter must agree)."""
    n, m, d = TOKENS, TEXT_TOKENS, DIM
    return {
        "self_attn": 4 * 2 * n * d * d + 2 * 2 * n * n * d,
        "cross_attn": 2 * 2 * n * d * d + 2 * 2 * m * d * d + 2 * 2 * n * m * d,
        "mlp": 2 * 2 * n * d * FFN,
    }


def hooks_left(module: torch.nn.Module) -> list[str]:
    found = []
    for name, sub in module.named_modules():
        reg = getattr(sub, "_diffusers_hook", None)
        if reg is not None and any(h in reg.hooks for h in (TRANSFORMER_HOOK, BLOCK_HOOK, COMPONENT_HOOK)):
            found.append(name)
    return found


def count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    counter = [0]

    def bump(*_):
        counter[0] += 1

    return counter, module.register_forward_hook(bump)


def record_component_outputs(engine, block: int, comp: int) -> list[tuple[str, torch.Tensor]]:
    """(cache context, output) of every call of one component, as the block receives it: computed,
    reused or forecast (reused components are not module calls any more, so module hooks miss them)."""
    seen: list[tuple[str, torch.Tensor]] = []
    manager = engine._hook.state_manager
    serve = engine._serve

    def recording_serve(state, b, c):
        out = serve(state, b, c)
        if out is not None and (b, c) == (block, comp):
            seen.append((manager.context.name, out.detach().clone()))
        return out

    def observer(context, step, b, component, out):
        if (b, COMPONENTS[comp]) == (block, component):
            seen.append((context, out.detach().clone()))

    engine._serve = recording_serve
    engine.config = dataclasses.replace(engine.config, observer=observer)
    return seen


def test_full_compute_table_is_bit_exact(clean, baseline):
    engine = vc.apply(clean, table=CacheTable.full_compute(STEPS, BLOCKS))
    out = run(clean)
    assert torch.equal(out, baseline)
    stats = engine.stats()
    assert stats["computed_fraction"] == 1.0
    assert stats["calls"] == {
        "transformer": 2 * STEPS,
        "compute": 2 * STEPS * BLOCKS * 3,
        "reuse": 0,
        "forecast": 0,
    }
    assert stats["cache_peak_bytes"] == 0


def test_remove_restores_bit_identical_output(clean, baseline):
    engine = vc.apply(clean, "reference-wan", "fast")
    assert vc.get_engine(clean) is engine and hooks_left(clean.transformer)
    with pytest.raises(RuntimeError, match="already applied"):
        vc.apply(clean, "reference-wan", "slow")
    with pytest.raises(vc.ProfileError, match="covers 10-100 steps; got 8"):
        run(clean)  # 8 steps is outside the reference profile's range; nothing else changes
    vc.remove(clean)
    assert vc.get_engine(clean) is None and hooks_left(clean.transformer) == []
    assert "forward" not in clean.transformer.blocks[0].ffn.__dict__  # no wrapper left on the instance
    assert torch.equal(run(clean), baseline)
    vc.apply(clean, table=table({(MLP, None): "CRCRCRCR"}))
    assert not torch.equal(run(clean), baseline)
    vc.remove(clean)
    assert torch.equal(run(clean), baseline)


def test_reuse_changes_output_and_measured_fraction_is_exact(clean, baseline):
    engine = vc.apply(clean, table=table({(MLP, None): "CRCRCRCR"}))
    out = run(clean)
    assert not torch.equal(out, baseline)
    assert (out - baseline).abs().max() < 0.5  # a perturbation, not garbage
    w = weights()
    expected = 1 - 0.5 * w["mlp"] / sum(w.values())
    stats = engine.stats()
    assert stats["computed_fraction"] == pytest.approx(expected, rel=1e-12)
    assert stats["computed_fraction_by_component"] == {"self_attn": 1.0, "cross_attn": 1.0, "mlp": 0.5}
    assert stats["executed_flops"] == pytest.approx(2 * STEPS * BLOCKS * (sum(w.values()) - 0.5 * w["mlp"]))
    assert stats["calls"]["reuse"] == 2 * 4 * BLOCKS
    assert engine.table.predicted_computed_fraction(w) == pytest.approx(expected)
    engine.reset_stats()
    assert engine.stats()["computed_fraction"] is None and engine.trace() == []


def test_reused_modules_are_not_executed(clean):
    block = clean.transformer.blocks[3]
    ffn_inner, h1 = count_calls(block.ffn.net[2])  # runs only when the real FeedForward runs
    attn_inner, h2 = count_calls(block.attn1.to_out[0])
    ffn_outer, h3 = count_calls(block.ffn)
    norm3, h4 = count_calls(block.norm3)  # the MLP's input norm: the lean block forward skips it on reuse
    norm1, h5 = count_calls(block.norm1)
    try:
        vc.apply(clean, table=table({(MLP, 3): "CRRCRCCC"}))
        run(clean)
    finally:
        for h in (h1, h2, h3, h4, h5):
            h.remove()
    assert ffn_inner[0] == 2 * 5  # 5 computed steps x (cond, uncond)
    assert attn_inner[0] == 2 * STEPS
    assert ffn_outer[0] == 2 * 5
    assert norm3[0] == 2 * 5
    assert norm1[0] == 2 * STEPS


def test_cond_and_uncond_keep_separate_caches(clean):
    engine = vc.apply(clean, table=table({(MLP, 0): "..CR...."}))
    outputs = record_component_outputs(engine, 0, MLP)
    run(clean)
    seen = {}
    counters: dict[str, int] = {}
    for name, out in outputs:
        seen[(name, counters.get(name, 0))] = out
        counters[name] = counters.get(name, 0) + 1
    assert counters == {"cond": STEPS, "uncond": STEPS}
    assert torch.equal(seen[("cond", 3)], seen[("cond", 2)])
    assert torch.equal(seen[("uncond", 3)], seen[("uncond", 2)])
    assert not torch.equal(seen[("cond", 3)], seen[("uncond", 2)])
    contexts = {r["context"] for r in engine.trace()}
    assert contexts == {"cond", "uncond"}


def test_memory_budget_is_honoured(clean):
    budget = 3 * TENSOR_BYTES
    engine = vc.apply(clean, table=table({(MLP, None): "..CR...."}), max_cache_bytes=budget)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(clean, guidance_scale=1.0)  # one context: the budget is filled in block order
    fallback_warnings = [w for w in caught if "nothing kept to reuse" in str(w.message)]
    assert len(fallback_warnings) == 1  # once per engine, not once per fallback
    stats = engine.stats()
    assert stats["cache_peak_bytes"] == budget <= engine.config.max_cache_bytes
    assert stats["fallbacks"] == BLOCKS - 3
    done = {r["block"]: r["action"] for r in engine.trace() if r["step"] == 3 and r["component"] == "mlp"}
    assert done == {b: ("R" if b < 3 else "C") for b in range(BLOCKS)}
    vc.remove(clean)
    vc.apply(clean, table=table({(MLP, b): "...R...." for b in range(3)}))
    assert torch.equal(run(clean, guidance_scale=1.0), out)


def test_tensors_are_freed_as_soon_as_unused(clean):
    engine = vc.apply(clean, table=table({(MLP, None): "..CRCR.."}))
    current: list[int] = []

    def on_step_end(pipeline, i, t, kwargs):
        current.append(engine.stats()["cache_current_bytes"])
        return {}

    run(clean, callback_on_step_end=on_step_end)
    per_step = 2 * BLOCKS * TENSOR_BYTES  # every block's mlp output, for cond and uncond
    assert current == [0, 0, per_step, 0, per_step, 0, 0, 0]
    stats = engine.stats()
    assert stats["cache_peak_bytes"] == per_step
    assert stats["cache_current_bytes"] == 0


def test_pipeline_reset_frees_an_interrupted_run(clean):
    engine = vc.apply(clean, table=table({(MLP, None): "..CR...."}))

    def interrupt(pipeline, i, t, kwargs):
        if i == 2:
            pipeline._interrupt = True
        return {}

    run(clean, callback_on_step_end=interrupt)
    assert engine.stats()["cache_peak_bytes"] > 0
    assert engine.stats()["cache_current_bytes"] == 0  # _reset_stateful_cache at the end of the call


def test_forecast_order_1_is_linear_extrapolation(clean):
    engine = vc.apply(clean, table=table({(MLP, 0): "CCRCFCCC"}, order=1))
    outputs = record_component_outputs(engine, 0, MLP)
    inner, handle = count_calls(clean.transformer.blocks[0].ffn.net[2])
    try:
        run(clean)
    finally:
        handle.remove()
    outs = [out for name, out in outputs if name == "cond"]
    assert inner[0] == 2 * 6  # neither the reuse (step 2) nor the forecast (step 4) runs the MLP
    expected = outs[3] + (outs[3] - outs[1]) * (4 - 3) / (3 - 1)  # uneven spacing: computes at 1 and 3
    assert torch.allclose(outs[4], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs[4], outs[3])
    stats = engine.stats()
    assert stats["calls"]["forecast"] == 2
    assert stats["cache_peak_bytes"] == 2 * 2 * TENSOR_BYTES  # k+1 = 2 tensors per context


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_gain_damps_the_extrapolation(clean, order):
    """A forecast with gain g returns last + g (extrapolated - last): order 1 through its fused lerp, higher
    orders through Newton's polynomial; gain 1 is the plain forecast."""
    engine = vc.apply(clean, table=table({(MLP, 0): "CCCCFCCC"}, order=order, gain=0.4))
    outputs = record_component_outputs(engine, 0, MLP)
    run(clean)
    outs = [out for name, out in outputs if name == "cond"]
    plain = 2 * outs[3] - outs[2] if order == 1 else 3 * outs[3] - 3 * outs[2] + outs[1]
    assert torch.allclose(outs[4], outs[3] + 0.4 * (plain - outs[3]), rtol=1e-5, atol=1e-6)
    assert engine.stats()["calls"]["forecast"] == 2
    with pytest.raises(TableError, match="forecast_gain must be a number in \\(0, 1\\]"):
        table({(MLP, 0): "CCCCFCCC"}, gain=1.5)


def test_cache_dtype_and_cpu_offload(clean):
    cells = {(MLP, None): "..CR...."}
    engine = vc.apply(clean, table=table(cells))
    full = run(clean)
    peak32 = engine.stats()["cache_peak_bytes"]
    vc.remove(clean)
    engine = vc.apply(clean, table=table(cells), cache_dtype=torch.bfloat16, offload_to_cpu=True)
    low = run(clean)
    assert engine.stats()["cache_peak_bytes"] * 2 == peak32
    assert low.dtype == full.dtype
    assert (low - full).abs().max() < 0.05
    vc.remove(clean)
    engine = vc.apply(clean, table=table(cells), cache_dtype=torch.float8_e4m3fn)
    fp8 = run(clean)
    # one byte per value plus one float32 scale per token row
    assert engine.stats()["cache_peak_bytes"] == peak32 // 4 + (peak32 // TENSOR_BYTES) * TOKENS * 4
    assert engine.stats()["cache_peak_host_bytes"] == 0  # a CPU model has nothing to offload to
    assert fp8.dtype == full.dtype and 0 < (fp8 - full).abs().max() < 0.1
    vc.remove(clean)
    with pytest.raises(ValueError, match="cache_dtype"):
        vc.apply(clean, table=table(cells), cache_dtype=torch.int16)


@pytest.mark.parametrize("dtype, bound, scales", [(torch.float8_e4m3fn, 1 / 16, 1), (torch.int8, 1 / 254, 2)])
def test_8bit_storage_round_trip(dtype, bound, scales):
    """8-bit storage with scales (float8: one per row; int8: one per 64 channels): every value within half
    a step (relative to its row's largest), whatever the rows' magnitudes; bytes as counted."""
    from videocache.store import CacheStore

    store = CacheStore(dtype=dtype)
    x = torch.randn(2, 16, 128, dtype=torch.bfloat16) * torch.logspace(-3, 3, 16).view(1, 16, 1).bfloat16()
    kept = store.keep(0, [x], None, last_use=1)
    back = store.load(kept)[0]
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    rel = ((back.float() - x.float()).abs() / x.float().abs().amax(-1, keepdim=True)).max()
    assert 0 < rel <= bound + 2**-8  # plus the bfloat16 rounding of the restored value
    assert store.device_bytes == x.numel() + 2 * 16 * scales * 4
    store.release(kept)
    assert store.device_bytes == 0


def test_direct_calls_without_cache_context(clean):
    """No pipeline, no cache_context: one "default" context, steps located in the scheduler's timesteps."""
    transformer, scheduler = clean.transformer, clean.scheduler
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, TEXT_TOKENS, 64, generator=g)

    def loop(stop: int = 4) -> torch.Tensor:
        scheduler.set_timesteps(4)
        out = []
        for t in scheduler.timesteps[:stop]:
            out.append(
                transformer(
                    hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False
                )[0]
            )
        return torch.stack(out)

    plain = loop()
    engine = vc.apply_to_transformer(transformer, scheduler, table({(MLP, None): "CCRC"}, steps=4))
    first = loop()
    second = loop()  # the step index goes back to 0: a new generation, nothing stale is reused
    assert torch.equal(first, second)
    assert torch.equal(first[:2], plain[:2]) and not torch.equal(first[2], plain[2])
    records = engine.trace()
    loop(stop=2)  # abandoned after step 1: its output is kept for a step 2 that never comes
    assert engine.stats()["cache_current_bytes"] == BLOCKS * TENSOR_BYTES
    engine.reset_stats()
    assert torch.equal(loop(), first)  # the next generation resets the context instead of mixing runs
    assert engine.stats()["cache_current_bytes"] == 0 and engine.stats()["fallbacks"] == 0
    assert {r["context"] for r in records} == {"default"}
    assert [r["step"] for r in records if r["block"] == 0 and r["component"] == "mlp"] == [0, 1, 2, 3] * 2
    assert [r["action"] for r in records if r["block"] == 0 and r["component"] == "mlp"][:4] == list("CCRC")
    vc.remove(transformer)
    assert hooks_left(transformer) == []
    assert torch.equal(loop(), plain)


def test_mismatched_table_is_rejected(clean):
    with pytest.raises(ValueError, match="8 blocks|has 4 blocks"):
        vc.apply(clean, table=CacheTable(np.zeros((STEPS, 4, 3), dtype=np.int8)))
    vc.apply(clean, table=CacheTable.full_compute(10, BLOCKS))
    with pytest.raises(ValueError, match="made for 10 steps; this run has 8"):
        run(clean)


def test_reuse_without_budget_actions_match_table(clean):
    cells = {(SA, 5): "..CRR...", (CA, 2): "...CRCR.", (MLP, 7): ".CRRRR.."}
    engine = vc.apply(clean, table=table(cells))
    run(clean)
    got = np.zeros((STEPS, BLOCKS, 3), dtype=np.int8)
    for r in engine.trace():
        if r["context"] == "uncond":
            got[r["step"], r["block"], COMPONENTS.index(r["component"])] = "CRF".index(r["action"])
    assert np.array_equal(got, engine.table.actions)
    assert engine.stats()["fallbacks"] == 0 and engine.stats()["cache_current_bytes"] == 0
    assert engine.table.action(3, 5, SA) is Action.REUSE


@pytest.mark.parametrize(
    "config, blocks, dim, ffn, profile",
    [
        (
            dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
            30,
            1536,
            8960,
            "wan2.1-t2v-1.3b",
        ),
        (
            dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
            40,
            5120,
            13824,
            "wan2.1-t2v-14b",
        ),
    ],
)
def test_full_size_wan_configs_on_meta(config, blocks, dim, ffn, profile):
    """The adapter's fingerprint and FLOP formulas for the real Wan2.1 sizes (no weights allocated)."""
    from videocache.adapters import get_adapter

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            **config,
        )
    adapter = get_adapter(model)
    assert adapter.fingerprint(model) == {
        "architecture": "WanTransformer3DModel",
        "num_blocks": blocks,
        "components": list(COMPONENTS),
    }
    n, m = 32760, 512  # 480p, 81 frames; T5 context
    with torch.device("meta"):
        x = torch.empty(1, n, dim)
        ctx = torch.empty(1, m, dim)
    block = model.blocks[0]
    assert (
        adapter.component_flops("self_attn", block.attn1, (x, None, None, None), {})
        == 4 * 2 * n * dim**2 + 2 * 2 * n * n * dim
    )
    assert adapter.component_flops("cross_attn", block.attn2, (x, ctx, None, None), {}) == (
        2 * 2 * n * dim**2 + 2 * 2 * m * dim**2 + 2 * 2 * n * m * dim
    )
    assert adapter.component_flops("mlp", block.ffn, (x,), {}) == 2 * 2 * n * dim * ffn
    vc.apply_to_transformer(model, None, profile)  # fingerprint matches its shipped profile
    assert len(hooks_left(model)) == 1 + blocks  # the transformer and its blocks
    vc.remove(model)
    assert hooks_left(model) == []


def test_wan_block_compute_matches_the_block(clean):
    """The adapter's block compute, with nothing served, is the block's own forward bit for bit; a served
    component's module does not run and its value is used as given."""
    from videocache.adapters import get_adapter

    block = clean.transformer.blocks[2]
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("args", tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args))

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run(clean)
    finally:
        handle.remove()
    args = captured["args"]
    adapter = get_adapter(clean.transformer)
    with torch.no_grad():
        out, computed = adapter.block_compute(block, args, {}, (None, None, None))
        assert torch.equal(out, block(*args))
        assert all(isinstance(o, torch.Tensor) for o in computed)
        as_kwargs = dict(zip(("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"), args, strict=True))
        again, _ = adapter.block_compute(block, (), as_kwargs, (None, None, None))
        assert torch.equal(again, out)
        calls, h = count_calls(block.ffn)
        try:
            served, partial = adapter.block_compute(block, args, {}, (None, None, computed[MLP]))
        finally:
            h.remove()
        assert calls[0] == 0 and partial[MLP] is None and torch.equal(served, out)
        flops = adapter.block_flops(block, args, {})
        assert len(flops) == 3 and flops[SA] > 0


def test_constant_modules_run_once_per_context(clean, baseline):
    runs = {"text": 0, "rope": 0}

    def counting(module, name):  # counts executions of the module's own forward, not calls answered by a hook
        def forward(*args, **kwargs):
            runs[name] += 1
            return type(module).forward(module, *args, **kwargs)

        module.forward = forward

    text, rope = clean.transformer.condition_embedder.text_embedder, clean.transformer.rope
    counting(text, "text")
    counting(rope, "rope")
    try:
        engine = vc.apply(clean, table=CacheTable.full_compute(STEPS, BLOCKS))
        assert torch.equal(run(clean), baseline)  # the memoised outputs are the modules' own
        assert runs == {"text": 2, "rope": 2}  # cond and uncond, once each for the whole run
        assert engine.stats()["calls"]["transformer"] == 2 * STEPS
        vc.remove(clean)
        run(clean)
        assert runs == {"text": 2 + 2 * STEPS, "rope": 2 + 2 * STEPS}
    finally:
        del text.forward, rope.forward


class _ComponentOnlyAdapter:
    """The Wan adapter without block_compute: the engine then hooks component modules instead of blocks."""

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        if name in ("block_compute", "block_flops", "residual_gates", "shared_gates"):
            raise AttributeError(name)
        return getattr(self._adapter, name)


def test_component_hooks_serve_like_block_compute(clean):
    """Adapters without block_compute get one hook per component module; same table, same values."""
    from videocache.adapters import get_adapter
    from videocache.engine import CacheEngine

    cells = table({(SA, None): "CCRCRCCC", (MLP, 1): "CCCFCFCC"})
    engine = vc.apply(clean, table=cells)
    by_block = run(clean)
    block_stats = engine.stats()
    vc.remove(clean)
    transformer = clean.transformer
    engine = CacheEngine(transformer, _ComponentOnlyAdapter(get_adapter(transformer)), cells, clean.scheduler)
    try:
        assert len(hooks_left(transformer)) == 1 + 3 * BLOCKS
        by_component = run(clean)
        stats = engine.stats()
    finally:
        engine.remove()
    assert hooks_left(transformer) == []
    assert torch.allclose(by_component, by_block, rtol=1e-5, atol=1e-6)
    assert stats["calls"] == block_stats["calls"]
    assert stats["computed_fraction"] == pytest.approx(block_stats["computed_fraction"])
