"""Block-run delta reuse (ProfilingDiT's background blocks) in the table, the profile and the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import videocache as vc
from videocache import COMPONENTS, CacheTable
from videocache.engine import BLOCK_HOOK, COMPONENT_HOOK, TRANSFORMER_HOOK
from videocache.profile import BlockRunSpec, Profile, ProfileError
from videocache.table import TableError, consecutive_runs, decreasing_interval_steps

PROMPT = "a red circle moving left on a black background"
STEPS, BLOCKS = 6, 8
RUNS = ((1, 3), (5, 6))


def run(pipe, guidance_scale: float = 5.0) -> torch.Tensor:
    return pipe(
        prompt=PROMPT,
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


@pytest.fixture(scope="module")
def baseline(pipe):
    return run(pipe)


def run_table(letters: str, runs=RUNS) -> CacheTable:
    """All components compute; every block run follows `letters` (C/R per step)."""
    actions = np.array([[("CR".index(ch))] * len(runs) for ch in letters], dtype=np.int8)
    return CacheTable(np.zeros((len(letters), BLOCKS, 3), dtype=np.int8), 1, runs, actions)


def block_calls(pipe) -> tuple[list[int], list]:
    """Real executions per block: norm1 runs inside the block's own forward only."""
    counts = [0] * BLOCKS
    handles = []
    for b, block in enumerate(pipe.transformer.blocks):

        def bump(*_, b=b):
            counts[b] += 1

        handles.append(block.norm1.register_forward_hook(bump))
    return counts, handles


def hooks_left(module: torch.nn.Module) -> list[str]:
    names = (TRANSFORMER_HOOK, COMPONENT_HOOK, BLOCK_HOOK)
    return [
        n
        for n, m in module.named_modules()
        if getattr(m, "_diffusers_hook", None) is not None
        and any(k in m._diffusers_hook.hooks for k in names)
    ]


# -- table and schedule -------------------------------------------------------------------------------
def test_consecutive_runs_and_decreasing_schedule():
    assert consecutive_runs([5, 1, 2, 3, 7, 6]) == [(1, 3), (5, 7)]
    assert consecutive_runs([]) == []
    steps = np.flatnonzero(decreasing_interval_steps(50, 6, 12, 2)).tolist()
    assert steps == [0, 1, 2, 3, 4, 5, 17, 27, 34, 40, 44, 47]
    gaps = np.diff(steps[5:])
    assert (np.diff(gaps) <= 0).all()  # the interval never grows
    assert decreasing_interval_steps(5, 0, 1, 1).all()  # interval 1 = every step
    with pytest.raises(TableError, match="t_min"):
        decreasing_interval_steps(10, 0, 2, 3)


def test_table_validates_block_runs():
    z = np.zeros((3, BLOCKS, 3), dtype=np.int8)
    ok = np.zeros((3, 1), dtype=np.int8)
    with pytest.raises(TableError, match="ascending, disjoint"):
        CacheTable(z, 1, ((2, 4), (4, 5)), np.zeros((3, 2), dtype=np.int8))
    with pytest.raises(TableError, match="ascending, disjoint"):
        CacheTable(z, 1, ((6, 8),), ok)
    with pytest.raises(TableError, match="run_actions"):
        CacheTable(z, 1, ((1, 2),))
    with pytest.raises(TableError, match="no earlier compute"):
        CacheTable(z, 1, ((1, 2),), np.array([[1], [0], [0]], dtype=np.int8))
    bad = z.copy()
    bad[1, 2, 0] = 1
    bad[0, 2, 0] = 0
    with pytest.raises(TableError, match="caches it whole"):
        CacheTable(bad, 1, ((1, 2),), ok)


def test_table_queries_and_prediction():
    t = run_table("CRRCR")
    assert t.run_of(2) == 0 and t.run_of(4) is None and t.run_of(6) == 1
    assert t.run_dependency(2, 0) == 0 and t.run_dependency(3, 0) is None
    assert t.run_last_use(0, 0) == 2 and t.run_last_use(3, 0) == 4 and t.run_last_use(4, 0) is None
    assert not t.is_full_compute()
    skipped_blocks = 3 * 5  # 5 blocks in runs x 3 reuse steps
    w = {c: 1.0 for c in COMPONENTS}
    assert t.predicted_computed_fraction(w) == pytest.approx(1 - skipped_blocks / (5 * BLOCKS))
    assert t.counts()["mlp"] == {"C": 5 * BLOCKS - skipped_blocks, "R": skipped_blocks, "F": 0}
    text = t.to_text()
    assert "block runs 1-3, 5-6" in text and text.splitlines()[-1].split()[2] == "DDD"
    assert t.with_cells([(0, 0, 0)], vc.Action.COMPUTE).block_runs == t.block_runs


# -- profile schema -----------------------------------------------------------------------------------
def profile_dict(block_runs: dict, **preset) -> dict:
    return {
        "schema_version": 1,
        "name": "t",
        "model": {"architecture": "WanTransformer3DModel", "num_blocks": BLOCKS},
        "steps": STEPS,
        "presets": {"bg": {"block_runs": block_runs, **preset}},
    }


