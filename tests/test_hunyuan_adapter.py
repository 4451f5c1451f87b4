"""The HunyuanVideo adapter on tiny random configurations of the real diffusers class: dual- and
single-stream block groups, split caching of the single blocks' fused projection, removal bit-identical,
separate cond/uncond state, profiles with block groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import videocache as vc
from videocache import Action, BlockLayout, CacheTable
from videocache.pipelines.hunyuan.adapter import DUAL, SINGLE, HunyuanVideoAdapter
from videocache.pipelines.hunyuan.tiny import tiny_hunyuan
from videocache.pipelines.hunyuan.tiny import tiny_inputs as inputs
from videocache.profile import Profile, ProfileError

STEPS = 4


def run(model, table_fn=None, contexts=("cond",), seeds=(1,)) -> list[torch.Tensor]:
    """STEPS calls per context (interleaved like a CFG loop), timestep falling; outputs in call order."""
    outs = []
    for step in range(STEPS):
        for name, seed in zip(contexts, seeds, strict=True):
            with model.cache_context(name):
                outs.append(model(**inputs(seed), timestep=torch.tensor([1000.0 - 200 * step]), return_dict=False)[0])
    return outs


def layout_of(model) -> BlockLayout:
    return BlockLayout.from_fingerprint(HunyuanVideoAdapter().fingerprint(model))


def apply(model, actions: np.ndarray) -> vc.CacheEngine:
    table = CacheTable(actions, layout=layout_of(model))
    return vc.apply_to_transformer(model, table_or_profile=table, scheduler=_Steps())


class _Steps:
    """A scheduler stand-in whose timesteps let the engine locate each call's step."""

    timesteps = torch.tensor([1000.0 - 200 * s for s in range(STEPS)])
    sigmas = torch.tensor([1.0 - 0.2 * s for s in range(STEPS)] + [0.0])


def test_fingerprint_groups_and_layout():
    model = tiny_hunyuan()
    fp = HunyuanVideoAdapter().fingerprint(model)
    assert fp["num_blocks"] == 5 and [g["name"] for g in fp["groups"]] == ["dual", "single"]
    layout = layout_of(model)
    assert layout.width == 3 and layout.components_of[0] == DUAL and layout.components_of[4] == SINGLE
    assert layout.present.sum() == 2 * 3 + 3 * 2


