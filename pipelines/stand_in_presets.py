"""Presets of a real model's profile derived without its weights, from published per-step statistics.

Shared by each model family's `presets` module (`videocache.pipelines.wan.presets`: Wan2.1 T2V 1.3B /
14B, `videocache.pipelines.hunyuan.presets`: HunyuanVideo, `videocache.pipelines.opensora.presets`:
Open-Sora 1.2): each describes its models as a `Model`, with a `measure` built on `engine_fractions`, and
calls `main`. They are developer tools, run from a source checkout: the profiles they write are the
repository's `profiles/` and their results go to its `benchmarks/` (both found from this file, as `ROOT`).

A profile is written for the model's step count (`Model.steps`: 50, Open-Sora's 30), with a step_rule
from half to twice that; the 50-step examples below carry over. For a model, videocache's schedule
search (`videocache.schedule_search`) chooses aligned schedules on per-step statistics that stand in for the
recording `videocache profile` would make on the real model:

* How much the block stack's output changes per step: MagCache's published magnitude ratios of the model
  (gamma_t = mean over tokens of ||r_t|| / ||r_(t-1)|| for the residual r = output - input of all blocks,
  per CFG branch where the model runs two). Stand-in features: F_t has norm prod(gamma_1..gamma_t) (the
  published curve) and a direction that drifts as a random walk whose step t turns by kappa * |log gamma_t|
  (assumed: the direction changes as fast as the magnitude, kappa = 1; a random walk is the pessimistic
  case for forecasting, since it cannot be extrapolated). The Gram matrices of these features feed
  `TableSearch` as a recording would, every component of every block group alike.
* How much the rest of sampling amplifies an error made at each step: the step sensitivity measured by
  `videocache profile` on our reference-wan model (`profiles/reference-wan.json`), carried to other step
  counts by position in the run, the rule `videocache.profile` uses for explicit step lists.
* MagCache's published safeguards: the first 20 % of steps always computed (its retention ratio; 10 % for
  `fast`) and a cap on skipped steps in a row (the model's `max_skips`).

One schedule for the whole model ("aligned": all components of all blocks compute at the same steps). A skip
may only follow two consecutive computes, so that forecasts extrapolate from two neighbouring steps. A
profile's explicit step lists are written for 50 steps (Open-Sora's 30) and resampled at other step counts
(`videocache.profile.StepPlan.resample`): the same share of compute steps where the schedule puts them.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

import videocache as vc
from videocache import BlockGroup, BlockLayout, Profile, build_table
from videocache.calibrate import TableSearch, attention_and_mlp
from videocache.profile import StepPlan
from videocache.schedule_search import _cell_costs, _shortest_paths
from videocache.table import Action

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: profiles/, benchmarks/
REF_STEPS = 50  # the default step count of MagCache's ratios and of the profiles (a Model's `steps`)
MIN_STEPS, MAX_STEPS = 25, 100  # the default profiles' step_rule: half to twice `steps`
KAPPA = 1.0
BIG = 1e6  # a skipped-cell cost that no schedule within the constraints pays
FULL_PRESET = {"warmup_steps": 0, "final_steps": 0, "rules": []}


@dataclass(frozen=True)
class Model:
    """One real model whose profile is derived here.

    `ratios`: MagCache's published per-step magnitude ratios (`steps` x `branches`, interleaved per step
    where there are two CFG branches; the first step's entries are MagCache's padding, 1); `groups`: the
    adapter fingerprint's block groups (name, blocks, components[, block indices where groups interleave]); `real_flops`: FLOPs of one real-size
    call per (block, cell) of the layout; `sigmas(steps)`: the model's per-step sigmas; `measure(names)`:
    {preset: {steps: computed fraction}} counted by the engine on a tiny random model with the real blocks
    (`engine_fractions`); `magcache`: MagCache's published (threshold, K) settings of the model, shown beside
    our presets; `module`: the generator that writes the profile (run as `python -m`); `results`: where its
    measurement goes, relative to the checkout, without a suffix (.md and .json are written)."""

    name: str
    title: str
    architecture: str
    hub: str
    groups: tuple[tuple[str, int, tuple[str, ...]], ...]
    ratios: tuple[float, ...]
    branches: int
    ratio_source: str
    sigmas: Callable[[int], list[float]]
    real_flops: Callable[[], np.ndarray]
    measure: Callable[[list[str]], dict]
    flow_shift: float
    presets: dict  # name -> (computed-fraction budget, share of the first steps always computed, most skips in a row)
    magcache: tuple[tuple[float, int], ...]
    skip_cap_source: str  # where the skip caps come from, for the metadata
    blocks_text: str  # the header's "(ARCHITECTURE, ...)"
    skip_text: str  # the header's note on how a skipped step runs
    feb_text: str  # the header's note on where feb saves little
    module: str  # the generator's module, e.g. videocache.pipelines.wan.presets
    results: str  # its measurement's OUT, e.g. benchmarks/wan_presets
    steps: int = REF_STEPS  # the step count of the ratios and of the profile; its step_rule is half to twice that
    groups_text: str = ""  # how the groups interleave, for the header (empty: consecutive)
    calibrate_args: str = ""  # the calibration command's size arguments (empty: the model's defaults)
    hub_text: str = ""  # what the calibration command's --model is, where it is not a hub id

    @property
    def script(self) -> str:
        """The command that writes the profile."""
        return f"python -m {self.module} --write-profiles"

    @property
    def source_file(self) -> str:
        """The generator's file in the checkout (videocache.pipelines is the folder pipelines/)."""
        return self.module.removeprefix("videocache.").replace(".", "/") + ".py"

    @property
    def min_steps(self) -> int:
        return self.steps // 2

    @property
    def max_steps(self) -> int:
        return 2 * self.steps

    @property
    def report_steps(self) -> tuple[int, int, int]:
        """The step counts reported: the step_rule's ends and the profile's own."""
        return (self.min_steps, self.steps, self.max_steps)

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(tuple(BlockGroup(g[0], g[1], tuple(g[2]), *g[3:]) for g in self.groups))

    @property
    def stand_in_layout(self) -> BlockLayout:
        """One block per group, consecutive: aligned schedules see every block of a group alike."""
        return BlockLayout(tuple(BlockGroup(g[0], 1, tuple(g[2])) for g in self.groups))

    @property
    def num_blocks(self) -> int:
        return sum(g[1] for g in self.groups)

    def model_dict(self) -> dict:
        """The profile's `model`: one kind of block as `components`, several as `groups` (with their block
        indices where a group lists them: interleaved groups)."""
        out = {"architecture": self.architecture, "num_blocks": self.num_blocks}
        if len(self.groups) == 1:
            return out | {"components": list(self.groups[0][2])}
        groups = [{"name": g[0], "num_blocks": g[1], "components": list(g[2])} for g in self.groups]
        return out | {"groups": [d | ({"blocks": list(g[3])} if len(g) > 3 else {}) for d, g in zip(groups, self.groups, strict=True)]}


