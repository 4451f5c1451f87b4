"""The Open-Sora 1.2 adapter on a tiny random STDiT3Model: spatial and temporal blocks as two interleaved
block groups, block compute bit-identical to the block, split caching in both groups, the fused skip, cond
and uncond apart, a PAB-like profile (temporal attention reused longest), the fg/bg attention probe, no
host reads on the per-call path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

import videocache as vc
import videocache.pipelines.opensora.model.transformer as st
from videocache import Action, BlockGroup, BlockLayout, CacheTable
from videocache.adapters import get_adapter
from videocache.fgbg import attention_received
from videocache.pipelines.attention_capture import SelfAttentionCapture, attention_probe
from videocache.pipelines.opensora.adapter import SPATIAL, TEMPORAL, OpenSoraAdapter
from videocache.pipelines.opensora.model.tiny import tiny_inputs as inputs
from videocache.pipelines.opensora.model.tiny import tiny_transformer as tiny_model
from videocache.pipelines.opensora.probes import opensora_query_key
from videocache.profile import Profile, ProfileError

from .test_no_sync import no_host_reads  # noqa: F401 (a fixture)

STEPS = 6


class _Steps:
    """A scheduler stand-in whose timesteps let the engine locate each call's step."""

    timesteps = torch.tensor([1000.0 - 150 * s for s in range(STEPS)])
    sigmas = torch.tensor([1.0 - 0.15 * s for s in range(STEPS)] + [0.0])


def run(model, contexts=("cond",), seeds=(1,)) -> list[torch.Tensor]:
    """STEPS calls per context (interleaved like a CFG loop), timestep falling; outputs in call order."""
    outs = []
    embeds = {seed: inputs(seed) for seed in seeds}  # one tensor per context, as a pipeline passes it
    for step in range(STEPS):
        for name, seed in zip(contexts, seeds, strict=True):
            with model.cache_context(name):
                t = _Steps.timesteps[step : step + 1]
                outs.append(model(**embeds[seed], timestep=t, return_dict=False)[0])
    return outs


def layout_of(model) -> BlockLayout:
    return BlockLayout.from_fingerprint(OpenSoraAdapter().fingerprint(model))


def apply(model, actions: np.ndarray, **kwargs) -> vc.CacheEngine:
    return vc.apply_to_transformer(model, _Steps(), CacheTable(actions, layout=layout_of(model)), **kwargs)


def block_args(model, block: int) -> tuple:
    captured = {}
    handle = model.blocks()[block].register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    with torch.no_grad():
        model(**inputs(), timestep=torch.tensor([500.0]))
    handle.remove()
    return captured["args"]


# -- layout -----------------------------------------------------------------------------------------------
def test_interleaved_groups_in_execution_order():
    model = tiny_model()
    assert isinstance(get_adapter(model), OpenSoraAdapter)
    layout = layout_of(model)
    assert layout.num_blocks == 4 and layout.width == 3
    assert layout.components_of == (SPATIAL, TEMPORAL, SPATIAL, TEMPORAL)
    assert tuple(layout.group_blocks(0)) == (0, 2) and tuple(layout.group_blocks(1)) == (1, 3)
    assert layout.names == ("spatial_attn", "cross_attn", "mlp", "temporal_attn")
    assert [b.temporal for b in OpenSoraAdapter().blocks(model)] == [False, True, False, True]
    assert layout.cells_of("temporal_attn") == [([1, 3], 0)]
    assert layout.cells_of("mlp", [0, 1]) == [([0], 2), ([1], 2)]


@pytest.mark.parametrize(
    "groups, match",
    [
        ([("a", 2, (0, 2)), ("b", 2, (1, 2))], "block 2 is in a and b"),
        ([("a", 2, (0, 2)), ("b", 2, (1, 4))], "block 4 does not exist"),
        ([("a", 2, (0, 2)), ("b", 2, None)], "either every block group lists its blocks or none"),
        ([("a", 2, (2, 0))], "ascending"),
    ],
)
def test_bad_interleaved_groups_are_one_line_errors(groups, match):
    with pytest.raises(ValueError, match=match):
        BlockLayout(tuple(BlockGroup(n, k, ("x",), b) for n, k, b in groups))


