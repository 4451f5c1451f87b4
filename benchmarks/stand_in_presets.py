"""Presets of a real model's profile derived without its weights, from published per-step statistics.

Shared by `benchmarks/wan_presets.py` (Wan2.1 T2V 1.3B / 14B) and `benchmarks/hunyuan_presets.py`
(HunyuanVideo): each describes its models as a `Model` and calls `main`. For a model, videocache's schedule
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

One schedule for the whole model ("aligned": all components of all blocks compute at the same steps). A
profile's explicit step lists are written for 50 steps and read at other step counts through the nearest
profile step, so a run of N < 50 steps never reads some profile steps: a lone compute step can vanish
(without the rule below, a Wan balanced schedule the search found skipped 12-13 steps in a row when read
at 31 or 40 steps). So a skip may only follow two consecutive computes: every run of 25-100 steps reads at
least one of any two neighbouring profile steps (except 23 and 24 at 25 steps, so no compute block ends at
24), and keeps every refresh. Forecasts then extrapolate from two neighbouring steps.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from videocache import BlockGroup, BlockLayout, Profile, build_table
from videocache.calibrate import TableSearch, attention_and_mlp
from videocache.schedule_search import _cell_costs, _shortest_paths
from videocache.table import Action

ROOT = Path(__file__).resolve().parents[1]
REF_STEPS = 50  # the step count of MagCache's ratios and of the profiles
MIN_STEPS, MAX_STEPS = 25, 100  # the profiles' step_rule
STEPS = (25, 50, 100)  # the step counts reported
KAPPA = 1.0
BIG = 1e6  # a skipped-cell cost that no schedule within the constraints pays
FULL_PRESET = {"warmup_steps": 0, "final_steps": 0, "rules": []}


@dataclass(frozen=True)
class Model:
    """One real model whose profile is derived here.

    `ratios`: MagCache's published per-step magnitude ratios (REF_STEPS x `branches`, interleaved per step
    where there are two CFG branches; the first step's entries are MagCache's padding, 1); `groups`: the
    adapter fingerprint's block groups (name, blocks, components); `real_flops`: FLOPs of one real-size
    call per (block, cell) of the layout; `sigmas(steps)`: the model's per-step sigmas; `measure(names)`:
    {preset: {steps: computed fraction}} counted by the engine on a tiny random model with the real blocks;
    `magcache`: MagCache's published (threshold, K) settings of the model, shown beside our presets."""

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
    script: str  # the command that writes the profile

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(tuple(BlockGroup(n, b, tuple(c)) for n, b, c in self.groups))

    @property
    def stand_in_layout(self) -> BlockLayout:
        """One block per group: aligned schedules see every block of a group alike."""
        return BlockLayout(tuple(BlockGroup(n, 1, tuple(c)) for n, _, c in self.groups))

    @property
    def num_blocks(self) -> int:
        return sum(b for _, b, _ in self.groups)

    def model_dict(self) -> dict:
        """The profile's `model`: one kind of block as `components`, several as `groups`."""
        out = {"architecture": self.architecture, "num_blocks": self.num_blocks}
        if len(self.groups) == 1:
            return out | {"components": list(self.groups[0][2])}
        return out | {"groups": [{"name": n, "num_blocks": b, "components": list(c)} for n, b, c in self.groups]}