# -- stand-in statistics ----------------------------------------------------------------------------
def feature_gram(ratios, steps: int, branches: int = 2, kappa: float = KAPPA) -> np.ndarray:
    """(steps, steps) Gram matrix of the stand-in block-stack features of a `steps`-step run, summed over
    the CFG branches. Flow sigmas are shift(u) for u evenly spaced (Wan's, HunyuanVideo's and Open-Sora's
    alike), so step i of an N-step run sits where step R i / N of the ratios' R-step run does: R / 2 steps
    are every other one, 2 R steps add midpoints (half a step of the walk, half of the log-magnitude change)."""
    ref = len(ratios) // branches
    if (2 * ref) % steps:
        raise ValueError(f"the stand-in statistics cover {ref // 2}, {ref} or {2 * ref} steps; got {steps}")
    gamma = np.asarray(ratios, dtype=np.float64).reshape(ref, branches)
    gamma = np.concatenate([gamma, gamma[-1:]])  # one more step, to place a 100-step run's last point
    half = np.repeat(np.log(gamma[1:]) / 2, 2, axis=0)  # (2 * ref, branches): log change per half step
    log_m = np.concatenate([np.zeros((1, branches)), np.cumsum(half, axis=0)])
    walk = kappa * np.abs(half) * math.sqrt(2)  # a half step turns by 1/sqrt(2) of the step's angle
    at = np.arange(steps) * (2 * ref // steps)  # half-step index of each run step
    gram = np.zeros((steps, steps))
    for b in range(branches):
        basis = np.zeros((steps, 2 * ref + 1))
        basis[:, 0] = 1.0
        for i, h in enumerate(at):
            basis[i, 1 : h + 1] = walk[:h, b]
        feats = np.exp(log_m[at, b])[:, None] * basis / np.linalg.norm(basis, axis=1, keepdims=True)
        gram += feats @ feats.T
    return gram


def step_weights(steps: int) -> np.ndarray:
    """reference-wan's measured step sensitivity, read at the same position in a `steps`-step run."""
    measured = json.loads((ROOT / "profiles" / "reference-wan.json").read_text())["step_sensitivity"]
    w = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(measured)), measured)
    return w / w[1:].mean()


