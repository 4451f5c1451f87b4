"""The cache table: for every (step, block, component) of one run, compute / reuse / forecast.

A table is the only thing the engine consults to decide what to execute, so everything that depends on
it (which tensors to keep, when to free them, the predicted compute share) is derived here, once, from
the table alone. `videocache.profile.build_table` expands a compact preset for a concrete run.

Optional second layer, block runs (ProfilingDiT): maximal runs of consecutive blocks that are cached as a
whole. On a run's compute step the engine keeps delta = h_out - h_in across the run; on its reuse step the
run's blocks do not execute and h_in + delta is used instead. A block in a run is cached only this way, so
its component cells are always COMPUTE.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

COMPONENTS: tuple[str, ...] = ("self_attn", "cross_attn", "mlp")  # the default components of one kind of block
_LETTERS = "CRF"


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one type, with the names of their cacheable components (in the order the adapter's
    `block_compute` serves and returns them). By default the group's blocks are consecutive (after the
    groups before it); `blocks`, the group's global block indices (ascending), lets groups interleave
    (Open-Sora's spatial and temporal blocks run S0, T0, S1, T1, ...)."""

    name: str
    num_blocks: int
    components: tuple[str, ...]
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a block group needs a name; got {self.name!r}")
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(f"block group {self.name}: num_blocks must be an integer >= 1; got {self.num_blocks!r}")
        comps = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        if not comps or not all(isinstance(c, str) and c for c in comps) or len(set(comps)) != len(comps):
            raise ValueError(f"block group {self.name}: components must be distinct names; got {list(comps)}")
        object.__setattr__(self, "components", comps)
        if self.blocks is not None:
            idx = tuple(self.blocks) if isinstance(self.blocks, list | tuple) else None
            if (
                idx is None or len(idx) != self.num_blocks
                or not all(isinstance(b, int | np.integer) and not isinstance(b, bool) and b >= 0 for b in idx)
                or any(a >= b for a, b in zip(idx, idx[1:], strict=False))
            ):
                raise ValueError(
                    f"block group {self.name}: blocks must be {self.num_blocks} ascending block indices (num_blocks); "
                    f"got {self.blocks!r}"
                )
            object.__setattr__(self, "blocks", tuple(int(b) for b in idx))

    def to_dict(self) -> dict:
        out = {"name": self.name, "num_blocks": self.num_blocks, "components": list(self.components)}
        return out if self.blocks is None else out | {"blocks": list(self.blocks)}


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a model as groups in execution order (Wan: one group of self_attn/cross_attn/mlp
    blocks; HunyuanVideo: dual-stream then single-stream blocks, each with components of their own).
    Groups own consecutive runs of blocks, in order, unless every group lists its `blocks`: then the lists
    must together hold each block index once (Open-Sora: spatial = the even blocks, temporal = the odd).

    A table cell is (step, block, c) with c the component's index *within its block's group*, so the
    table is `width` = the largest group's component count wide; the cells past a block's own
    components are absent (`present` is False there) and never executed or counted."""

    groups: tuple[BlockGroup, ...]
    components_of: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    present: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups or not all(isinstance(g, BlockGroup) for g in groups):
            raise ValueError("a block layout needs at least one BlockGroup")
        if len({g.name for g in groups}) != len(groups):
            raise ValueError(f"block group names must be distinct; got {[g.name for g in groups]}")
        object.__setattr__(self, "groups", groups)
        explicit = [g.blocks is not None for g in groups]
        if any(explicit):
            if not all(explicit):
                raise ValueError("either every block group lists its blocks or none does")
            total = sum(g.num_blocks for g in groups)
            owner: list[BlockGroup | None] = [None] * total
            for g in groups:
                for b in g.blocks:
                    if b >= total or owner[b] is not None:
                        raise ValueError(
                            f"the block groups' blocks must hold each index 0-{total - 1} once; block {b} "
                            + ("does not exist" if b >= total else f"is in {owner[b].name} and {g.name}")
                        )
                    owner[b] = g
            per_block = tuple(g.components for g in owner)
        else:
            per_block = tuple(g.components for g in groups for _ in range(g.num_blocks))
        object.__setattr__(self, "components_of", per_block)
        names: list[str] = []
        for g in groups:
            names += [c for c in g.components if c not in names]
        object.__setattr__(self, "names", tuple(names))
        present = np.zeros((len(per_block), max(len(c) for c in per_block)), dtype=bool)
        for b, comps in enumerate(per_block):
            present[b, : len(comps)] = True
        present.flags.writeable = False
        object.__setattr__(self, "present", present)

    @classmethod
    def uniform(cls, num_blocks: int, components: Sequence[str] = COMPONENTS, name: str = "blocks") -> BlockLayout:
        return cls((BlockGroup(name, num_blocks, tuple(components)),))

    @classmethod
    def from_fingerprint(cls, fingerprint: Mapping) -> BlockLayout:
        """The layout an adapter fingerprint describes: its `groups`, else one group of its `components`."""
        groups = fingerprint.get("groups")
        if groups is None:
            if not fingerprint.get("components"):
                raise ValueError(f"the fingerprint of {fingerprint.get('architecture')} names neither components nor groups")
            return cls.uniform(int(fingerprint["num_blocks"]), fingerprint["components"])
        return cls(tuple(
            g if isinstance(g, BlockGroup)
            else BlockGroup(g["name"], g["num_blocks"], tuple(g["components"]), g.get("blocks"))
            for g in groups
        ))

    @property
    def num_blocks(self) -> int:
        return len(self.components_of)

    @property
    def width(self) -> int:
        return self.present.shape[1]

    def group_blocks(self, index: int) -> Sequence[int]:
        """Global block indices of group `index` (ascending)."""
        if self.groups[index].blocks is not None:
            return self.groups[index].blocks
        start = sum(g.num_blocks for g in self.groups[:index])
        return range(start, start + self.groups[index].num_blocks)

    def index(self, block: int, name: str) -> int | None:
        """The cell index of component `name` in `block`, or None when that block has no such component."""
        comps = self.components_of[block]
        return comps.index(name) if name in comps else None

    def cells_of(self, name: str, blocks: Iterable[int] | None = None) -> list[tuple[list[int], int]]:
        """(blocks, cell index) pairs, one per group, for component `name` in `blocks` (default all)."""
        wanted = set(range(self.num_blocks) if blocks is None else blocks)
        out = []
        for gi, g in enumerate(self.groups):
            if name in g.components:
                members = [b for b in self.group_blocks(gi) if b in wanted]
                if members:
                    out.append((members, g.components.index(name)))
        return out

    def per_cell(self, values: Mapping[str, float]) -> np.ndarray:
        """(num_blocks, width) array of a per-component-name value at every cell (absent cells 0)."""
        out = np.zeros(self.present.shape)
        for b, comps in enumerate(self.components_of):
            out[b, : len(comps)] = [float(values[c]) for c in comps]
        return out

    def name(self, block: int, comp: int) -> str:
        return self.components_of[block][comp]

    def to_list(self) -> list[dict]:
        return [g.to_dict() for g in self.groups]


class Action(enum.IntEnum):
    COMPUTE = 0
    REUSE = 1
    FORECAST = 2

    @property
    def letter(self) -> str:
        return _LETTERS[self]


class TableError(ValueError):
    """A cache table that cannot be executed (bad shape, or a reuse with nothing computed before it)."""


def consecutive_runs(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices, (first, last) inclusive: [1, 2, 3, 5] -> [(1, 3), (5, 5)]."""
    runs: list[tuple[int, int]] = []
    for b in sorted(set(int(b) for b in blocks)):
        if runs and b == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((b, b))
    return runs