# -- stand-in statistics ----------------------------------------------------------------------------
def feature_gram(ratios, steps: int, branches: int = 2, kappa: float = KAPPA) -> np.ndarray:
    """(steps, steps) Gram matrix of the stand-in block-stack features of a `steps`-step run, summed over
    the CFG branches. Flow sigmas are shift(u) for u evenly spaced (Wan's and HunyuanVideo's alike), so
    step i of an N-step run sits where step 50 i / N of the 50-step run does: 25 steps are every other one,
    100 steps add midpoints (half a step of the walk, half of the log-magnitude change)."""
    if (2 * REF_STEPS) % steps:
        raise ValueError(f"the stand-in statistics cover 25, 50 or 100 steps; got {steps}")
    gamma = np.asarray(ratios, dtype=np.float64).reshape(REF_STEPS, branches)
    gamma = np.concatenate([gamma, gamma[-1:]])  # one more step, to place a 100-step run's last point
    half = np.repeat(np.log(gamma[1:]) / 2, 2, axis=0)  # (2 * REF_STEPS, branches): log change per half step
    log_m = np.concatenate([np.zeros((1, branches)), np.cumsum(half, axis=0)])
    walk = kappa * np.abs(half) * math.sqrt(2)  # a half step turns by 1/sqrt(2) of the step's angle
    at = np.arange(steps) * (2 * REF_STEPS // steps)  # half-step index of each run step
    gram = np.zeros((steps, steps))
    for b in range(branches):
        basis = np.zeros((steps, 2 * REF_STEPS + 1))
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
    every step in `must` computed, at most `max_skips` skipped steps in a row, and a skip only right after two
    consecutive computes (see the module docstring). A cell that breaks a rule costs BIG."""
    cost, forecast = _cell_costs(search, [tuple(int(i) for i in cell) for cell in np.argwhere(search.layout.present)])
    steps = np.arange(search.num_steps)
    prev = np.arange(-1, search.num_steps)[:, None, None]  # cost[p + 1, l, t]: p, l the last two computes
    last, skipped = steps[None, :, None], steps[None, None, :]
    broken = (skipped - last > max_skips) | (prev != last - 1) | np.isin(skipped, sorted(must))
    broken |= np.isin(last, sorted(unread_ends(search.num_steps))) & (skipped > last)
    cost = np.where(np.isfinite(cost) & broken, BIG, cost)
    schedule = _shortest_paths(cost, forecast)
    if not schedule.errors[computes] < BIG:
        raise ValueError(f"no schedule with {computes} computes meets the constraints")
    chosen, forecasts = set(schedule.computes[computes]), set(schedule.forecasts[computes])
    return "".join("C" if t in chosen else "F" if t in forecasts else "R" for t in range(search.num_steps))


def unread_ends(num_steps: int, min_steps: int = MIN_STEPS) -> set[int]:
    """Profile steps a compute block must not end at: the second of two steps that a run of `min_steps` to
    100 steps both skips when it reads the profile (at 25 steps: 23 and 24, read as 22 then 25). A block
    of two computes there would vanish from that run."""
    if num_steps != REF_STEPS:
        return set()
    ends = set()
    for n in range(min_steps, MAX_STEPS + 1):
        reads = sorted({profile_step(i, n) for i in range(n)})
        ends |= {b - 1 for a, b in zip(reads, reads[1:], strict=False) if b - a > 2}
    return ends


def profile_step(step: int, steps: int) -> int:
    """The profile step a run step reads (as `videocache.profile.StepPlan.reference_step`)."""
    return int(math.floor(step * (REF_STEPS - 1) / (steps - 1) + 0.5))


def derive(model: Model, budget: float, retention: float, max_skips: int, kappa: float = KAPPA) -> str:
    """The 50-step schedule (C/R/F letters) of one preset."""
    return aligned_schedule(stand_in_search(model, REF_STEPS, kappa), math.floor(budget * REF_STEPS + 1e-9),
                            max_skips, must=set(range(math.ceil(retention * REF_STEPS))))


def read_at(letters: str, steps: int) -> str:
    """The letters a `steps`-step run reads from a 50-step schedule."""
    return "".join(letters[profile_step(i, steps)] for i in range(steps))


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
    """The preset's table for a `steps`-step run of the stand-in model (profile of REF_STEPS)."""
    layout = model.stand_in_layout
    stand_in = Model.model_dict(model) | {"num_blocks": layout.num_blocks}
    if "groups" in stand_in:
        stand_in["groups"] = [g | {"num_blocks": 1} for g in stand_in["groups"]]
    profile = Profile.from_dict({"schema_version": 1, "name": "stand-in", "steps": REF_STEPS, "model": stand_in,
                                 "step_rule": {"mode": "scale", "min_steps": MIN_STEPS, "max_steps": MAX_STEPS},
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
    return (f"videocache profile --model {model.hub} --prompts prompts.txt --steps 50 {budgets} "
            f"--preset-names {' '.join(model.presets)} --out {model.name}.yaml")


def header(model: Model, feb_fraction: float, spread: float) -> str:
    """`spread`: the most a derived preset's computed fraction at 25 or 100 steps differs from its budget."""
    command = calibration_command(model).replace(" --budget 0.6", " \\\n#       --budget 0.6")
    caps = " / ".join(str(spec[2]) for spec in model.presets.values())
    fractions = " / ".join(f"{spec[0]:.2f}" for spec in model.presets.values())
    body = (
        f"Cache profile for {model.title} ({model.blocks_text}), 50 steps ({MIN_STEPS}-{MAX_STEPS} by scaling).\n"
        "NOT CALIBRATED on the real weights: no video made with these presets has been measured against an "
        f"uncached one. {' / '.join(model.presets)} compute {fractions} of the block work at 50 steps (within "
        f"{spread:.2f} of that at 25 and 100 steps; {model.script.split()[1].replace('.py', '.md')}). videocache's schedule "
        "search chose them on stand-in statistics: MagCache's published per-step magnitude ratios of this model, "
        "the step sensitivity measured on our reference-wan model, MagCache's retention (first 20% of steps "
        f"computed; 10% for fast) and at most {caps} skipped steps in a row, each skip run after two consecutive "
        "computes (so that runs of other step counts read every refresh). Each is one schedule for all blocks and "
        f"components ({model.skip_text}); skipped steps forecast (order 1), or reuse where forecasting predicts "
        "worse. feb is FEB-Cache's published stage rule (arXiv 2503.07120) as is, attention fresh early and MLP "
        f"fresh late: at this model's real size it computes {feb_fraction:.2f} of the work at 50 steps "
        f"({model.feb_text}) and all of it at 25. full computes everything. Sources and assumptions: metadata below."
    )
    lines = [*(line for part in body.split("\n") for line in textwrap.wrap(part, 104)), "Made by", f"  {model.script}",
             "With the weights, calibrate a profile instead (prompts.txt: a few prompts, one per line):"]
    return "".join(f"# {line}\n" for line in lines) + f"#   {command}\n"


def profile_dict(model: Model, schedules: dict[str, str]) -> dict:
    """The profile, from each derived preset's 50-step letters."""
    names = list(model.layout.names)
    presets = {name: preset_from_letters(letters, names) for name, letters in schedules.items()}
    return {
        "schema_version": 1,
        "name": model.name,
        "model": model.model_dict(),
        "calibrated": False,
        "steps": REF_STEPS,
        "step_rule": {"mode": "scale", "min_steps": MIN_STEPS, "max_steps": MAX_STEPS},
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
                f"skips only after two consecutive computes ({model.script.split()[1]}, benchmarks/stand_in_presets.py)"
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
                               "max_skips": model.presets[name][2], "schedule_50": letters,
                               "schedule_25": read_at(letters, 25)} for name, letters in schedules.items()},
            "measured": {},
        },
    }


