"""Budgeted cache-table calibration from uncached runs (FEB-Cache's table search, generalised).

An uncached calibration run records, for every (context, block, component), the Gram matrix of the
component's outputs over the steps: G[s, s'] = <F_s, F_s'>. Any value the engine hands back at step t
instead of computing F_t is a linear combination of earlier computed outputs (reuse: F_last; EOC-style
corrected reuse: a * F_last; order-1 forecast: (1 + r) F_last - r F_prev, r scaled by the forecast gain), so
its exact squared error ||F_t - sum a_i F_i||^2 follows from G alone, without keeping any tensor. Outputs of
more than SKETCH_ABOVE values (Wan2.1-1.3B at 480p x 81 frames: 50 M) are recorded through a fixed linear
sketch instead, which estimates every such error within about sqrt(2 / SKETCH_SIZE) (`GramRecorder`).

The search space is FEB-Cache's stage-aware one, written as profile rules: a warm-up, then in the early
stage (sigma >= stage_threshold) attention and MLP each recomputed every a_early / m_early steps, in the
late stage every a_late / m_late steps (FEB keeps attention fresh early and the MLP late: the search
finds how much), optionally with the background blocks (fg/bg profile) one step coarser or reused whole
as block runs, and a final fully computed step. Every candidate's computed fraction is exact (FLOPs per
cell) and its error is predicted from the Gram matrices: the sum over skipped cells of their relative
error (to the block's output scale), weighted by the step's measured sensitivity (how much the rest of
sampling amplifies an error made there), median over the calibration prompts (a majority vote). The
best-predicted candidates within the budget are then measured by generation, and the measurement
decides.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .profile import build_table, preset_from_dict
from .table import Action, BlockLayout, CacheTable

SKETCH_ABOVE = 2**20  # outputs with more values than this are recorded as a CountSketch (see GramRecorder)
SKETCH_SIZE = 2**16  # buckets of that sketch: relative error of a squared norm about sqrt(2 / SKETCH_SIZE)
_SKETCH_CHUNK = 2**22  # values converted to float64 at a time while sketching (32 MB)


@dataclass
class GramRecorder:
    """Engine observer for one calibration run: accumulates per-cell Gram matrices, summed over contexts.

    Every quantity the table search derives from a Gram matrix is the squared norm of a linear combination
    of one cell's outputs, so a fixed linear sketch S of the outputs serves as well: <S x, S y> estimates
    <x, y> without bias and ||S z||^2 estimates ||z||^2 with relative standard deviation at most
    sqrt(2 / sketch_size) (0.55 % for 2**16 buckets), for every combination z at once. Outputs with up to
    `sketch_above` values are recorded exactly (their float64 dot products); larger ones as a CountSketch:
    each coordinate is hashed to one of 2 * sketch_size buckets, the sketch is the first half minus the
    second (a random sign per coordinate). The bucket index (int32, one per coordinate) is drawn once per
    output size and device from a generator seeded with `seed`, so every output of a cell, step and
    prompt shares one S. Kept per cell: the last `band` + 1 outputs, float64, of at most
    `sketch_size` values each. Gram entries are accumulated on the outputs' device and read back once
    (`gram`), so recording never waits for the device."""

    num_steps: int
    num_blocks: int
    band: int = 9  # pairs of steps further apart than this are not recorded (memory)
    sketch_above: int | None = SKETCH_ABOVE  # None: always exact
    sketch_size: int = SKETCH_SIZE
    seed: int = 0
    layout: BlockLayout | None = None  # default: one group of Wan's components
    _seen: dict = field(init=False, default_factory=dict)  # (context, block, comp) -> {step: float64 vector}
    _acc: dict = field(init=False, default_factory=dict)  # device -> (blocks, components, steps, steps) float64
    _buckets: dict = field(init=False, default_factory=dict)  # (size, device) -> int32 bucket per coordinate

    def __post_init__(self) -> None:
        if self.sketch_above is not None and (self.sketch_size < 1 or self.sketch_above < 1):
            raise ValueError(f"sketch_size and sketch_above must be >= 1; got {self.sketch_size}, {self.sketch_above}")
        if self.layout is None:
            self.layout = BlockLayout.uniform(self.num_blocks)

    @property
    def gram(self) -> np.ndarray:
        """(blocks, components, steps, steps) float64 Gram matrices, summed over contexts (one transfer)."""
        out = np.zeros((self.num_blocks, self.layout.width, self.num_steps, self.num_steps))
        for acc in self._acc.values():
            out += acc.cpu().numpy()
        return out

    def sketched(self, numel: int) -> bool:
        """Whether an output of `numel` values is recorded as a sketch."""
        return self.sketch_above is not None and numel > self.sketch_above

    def clear(self) -> None:
        """Free the kept outputs and bucket indices (the Gram matrices stay)."""
        self._seen.clear()
        self._buckets.clear()

    def _sketch(self, flat):
        import torch

        k = self.sketch_size
        key = (flat.numel(), flat.device)
        buckets = self._buckets.get(key)
        if buckets is None:
            generator = torch.Generator(device=flat.device).manual_seed(self.seed)
            buckets = torch.randint(0, 2 * k, (flat.numel(),), generator=generator, device=flat.device,
                                    dtype=torch.int32)
            self._buckets[key] = buckets
        acc = torch.zeros(2 * k, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), _SKETCH_CHUNK):  # bounded float64 copies
            stop = start + _SKETCH_CHUNK
            acc.index_add_(0, buckets[start:stop], flat[start:stop].to(torch.float64))
        return acc[:k] - acc[k:]

    def __call__(self, context: str, step: int, block: int, component: str, output) -> None:
        import torch

        c = self.layout.index(block, component)
        out = output[0] if isinstance(output, tuple | list) else output
        flat = out.detach().reshape(-1)
        sketched = self.sketched(flat.numel())
        vec = self._sketch(flat) if sketched else flat.to(torch.float64)
        kept = self._seen.setdefault((context, block, c), {})
        for s in [s for s in kept if s < step - self.band or s >= step]:  # too old, or a new run began
            del kept[s]
        kept[step] = vec
        steps, others = list(kept), list(kept.values())
        if sketched:  # one matrix-vector product
            dots = torch.stack(others) @ vec
        else:  # the same dot products as one at a time (bit for bit), gathered without a host sync
            dots = torch.stack([torch.dot(vec, other) for other in others])
        acc = self._acc.get(vec.device)
        if acc is None:
            acc = self._acc[vec.device] = torch.zeros(
                (self.num_blocks, self.layout.width, self.num_steps, self.num_steps), dtype=torch.float64,
                device=vec.device)
        first = steps[0]
        if steps == list(range(first, step + 1)):  # consecutive steps (every step recorded): two slices
            row = acc[block, c, step, first : step + 1]
            row += dots
            col = acc[block, c, first:step, step]
            col += dots[:-1]
        else:
            for i, s in enumerate(steps):
                acc[block, c, step, s] += dots[i]
                if s != step:
                    acc[block, c, s, step] += dots[i]


def _combination_error(gram: np.ndarray, t: int, steps: Sequence[int], coeffs: Sequence[float]) -> np.ndarray:
    """||F_t - sum_i a_i F_{s_i}||^2 per prompt, from (prompts, steps, steps) Gram matrices."""
    err = gram[:, t, t].copy()
    for a, s in zip(coeffs, steps, strict=True):
        err -= 2 * a * gram[:, t, s]
    for a, s in zip(coeffs, steps, strict=True):
        for b, u in zip(coeffs, steps, strict=True):
            err += a * b * gram[:, s, u]
    return np.maximum(err, 0.0)


def attention_and_mlp(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """FEB-Cache's two kinds of component: attention (names containing "attn": Wan's self_attn and
    cross_attn, HunyuanVideo's attn) and the feed-forward rest (mlp, ff, ff_context)."""
    attention = [n for n in names if "attn" in n]
    return attention, [n for n in names if n not in attention]