# -- block compute ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [0, 1], ids=["spatial", "temporal"])
def test_block_compute_is_the_block_bit_for_bit(block):
    model = tiny_model()
    adapter = OpenSoraAdapter()
    module = model.blocks()[block]
    args = block_args(model, block)
    with torch.no_grad():
        want = module(*args)
        got, computed = adapter.block_compute(module, args, {}, (None, None, None))
        assert torch.equal(got, want) and all(c is not None for c in computed)
        for c in range(3):  # serve one component from that computation: the same output, exactly
            served = tuple(computed[i] if i == c else None for i in range(3))
            again, fresh = adapter.block_compute(module, args, {}, served)
            assert fresh[c] is None and all(fresh[i] is not None for i in range(3) if i != c)
            assert torch.equal(again, got)
        flops = adapter.block_flops(module, args, {})
        x = args[0]
        attn = 2 * 48 * (32 * 96 + 32 * 32) + 4 * 48 * (3 if block else 16) * 32
        assert flops[0] == attn and flops[2] == 2 * 48 * 2 * 32 * 128
        assert flops[1] == 2 * (48 * 2 * 32 * 32 + 8 * 32 * 64) + 4 * 48 * 8 * 32
        comps = adapter.component_modules(module)
        assert adapter.component_flops(next(iter(comps)), module.attn, (x, args[4], args[5]), {}) == flops[0]
        assert adapter.component_flops("cross_attn", module.cross_attn, (x, args[1], args[3]), {}) == flops[1]
        assert adapter.component_flops("mlp", module.mlp, (x,), {}) == flops[2]