def write_profile(model: Model) -> Path:
    data = profile_dict(model, {name: derive(model, *spec) for name, spec in model.presets.items()})
    path = ROOT / "profiles" / f"{model.name}.yaml"
    profile = Profile.from_dict(data, str(path))  # validate before writing
    feb = real_size_fraction(model, profile.preset("feb"), REF_STEPS)
    spread = max(abs(real_size_fraction(model, profile.preset(name), n) - spec[0])
                 for name, spec in model.presets.items() for n in (MIN_STEPS, MAX_STEPS))
    path.write_text(header(model, feb, math.ceil(spread * 100 - 1e-6) / 100) + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
    return path


# -- the benchmark ------------------------------------------------------------------------------------
def magcache_schedule(model: Model, threshold: float, max_skips: int, retention: float = 0.2) -> str:
    """MagCache's own 50-step decisions (R = skip, reusing the residual) on its published ratios: after the
    retention steps, skip while the summed |1 - product of ratios since the last compute| stays under the
    threshold and at most `max_skips` steps in a row are skipped (conditional branch)."""
    gamma = model.ratios[0 :: model.branches]
    letters, err, run, ratio = [], 0.0, 0, 1.0
    for t in range(REF_STEPS):
        if t >= int(REF_STEPS * retention):
            ratio, run = ratio * gamma[t], run + 1
            err += abs(1 - ratio)
            if err < threshold and run <= max_skips:
                letters.append("R")
                continue
        letters.append("C")
        err, run, ratio = 0.0, 0, 1.0
    return "".join(letters)


def read_out_range(letters: str) -> dict:
    """Over every step count the profiles cover: the least and most computed fraction, and the longest run of
    skipped steps in 50-step units (run length x 49 / (N - 1))."""
    fractions, spans = [], []
    for n in range(MIN_STEPS, MAX_STEPS + 1):
        read = read_at(letters, n)
        fractions.append(read.count("C") / n)
        spans.append(max(len(run) for run in read.split("C")) * (REF_STEPS - 1) / (n - 1))
    return {"min_fraction": round(min(fractions), 3), "max_fraction": round(max(fractions), 3),
            "longest_skip_run": round(max(spans), 1)}


def measure_models(models: list[Model], command: str) -> dict:
    """Every model's presets: counted fractions (tiny model), table fractions at the real size, the read-out
    range over 25-100 steps, and the predicted errors beside MagCache's own schedules."""
    import torch

    torch.set_num_threads(1)
    result: dict = {"command": command, "models": {}}
    for model in models:
        names = [*model.presets, "feb", "full"]
        profile = Profile.from_dict(yaml.safe_load((ROOT / "profiles" / f"{model.name}.yaml").read_text()))
        schedules = {name: profile.metadata["presets"][name]["schedule_50"] for name in model.presets}
        for threshold, k in model.magcache:
            schedules[f"MagCache E{round(threshold * 100):03d}K{k}R02"] = magcache_schedule(model, threshold, k)
        comps = list(model.stand_in_layout.names)
        predicted = {name: {n: [round(v, 4) for v in predicted_error(model, preset_from_letters(s, comps), n)]
                            for n in STEPS} for name, s in schedules.items()}
        real = {name: {n: round(real_size_fraction(model, profile.preset(name), n), 4) for n in STEPS} for name in names}
        every = {name: read_out_range(schedules[name]) for name in model.presets}
        result["models"][model.name] = {"flow_shift": model.flow_shift, "computed_fraction": model.measure(names),
                                        "real_size_table_fraction": real, "steps_25_to_100": every,
                                        "schedule_50": schedules, "predicted": predicted}
    return result


def model_report(model: Model, r: dict, real_note: str) -> list[str]:
    lines = [f"## {model.title} (`profiles/{model.name}.yaml`, flow_shift {r['flow_shift']})", "",
             "| preset | 25 steps | 50 steps | 100 steps | real size, from the table: 25 / 50 / 100 |",
             "|---|---:|---:|---:|---:|"]
    for name, by_steps in r["computed_fraction"].items():
        real = " / ".join(f"{r['real_size_table_fraction'][name][n]:.3f}" for n in STEPS)
        lines.append(f"| {name} | " + " | ".join(f"{by_steps[n]:.3f}" for n in STEPS) + f" | {real} |")
    lines += ["", real_note,
              "", f"Every step count the profile covers ({MIN_STEPS}-{MAX_STEPS}), read from the step lists:", "",
              "| preset | computed fraction | longest run of skipped steps, in 50-step units |", "|---|---:|---:|"]
    for name, e in r["steps_25_to_100"].items():
        lines.append(f"| {name} | {e['min_fraction']:.2f}-{e['max_fraction']:.2f} | {e['longest_skip_run']:.1f} |")
    lines += ["", "Schedules at 50 steps (C compute, F forecast, R reuse; one letter per step, all blocks and "
              "components alike) and the error the stand-in statistics predict (lower is better; a model "
              "prediction, comparable only within a column). MagCache rows: MagCache's own decisions on its "
              "published ratios with its published settings (threshold, max skips K, retention R), for scale.",
              "", "| schedule | 50-step letters | fraction / predicted error at 25 | 50 | 100 |",
              "|---|---|---:|---:|---:|"]
    for name, letters in r["schedule_50"].items():
        cells = " | ".join(f"{f:.2f} / {e:.3f}" for f, e in (r["predicted"][name][n] for n in STEPS))
        lines.append(f"| {name} | `{letters}` | {cells} |")
    lines.append("")
    return lines


def main(models: list[Model], script: str, out: Path, report: Callable[[dict], str], description: str) -> None:
    """The command line of a model family's script: optionally rewrite its profiles, then measure them
    into OUT.md / OUT.json."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-profiles", action="store_true", help="derive the presets and rewrite the profiles first")
    p.add_argument("--out", default=str(out), help="writes OUT.md and OUT.json")
    args = p.parse_args()
    if args.write_profiles:
        for model in models:
            print(f"wrote {write_profile(model).relative_to(ROOT)}")
    result = measure_models(models, f"python {script}" + (" --write-profiles" if args.write_profiles else ""))
    path = Path(args.out)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(report(result))
    print(f"wrote {path.with_suffix('.md')}, {path.with_suffix('.json')}")


def import_measure(module: str, model: str) -> Callable[[list[str]], dict]:
    """`module.computed_fractions(model, names)`, imported when called (the tests import torch models)."""
    return lambda names: importlib.import_module(module).computed_fractions(model, names)