@pytest.mark.parametrize("kind", ["dual", "single"])
def test_block_compute_matches_the_block_and_serves_exactly(kind):
    """Nothing served: the block's own output (the single block's proj_out split in two sums in another
    order, so within float rounding). Everything served from that computation: the same output again."""
    model = tiny_hunyuan()
    adapter = HunyuanVideoAdapter()
    blocks = model.transformer_blocks if kind == "dual" else model.single_transformer_blocks
    captured = {}
    handle = blocks[0].register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    with torch.no_grad():
        model(**inputs(), timestep=torch.tensor([500.0]))
        handle.remove()
        args = captured["args"]
        want = blocks[0](*args)
        n = len(DUAL if kind == "dual" else SINGLE)
        got, computed = adapter.block_compute(blocks[0], args, {}, (None,) * n)
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        for c in range(n):  # serve one component, compute the rest
            served = tuple(computed[i] if i == c else None for i in range(n))
            again, fresh = adapter.block_compute(blocks[0], args, {}, served)
            assert fresh[c] is None and all(fresh[i] is not None for i in range(n) if i != c)
            for a, b in zip(again, got, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_full_table_and_removal_are_bit_identical():
    model = tiny_hunyuan()
    with torch.no_grad():
        base = run(model)
        layout = layout_of(model)
        engine = apply(model, np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8))
        cached = run(model)
        assert engine.stats()["computed_fraction"] == 1.0
        vc.remove(model)
        after = run(model)
    for a, b, c in zip(base, cached, after, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def split_table(model) -> np.ndarray:
    """Steps 2 and 3: dual ff and single attn reused; step 3: single mlp forecast; the rest computed."""
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    dual, single = layout.group_blocks(0), layout.group_blocks(1)
    acts[2:, list(dual), DUAL.index("ff")] = Action.REUSE
    acts[2:, list(single), SINGLE.index("attn")] = Action.REUSE
    acts[3, list(single), SINGLE.index("mlp")] = Action.FORECAST
    return acts


def test_split_caching_in_both_block_groups():
    model = tiny_hunyuan()
    with torch.no_grad():
        base = run(model)
        engine = apply(model, split_table(model))
        cached = run(model)
        stats = engine.stats()
        trace = engine.trace()
        vc.remove(model)
    for a, b in zip(base[:2], cached[:2], strict=True):  # computed (and kept: proj_out split in two sums)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(base[2], cached[2])
    rel = max(float((a - b).norm() / a.norm()) for a, b in zip(base, cached, strict=True))
    assert rel < 0.5  # reused, not garbage: the residual stream dominates a tiny random model
    assert 0.4 < stats["computed_fraction"] < 1.0
    by = stats["computed_fraction_by_component"]
    assert set(by) == {"attn", "ff", "ff_context", "mlp"} and by["ff_context"] == 1.0 and by["ff"] < 1.0
    letters = {(r["step"], r["block"], r["component"]): r["action"] for r in trace}
    assert letters[(3, 4, "mlp")] == "F" and letters[(2, 4, "attn")] == "R" and letters[(2, 0, "attn")] == "C"
    assert letters[(2, 0, "ff")] == "R" and (2, 4, "ff") not in letters


def test_cond_and_uncond_keep_their_own_outputs():
    """True CFG: two contexts with different inputs; each context's cached run equals that context run
    alone with the same table."""
    model = tiny_hunyuan()
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


def test_profiles_with_block_groups(tmp_path):
    model = tiny_hunyuan()
    fp = HunyuanVideoAdapter().fingerprint(model)
    data = {
        "schema_version": 1, "name": "tiny-hunyuan", "model": fp, "steps": STEPS,
        "presets": {"fast": {"warmup_steps": 1, "rules": [
            {"stage": "all", "components": ["attn"], "blocks": "all", "interval": 2},
            {"stage": "all", "components": ["mlp"], "blocks": "2-4", "interval": 3}]}},
    }
    profile = Profile.from_dict(data)
    profile.check_model(fp)
    table = vc.build_table(profile.preset("fast"), [1.0, 0.8, 0.6, 0.4], 5, layout_of(model))
    assert table.actions[1, 0, 0] == Action.REUSE and table.actions[1, 4, 0] == Action.REUSE  # attn in both groups
    assert table.actions[1, 4, 1] == Action.REUSE and table.actions[1, 0, 1] == Action.COMPUTE  # mlp: single only
    assert "dual: attn/ff/ff_context; single: attn/mlp" in table.to_text()
    assert Profile.from_dict(profile.to_dict()).model == profile.model
    # a Wan profile on this model, and this profile on a model with other groups: one line each
    with pytest.raises(ProfileError, match="is for WanTransformer3DModel"):
        vc.load_profile("reference-wan").check_model(fp)
    other = HunyuanVideoAdapter().fingerprint(tiny_hunyuan(dual=1, single=4))
    with pytest.raises(ProfileError, match="other block groups"):
        profile.check_model(other)
    # a component the selected blocks do not have
    data["presets"]["fast"]["rules"][1]["blocks"] = "0-1"
    with pytest.raises(ProfileError, match="none of the selected blocks has a 'mlp'"):
        Profile.from_dict(data)


def test_block_runs_carry_video_and_text():
    """A block run over the last dual and the first single blocks (ProfilingDiT's background blocks) keeps
    the delta of both streams; a reuse step skips the run's blocks."""
    model = tiny_hunyuan()
    layout = layout_of(model)
    acts = np.zeros((STEPS, layout.num_blocks, layout.width), dtype=np.int8)
    run_actions = np.array([[0], [1], [0], [1]], dtype=np.int8)
    table = CacheTable(acts, block_runs=((1, 3),), run_actions=run_actions, layout=layout)
    with torch.no_grad():
        base = run(model)
        engine = vc.apply_to_transformer(model, table_or_profile=table, scheduler=_Steps())
        cached = run(model)
        stats = engine.stats()
        vc.remove(model)
    assert torch.equal(base[0], cached[0]) and not torch.equal(base[1], cached[1])
    assert stats["block_runs"] == {"compute": 2, "reuse": 2, "skipped_blocks": 6}
    assert float((base[1] - cached[1]).norm() / base[1].norm()) < 0.5


def test_comparison_flop_counter_agrees_with_the_adapter():
    """The comparison's FLOP counter (probes inside each component, whatever cache runs) counts an
    uncached HunyuanVideo call as the adapter's block_flops do, and a split-cached run as the engine does."""
    from videocache.eval_vbench.metrics.flops import ComponentCounter

    model = tiny_hunyuan()
    adapter = HunyuanVideoAdapter()
    captured = []
    handles = [b.register_forward_pre_hook(lambda m, a, c=captured: c.append((m, a))) for b in adapter.blocks(model)]
    with torch.no_grad(), ComponentCounter(model) as counter:
        model(**inputs(pad=2), timestep=torch.tensor([500.0]))
    for h in handles:
        h.remove()
    want = sum(sum(adapter.block_flops(m, a, {})) for m, a in captured)
    assert counter.counts.total_flops == pytest.approx(want, rel=1e-9)
    assert counter.counts.calls["single_attn"] == 3 and counter.counts.calls["ff_context"] == 2
    with torch.no_grad(), ComponentCounter(model) as counter:
        engine = apply(model, split_table(model))
        run(model)
        fraction = engine.stats()["computed_fraction"]
        vc.remove(model)
    with torch.no_grad(), ComponentCounter(model) as base:
        run(model)
    assert counter.counts.total_flops / base.counts.total_flops == pytest.approx(fraction, rel=1e-9)