def test_profile_block_runs_build_and_round_trip():
    prof = Profile.from_dict(
        profile_dict({"blocks": [1, "2-3", 5, 6], "warmup_steps": 2, "t_max": 3, "t_min": 1})
    )
    preset = prof.preset("bg")
    assert preset.block_runs == BlockRunSpec((1, "2-3", 5, 6), t_max=3, t_min=1, warmup_steps=2)
    table = vc.build_table(preset, np.linspace(1, 0.1, STEPS), BLOCKS)
    assert table.block_runs == RUNS
    # warm-up 0-1, then T = t_max = 3 after the warm-up (step 4), T = 2 from step 4 on (past the end)
    assert "".join("CR"[v] for v in table.run_actions[:, 0]) == "CCRRCR"
    again = Profile.from_dict(prof.to_dict())
    assert again.preset("bg").block_runs == preset.block_runs
    # the preset's own final steps also compute the runs
    prof2 = Profile.from_dict(profile_dict({"blocks": "1-3", "t_max": 4, "t_min": 4}, final_steps=1))
    t2 = vc.build_table(prof2.preset("bg"), np.linspace(1, 0.1, STEPS), BLOCKS)
    assert "".join("CR"[v] for v in t2.run_actions[:, 0]) == "CRRRCC"


def test_profile_block_run_rules_do_not_touch_run_blocks():
    rules = [{"stage": "all", "components": ["mlp"], "blocks": "all", "interval": 2}]
    prof = Profile.from_dict(profile_dict({"blocks": [2], "t_max": 2, "t_min": 2}, rules=rules))
    t = vc.build_table(prof.preset("bg"), np.linspace(1, 0.1, STEPS), BLOCKS)
    mlp = COMPONENTS.index("mlp")
    assert (t.actions[:, 2] == 0).all() and t.actions[1, 0, mlp] == vc.Action.REUSE


