"""Cache table semantics and preset expansion (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from videocache import COMPONENTS, Action, CacheTable, build_table
from videocache.profile import PresetSpec, ProfileError, RuleSpec, StepRule
from videocache.table import TableError

MLP = COMPONENTS.index("mlp")
SA = COMPONENTS.index("self_attn")


def table_from_column(col: str, forecast_order: int = 1, blocks: int = 1) -> CacheTable:
    """A table whose mlp column (every block) follows the letters in `col`; everything else computes."""
    arr = np.zeros((len(col), blocks, 3), dtype=np.int8)
    for s, ch in enumerate(col):
        arr[s, :, MLP] = "CRF".index(ch)
    return CacheTable(arr, forecast_order)


def test_validation_rejects_bad_tables():
    with pytest.raises(TableError, match="shape"):
        CacheTable(np.zeros((4, 2), dtype=np.int8))
    with pytest.raises(TableError, match="0 \\(compute\\)"):
        CacheTable(np.full((2, 1, 3), 3, dtype=np.int8))
    with pytest.raises(TableError, match="no earlier compute"):
        table_from_column("RC")
    with pytest.raises(TableError, match="forecast_order"):
        table_from_column("CR", forecast_order=0)


def test_actions_are_read_only_copies():
    arr = np.zeros((3, 2, 3), dtype=np.int8)
    t = CacheTable(arr)
    arr[1, 0, 0] = 1
    assert t.action(1, 0, 0) is Action.COMPUTE
    with pytest.raises(ValueError):
        t.actions[0, 0, 0] = 1


def test_dependencies_last_use_and_next_use():
    t = table_from_column("CRRCRCC")
    assert t.dependencies(1, 0, MLP) == (0,)
    assert t.dependencies(2, 0, MLP) == (0,)
    assert t.last_use(0, 0, MLP) == 2
    assert t.last_use(3, 0, MLP) == 4
    assert t.last_use(5, 0, MLP) is None
    assert t.last_use(0, 0, SA) is None
    assert t.next_use_after(0, 0, "mlp") == 1
    assert t.next_use_after(3, 0, MLP) == 4
    assert t.next_use_after(5, 0, MLP) is None
    # at every compute cell: stored (last_use) exactly when something reads it later (next_use_after)
    for s in range(t.num_steps):
        if t.action(s, 0, MLP) is Action.COMPUTE:
            assert (t.last_use(s, 0, MLP) is None) == (t.next_use_after(s, 0, MLP) is None)


def test_forecast_dependencies_use_last_k_plus_1_computes():
    t = table_from_column("CCRCFFC", forecast_order=1)
    assert t.dependencies(4, 0, MLP) == (1, 3)
    assert t.dependencies(5, 0, MLP) == (1, 3)
    assert t.last_use(0, 0, MLP) is None  # older than the last two computes before step 4
    assert t.last_use(1, 0, MLP) == 5
    assert t.last_use(3, 0, MLP) == 5
    early = table_from_column("CFC", forecast_order=2)  # only one compute exists before step 1
    assert early.dependencies(1, 0, MLP) == (0,)
    second = table_from_column("CCCF", forecast_order=2)
    assert second.dependencies(3, 0, MLP) == (0, 1, 2)


def test_predicted_fraction_and_text():
    t = table_from_column("CRCR", blocks=2)
    w = {"self_attn": 1.0, "cross_attn": 1.0, "mlp": 2.0}
    # mlp weight 2 of 4, computed half the steps -> 1 - 0.5 * 0.5
    assert t.predicted_computed_fraction(w) == pytest.approx(0.75)
    assert not t.is_full_compute()
    assert CacheTable.full_compute(3, 2).is_full_compute()
    lines = t.to_text().splitlines()
    assert lines[-1].split()[1:] == ["CCR", "CCR"]
    assert len(lines) == 2 + t.num_steps
    with pytest.raises(TableError, match="missing"):
        t.predicted_computed_fraction({"mlp": 1.0})


def preset(**kw) -> PresetSpec:
    kw.setdefault("stage_threshold", 0.5)
    return PresetSpec(**kw)


SIGMAS10 = [1.0 - i / 10 for i in range(10)]  # 1.0 ... 0.1; early (>= 0.5) = steps 0-5, late = 6-9


def test_build_table_stages_intervals_and_overrides():
    p = preset(
        warmup_steps=1,
        final_steps=1,
        rules=(
            RuleSpec(stage="early", components=("mlp",), interval=2),
            RuleSpec(stage="late", components=("self_attn", "cross_attn"), blocks="1-2", interval=3),
            RuleSpec(stage="late", components=("self_attn",), blocks=[2], interval=3, mode="forecast"),
        ),
    )
    t = build_table(p, SIGMAS10, num_blocks=3)
    col = "".join("CRF"[v] for v in t.actions[:, 0, MLP])
    assert col == "CRCRCRCCCC"  # warm-up step 0; early stage starts at 0 -> reuse at odd steps
    # late stage = steps 6..9, interval 3 counted from step 6: compute 6, 9 (final), reuse 7, 8
    assert "".join("CRF"[v] for v in t.actions[:, 1, SA]) == "CCCCCCCRRC"
    assert "".join("CRF"[v] for v in t.actions[:, 2, SA]) == "CCCCCCCFFC"  # later rule overrides
    assert "".join("CRF"[v] for v in t.actions[:, 0, SA]) == "C" * 10  # block 0 not selected


def test_build_table_explicit_and_scaling():
    p = preset(
        explicit={"cross_attn": {"all": [2, 3]}},
        rules=(RuleSpec(stage="all", components=("mlp",), interval=2),),
        warmup_steps=1,
        reference_steps=10,
        step_rule=StepRule("scale", 5, 40),
    )
    t = build_table(p, SIGMAS10, num_blocks=2)
    assert t.actions[2:4, :, COMPONENTS.index("cross_attn")].tolist() == [[1, 1], [1, 1]]
    # 20 steps: warm-up 1 -> 2 (its share of the run), interval 2 stays (every other step is already a share)
    sig20 = [1.0 - i / 20 for i in range(20)]
    t20 = build_table(p, sig20, num_blocks=2)
    assert "".join("CRF"[v] for v in t20.actions[:8, 0, MLP]) == "CCCRCRCR"
    assert t20.actions[:2].max() == 0
    # the explicit list (steps 2-3 of 10 reused: 0.8 computed) is resampled, not read step by step: 4 of 20 and
    # 3 of 15 steps are reused, the same share at the same place in the run, the computes gained spread through it
    cross = COMPONENTS.index("cross_attn")
    assert "".join("CRF"[v] for v in t20.actions[:, 0, cross]) == "CCCRCRRCRC" + "C" * 10
    t15 = build_table(p, [1.0 - i / 15 for i in range(15)], num_blocks=2)
    assert "".join("CRF"[v] for v in t15.actions[:, 1, cross]) == "CCRCRRC" + "C" * 8
    with pytest.raises(ProfileError, match="covers 5-40 steps; got 4"):
        build_table(p, SIGMAS10[:4], num_blocks=2)


def test_build_table_reports_reuse_without_compute():
    p = preset(explicit={"mlp": {"all": [0]}}, source="x.yaml", name="bad")
    with pytest.raises(ProfileError, match=r"x\.yaml: preset 'bad'.*no earlier compute"):
        build_table(p, SIGMAS10, num_blocks=1)
