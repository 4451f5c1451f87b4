"""Optimal compute-step schedules under a compute budget, by dynamic programming on Gram statistics.

The rule family of `videocache.calibrate` fixes the shape of a table (warm-up, per-stage intervals) and
searches its few parameters. This search drops the shape: for each (block, component), or each component
with one schedule shared by all blocks, it picks the set of steps to compute and, for every other step,
whether to reuse the last computed output or forecast it (order 1, from the last two), so that the
predicted error is the lowest possible for that number of computes. Rule tables such as TaylorSeer's
fixed interval are points of this space, so its predicted error is never worse than theirs.

The predicted error of a skipped cell depends only on the last two compute steps before it, so the
optimum over schedules is a shortest path over states (previous compute, last compute): exact, O(T^3)
per (block, component) for T steps. A Lagrange multiplier on FLOPs then shares the budget between the
(block, component) schedules, and a greedy pass spends what the multiplier's rounding left over.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibrate import TableSearch

CROSSING_COST = 1e6  # a skip reading across an expert switch; finite: an infinite cost reads as free below


@dataclass
class Schedule:
    """One (block group, component) schedule for every number of computes k (index k, 1..T)."""

    errors: np.ndarray  # (T + 1,) predicted error with k computes; inf where impossible
    computes: list[list[int]]  # per k: the compute steps
    forecasts: list[list[int]]  # per k: the skipped steps that forecast (the others reuse)


def _cell_costs(search: TableSearch, cells: list[tuple[int, int]], gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted predicted error of every skipped step t given its last two computes (p, l), summed over
    the (block, component) `cells` and averaged over prompts, taking for each the better of reuse and forecast.

    Returns (cost, forecast) of shape (T + 1, T, T): index p + 1 (0: no compute before l), l, t; cost is
    inf unless p < l < t, and forecast says where forecasting beats reuse. `gain`: forecasts damped to
    last + gain (forecast - last)."""
    T = search.num_steps
    band = search.band
    t_idx = np.arange(T)
    p_, l_, t_ = np.meshgrid(t_idx, t_idx, t_idx, indexing="ij")
    r = gain * np.where(l_ > p_, (t_ - l_) / np.maximum(l_ - p_, 1), 0.0)  # forecast weights (1 + r, -r)
    a, m = 1 + r, -r
    far_l = (t_idx[None, :] - t_idx[:, None]) > band  # beyond the recorded band: nothing useful kept
    far_p = (t_ - p_) > band
    reuse = np.zeros((T, T))
    fc = np.zeros((T, T, T))
    for b, c in cells:
        g = search.grams[:, b, c]  # (P, T, T), zero beyond the band
        d = np.einsum("ptt->pt", g)
        scale = search.scale[:, :, b]  # (P, T)
        full = np.sqrt(np.maximum(d, 0.0)) / scale  # the error of handing back nothing useful
        # reuse of l at t: ||F_t - F_l||^2
        e_r = d[:, None, :] - 2 * g.transpose(0, 2, 1) + d[:, :, None]  # (P, l, t)
        e_r = np.sqrt(np.maximum(e_r, 0.0)) / scale[:, None, :]
        e_r = np.where(far_l[None], full[:, None, :], e_r)
        reuse += e_r.mean(axis=0) * search.cell_weight[b, c]
        # forecast from (p, l) at t: ||F_t - (1 + r) F_l + r F_p||^2, r = (t - l) / (l - p)
        g_lt = g.transpose(0, 2, 1)  # g_lt[:, x, y] = <F_y, F_x>
        e_f = (
            d[:, None, None, :]
            - 2 * a * g_lt[:, None, :, :]
            - 2 * m * g_lt[:, :, None, :]
            + a * a * d[:, None, :, None]
            + 2 * a * m * g_lt[:, :, :, None]
            + m * m * d[:, :, None, None]
        )
        e_f = np.sqrt(np.maximum(e_f, 0.0)) / scale[:, None, None, :]
        e_f = np.where(far_p[None], full[:, None, None, :], e_f)
        fc += e_f.mean(axis=0) * search.cell_weight[b, c]
    weight = search.step_weights[None, :]
    reuse = reuse * weight
    fc = fc * weight[None]
    # an expert reads nothing another computed (videocache.experts): a skip right after a switch costs what no
    # schedule pays, so the switch step is computed; a forecast from the other side is not an option
    crossing = search.span_of[:, None] != search.span_of[None, :]  # (l or p, t)
    reuse = np.where(crossing, CROSSING_COST, reuse)
    fc = np.where(crossing[:, None, :], np.inf, fc)
    cost = np.full((T + 1, T, T), np.inf)
    forecast = np.zeros((T + 1, T, T), dtype=bool)
    cost[0] = np.where(t_idx[None, :] > t_idx[:, None], reuse, np.inf)  # only the first compute: reuse
    valid = (p_ < l_) & (l_ < t_)
    better = fc < reuse[None]
    cost[1:] = np.where(valid, np.where(better, fc, reuse[None]), np.inf)
    forecast[1:] = valid & better
    return cost, forecast