def stand_in_search(model: Model, steps: int, kappa: float = KAPPA) -> TableSearch:
    """A TableSearch over one block per group whose components all see the stand-in features."""
    layout = model.stand_in_layout
    gram = feature_gram(model.ratios, steps, model.branches, kappa)
    grams = layout.present[None, :, :, None, None] * gram  # absent cells: no features
    return TableSearch(grams, layout.present.astype(np.float64), [1.0] * steps, band=steps,
                       step_weights=step_weights(steps), layout=layout)


# -- the search -------------------------------------------------------------------------------------
def aligned_schedule(search: TableSearch, computes: int, max_skips: int, must: set[int] = frozenset()) -> str:
    """The least-error aligned schedule with `computes` compute steps as C/R/F letters (R reuse, F forecast):
    every step in `must` computed, at most `max_skips` skipped steps in a row, a skip only right after two
    consecutive computes (see the module docstring). A cell that breaks a rule costs BIG."""
    cost, forecast = _cell_costs(search, [tuple(int(i) for i in cell) for cell in np.argwhere(search.layout.present)])
    steps = np.arange(search.num_steps)
    prev = np.arange(-1, search.num_steps)[:, None, None]  # cost[p + 1, l, t]: p, l the last two computes
    last, skipped = steps[None, :, None], steps[None, None, :]
    broken = (skipped - last > max_skips) | (prev != last - 1) | np.isin(skipped, sorted(must))
    cost = np.where(np.isfinite(cost) & broken, BIG, cost)
    schedule = _shortest_paths(cost, forecast)
    if not schedule.errors[computes] < BIG:
        raise ValueError(f"no schedule with {computes} computes meets the constraints")
    chosen, forecasts = set(schedule.computes[computes]), set(schedule.forecasts[computes])
    return "".join("C" if t in chosen else "F" if t in forecasts else "R" for t in range(search.num_steps))


def derive(model: Model, budget: float, retention: float, max_skips: int, kappa: float = KAPPA) -> str:
    """The schedule of one preset at the profile's step count (C/R/F letters)."""
    n = model.steps
    return aligned_schedule(stand_in_search(model, n, kappa), math.floor(budget * n + 1e-9), max_skips,
                            must=set(range(math.ceil(retention * n))))


def read_at(letters: str, steps: int) -> tuple[str, float]:
    """The schedule a `steps`-step run makes of a profile's schedule (one letter per profile step), and its
    computed fraction (a partial compute step counts its share; its letter is the skip)."""
    actions, partial = StepPlan(steps, len(letters)).resample(["CRF".index(c) for c in letters])
    return "".join("CRF"[a] for a in actions), (actions.count(0) + sum(partial.values())) / steps