def decreasing_interval_steps(num_steps: int, warmup_steps: int, t_max: int, t_min: int) -> np.ndarray:
    """Compute steps (bool, one per step) of ProfilingDiT's schedule: every step of the warm-up s0, then a
    recompute T_s steps after each compute step s, T_s = T_max - (T_max - T_min)(s - s0)/(S - s0) rounded
    and kept in [T_min, T_max], so reuse stretches are long early and short late. Step 0 always computes."""
    if not 1 <= t_min <= t_max:
        raise TableError(f"block-run intervals need 1 <= t_min <= t_max; got t_min={t_min}, t_max={t_max}")
    s0 = min(max(0, warmup_steps), num_steps)
    compute = np.zeros(num_steps, dtype=bool)
    compute[: max(s0, 1)] = True
    s = max(s0, 1) - 1
    while True:
        frac = max(0, s - s0) / max(1, num_steps - s0)
        s += min(t_max, max(t_min, _round_half_up(t_max - (t_max - t_min) * frac)))
        if s >= num_steps:
            return compute
        compute[s] = True


# Action values as plain ints, for hot loops where enum lookups cost
_COMPUTE, _REUSE, _FORECAST = int(Action.COMPUTE), int(Action.REUSE), int(Action.FORECAST)


def is_forecast_gain(value: object) -> bool:
    """Whether `value` is a forecast gain: a number in (0, 1] (1: plain forecasts; `videocache.forecast.served`)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and 0.0 < value <= 1.0


@dataclass(eq=False)
class CacheTable:
    """Actions of shape (num_steps, num_blocks, layout.width), values in `Action`; cell (s, b, c) is
    component c of block b's group (`layout`, by default one group of `COMPONENTS`), and absent cells
    (past a block's own components) must be COMPUTE.

    `forecast_order` k: a FORECAST cell extrapolates from the last k+1 computed outputs of its
    (block, component), or from as many as exist when fewer were computed before it.
    The table is treated as immutable: the array is copied and made read-only.

    `block_runs` ((first, last) inclusive, ascending, disjoint) with `run_actions` of shape
    (num_steps, len(block_runs)), values COMPUTE or REUSE: the optional block-run layer (module docstring).

    `reuse_scale` (same shape as `actions`, float): a REUSE cell returns the kept output times its factor
    (EOC-style correction calibrated from uncached runs); None means 1 everywhere.

    `forecast_gain` g in (0, 1]: a FORECAST cell returns last + g (forecast - last) (`videocache.forecast.served`).
    """

    actions: np.ndarray
    forecast_order: int = 1
    block_runs: tuple[tuple[int, int], ...] = ()
    run_actions: np.ndarray | None = None
    reuse_scale: np.ndarray | None = None
    layout: BlockLayout | None = None
    forecast_gain: float = 1.0
    partial_blocks: np.ndarray = field(init=False, repr=False)
    _computes: list[list[list[int]]] = field(init=False, repr=False)
    _run_of: dict[int, int] = field(init=False, repr=False)
    _run_deps: np.ndarray = field(init=False, repr=False)
    _run_last_use: np.ndarray = field(init=False, repr=False)
    # cells[step][block][comp] = (action, dependencies, last_use or None, factor: the reuse factor of a REUSE
    # cell, the forecast gain of a FORECAST one): the same facts as
    # the arrays, as plain Python values, because the engine reads one per component call; one entry per
    # component of the block's group (absent cells left out)
    cells: list[list[list[tuple[int, tuple[int, ...], int | None, float]]]] = field(init=False, repr=False)
    # uniform_skips[step] = (action, dependencies, factor) where every cell of that step shares them
    # (no block runs): the engine may then skip the whole block stack at once from per-step sums;
    # sum_last_use[step] = the last uniform skip step that reads that compute step
    uniform_skips: dict[int, tuple[int, tuple[int, ...], float]] = field(init=False, repr=False)
    sum_last_use: dict[int, int] = field(init=False, repr=False)
    # cell_last_use[step][block][comp]: last_use counting only the steps that are not uniform skips (what
    # a cell's own kept output must live for when the engine skips uniform steps from step sums)
    cell_last_use: list[list[list[int | None]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arr = np.asarray(self.actions)
        if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise TableError(f"cache table actions must have shape (num_steps, num_blocks, components); got {arr.shape}")
        if self.layout is None:
            self.layout = BlockLayout.uniform(arr.shape[1])
        layout = self.layout
        if arr.shape[1:] != (layout.num_blocks, layout.width):
            raise TableError(
                f"cache table actions must have shape (num_steps, {layout.num_blocks}, {layout.width}) for its block "
                f"layout; got {arr.shape}"
            )
        if arr.dtype.kind not in "iub":
            raise TableError(
                f"cache table actions must be integers (0=compute, 1=reuse, 2=forecast); got {arr.dtype}"
            )
        if arr.size and (arr.min() < 0 or arr.max() > int(Action.FORECAST)):
            raise TableError("cache table actions must be 0 (compute), 1 (reuse) or 2 (forecast)")
        if np.any(arr[:, ~layout.present] != Action.COMPUTE):
            raise TableError("cache table: a cell past its block's components is not compute (absent cells must be 0)")
        if not isinstance(self.forecast_order, int) or self.forecast_order < 1:
            raise TableError(f"forecast_order must be an integer >= 1; got {self.forecast_order!r}")
        if not is_forecast_gain(self.forecast_gain):
            raise TableError(f"forecast_gain must be a number in (0, 1]; got {self.forecast_gain!r}")
        arr = arr.astype(np.int8, copy=True)
        arr.flags.writeable = False
        self.actions = arr
        # (num_steps, num_blocks): the block has a component that is not computed at that step
        self.partial_blocks = (arr != Action.COMPUTE).any(axis=2)
        if self.reuse_scale is not None:
            scale = np.asarray(self.reuse_scale, dtype=np.float32).copy()
            if scale.shape != arr.shape or not np.isfinite(scale).all():
                raise TableError(f"reuse_scale must be finite numbers of shape {arr.shape}; got {scale.shape}")
            scale.flags.writeable = False
            self.reuse_scale = scale
        steps, blocks, comps = arr.shape
        # one pass per (block, component): compute steps, what each cell reads, who reads each compute last
        acts = arr.tolist()
        scale = self.reuse_scale.tolist() if self.reuse_scale is not None else None
        n_read = {_REUSE: 1, _FORECAST: self.forecast_order + 1}
        last = [[[-1] * comps for _ in range(blocks)] for _ in range(steps)]
        deps_of: list[list[list[tuple[int, ...]]]] = [[[()] * comps for _ in range(blocks)] for _ in range(steps)]
        self._computes = [[[] for _ in range(comps)] for _ in range(blocks)]
        own = [len(c) for c in layout.components_of]
        for b in range(blocks):
            for c in range(own[b]):
                computes = self._computes[b][c]
                for s in range(steps):
                    kind = acts[s][b][c]
                    if kind == _COMPUTE:
                        computes.append(s)
                        continue
                    if not computes:
                        verb = "reuses" if kind == _REUSE else "forecasts"
                        raise TableError(
                            f"cache table: block {b} {layout.name(b, c)} {verb} at step {s} with no earlier compute; "
                            "compute it at an earlier step (e.g. add warm-up steps)"
                        )
                    deps = deps_of[s][b][c] = tuple(computes[-n_read[kind]:])
                    for d in deps:
                        last[d][b][c] = s  # s only grows, so this ends as the last reader
        self.cells = [
            [
                [
                    (
                        acts[s][b][c],
                        deps_of[s][b][c],
                        None if last[s][b][c] < 0 else last[s][b][c],
                        self.forecast_gain if acts[s][b][c] == _FORECAST else 1.0 if scale is None else scale[s][b][c],
                    )
                    for c in range(own[b])
                ]
                for b in range(blocks)
            ]
            for s in range(steps)
        ]
        self._init_block_runs()
        self._init_uniform_skips()

    def _init_uniform_skips(self) -> None:
        self.uniform_skips, self.sum_last_use = {}, {}
        self.cell_last_use = [[[c[2] for c in cells] for cells in row] for row in self.cells]
        if self.block_runs:
            return
        for s, row in enumerate(self.cells):
            first = row[0][0]
            if first[0] == _COMPUTE or any(
                (a, d, f) != (first[0], first[1], first[3]) for cells in row for a, d, _, f in cells
            ):
                continue
            self.uniform_skips[s] = (first[0], first[1], first[3])
            for d in first[1]:
                self.sum_last_use[d] = s  # s only grows
        last: list[list[list[int | None]]] = [[[None] * len(cells) for cells in row] for row in self.cells]
        for s, row in enumerate(self.cells):
            if s in self.uniform_skips:
                continue
            for b, cells in enumerate(row):
                for c, (_, deps, _, _) in enumerate(cells):
                    for d in deps:
                        last[d][b][c] = s
        self.cell_last_use = last

    def _init_block_runs(self) -> None:
        runs = tuple(self.block_runs)
        ok = all(
            isinstance(r, tuple | list) and len(r) == 2 and all(isinstance(b, int | np.integer) for b in r) for r in runs
        )
        if not ok:
            raise TableError(f"block_runs must be (first, last) block index pairs; got {list(runs)}")
        runs = tuple((int(a), int(b)) for a, b in runs)
        steps, blocks = self.actions.shape[:2]
        prev = -1
        for a, b in runs:
            if not prev < a <= b < blocks:
                raise TableError(
                    f"block_runs must be ascending, disjoint (first, last) ranges within blocks 0-{blocks - 1}; "
                    f"got {list(runs)}"
                )
            prev = b
        self.block_runs = runs
        self._run_of = {blk: r for r, (a, b) in enumerate(runs) for blk in range(a, b + 1)}
        if self.run_actions is None:
            if runs:
                raise TableError("block_runs need run_actions of shape (num_steps, number of runs)")
            ra = np.zeros((steps, 0), dtype=np.int8)
        else:
            ra = np.asarray(self.run_actions)
            if ra.shape != (steps, len(runs)) or ra.dtype.kind not in "iub":
                raise TableError(
                    f"run_actions must be integers of shape ({steps}, {len(runs)}) (steps, block runs); "
                    f"got {ra.dtype} {ra.shape}"
                )
            if ra.size and (ra.min() < 0 or ra.max() > int(Action.REUSE)):
                raise TableError("run_actions must be 0 (compute) or 1 (reuse)")
            ra = ra.astype(np.int8, copy=True)
        ra.flags.writeable = False
        self.run_actions = ra
        for blk in self._run_of:
            if np.any(self.actions[:, blk] != Action.COMPUTE):
                r = self.block_runs[self._run_of[blk]]
                raise TableError(
                    f"block {blk} is in block run {r[0]}-{r[1]}, which caches it whole; its component cells must "
                    "all be compute"
                )
        # the compute step each run reuse reads, and the last step reading each run compute (-1: none)
        deps = np.full(ra.shape, -1, dtype=np.int32)
        last = np.full(ra.shape, -1, dtype=np.int32)
        for r in range(len(runs)):
            src = -1
            for s in range(steps):
                if ra[s, r] == Action.COMPUTE:
                    src = s
                elif src < 0:
                    a, b = runs[r]
                    raise TableError(
                        f"cache table: block run {a}-{b} reuses at step {s} with no earlier compute; "
                        "compute it at an earlier step (e.g. add warm-up steps)"
                    )
                else:
                    deps[s, r] = src
                    last[src, r] = s
        deps.flags.writeable = False
        last.flags.writeable = False
        self._run_deps, self._run_last_use = deps, last

    # -- shape ------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.actions.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.actions.shape[1]

    # -- queries the engine makes on its hot path -------------------------------------------------
    def action(self, step: int, block: int, comp_index: int) -> Action:
        return Action(int(self.actions[step, block, comp_index]))

    def dependencies(self, step: int, block: int, comp_index: int) -> tuple[int, ...]:
        """Compute steps whose outputs a cell reads: () for COMPUTE, the latest earlier compute for REUSE,
        the latest min(k+1, available) earlier computes (ascending) for FORECAST."""
        return self.cells[step][block][comp_index][1]

    def last_use(self, step: int, block: int, comp_index: int) -> int | None:
        """Last step that reads the output computed at `step`, or None: the engine frees it after that step."""
        return self.cells[step][block][comp_index][2]

    def next_use_after(self, step: int, block: int, comp: int | str) -> int | None:
        """First step > `step` that reuses or forecasts from a value computed at or before `step`, or None.

        At a COMPUTE cell this says whether its output must be stored at all.
        """
        c = self.layout.index(block, comp) if isinstance(comp, str) else comp
        if c is None:
            return None
        computes = self._computes[block][c]
        for r in range(step + 1, self.num_steps):
            if self.actions[r, block, c] == Action.COMPUTE:
                # once k+1 computes lie in (step, r], no later cell can read anything from <= step
                i, j = bisect.bisect_right(computes, step), bisect.bisect_right(computes, r)
                if j - i >= self.forecast_order + 1:
                    return None
                continue
            deps = self.dependencies(r, block, c)
            if deps and deps[0] <= step:
                return r
        return None

    # -- block runs -------------------------------------------------------------------------------
    def run_of(self, block: int) -> int | None:
        """Index of the block run containing `block`, or None."""
        return self._run_of.get(block)

    def run_action(self, step: int, run: int) -> Action:
        return Action(int(self.run_actions[step, run]))

    def run_dependency(self, step: int, run: int) -> int | None:
        """The compute step whose delta a run reuse at `step` adds; None at a run compute step."""
        v = int(self._run_deps[step, run])
        return None if v < 0 else v

    def run_last_use(self, step: int, run: int) -> int | None:
        """Last step that reuses the delta computed at `step`, or None: the engine keeps it only if read."""
        v = int(self._run_last_use[step, run])
        return None if v < 0 else v

    def skipped_cells(self) -> np.ndarray:
        """(num_steps, num_blocks) bool: blocks that a block-run reuse skips at that step."""
        skipped = np.zeros(self.actions.shape[:2], dtype=bool)
        for r, (a, b) in enumerate(self.block_runs):
            skipped[:, a : b + 1] = (self.run_actions[:, r] == Action.REUSE)[:, None]
        return skipped

    # -- summaries --------------------------------------------------------------------------------
    def is_full_compute(self) -> bool:
        return not bool(np.any(self.actions != Action.COMPUTE) or np.any(self.run_actions != Action.COMPUTE))

    def cell_weights(self, weights: Mapping[str, float]) -> np.ndarray:
        """(num_blocks, width) per-cell weights from per-component-name ones (absent cells 0)."""
        layout = self.layout
        missing = [c for c in layout.names if c not in weights]
        if missing:
            raise TableError(f"a weight is needed for every component; missing {missing}")
        w = layout.per_cell(weights)
        if np.any(w < 0) or w.sum() <= 0:
            raise TableError("component weights must be >= 0 and not all zero")
        return w

    def predicted_computed_fraction(self, weights: Mapping[str, float]) -> float:
        """FLOP-weighted share of block-component work the table executes (weights: FLOPs per call of
        each component, by name). A prediction only: the engine measures what really ran."""
        w = self.cell_weights(weights)
        computed = ((self.actions == Action.COMPUTE) & ~self.skipped_cells()[:, :, None]).sum(axis=0)
        return float((computed * w).sum() / (self.num_steps * w.sum()))

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of cells per component name and action letter; cells a block-run reuse skips count as R."""
        skipped = self.skipped_cells()
        out = {}
        for name in self.layout.names:
            counts = dict.fromkeys(_LETTERS, 0)
            for blocks, c in self.layout.cells_of(name):
                acts, skip = self.actions[:, blocks, c], skipped[:, blocks]
                for a in Action:
                    counts[a.letter] += int(((acts == a) & ~skip).sum())
                counts["R"] += int(skip.sum())
            out[name] = counts
        return out

    def to_text(self) -> str:
        """Rows = steps; per block one letter per component (in its group's order), C/R/F."""
        layout = self.layout
        width = len(str(self.num_steps - 1))
        own = [len(c) for c in layout.components_of]
        head = f"{'':>{width}}  " + " ".join(f"{b:<{own[b]}}" for b in range(self.num_blocks))
        groups = "; ".join(f"{g.name}: {'/'.join(g.components)}" for g in layout.groups)
        lines = [
            f"# C=compute R=reuse F=forecast(order {self.forecast_order}"
            f"{'' if self.forecast_gain == 1.0 else f', gain {self.forecast_gain:g}'}); per block: {groups}",
        ]
        if self.block_runs:
            runs = ", ".join(f"{a}-{b}" for a, b in self.block_runs)
            lines.append(f"# block runs {runs}: D = skipped, h_in + delta of the run's last compute")
        lines.append(head)
        skipped = self.skipped_cells()
        for s in range(self.num_steps):
            cells = " ".join(
                "D" * own[b] if skipped[s, b] else "".join(_LETTERS[v] for v in self.actions[s, b, : own[b]])
                for b in range(self.num_blocks)
            )
            lines.append(f"{s:>{width}}  {cells}")
        return "\n".join(lines)

    def with_cells(self, cells: Sequence[tuple[int, int, int]], action: Action) -> CacheTable:
        """A copy with the given (step, block, comp_index) cells set to `action` (block runs kept)."""
        arr = self.actions.copy()
        for s, b, c in cells:
            arr[s, b, c] = action
        return CacheTable(arr, self.forecast_order, self.block_runs, self.run_actions, self.reuse_scale, self.layout, self.forecast_gain)

    def within(self, start: int, stop: int) -> CacheTable:
        """The table of a transformer that runs steps start..stop-1 only (one expert of several, indexed by
        the generation's step): it computes every cell at its first step, reads nothing computed before it
        (a forecast lacking its k+1 points there reuses the last instead) and nothing after its last step
        reads what it computed, so every kept output is freed by then. Cells outside the span are compute."""
        if not 0 <= start <= stop <= self.num_steps:
            raise TableError(f"a step span must lie within 0-{self.num_steps}; got {start}-{stop}")
        arr = self.actions.copy()
        arr[: start + 1] = Action.COMPUTE
        arr[stop:] = Action.COMPUTE
        computed = np.cumsum(arr[start:stop] == Action.COMPUTE, axis=0)  # computes in [start, s], per cell
        short = (arr[start + 1 : stop] == Action.FORECAST) & (computed[:-1] < self.forecast_order + 1)
        arr[start + 1 : stop][short] = Action.REUSE
        runs = None
        if self.block_runs:
            runs = self.run_actions.copy()
            runs[: start + 1] = Action.COMPUTE
            runs[stop:] = Action.COMPUTE
        return CacheTable(arr, self.forecast_order, self.block_runs, runs, self.reuse_scale, self.layout, self.forecast_gain)

    def split(self, spans: Sequence[tuple[int, int]]) -> CacheTable:
        """What experts that run consecutive `spans` of the steps execute of this table, as one table: each
        span's rows from its `within` (calibration predicts a candidate's fraction and error on it)."""
        arr = self.actions.copy()
        runs = self.run_actions.copy() if self.block_runs else None
        for start, stop in spans:
            part = self.within(start, stop)
            arr[start:stop] = part.actions[start:stop]
            if runs is not None:
                runs[start:stop] = part.run_actions[start:stop]
        return CacheTable(arr, self.forecast_order, self.block_runs, runs, self.reuse_scale, self.layout, self.forecast_gain)

    @classmethod
    def full_compute(cls, num_steps: int, num_blocks: int, layout: BlockLayout | None = None) -> CacheTable:
        layout = layout or BlockLayout.uniform(num_blocks)
        return cls(np.zeros((num_steps, layout.num_blocks, layout.width), dtype=np.int8), layout=layout)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