def _shortest_paths(cost: np.ndarray, forecast: np.ndarray) -> Schedule:
    """Best schedule for every number of computes k: step 0 is always computed; states are (p, last)."""
    T = cost.shape[1]
    # seg[p+1, last, n] = cost of the skipped steps last+1 .. n-1 between computes last and n (n = T: to the end)
    finite = np.where(np.isfinite(cost), cost, 0.0)
    cum = np.concatenate([np.zeros((T + 1, T, 1)), np.cumsum(finite, axis=2)], axis=2)  # cum[..., j] = sum t < j
    seg = cum[:, :, :] - cum[:, np.arange(T), np.arange(T) + 1][:, :, None]
    # f[k][p+1, last]: least cost of steps 0..last with k computes, the last two at p and last
    f = np.full((T + 1, T + 1, T), np.inf)
    parent = np.full((T + 1, T + 1, T), -2, dtype=np.int64)
    f[1, 0, 0] = 0.0
    for k in range(1, T):
        for pi in range(T + 1):
            for last in range(T - 1):
                base = f[k, pi, last]
                if not np.isfinite(base):
                    continue
                ns = np.arange(last + 1, T)
                cand = base + seg[pi, last, ns]
                cur = f[k + 1, last + 1, ns]
                better = cand < cur
                f[k + 1, last + 1, ns[better]] = cand[better]
                parent[k + 1, last + 1, ns[better]] = pi - 1
    errors = np.full(T + 1, np.inf)
    computes: list[list[int]] = [[] for _ in range(T + 1)]
    forecasts: list[list[int]] = [[] for _ in range(T + 1)]
    for k in range(1, T + 1):
        total = f[k] + seg[:, :, T]
        pi, last = (int(i) for i in np.unravel_index(int(np.argmin(total)), total.shape))
        if not np.isfinite(total[pi, last]):
            continue
        errors[k] = float(total[pi, last])
        steps, kk, p = [last], k, pi - 1
        while p >= 0:
            steps.append(p)
            p, last, kk = int(parent[kk, p + 1, last]), p, kk - 1
        steps.sort()
        computes[k] = steps
        bounds = [*steps, T]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            prev = steps[i - 1] + 1 if i > 0 else 0
            forecasts[k].extend(t for t in range(lo + 1, hi) if forecast[prev, lo, t])
    return Schedule(errors, computes, forecasts)


GRANULARITIES = ("aligned", "component", "block")


def schedule_preset(search: TableSearch, budget: float, granularity: str = "aligned", gain: float = 1.0) -> dict:
    """A preset (explicit reuse/forecast step lists) with the least predicted error whose FLOP-weighted
    computed fraction is at most `budget`. `granularity`: one schedule for the whole model ("aligned":
    every component of every block computes at the same steps), one per component, or one per
    (block, component). `gain`: the preset's forecast gain (forecasts scored and run damped by it)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"the compute budget must be in (0, 1]; got {budget}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    T, layout = search.num_steps, search.layout
    by_name = {n: [(b, c) for blocks, c in layout.cells_of(n) for b in blocks] for n in layout.names}
    if granularity == "aligned":
        groups = [[cell for cells in by_name.values() for cell in cells]]
    elif granularity == "component":
        groups = list(by_name.values())
    else:
        groups = [[cell] for cells in by_name.values() for cell in cells]
    items = []  # (cells, schedule, FLOP share of one compute step)
    total = float(search.flops.sum()) * T
    for cells in groups:
        schedule = _shortest_paths(*_cell_costs(search, cells, gain))
        items.append((cells, schedule, float(sum(search.flops[b, c] for b, c in cells)) / total))
    ks = np.arange(T + 1)

    def choose(lam: float) -> list[int]:
        return [int(np.argmin(s.errors + lam * share * ks)) for _, s, share in items]

    def used(chosen: list[int]) -> float:
        return sum(k * it[2] for k, it in zip(chosen, items, strict=True))

    if used(choose(1e18)) > budget + 1e-9:
        raise ValueError(f"no schedule fits the budget {budget}: even one compute per component exceeds it")
    lo, hi = 0.0, 1.0
    while used(choose(hi)) > budget:
        hi *= 4
    for _ in range(60):  # the smallest multiplier whose choice fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(choose(mid)) > budget else (lo, mid)
    chosen = choose(hi)
    while True:  # spend what is left on the best error drop per FLOP
        room = budget - used(chosen)
        gains = [
            ((s.errors[k] - s.errors[k + 1]) / share, i)
            for i, (k, (_, s, share)) in enumerate(zip(chosen, items, strict=True))
            if k < T and share <= room + 1e-12 and np.isfinite(s.errors[k + 1])
        ]
        if not gains or max(gains)[0] <= 0:
            break
        chosen[max(gains)[1]] += 1
    explicit: dict[str, dict] = {}
    explicit_forecast: dict[str, dict] = {}
    for k, (cells, s, _) in zip(chosen, items, strict=True):
        key = cells[0][0] if granularity == "block" else "all"  # "all": every block that has the component
        forecast = sorted(s.forecasts[k])
        reuse = [t for t in range(T) if t not in s.computes[k] and t not in forecast]
        for name in dict.fromkeys(layout.name(b, c) for b, c in cells):
            if reuse:
                explicit.setdefault(name, {})[key] = reuse
            if forecast:
                explicit_forecast.setdefault(name, {})[key] = forecast
    return {"warmup_steps": 0, "final_steps": 0, "rules": [], "explicit": explicit,
            "explicit_forecast": explicit_forecast, **({"forecast_gain": gain} if gain != 1.0 and explicit_forecast else {})}