def test_full_table_and_removal_are_bit_identical():
    model = tiny_model()
    with torch.no_grad():
        base = run(model)
        layout = layout_of(model)
        calls = [0]
        handle = model.y_embedder.y_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        engine = apply(model, np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8))
        cached = run(model)
        assert calls[0] == 1  # the caption projection ran once, then was answered from its memo
        assert engine.stats()["computed_fraction"] == 1.0
        vc.remove(model)
        handle.remove()
        after = run(model)
    for a, b, c in zip(base, cached, after, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def split_table(model) -> np.ndarray:
    """From step 2: temporal attention reused, spatial MLP forecast at step 3 and 5, cross-attention of
    block 1 reused at step 4; the rest computed."""
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    spatial, temporal = list(layout.group_blocks(0)), list(layout.group_blocks(1))
    acts[2:, temporal, TEMPORAL.index("temporal_attn")] = Action.REUSE
    for s in (3, 5):
        acts[s, spatial, SPATIAL.index("mlp")] = Action.FORECAST
    acts[4, 1, TEMPORAL.index("cross_attn")] = Action.REUSE
    return acts


def test_split_caching_in_both_groups():
    model = tiny_model()
    with torch.no_grad():
        base = run(model)
        engine = apply(model, split_table(model))
        cached = run(model)
        stats, trace = engine.stats(), engine.trace()
        vc.remove(model)
    assert torch.equal(base[0], cached[0]) and torch.equal(base[1], cached[1])  # computed steps, exactly
    assert not torch.equal(base[2], cached[2])
    rel = max(float((a - b).norm() / a.norm()) for a, b in zip(base, cached, strict=True))
    assert rel < 0.5  # reused, not garbage
    by = stats["computed_fraction_by_component"]
    assert set(by) == {"spatial_attn", "temporal_attn", "cross_attn", "mlp"}
    assert by["spatial_attn"] == 1.0 and by["temporal_attn"] == pytest.approx(2 / STEPS)
    assert by["mlp"] < 1.0 and by["cross_attn"] < 1.0 and 0.4 < stats["computed_fraction"] < 1.0
    letters = {(r["step"], r["block"], r["component"]): r["action"] for r in trace}
    assert letters[(2, 1, "temporal_attn")] == "R" and letters[(2, 0, "spatial_attn")] == "C"
    assert letters[(3, 2, "mlp")] == "F" and letters[(3, 3, "mlp")] == "C" and letters[(4, 1, "cross_attn")] == "R"
    assert (2, 0, "temporal_attn") not in letters and (2, 1, "spatial_attn") not in letters


def test_cond_and_uncond_keep_their_own_outputs():
    model = tiny_model()
    acts = split_table(model)
    with torch.no_grad():
        apply(model, acts)
        both = run(model, contexts=("cond", "uncond"), seeds=(1, 2))
        vc.remove(model)
        apply(model, acts)
        alone = run(model, contexts=("uncond",), seeds=(2,))
        vc.remove(model)
    for a, b in zip(both[1::2], alone, strict=True):
        assert torch.equal(a, b)


def test_block_run_across_spatial_and_temporal_blocks():
    """ProfilingDiT's block runs take consecutive executed blocks, here temporal 0 and spatial 1."""
    model = tiny_model()
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    runs = np.array([[0], [0], [1], [0], [1], [1]], dtype=np.int8)
    table = CacheTable(acts, block_runs=((1, 2),), run_actions=runs, layout=layout)
    with torch.no_grad():
        base = run(model)
        engine = vc.apply_to_transformer(model, _Steps(), table)
        cached = run(model)
        stats = engine.stats()
        vc.remove(model)
    assert torch.equal(base[1], cached[1]) and not torch.equal(base[2], cached[2])
    assert stats["block_runs"] == {"compute": 3, "reuse": 3, "skipped_blocks": 6}
    assert float((base[2] - cached[2]).norm() / base[2].norm()) < 0.5


# -- the fused skip -----------------------------------------------------------------------------------------
def aligned(model, letters: str) -> np.ndarray:
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    for s, letter in enumerate(letters):
        acts[s] = "CRF".index(letter)
    return acts


@pytest.mark.parametrize("letters", ["CCRCFC", "CCFCRR"])
def test_fused_skip_matches_block_by_block(letters):
    model = tiny_model()
    ran = [0]
    handle = model.temporal_blocks[1].norm1.register_forward_hook(lambda *_: ran.__setitem__(0, ran[0] + 1))
    with torch.no_grad():
        engine = apply(model, aligned(model, letters))
        assert engine.table.uniform_skips and engine._fuse
        fused = run(model, contexts=("cond", "uncond"), seeds=(1, 2))
        fused_stats, fused_trace = engine.stats(), engine.trace()
        vc.remove(model)
        fused_runs = ran[0]
        engine = apply(model, aligned(model, letters), fuse_skipped_steps=False)
        plain = run(model, contexts=("cond", "uncond"), seeds=(1, 2))
        plain_stats = engine.stats()
        vc.remove(model)
    handle.remove()
    assert fused_runs == 2 * letters.count("C")  # skipped steps run no block
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in ("computed_fraction", "computed_fraction_by_component", "calls", "executed_flops", "fallbacks"):
        assert fused_stats[key] == pytest.approx(plain_stats[key]), key
    assert fused_trace == engine.trace()
    assert fused_stats["cache_peak_bytes"] < plain_stats["cache_peak_bytes"]


# -- profiles -----------------------------------------------------------------------------------------------
def pab_profile(model) -> dict:
    """PAB's Open-Sora setting in a profile: broadcast ranges spatial 2 < temporal 4 < cross 6 (here 5, for
    6 steps), i.e. after a warm-up step spatial attention recomputed every 2nd step, temporal attention (the
    most reusable self-attention) every 4th; MLPs always computed."""
    fp = OpenSoraAdapter().fingerprint(model)
    return {
        "schema_version": 1, "name": "tiny-opensora", "model": fp, "steps": STEPS,
        "presets": {"pab": {"warmup_steps": 1, "rules": [
            {"stage": "all", "components": ["spatial_attn"], "interval": 2},
            {"stage": "all", "components": ["temporal_attn"], "interval": 4},
            {"stage": "all", "components": ["cross_attn"], "interval": 5}]}},
    }


def test_pab_like_profile_loads_builds_and_runs(tmp_path):
    model = tiny_model()
    data = pab_profile(model)
    path = tmp_path / "tiny-opensora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    profile = vc.load_profile(path)
    profile.check_model(OpenSoraAdapter().fingerprint(model))
    assert Profile.from_dict(yaml.safe_load(profile.to_yaml())).model == profile.model
    layout = layout_of(model)
    table = vc.build_table(profile.preset("pab"), [float(s) for s in _Steps.sigmas[:-1]], 4, layout)
    counts = table.counts()
    assert counts["temporal_attn"]["R"] > counts["spatial_attn"]["R"] > 0 and counts["mlp"]["R"] == 0
    assert "spatial: spatial_attn/cross_attn/mlp; temporal: temporal_attn/cross_attn/mlp" in table.to_text()
    with torch.no_grad():
        base = run(model)
        engine = vc.apply_to_transformer(model, _Steps(), profile, "pab")
        cached = run(model)
        by = engine.stats()["computed_fraction_by_component"]
        vc.remove(model)
    assert by["temporal_attn"] < by["spatial_attn"] < 1.0 and by["mlp"] == 1.0
    assert float((base[-1] - cached[-1]).norm() / base[-1].norm()) < 0.5
    # the same profile on a model with another depth, and one without interleaved groups: one line each
    with pytest.raises(ProfileError, match="is for STDiT3Model with 4 blocks"):
        profile.check_model(OpenSoraAdapter().fingerprint(tiny_model(depth=3)))
    for g in data["model"]["groups"]:
        g.pop("blocks")
    with pytest.raises(ProfileError, match="other block groups"):
        Profile.from_dict(data).check_model(OpenSoraAdapter().fingerprint(model))
    data["model"]["groups"][0]["blocks"] = [0, 1]
    with pytest.raises(ProfileError, match="model: groups: either every block group lists its blocks"):
        Profile.from_dict(data)


# -- foreground/background probe -------------------------------------------------------------------------------
def test_probe_reproduces_the_attention_and_scores_in_token_order(monkeypatch):
    model = tiny_model()
    seen = []
    real = st.dispatch_attention_fn

    def record(query, key, value, *args, **kwargs):
        seen.append((query, key))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(st, "dispatch_attention_fn", record)  # the masked cross-attention runs SDPA itself
    with torch.no_grad(), SelfAttentionCapture(model, chunk=5) as capture:
        capture.armed = True
        model(**inputs(), timestep=torch.tensor([500.0]))
        received = capture.take()
    probe = attention_probe(model)
    assert len(probe.modules) == 4 and probe.patch_size == (1, 2, 2) and len(seen) == 4
    for b, (q, k) in enumerate(seen):
        temporal = b % 2 == 1
        assert q.shape == ((16, 3, 2, 16) if temporal else (3, 16, 2, 16))
        a = attention_received(q.transpose(1, 2), k.transpose(1, 2)).mean(dim=1)  # (groups, members)
        want = (a * 3).T if temporal else a * 16  # (frames, positions), scaled by the group length
        torch.testing.assert_close(received[b], want.reshape(1, 48), rtol=1e-5, atol=1e-6)
        grid = received[b].view(3, 16)
        sums = grid.sum(0) if temporal else grid.sum(1)  # each group's scores sum to its length
        torch.testing.assert_close(sums, torch.full_like(sums, 3.0 if temporal else 16.0))
    # the probe's q/k are the module's own, exactly
    args = block_args(model, 1)
    module = model.blocks()[1]
    seen.clear()
    with torch.no_grad():
        x = module.norm1(args[0])
        module.attn(x, args[4], args[5])
        q, k = opensora_query_key(module.attn, x, args[4], args[5])
    assert torch.equal(q, seen[0][0]) and torch.equal(k, seen[0][1])


def test_profile_pipeline_runs_on_the_tiny_pipeline():
    from videocache.pipelines.attention_capture import profile_pipeline
    from videocache.pipelines.opensora.model.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    result = profile_pipeline(pipe, ["a red ball"], steps=[2, 3], num_inference_steps=4, num_frames=1,
                              height=64, width=64, guidance_scale=1.0, progress=False, border=0)
    assert len(result.r_attn) == 2 * pipe.transformer.config.depth
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


# -- no host reads ------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("no_host_reads")
@pytest.mark.parametrize("kind", ["split", "fused"])
def test_per_call_path_reads_no_tensor_value(kind):
    model = tiny_model()
    acts = split_table(model) if kind == "split" else aligned(model, "CCRCFC")
    engine = vc.apply_to_transformer(model, None, CacheTable(acts, layout=layout_of(model)))  # steps from the context
    data = {c: inputs(seed) for c, seed in (("cond", 1), ("uncond", 2))}
    with torch.no_grad():
        for i, t in enumerate(_Steps.timesteps):
            for context in ("cond", "uncond"):
                with model.cache_context(context, step_index=i, num_inference_steps=STEPS, sigma=1.0 - 0.15 * i):
                    model(**data[context], timestep=t.expand(1), return_dict=False)
    stats = engine.stats()
    assert stats["computed_fraction"] < 1 and stats["fallbacks"] == 0
    vc.remove(model)


# -- torch.compile ------------------------------------------------------------------------------------------
def test_compiled_blocks_share_graphs_and_match_eager():
    """The engine compiles the adapter's block compute; spatial and temporal blocks differ (grouping, RoPE),
    so at most one graph per block kind and pattern of served components, none after warm-up."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(depth=3)
    acts = split_table_for(model)
    with torch.no_grad():
        apply(model, acts)
        eager = run(model)
        vc.remove(model)
        engine = apply(model, acts)
        model.compile()  # the whole model: the engine runs the call eagerly and compiles the block compute
        run(model)
        warm = counters["stats"]["unique_graphs"]
        out = run(model)
    try:
        assert engine.compiled and 1 <= warm <= 2 * 2 ** 3
        assert counters["stats"]["unique_graphs"] == warm, "a run after warm-up compiled again"
        for a, b in zip(out, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    finally:
        vc.remove(model)
        model._compiled_call_impl = None
        torch._dynamo.reset()


def split_table_for(model) -> np.ndarray:
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    acts[2:, list(layout.group_blocks(1)), 0] = Action.REUSE
    acts[3::2, list(layout.group_blocks(0)), 2] = Action.FORECAST
    return acts


def test_decisions_stay_out_of_the_graph():
    """Every traced operation comes from the model or the adapter's block compute, never from the engine."""
    seen: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny_model()
    engine = apply(model, split_table_for(model), compile_options={"backend": recording_backend})
    try:
        model.compile()
        with torch.no_grad():
            run(model)
        assert engine.compiled and seen
        files = {line.split('"')[1] for gm in seen for node in gm.graph.nodes
                 for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File")}
        assert {f for f in files if "/videocache/" in f and "/pipelines/" not in f} == set()
        assert any(f.endswith("opensora/adapter.py") for f in files)
        assert any(f.endswith("opensora/model/transformer.py") for f in files)
    finally:
        vc.remove(model)
        model._compiled_call_impl = None
        torch._dynamo.reset()


# -- the pipeline -------------------------------------------------------------------------------------------
def test_pipeline_with_cfg_full_table_is_exact_and_a_profile_preset_runs(tmp_path):
    """OpenSoraPipeline's cond and uncond calls (cache contexts with step and sigma): a full table gives the
    uncached latents bit for bit, a PAB-like preset runs with its own decisions, removal restores them."""
    from videocache.pipelines.opensora.model.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    settings = dict(prompt="a red ball", num_frames=17, height=64, width=64, num_inference_steps=STEPS,
                    guidance_scale=7.0, output_type="latent")

    def generate():
        with torch.no_grad():
            return pipe(**settings, generator=torch.Generator().manual_seed(0)).frames

    base = generate()
    layout = layout_of(pipe.transformer)
    engine = vc.apply(pipe, table=CacheTable(np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8),
                                             layout=layout))
    assert torch.equal(generate(), base)
    assert engine.stats()["calls"]["transformer"] == 2 * STEPS
    vc.remove(pipe)
    data = pab_profile(pipe.transformer)
    path = tmp_path / "tiny-opensora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    engine = vc.apply(pipe, path, "pab")
    cached = generate()
    stats = engine.stats()
    vc.remove(pipe)
    assert stats["fallbacks"] == 0 and stats["computed_fraction"] < 1
    assert not torch.equal(cached, base) and float((cached - base).norm() / base.norm()) < 0.5
    assert torch.equal(generate(), base)


def test_exposure_bias_correction_on_x0_minus_noise_predictions():
    """STDiT3 predicts x0 - eps on the first 4 of 8 channels: the correction applies to -v there (the formula
    is written for eps - x0) and leaves the other channels alone."""
    from videocache.exposure_bias import ExposureBiasConfig, correct_velocity

    model = tiny_model()
    layout = layout_of(model)
    full = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    eb = ExposureBiasConfig(enabled=True)
    with torch.no_grad():
        base = run(model)
        apply(model, full, exposure_bias=eb)
        corrected = run(model)
        vc.remove(model)
    x_t = inputs(1)["hidden_states"]
    for step, (v, got) in enumerate(zip(base, corrected, strict=True)):
        sigma = float(_Steps.sigmas[step])
        want = -correct_velocity(-v[:, :4], x_t, sigma, eb.factor(sigma))
        torch.testing.assert_close(got[:, :4], want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[:, 4:], v[:, 4:])
    assert any(not torch.equal(a[:, :4], b[:, :4]) for a, b in zip(base, corrected, strict=True))