@dataclass(frozen=True)
class SearchOptions:
    """The candidate family: warm-up and final steps, recompute intervals tried per stage and component
    kind, whether skipped cells forecast (order 1) or reuse, EOC-style correction of reused outputs, and a
    block group (e.g. the background blocks) recomputed one step less often than the rest. `components`:
    the model's component names (`BlockLayout.names`), split into attention and MLP by
    `attention_and_mlp`."""

    warmup_steps: Sequence[int] = (2, 3, 4, 5)
    final_steps: Sequence[int] = (0, 1)
    intervals: Sequence[int] = (1, 2, 3, 4)
    stage_threshold: float = 0.4
    forecast: bool = False
    forecast_gain: float = 1.0  # forecasts return last + gain (forecast - last)
    correction: bool = False
    group_blocks: tuple[int, ...] = ()
    # ProfilingDiT's block runs on these blocks (each run of consecutive blocks reused as one delta,
    # recomputed every t_max steps early down to every t_min late): {"blocks": [...], "t_max": 4, "t_min": 2}
    block_runs: dict | None = None
    components: tuple[str, ...] = ("self_attn", "cross_attn", "mlp")

    def __post_init__(self) -> None:
        if not self.intervals or min(self.intervals) < 1 or min(self.warmup_steps) < 1:
            raise ValueError("intervals must be >= 1 and warm-up steps >= 1 (step 0 always computes)")
        object.__setattr__(self, "group_blocks", tuple(self.group_blocks))

    def presets(self) -> list[dict]:
        """Every candidate preset of the family, in profile-rule form."""
        mode = {"mode": "forecast"} if self.forecast else {}
        gain = {"forecast_gain": self.forecast_gain} if self.forecast and self.forecast_gain != 1.0 else {}
        attention, mlp = attention_and_mlp(self.components)
        out = []
        for warm, final, ae, al, me, ml in itertools.product(
            self.warmup_steps, self.final_steps, *[self.intervals] * 4
        ):
            rules = []
            for stage, comps, interval in (("early", attention, ae), ("late", attention, al),
                                           ("early", mlp, me), ("late", mlp, ml)):
                if not comps:
                    continue
                if interval > 1:
                    rules.append({"stage": stage, "components": comps, "blocks": "all", "interval": interval, **mode})
                if self.group_blocks:
                    rules.append({"stage": stage, "components": comps, "blocks": list(self.group_blocks),
                                  "interval": interval + 1, **mode})
            out.append({"warmup_steps": warm, "final_steps": final, "stage_threshold": self.stage_threshold,
                        "rules": rules, **({"block_runs": self.block_runs} if self.block_runs else {}), **gain})
        return out