def preset_from_letters(letters: str, components) -> dict:
    reuse = [t for t, c in enumerate(letters) if c == "R"]
    forecast = [t for t, c in enumerate(letters) if c == "F"]
    preset: dict = {"warmup_steps": 0, "final_steps": 0, "stage_threshold": 0.4, "rules": []}
    if reuse:
        preset["explicit"] = {c: {"all": list(reuse)} for c in components}  # copies: no YAML anchors
    if forecast:
        preset["explicit_forecast"] = {c: {"all": list(forecast)} for c in components}
    return preset


def feb_preset(components) -> dict:
    """FEB-Cache's published stage rule as is: attention fresh early (feed-forward parts reused every other
    step while sigma >= 0.4), feed-forward fresh late (attention reused every other step)."""
    attention, mlp = attention_and_mlp(components)
    return {"warmup_steps": 5, "final_steps": 2, "stage_threshold": 0.4,
            "rules": [{"stage": "early", "components": mlp, "blocks": "all", "interval": 2},
                      {"stage": "late", "components": attention, "blocks": "all", "interval": 2}]}


def expand(model: Model, preset: dict, steps: int):
    """The preset's table for a `steps`-step run of the stand-in model (profile of `model.steps`)."""
    layout = model.stand_in_layout
    stand_in = Model.model_dict(model) | {"num_blocks": layout.num_blocks}
    if "groups" in stand_in:
        stand_in["groups"] = [{k: v for k, v in g.items() if k != "blocks"} | {"num_blocks": 1} for g in stand_in["groups"]]
    profile = Profile.from_dict({"schema_version": 1, "name": "stand-in", "steps": model.steps, "model": stand_in,
                                 "step_rule": {"mode": "scale", "min_steps": model.min_steps, "max_steps": model.max_steps},
                                 "presets": {"p": preset}})
    return build_table(profile.preset("p"), model.sigmas(steps), layout.num_blocks, layout)


def table_fraction(table, cell_flops: np.ndarray) -> float:
    """The FLOP-weighted fraction a table computes, with FLOPs per (block, cell) (absent cells 0)."""
    computed = ((np.asarray(table.actions) == Action.COMPUTE) & ~table.skipped_cells()[:, :, None]).sum(axis=0)
    return float((computed * cell_flops).sum() / (table.num_steps * cell_flops.sum()))


def real_size_fraction(model: Model, preset, steps: int) -> float:
    """A profile preset's computed fraction from its table with the FLOPs of one real-size call per cell.
    Aligned presets skip all components alike, so theirs equals the counted fraction of any size; a
    component-wise preset such as feb depends on the components' FLOP shares."""
    table = build_table(preset, model.sigmas(steps), model.num_blocks, model.layout)
    return table_fraction(table, model.real_flops())


def predicted_error(model: Model, preset: dict, steps: int) -> tuple[float, float]:
    """(computed fraction, predicted error) of a preset in a `steps`-step run, on the stand-in statistics."""
    table = expand(model, preset, steps)
    fraction = float((np.asarray(table.actions) == 0)[:, model.stand_in_layout.present].mean())
    return fraction, stand_in_search(model, steps).evaluate(preset, expanded=(table, fraction)).predicted_error


# -- the profiles ------------------------------------------------------------------------------------
def calibration_command(model: Model) -> str:
    budgets = " ".join(f"--budget {spec[0]:g}" for spec in model.presets.values())
    size = f" {model.calibrate_args}" if model.calibrate_args else ""
    return (f"videocache profile --model {model.hub} --prompts prompts.txt --steps {model.steps}{size} {budgets} "
            f"--preset-names {' '.join(model.presets)} --out {model.name}.yaml")