@pytest.mark.parametrize(
    ("block_runs", "fragment"),
    [
        (
            {"blocks": [1], "t_max": 2, "t_min": 3},
            "presets.bg: block_runs: t_min (3) must not exceed t_max (2)",
        ),
        ({"blocks": [1], "t_max": 0, "t_min": 0}, "t_max must be an integer >= 1"),
        ({"blocks": [1], "t_max": 2}, "missing required key 't_min'"),
        ({"blocks": [1], "t_max": 2, "t_min": 1, "every": 3}, "unknown key 'every'"),
        ({"blocks": [9], "t_max": 2, "t_min": 1}, "presets.bg: block_runs.blocks: block 9 does not exist"),
        ({"blocks": ["x"], "t_max": 2, "t_min": 1}, "blocks must be 'all', an index"),
        ({"blocks": [1], "t_max": 2, "t_min": 1, "warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ],
)
def test_profile_block_run_errors_are_one_line(block_runs, fragment):
    with pytest.raises(ProfileError) as info:
        Profile.from_dict(profile_dict(block_runs), source="p.yaml")
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("p.yaml: ")


# -- engine -------------------------------------------------------------------------------------------
def test_interval_one_block_runs_are_bit_exact_and_detach(clean, baseline):
    engine = vc.apply(clean, table=run_table("C" * STEPS))
    assert torch.equal(run(clean), baseline)
    stats = engine.stats()
    assert stats["computed_fraction"] == 1.0
    assert stats["block_runs"] == {"compute": 2 * STEPS * len(RUNS), "reuse": 0, "skipped_blocks": 0}
    vc.remove(clean)
    assert hooks_left(clean.transformer) == []
    assert torch.equal(run(clean), baseline)


def test_profile_preset_with_interval_one_is_bit_exact(clean, baseline):
    prof = Profile.from_dict(profile_dict({"blocks": [1, 2, 3, 5, 6], "t_max": 1, "t_min": 1}))
    vc.apply(clean, prof, "bg")
    assert torch.equal(run(clean), baseline)


def test_reuse_skips_the_blocks_and_the_fraction_is_measured(clean, baseline):
    letters = "CCRCRR"
    table = run_table(letters)
    engine = vc.apply(clean, table=table)
    counts, handles = block_calls(clean)
    try:
        out = run(clean)
    finally:
        for h in handles:
            h.remove()
    reuse_steps = letters.count("R")
    in_runs = {b for a, z in RUNS for b in range(a, z + 1)}
    for b in range(BLOCKS):
        expected = 2 * (STEPS - reuse_steps) if b in in_runs else 2 * STEPS
        assert counts[b] == expected, (b, counts)
    stats = engine.stats()
    assert stats["block_runs"] == {
        "compute": 2 * (STEPS - reuse_steps) * len(RUNS),
        "reuse": 2 * reuse_steps * len(RUNS),
        "skipped_blocks": 2 * reuse_steps * len(in_runs),
    }
    # measured fraction = table's prediction with the adapter's per-component FLOPs
    comps = engine._components[0]
    hidden = torch.zeros(1, 32, 128)
    ctx = torch.zeros(1, 16, 128)
    w = {
        "self_attn": engine.adapter.component_flops("self_attn", comps["self_attn"], (hidden,), {}),
        "cross_attn": engine.adapter.component_flops("cross_attn", comps["cross_attn"], (hidden, ctx), {}),
        "mlp": engine.adapter.component_flops("mlp", comps["mlp"], (hidden,), {}),
    }
    assert stats["computed_fraction"] == pytest.approx(table.predicted_computed_fraction(w))
    assert stats["computed_fraction"] < 1.0
    assert stats["fallbacks"] == 0 and stats["cache_current_bytes"] == 0
    assert not torch.equal(out, baseline) and torch.isfinite(out).all()
    trace = engine.trace()
    skipped = [r for r in trace if r["action"] == "D"]
    assert len(skipped) == 3 * stats["block_runs"]["skipped_blocks"]
    assert {r["step"] for r in skipped} == {s for s, ch in enumerate(letters) if ch == "R"}
    assert {r["block"] for r in skipped} == in_runs


def test_reuse_adds_the_delta_of_the_same_context(clean):
    """On a reuse step the run's first block returns h_in + (h_out - h_in) of the *same* context's last
    compute; cond and uncond keep their own deltas."""
    vc.apply(clean, table=run_table("CR" + "C" * (STEPS - 2), runs=((2, 4),)))
    first, last = clean.transformer.blocks[2], clean.transformer.blocks[4]
    seen: list[tuple[str, torch.Tensor]] = []

    def rec(name):
        def hook(module, args, kwargs, out):
            h = kwargs.get("hidden_states", args[0] if args else None)
            seen.append((name, h.detach().clone(), out.detach().clone()))

        return hook

    handles = [
        first.register_forward_hook(rec("first"), with_kwargs=True),
        last.register_forward_hook(rec("last"), with_kwargs=True),
    ]
    try:
        run(clean)
    finally:
        for h in handles:
            h.remove()
    # per step and context (cond, uncond): step 0 records first+last, step 1 (reuse) records first+last too
    step0 = seen[0:4]  # cond first, cond last, uncond first, uncond last
    step1 = seen[4:8]
    for k in (0, 2):  # cond, uncond
        h_in0, h_out0 = step0[k][1], step0[k + 1][2]
        h_in1, out1 = step1[k][1], step1[k][2]
        assert torch.allclose(out1, h_in1 + (h_out0 - h_in0), atol=1e-5)
        # the later blocks of the run pass their input through unchanged
        assert torch.equal(step1[k + 1][2], step1[k + 1][1])
    cond_delta = step0[1][2] - step0[0][1]
    uncond_delta = step0[3][2] - step0[2][1]
    assert not torch.allclose(cond_delta, uncond_delta)


def test_refused_delta_falls_back_to_compute_exactly(clean, baseline):
    engine = vc.apply(clean, table=run_table("CCRCRR"), max_cache_bytes=0)
    with pytest.warns(UserWarning, match="block run"):
        out = run(clean)
    assert torch.equal(out, baseline)
    stats = engine.stats()
    assert stats["fallbacks"] == 2 * 3 * len(RUNS) and stats["computed_fraction"] == 1.0


def test_profile_carries_the_fgbg_scores():
    data = profile_dict({"blocks": [1, 2], "t_max": 2, "t_min": 1})
    scores = [0.3, 0.1, 0.05, 0.4, 0.5, 0.2, 0.35, 0.45]
    data["fgbg"] = {
        "r_attn": scores,
        "classes": ["fg" if s >= 0.325 else "bg" for s in scores],
        "tau": 0.325,
        "steps_used": [2, 4],
        "heads_used": [0, 1],
        "mask_iou": 0.55,
        "per_step": [[s, None] for s in scores],  # None: a step with no measurement
    }
    prof = Profile.from_dict(data)
    assert prof.fgbg.background_runs == [(0, 2), (5, 5)] and prof.fgbg.heads_used == (0, 1)
    assert Profile.from_dict(prof.to_dict()).to_dict() == prof.to_dict()
    bad = {**data, "fgbg": {**data["fgbg"], "r_attn": scores[:3], "classes": ["fg"] * 3, "per_step": []}}
    with pytest.raises(ProfileError, match="p.yaml: fgbg scores 3 blocks; model.num_blocks is 8"):
        Profile.from_dict(bad, source="p.yaml")
    with pytest.raises(ProfileError, match="p.yaml: fgbg: unknown key 'colour'"):
        Profile.from_dict({**data, "fgbg": {**data["fgbg"], "colour": 1}}, source="p.yaml")
    with pytest.raises(ProfileError, match="p.yaml: fgbg: classes must be"):
        Profile.from_dict({**data, "fgbg": {**data["fgbg"], "classes": ["x"] * 8}}, source="p.yaml")