@dataclass
class Candidate:
    preset: dict
    actions: np.ndarray
    predicted_fraction: float
    predicted_error: float


class TableSearch:
    """Scores candidate tables on the Gram statistics of P calibration prompts.

    `grams`: (prompts, blocks, components, steps, steps); `flops`: (blocks, components) FLOPs of one call
    (components: cells in the block's group, `layout`, default one group of Wan's components); `sigmas`:
    the run's per-step sigmas (1 = noise); `step_weights`: measured step sensitivity; `component_weights`:
    measured sensitivity per component name (`layout.names` order); `spans`: the (start, stop) steps each
    expert of a pipeline with several runs (a candidate is scored as they execute it: `CacheTable.split`)."""

    def __init__(
        self,
        grams: np.ndarray,
        flops: np.ndarray,
        sigmas: Sequence[float],
        band: int = 9,
        step_weights: Sequence[float] | None = None,
        component_weights: Sequence[float] | None = None,
        layout: BlockLayout | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.band = band
        self.grams = np.asarray(grams, dtype=np.float64)
        self.flops = np.asarray(flops, dtype=np.float64)
        self.sigmas = [float(s) for s in sigmas]
        _, self.num_blocks, _, self.num_steps, _ = self.grams.shape
        self.step_weights = np.ones(self.num_steps) if step_weights is None else np.asarray(step_weights, dtype=np.float64)
        self.layout = layout or BlockLayout.uniform(self.num_blocks)
        self.component_weights = (
            np.ones(len(self.layout.names)) if component_weights is None else np.asarray(component_weights, dtype=np.float64)
        )
        # (blocks, components): the weight of each cell, by its component's name
        self.cell_weight = self.layout.per_cell(dict(zip(self.layout.names, self.component_weights, strict=True)))
        diag = np.einsum("pbcss->pbcs", self.grams)
        # per (prompt, step, block): the block's output scale, the sum of its components' norms
        self.scale = np.maximum(np.sqrt(np.maximum(diag, 0.0)).sum(axis=2).transpose(0, 2, 1), 1e-12)
        # mean least-squares factor <F_t, F_s> / ||F_s||^2 over prompts (the EOC trend prior)
        self.alpha = (self.grams / np.maximum(diag[..., None, :], 1e-30)).mean(axis=0)  # (b, c, t, s)
        self._memo: dict[tuple, np.ndarray] = {}
        self.spans = [tuple(span) for span in spans or [(0, self.num_steps)]]
        self.span_of = np.zeros(self.num_steps, dtype=np.int64)  # the index of each step's span
        for i, (start, stop) in enumerate(self.spans):
            self.span_of[start:stop] = i

    def cell_error(self, b: int, c: int, t: int, steps: tuple[int, ...], coeffs: tuple[float, ...]) -> np.ndarray:
        """Per-prompt relative error of handing back sum_i coeffs_i F_{steps_i} for F_t; beyond the recorded
        band of steps the error is taken as the full output (as if nothing were kept)."""
        key = (b, c, t, steps, coeffs)
        err = self._memo.get(key)
        if err is None:
            if any(t - s > self.band for s in steps):
                err = np.sqrt(self.grams[:, b, c, t, t]) / self.scale[:, t, b]
            else:
                err = np.sqrt(_combination_error(self.grams[:, b, c], t, steps, coeffs)) / self.scale[:, t, b]
            self._memo[key] = err
        return err

    def _expand(self, preset: dict) -> tuple[CacheTable, float]:
        """The preset's table for the calibration run and its exact FLOP-weighted computed fraction."""
        table = build_table(preset_from_dict("candidate", preset, self.num_steps), self.sigmas, self.num_blocks, self.layout)
        if len(self.spans) > 1:
            table = table.split(self.spans)
        skipped = np.asarray(table.actions) != Action.COMPUTE
        for r, (first, last) in enumerate(table.block_runs):  # a run reuse skips its blocks whole
            skipped[np.asarray(table.run_actions)[:, r] == Action.REUSE, first : last + 1] = True
        fraction = 1.0 - float((skipped * self.flops[None]).sum()) / (float(self.flops.sum()) * self.num_steps)
        return table, fraction

    def evaluate(self, preset: dict, correction: bool = False, expanded: tuple[CacheTable, float] | None = None) -> Candidate:
        """Exact computed fraction and predicted error of one preset; with `correction`, the preset gets
        the EOC factors of its reused cells (the mean least-squares scale from the calibration runs).
        `expanded`: the preset's `_expand` result, when already at hand."""
        table, fraction = expanded or self._expand(preset)
        gain = table.forecast_gain
        actions = np.asarray(table.actions)
        skipped = actions != Action.COMPUTE
        total = np.zeros(self.grams.shape[0])
        factors: dict[str, dict[int, dict[int, float]]] = {}
        for t, b, c in zip(*np.nonzero(skipped), strict=True):
            t, b, c = int(t), int(b), int(c)
            deps = table.dependencies(t, b, c)
            if actions[t, b, c] == Action.FORECAST and len(deps) == 2:
                prev, last = deps
                r = gain * (t - last) / (last - prev)
                err = self.cell_error(b, c, t, (last, prev), (1 + r, -r))
            else:
                last = deps[-1]
                a = round(float(self.alpha[b, c, t, last]), 5) if correction else 1.0
                err = self.cell_error(b, c, t, (last,), (a,))
                if a != 1.0:
                    factors.setdefault(self.layout.name(b, c), {}).setdefault(b, {})[t] = a
            total += err * self.step_weights[t] * self.cell_weight[b, c]
        if factors:
            preset = {**preset, "correction": factors}
        return Candidate(preset, actions, fraction, float(np.median(total)))

    def best_within(self, budget: float, opts: SearchOptions, keep: int = 3, slack: float = 0.06) -> list[Candidate]:
        """The `keep` candidates with the lowest predicted error among those whose computed fraction is in
        [budget - slack, budget] (a table far under budget wastes it)."""
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"the compute budget must be in (0, 1]; got {budget}")
        fitting = []
        for preset in opts.presets():
            expanded = self._expand(preset)
            if budget - slack <= expanded[1] <= budget:
                fitting.append((preset, expanded))
        if not fitting:
            raise ValueError(
                f"no candidate has a computed fraction in [{budget - slack:.2f}, {budget}]: widen the intervals"
            )
        scored = sorted(
            (self.evaluate(p, opts.correction, expanded) for p, expanded in fitting), key=lambda c: c.predicted_error
        )
        return scored[:keep]


def step_proxy_errors(grams: np.ndarray, layout: BlockLayout | None = None) -> np.ndarray:
    """(prompts, steps, component names) sum over blocks of the relative error of reusing the component at
    step t from step t - 1 (0 at step 0): the proxy that measured sensitivities are divided by."""
    search = TableSearch(grams, np.ones(grams.shape[1:3]), [1.0] * grams.shape[-1], layout=layout)
    P, B, _, S, _ = search.grams.shape
    names = search.layout.names
    out = np.zeros((P, S, len(names)))
    for t in range(1, S):
        for b, comps in enumerate(search.layout.components_of):
            for c, name in enumerate(comps):
                out[:, t, names.index(name)] += search.cell_error(b, c, t, (t - 1,), (1.0,))
    return out