def header(model: Model, feb_fraction: float, spread: float, feb_low: float = 1.0) -> str:
    """`spread`: the most a derived preset's computed fraction at the step_rule's ends differs from its budget;
    `feb_low`: feb's fraction at the fewest steps."""
    command = calibration_command(model).replace(" --budget", " \\\n#       --budget", 1)
    caps = " / ".join(str(spec[2]) for spec in model.presets.values())
    fractions = " / ".join(f"{spec[0]:.2f}" for spec in model.presets.values())
    lo, n, hi = model.report_steps
    feb_at_low = "all of it" if feb_low == 1.0 else f"{feb_low:.2f}"
    body = (
        f"Cache profile for {model.title} ({model.blocks_text}), {n} steps ({lo}-{hi} by scaling).\n"
        "NOT CALIBRATED on the real weights: no video made with these presets has been measured against an "
        f"uncached one. {' / '.join(model.presets)} compute {fractions} of the block work at {n} steps (within "
        f"{spread:.2f} of that at {lo} and {hi} steps; {model.results}.md). videocache's schedule "
        "search chose them on stand-in statistics: MagCache's published per-step magnitude ratios of this model, "
        "the step sensitivity measured on our reference-wan model, MagCache's retention (first 20% of steps "
        f"computed; 10% for fast) and at most {caps} skipped steps in a row, each skip run after two consecutive "
        "computes (so that forecasts extrapolate from two neighbouring steps). Each is one schedule for all blocks and "
        f"components ({model.skip_text}); skipped steps forecast (order 1), or reuse where forecasting predicts "
        "worse. feb is FEB-Cache's published stage rule (arXiv 2503.07120) as is, attention fresh early and MLP "
        f"fresh late: at this model's real size it computes {feb_fraction:.2f} of the work at {n} steps "
        f"({model.feb_text}) and {feb_at_low} at {lo}. full computes everything. "
        + (f"{model.groups_text} " if model.groups_text else "") + "Sources and assumptions: metadata below."
    )
    calibrate = ("With the weights, calibrate a profile instead (prompts.txt: a few prompts, one per line"
                 + (f"; {model.hub_text}" if model.hub_text else "") + "):")
    lines = [*(line for part in body.split("\n") for line in textwrap.wrap(part, 104)), "Made by", f"  {model.script}",
             *textwrap.wrap(calibrate, 104)]
    return "".join(f"# {line}\n" for line in lines) + f"#   {command}\n"


def profile_dict(model: Model, schedules: dict[str, str]) -> dict:
    """The profile, from each derived preset's letters at the profile's step count."""
    names = list(model.layout.names)
    presets = {name: preset_from_letters(letters, names) for name, letters in schedules.items()}
    return {
        "schema_version": 1,
        "name": model.name,
        "model": model.model_dict(),
        "calibrated": False,
        "steps": model.steps,
        "step_rule": {"mode": "scale", "min_steps": model.min_steps, "max_steps": model.max_steps},
        "default_preset": "slow",
        "exposure_bias": {"enabled": False, "b_high": 0.98, "b_low": 0.96, "t_threshold": 0.4, "sign": 1},
        "presets": {**presets, "feb": feb_preset(names), "full": FULL_PRESET},
        "metadata": {
            "made_by": model.script,
            "calibrated_on_real_weights": False,
            "calibrate_with_weights": calibration_command(model),
            "method": (
                "videocache.schedule_search's shortest path over compute steps (aligned: one schedule for all "
                "blocks and components) on stand-in Gram statistics, with retention, a cap on skips in a row and "
                f"skips only after two consecutive computes ({model.source_file}, pipelines/stand_in_presets.py)"
            ),
            "source": (
                f"per-step change: {model.ratio_source}; step sensitivity: profiles/reference-wan.json "
                "(videocache profile on reference-wan); retention and skip cap: MagCache's published settings "
                f"({model.skip_cap_source}); preset feb: FEB-Cache (arXiv 2503.07120) stage rule, attention fresh early, "
                "MLP fresh late, t_thre 0.4"
            ),
            "assumptions": (
                f"features whose norm follows MagCache's ratios and whose direction drifts as a random walk "
                f"turning by kappa |log gamma_t| per step (kappa {KAPPA}); sensitivity read by position in the run"
            ),
            "presets": {name: {"budget": model.presets[name][0], "retention": model.presets[name][1],
                               "max_skips": model.presets[name][2], f"schedule_{model.steps}": letters,
                               f"schedule_{model.min_steps}": read_at(letters, model.min_steps)[0]}
                        for name, letters in schedules.items()},
            "measured": {},
        },
    }


