"""The run-time guard on a cache table: a calibrated table made for one setting, corrected by what the run does.

A table decides from (step, block, component) alone, so it cannot see that a run moves faster than the runs
it was calibrated on (a higher guidance scale, more frames). The guard measures one cheap signal per step:
the relative change of the denoiser's input latent, delta_t = |x_t - x_(t-1)|_1 / |x_(t-1)|_1, summed since
the last step that computed everything (D). The profile keeps what the calibration runs did: the drift
rate per unit of sigma at each sigma (`GuardConfig.drift_rate`), so a run of any step count expects
E = sum of rate(sigma) * (sigma_(t-1) - sigma_t) over the same steps. The cached outputs were made at the
last full compute; their error grows with how far the input has moved since. Where D > (1 + threshold) * E
on a step the table does not compute in full, the guard computes that step, and pays it back at once by
skipping the nearest later step that the table computes whole between two computed steps, which keeps the
computed fraction the preset's. A step is forced only while such a later step exists: skipping a step at the
edge of a skip run lengthens the run, and forecasts over the longer run cost more than the forced step
gains (measured: benchmarks/shift_reference/README.md).

The rewrite is a new `CacheTable` from the step on (the past is untouched), made on the host before the
step runs: one host-device synchronisation per step (reading the two sums), decisions out of any compiled
graph, the same answer for every CFG context of the step (they share the latent; the first call of the step
decides) and, under sequence parallelism, for every rank: the two sums are all-reduced over the ranks that
share the tokens (`Agreement.group`), one all-reduce per step.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .table import Action, CacheTable, TableError


@dataclass(frozen=True)
class GuardConfig:
    """`sigmas` (descending) and `drift_rate` (the calibration runs' input drift per unit sigma there);
    `threshold`: how much more than expected the run may drift before a step is computed."""

    sigmas: tuple[float, ...]
    drift_rate: tuple[float, ...]
    threshold: float
    enabled: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "drift_rate", tuple(float(r) for r in self.drift_rate))
        if len(self.sigmas) < 2 or len(self.sigmas) != len(self.drift_rate):
            raise ValueError("guard: sigmas and drift_rate must be lists of the same length, at least 2")
        if any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:], strict=False)):
            raise ValueError("guard: sigmas must be strictly descending")
        if not all(np.isfinite(r) and r > 0 for r in self.drift_rate):
            raise ValueError("guard: drift_rate values must be positive numbers")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) or not self.threshold > 0:
            raise ValueError(f"guard: threshold must be a number > 0; got {self.threshold!r}")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"guard: enabled must be true or false; got {self.enabled!r}")

    def rate(self, sigma: float) -> float:
        """The expected drift per unit sigma at `sigma` (linear between the calibrated points, flat beyond)."""
        xs, ys = self.sigmas[::-1], self.drift_rate[::-1]
        return float(np.interp(sigma, xs, ys))

    def expected(self, sigma_before: float, sigma: float) -> float:
        return self.rate(0.5 * (sigma_before + sigma)) * abs(sigma_before - sigma)

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "threshold": round(float(self.threshold), 4),
                "sigmas": [round(s, 5) for s in self.sigmas], "drift_rate": [round(r, 5) for r in self.drift_rate]}

    @classmethod
    def from_dict(cls, raw: Any) -> GuardConfig:
        if not isinstance(raw, dict) or set(raw) - {"enabled", "threshold", "sigmas", "drift_rate"} \
                or not {"threshold", "sigmas", "drift_rate"} <= set(raw):
            raise ValueError("guard must be a mapping of threshold, sigmas, drift_rate and optionally enabled")
        return cls(tuple(raw["sigmas"]), tuple(raw["drift_rate"]), raw["threshold"], raw.get("enabled", True))


class TableGuard:
    """One generation's guard (module docstring). `decide(step, x)` is called at every transformer call and
    returns the table this step runs with."""

    def __init__(self, config: GuardConfig, weights: Callable[[], np.ndarray], group: Callable[[], Any]) -> None:
        self.config = config
        self._weights = weights  # (blocks, width) FLOPs per cell, 0 where unknown
        self._group = group  # the process group of the ranks sharing the tokens, or None
        self.table: CacheTable | None = None
        self.forced: list[int] = []
        self.dropped: list[int] = []
        self.signal: list[tuple[int, float, float]] = []  # (step, drift since the last full compute, expected)
        self._step = -1

    @property
    def step(self) -> int:
        return self._step

    def start(self, table: CacheTable, sigmas: Sequence[float] | None) -> None:
        self.table, self._sigmas = table, sigmas
        self.forced, self.dropped, self.signal = [], [], []
        self._step, self._prev, self._drift, self._expected, self._debt = -1, None, 0.0, 0.0, 0.0

    def decide(self, step: int, x: torch.Tensor) -> CacheTable:
        """The table for `step` (the first call of a step decides; later calls of it get the same table)."""
        if step == self._step or self.table is None:
            return self.table
        self._step = step
        prev, self._prev = self._prev, x.detach().clone()
        if prev is None or self._sigmas is None or prev.shape != x.shape:
            self._drift = self._expected = 0.0
            return self.table
        diff = x.detach() - prev  # in the latent's dtype; the norms accumulate in float32
        sums = torch.stack([torch.linalg.vector_norm(diff, 1, dtype=torch.float32),
                            torch.linalg.vector_norm(prev, 1, dtype=torch.float32)])
        sums = sums.to(device="cpu", dtype=torch.float64)  # the step's one host-device synchronisation
        group = self._group()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(sums, group=group)
        self._drift += float(sums[0] / sums[1].clamp_min(1e-30))
        self._expected += self.config.expected(self._sigmas[step - 1], self._sigmas[step])
        self.signal.append((step, round(self._drift, 5), round(self._expected, 5)))
        acts = self.table.actions
        full = bool((acts[step] == Action.COMPUTE).all())
        if not full and self._drift > (1.0 + self.config.threshold) * self._expected:
            forced = self._forced(step)
            if forced is not None:
                self.table, full = forced, True
                self.forced.append(step)
        if full:
            self._drift = self._expected = 0.0
        return self.table

    def _computed_share(self, step: int) -> float:
        """The FLOP share of the step that the table computes (cells weighted by their FLOPs, once known)."""
        present = self.table.layout.present
        w = np.where(present, np.asarray(self._weights(), dtype=np.float64), 0.0)
        if not w.sum() > 0:
            w = present.astype(np.float64)
        return float(w[self.table.actions[step] == Action.COMPUTE].sum() / w.sum())

    def _forced(self, step: int) -> CacheTable | None:
        """The table with `step` computed whole and, once the extra compute adds up to half a step or more,
        the nearest later whole-compute step between two computed steps skipped; None when there is none."""
        acts = self.table.actions
        present = self.table.layout.present
        arr = acts.copy()
        arr[step] = Action.COMPUTE
        runs = self.table.run_actions.copy() if self.table.run_actions is not None else None
        if runs is not None and runs.size:
            runs[step] = Action.COMPUTE
        t = self.table

        def rebuilt(actions: np.ndarray) -> CacheTable:
            return CacheTable(actions, t.forecast_order, t.block_runs, runs, t.reuse_scale, t.layout, t.forecast_gain)

        debt = self._debt + 1.0 - self._computed_share(step)
        if debt >= 0.5:
            computes = [s == step or bool((acts[s][present] == Action.COMPUTE).all()) for s in range(len(acts))]
            whole = [u for u in range(step + 1, len(acts) - 1) if computes[u]]
            inner = [u for u in whole if computes[u - 1] and computes[u + 1]]
            for u in inner:  # nearest first
                trial = arr.copy()
                trial[u][present] = self._skip_actions(u)[present]
                try:
                    table = rebuilt(trial)
                except TableError:
                    continue
                self._debt = debt - 1.0
                self.dropped.append(u)
                return table
            return None
        self._debt = debt
        return rebuilt(arr)

    def _skip_actions(self, step: int) -> np.ndarray:
        """Per cell, the skip the table uses nearest to `step` (reuse where it skips that cell nowhere)."""
        acts = self.table.actions
        out = np.full(acts.shape[1:], int(Action.REUSE), dtype=np.int8)
        skipping = acts != Action.COMPUTE
        for b, c in zip(*np.nonzero(skipping.any(axis=0)), strict=True):
            steps = np.nonzero(skipping[:, b, c])[0]
            i = bisect.bisect_left(steps.tolist(), step)
            near = min((s for s in steps[max(0, i - 1): i + 1]), key=lambda s: abs(int(s) - step))
            out[b, c] = acts[near, b, c]
        return out
