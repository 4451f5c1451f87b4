"""Optimal compute-step schedules: exact shortest paths, budget respected, never worse than a rule table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import videocache as vc
from videocache.calibrate import TableSearch
from videocache.schedule_search import _cell_costs, _shortest_paths, schedule_preset

STEPS, BLOCKS = 8, 2


@pytest.fixture(scope="module")
def search() -> TableSearch:
    """Gram matrices of smooth random feature trajectories (one prompt, so median = mean)."""
    rng = np.random.default_rng(0)
    comps = len(vc.COMPONENTS)
    grams = np.zeros((1, BLOCKS, comps, STEPS, STEPS))
    for b, c in itertools.product(range(BLOCKS), range(comps)):
        walk = np.cumsum(rng.normal(size=(STEPS, 16)) * rng.uniform(0.2, 1.0, size=(STEPS, 1)), axis=0) + 3
        grams[0, b, c] = walk @ walk.T
    flops = rng.uniform(1, 3, size=(BLOCKS, comps))
    weights = rng.uniform(0.5, 2.0, size=STEPS)
    return TableSearch(grams, flops, np.linspace(1, 0.05, STEPS), band=STEPS, step_weights=weights)


def _brute_force(cost: np.ndarray) -> np.ndarray:
    """Least total cost per number of computes, over every compute set containing step 0."""
    T = cost.shape[1]
    best = np.full(T + 1, np.inf)
    for k in range(1, T + 1):
        for rest in itertools.combinations(range(1, T), k - 1):
            computes = [0, *rest]
            total = 0.0
            for t in range(T):
                if t in computes:
                    continue
                before = [s for s in computes if s < t]
                p = before[-2] + 1 if len(before) > 1 else 0
                total += cost[p, before[-1], t]
            best[k] = min(best[k], total)
    return best


def test_shortest_paths_are_optimal(search):
    cost, forecast = _cell_costs(search, [(b, c) for b in (0, 1) for c in (0, 2)])
    schedule = _shortest_paths(cost, forecast)
    np.testing.assert_allclose(schedule.errors[1:], _brute_force(cost)[1:], rtol=1e-9)
    for k in range(1, STEPS + 1):
        assert len(schedule.computes[k]) == k and schedule.computes[k][0] == 0
    assert schedule.errors[STEPS] == 0.0


@pytest.mark.parametrize("granularity", ["aligned", "component", "block"])
def test_schedule_respects_the_budget(search, granularity):
    preset = schedule_preset(search, 0.5, granularity)
    candidate = search.evaluate(preset)
    assert 0.3 < candidate.predicted_fraction <= 0.5


def test_aligned_schedule_beats_a_fixed_interval_rule(search):
    """TaylorSeer-style tables (warm-up, then every other step forecast) are points of the searched space."""
    rule = {"warmup_steps": 2, "final_steps": 0, "rules": [
        {"stage": "all", "components": list(vc.COMPONENTS), "blocks": "all", "interval": 2, "mode": "forecast"}]}
    fixed = search.evaluate(rule)
    found = search.evaluate(schedule_preset(search, fixed.predicted_fraction, "aligned"))
    assert found.predicted_fraction <= fixed.predicted_fraction + 1e-9
    assert found.predicted_error <= fixed.predicted_error + 1e-9


@pytest.fixture(scope="module")
def bending() -> TableSearch:
    """Trajectories that bend (a linear forecast overshoots them), not random walks (reuse beats any forecast)."""
    rng = np.random.default_rng(1)
    comps = len(vc.COMPONENTS)
    t = np.linspace(0, 1, STEPS)[:, None]
    grams = np.zeros((1, BLOCKS, comps, STEPS, STEPS))
    for b, c in itertools.product(range(BLOCKS), range(comps)):
        a, v = rng.normal(size=(2, 16))
        path = 3 + a * np.sqrt(t) + 0.3 * v * t
        grams[0, b, c] = path @ path.T
    return TableSearch(grams, np.ones((BLOCKS, comps)), np.linspace(1, 0.05, STEPS), band=STEPS)


def test_a_forecast_gain_is_scored_as_it_runs(bending):
    """At gain g the search scores forecasts damped by g, as the engine runs them: its schedule is the best
    there, no worse than the gain-1 schedule run damped; the preset carries the gain, which scoring reads."""
    search = bending
    plain = schedule_preset(search, 0.5, "aligned")
    damped = schedule_preset(search, 0.5, "aligned", gain=0.5)
    assert damped["explicit_forecast"] and damped["forecast_gain"] == 0.5 and "forecast_gain" not in plain
    found = search.evaluate(damped)
    assert found.predicted_error <= search.evaluate({**plain, "forecast_gain": 0.5}).predicted_error + 1e-9
    assert found.predicted_error != search.evaluate({**damped, "forecast_gain": 1.0}).predicted_error


def test_bad_arguments(search):
    with pytest.raises(ValueError, match="granularity"):
        schedule_preset(search, 0.5, "per-token")
    with pytest.raises(ValueError, match="budget"):
        schedule_preset(search, 1.5)
    with pytest.raises(ValueError, match="no schedule fits"):
        schedule_preset(search, 0.01)


@pytest.mark.parametrize("stage", ["+forecast", "+schedule"])
def test_calibration_stages_try_each_forecast_gain(bending, stage):
    """The forecast and schedule stages measure a candidate per gain (and granularity), each once."""
    from videocache.calibrate import SearchOptions
    from videocache.eval_vbench.calibration.runs import _stage_trials

    grid = (1.0, 0.7, 0.4, 0.2)  # the shipped FORECAST_GAINS (tests run two: conftest)
    trials = _stage_trials(stage, SearchOptions(), bending, 0.6, None, None, measure_top=3, gains=grid)
    gains = [c.preset.get("forecast_gain", 1.0) for c, _ in trials]
    assert set(gains) == set(grid)
    keys = [repr(sorted(c.preset.items())) for c, _ in trials]
    assert len(set(keys)) == len(keys)
    if stage == "+forecast":  # what later stages build on keeps the gain
        assert [o.forecast_gain for _, o in trials] == gains