def profile_path(name: str) -> Path:
    """The checkout's profile of that name (what `write_profile` writes and the measurement reads)."""
    return ROOT / "profiles" / f"{name}.yaml"


def write_profile(model: Model) -> Path:
    data = profile_dict(model, {name: derive(model, *spec) for name, spec in model.presets.items()})
    path = profile_path(model.name)
    profile = Profile.from_dict(data, str(path))  # validate before writing
    feb = real_size_fraction(model, profile.preset("feb"), model.steps)
    feb_low = real_size_fraction(model, profile.preset("feb"), model.min_steps)
    spread = max(abs(real_size_fraction(model, profile.preset(name), n) - spec[0])
                 for name, spec in model.presets.items() for n in (model.min_steps, model.max_steps))
    text = header(model, feb, math.ceil(spread * 100 - 1e-6) / 100, feb_low)
    path.write_text(text + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    return path


# -- the benchmark ------------------------------------------------------------------------------------
def engine_fractions(transformer, profile, presets, steps, scheduler_for, call, x0) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} counted by the engine over a denoising loop from `x0` per step
    count: each preset of `profile` (a name or path) applied to `transformer`, `scheduler_for(n)` the
    scheduler set for n steps, `call(x, t)` the transformer's output (run under the "cond" context). The
    count comes from the modules that ran, so it checks the table and the engine alike."""
    out: dict[str, dict[int, float]] = {}
    for preset in presets:
        for n in steps:
            scheduler = scheduler_for(n)
            engine = vc.apply_to_transformer(transformer, scheduler, profile, preset, trace=False, num_inference_steps=n)
            x = x0
            try:
                with torch.no_grad():
                    for t in scheduler.timesteps:
                        with transformer.cache_context("cond"):
                            v = call(x, t)
                        x = scheduler.step(v, t, x).prev_sample
                calls = engine.stats()["calls"]["transformer"]
                if calls != n:
                    raise RuntimeError(f"preset {preset} at {n} steps: the engine saw {calls} transformer calls")
                out.setdefault(preset, {})[n] = engine.stats()["computed_fraction"]
            finally:
                vc.remove(transformer)
    return out


def magcache_schedule(model: Model, threshold: float, max_skips: int, retention: float = 0.2) -> str:
    """MagCache's own decisions at the ratios' step count (R = skip, reusing the residual) on its published ratios: after the
    retention steps, skip while the summed |1 - product of ratios since the last compute| stays under the
    threshold and at most `max_skips` steps in a row are skipped (conditional branch)."""
    gamma = model.ratios[0 :: model.branches]
    letters, err, run, ratio = [], 0.0, 0, 1.0
    for t in range(model.steps):
        if t >= int(model.steps * retention):
            ratio, run = ratio * gamma[t], run + 1
            err += abs(1 - ratio)
            if err < threshold and run <= max_skips:
                letters.append("R")
                continue
        letters.append("C")
        err, run, ratio = 0.0, 0, 1.0
    return "".join(letters)


def read_out_range(letters: str, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS) -> dict:
    """Over every step count the profile covers: the least and most computed fraction, and the longest run of
    skipped steps in profile-step units (run length x (R - 1) / (N - 1) for a profile of R = len(letters))."""
    fractions, spans = [], []
    for n in range(min_steps, max_steps + 1):
        read, fraction = read_at(letters, n)
        fractions.append(fraction)
        spans.append(max(len(run) for run in read.split("C")) * (len(letters) - 1) / (n - 1))
    return {"min_fraction": round(min(fractions), 3), "max_fraction": round(max(fractions), 3),
            "longest_skip_run": round(max(spans), 1)}


def measure_models(models: list[Model], command: str) -> dict:
    """Every model's presets: counted fractions (tiny model), table fractions at the real size, the read-out
    range over the step_rule's steps, and the predicted errors beside MagCache's own schedules."""
    torch.set_num_threads(1)
    result: dict = {"command": command, "models": {}}
    for model in models:
        names = [*model.presets, "feb", "full"]
        profile = Profile.from_dict(yaml.safe_load(profile_path(model.name).read_text()))
        steps = model.report_steps
        schedules = {name: profile.metadata["presets"][name][f"schedule_{model.steps}"] for name in model.presets}
        for threshold, k in model.magcache:
            schedules[f"MagCache E{round(threshold * 100):03d}K{k}R02"] = magcache_schedule(model, threshold, k)
        comps = list(model.stand_in_layout.names)
        predicted = {name: {n: [round(v, 4) for v in predicted_error(model, preset_from_letters(s, comps), n)]
                            for n in steps} for name, s in schedules.items()}
        real = {name: {n: round(real_size_fraction(model, profile.preset(name), n), 4) for n in steps} for name in names}
        every = {name: read_out_range(schedules[name], model.min_steps, model.max_steps) for name in model.presets}
        result["models"][model.name] = {"flow_shift": model.flow_shift, "computed_fraction": model.measure(names),
                                        "real_size_table_fraction": real,
                                        f"steps_{model.min_steps}_to_{model.max_steps}": every,
                                        f"schedule_{model.steps}": schedules, "predicted": predicted}
    return result


def model_report(model: Model, r: dict, real_note: str) -> list[str]:
    steps = lo, n, hi = model.report_steps
    lines = [f"## {model.title} (`profiles/{model.name}.yaml`, flow_shift {r['flow_shift']})", "",
             f"| preset | {lo} steps | {n} steps | {hi} steps | real size, from the table: {lo} / {n} / {hi} |",
             "|---|---:|---:|---:|---:|"]
    for name, by_steps in r["computed_fraction"].items():
        real = " / ".join(f"{r['real_size_table_fraction'][name][k]:.3f}" for k in steps)
        lines.append(f"| {name} | " + " | ".join(f"{by_steps[k]:.3f}" for k in steps) + f" | {real} |")
    lines += ["", real_note,
              "", f"Every step count the profile covers ({lo}-{hi}), resampled from the step lists:", "",
              f"| preset | computed fraction | longest run of skipped steps, in {n}-step units |", "|---|---:|---:|"]
    for name, e in r[f"steps_{lo}_to_{hi}"].items():
        lines.append(f"| {name} | {e['min_fraction']:.2f}-{e['max_fraction']:.2f} | {e['longest_skip_run']:.1f} |")
    lines += ["", f"Schedules at {n} steps (C compute, F forecast, R reuse; one letter per step, all blocks and "
              "components alike) and the error the stand-in statistics predict (lower is better; a model "
              "prediction, comparable only within a column). MagCache rows: MagCache's own decisions on its "
              "published ratios with its published settings (threshold, max skips K, retention R), for scale.",
              "", f"| schedule | {n}-step letters | fraction / predicted error at {lo} | {n} | {hi} |",
              "|---|---|---:|---:|---:|"]
    for name, letters in r[f"schedule_{n}"].items():
        cells = " | ".join(f"{f:.2f} / {e:.3f}" for f, e in (r["predicted"][name][k] for k in steps))
        lines.append(f"| {name} | `{letters}` | {cells} |")
    lines.append("")
    return lines


def main(models: list[Model], report: Callable[[dict], str], description: str) -> None:
    """The command line of a model family's generator (`python -m MODULE`, the models' `module`): optionally
    rewrite its profiles, then measure them into OUT.md / OUT.json (default: the models' `results`)."""
    module, out = models[0].module, ROOT / models[0].results
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-profiles", action="store_true", help="derive the presets and rewrite the profiles first")
    p.add_argument("--out", default=str(out), help="writes OUT.md and OUT.json")
    args = p.parse_args()
    if args.write_profiles:
        for model in models:
            print(f"wrote {write_profile(model).relative_to(ROOT)}")
    result = measure_models(models, f"python -m {module}" + (" --write-profiles" if args.write_profiles else ""))
    path = Path(args.out)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(report(result))
    print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.json')}")

