"""Wan2.1 T2V presets from published per-step statistics, and their computed fractions at 25/50/100 steps.

No Wan2.1 weights are needed. The presets of `profiles/wan2.1-t2v-1.3b.yaml` and `profiles/wan2.1-t2v-14b.yaml`
are chosen by our schedule search (`videocache.schedule_search`) on per-step statistics that stand in for
the recording `videocache profile` would make on the real model:

* How much the block stack's output changes per step: MagCache's published magnitude ratios for Wan2.1
  T2V 1.3B and 14B (`MAG_RATIOS` below, copied from MagCache's `magcache_generate.py`; calibrated by the
  MagCache authors with Wan's own sampler: UniPC, 50 steps, shift 5.0, both CFG branches). A ratio gamma_t
  = mean over tokens of ||r_t|| / ||r_(t-1)|| for the residual r = output - input of all blocks.
  Stand-in features: F_t has norm prod(gamma_1..gamma_t) (the published curve) and a direction that
  drifts as a random walk whose step t turns by kappa * |log gamma_t| (assumed: the direction changes as
  fast as the magnitude, kappa = 1; a random walk is the pessimistic case for forecasting, since it cannot
  be extrapolated). The Gram matrices of these features feed `TableSearch` as a recording would.
* How much the rest of sampling amplifies an error made at each step: the step sensitivity measured by
  `videocache profile` on our reference-wan model (`profiles/reference-wan.json`), carried to other step
  counts by position in the run, the rule `videocache.profile` uses for explicit step lists.
* MagCache's published safeguards: the first 20 % of steps always computed (its retention ratio; 10 % for
  `fast`) and a cap on skipped steps in a row: MagCache's K of its Wan settings E012K2R02 / E012K4R02 /
  E024K6R02 plus one (3 / 5 / 7 for slow / balanced / fast), because here every refresh is two computes.

One schedule for the whole model ("aligned": all components of all blocks compute at the same steps),
which the engine runs as a fused skip of the whole block stack; the calibrated reference-wan presets came
out aligned at all three budgets. A profile's explicit step lists are written for 50 steps and read at
other step counts through the nearest profile step, so a run of N < 50 steps never reads some profile
steps: a lone compute step can vanish (without the rule below, a balanced schedule the search found skipped
12-13 steps in a row when read at 31 or 40 steps). So a skip may only follow two consecutive computes: every run of 25-100 steps reads at least
one of any two neighbouring profile steps (except 23 and 24 at 25 steps, so no compute block ends at 24),
and keeps every refresh. Forecasts then extrapolate from two neighbouring steps.

    python benchmarks/wan_presets.py --write-profiles   # derive the presets, rewrite the two profiles
    python benchmarks/wan_presets.py                    # measure fractions on tiny 30/40-block models
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from videocache import COMPONENTS, Profile, build_table  # noqa: E402
from videocache.calibrate import TableSearch  # noqa: E402
from videocache.schedule_search import _cell_costs, _shortest_paths  # noqa: E402

MAGCACHE_SOURCE = (
    "MagCache (arXiv 2506.09045), github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py, "
    "mag_ratios for 'T2V-1.3B' / 'T2V-14B' (commit df81cb181776c2c61477c08e1d21f87fda1cd938 and later)"
)
# interleaved [cond, uncond] per step, 50 steps; the first pair is MagCache's padding (gamma_0 = 1)
MAG_RATIOS = {
    "wan2.1-t2v-1.3b": [1.0] * 2 + [
        1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586,
        0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549,
        0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479,
        0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304,
        0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
        0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
        0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541,
        0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868,
        0.81838, 0.81939,
    ],
    "wan2.1-t2v-14b": [1.0] * 2 + [
        1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476,
        0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434,
        0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426,
        0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215,
        0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866,
        0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173,
        0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345,
        0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945,
        0.86111, 0.86189,
    ],
}
MODELS = {  # profile -> (blocks, diffusers flow_shift of the released Diffusers checkpoint, title)
    "wan2.1-t2v-1.3b": (30, 3.0, "Wan2.1 T2V 1.3B"),
    "wan2.1-t2v-14b": (40, 5.0, "Wan2.1 T2V 14B"),
}
# (video tokens, hidden size, FFN size) at the real sizes: 81 frames at 480p (1.3B) / 720p (14B), 512 T5 tokens
REAL_SIZE = {"wan2.1-t2v-1.3b": (32760, 1536, 8960), "wan2.1-t2v-14b": (75600, 5120, 13824)}
REF_STEPS = 50  # the step count of MagCache's ratios and of the profiles
MIN_STEPS, MAX_STEPS = 25, 100  # the profiles' step_rule
PRESETS = {  # name -> (computed-fraction budget, share of the first steps always computed, most skips in a row)
    "slow": (0.6, 0.2, 3),
    "balanced": (0.5, 0.2, 5),
    "fast": (0.34, 0.1, 7),
}
KAPPA = 1.0
BIG = 1e6  # a skipped-cell cost that no schedule within the constraints pays


# -- stand-in statistics ----------------------------------------------------------------------------
def feature_gram(ratios: list[float], steps: int, kappa: float = KAPPA) -> np.ndarray:
    """(steps, steps) Gram matrix of the stand-in block-stack features of a `steps`-step run, summed over
    both CFG branches. Wan's flow sigmas are shift(u) for u evenly spaced, so step i of an N-step run sits
    where step 50 i / N of the 50-step run does: 25 steps are every other one, 100 steps add midpoints (half a
    step of the walk, half of the log-magnitude change)."""
    if (2 * REF_STEPS) % steps:
        raise ValueError(f"the stand-in statistics cover 25, 50 or 100 steps; got {steps}")
    gamma = np.asarray(ratios, dtype=np.float64).reshape(REF_STEPS, 2)
    gamma = np.concatenate([gamma, gamma[-1:]])  # one more step, to place a 100-step run's last point
    half = np.repeat(np.log(gamma[1:]) / 2, 2, axis=0)  # (2 * REF_STEPS, 2): log change per half step
    log_m = np.concatenate([np.zeros((1, 2)), np.cumsum(half, axis=0)])
    walk = kappa * np.abs(half) * math.sqrt(2)  # a half step turns by 1/sqrt(2) of the step's angle
    at = np.arange(steps) * (2 * REF_STEPS // steps)  # half-step index of each run step
    gram = np.zeros((steps, steps))
    for b in range(2):
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


def stand_in_search(model: str, steps: int, kappa: float = KAPPA) -> TableSearch:
    """A TableSearch over one block group whose three components all see the stand-in features."""
    gram = feature_gram(MAG_RATIOS[model], steps, kappa)
    grams = np.broadcast_to(gram, (1, 1, len(COMPONENTS), steps, steps)).copy()
    return TableSearch(grams, np.ones((1, len(COMPONENTS))), [1.0] * steps, band=steps,
                       step_weights=step_weights(steps))


# -- the search -------------------------------------------------------------------------------------
def aligned_schedule(search: TableSearch, computes: int, max_skips: int, must: set[int] = frozenset()) -> str:
    """The least-error aligned schedule with `computes` compute steps as C/R/F letters (R reuse, F forecast):
    every step in `must` computed, at most `max_skips` skipped steps in a row, and a skip only right after two
    consecutive computes (see the module docstring). A cell that breaks a rule costs BIG."""
    cost, forecast = _cell_costs(search, [(0, c) for c in range(len(COMPONENTS))])
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


def derive(model: str, budget: float, retention: float, max_skips: int, kappa: float = KAPPA) -> str:
    """The 50-step schedule (C/R/F letters) of one preset."""
    return aligned_schedule(stand_in_search(model, REF_STEPS, kappa), math.floor(budget * REF_STEPS + 1e-9),
                            max_skips, must=set(range(math.ceil(retention * REF_STEPS))))


def read_at(letters: str, steps: int) -> str:
    """The letters a `steps`-step run reads from a 50-step schedule."""
    return "".join(letters[profile_step(i, steps)] for i in range(steps))


def preset_from_letters(letters: str) -> dict:
    reuse = [t for t, c in enumerate(letters) if c == "R"]
    forecast = [t for t, c in enumerate(letters) if c == "F"]
    preset: dict = {"warmup_steps": 0, "final_steps": 0, "stage_threshold": 0.4, "rules": []}
    if reuse:
        preset["explicit"] = {c: {"all": list(reuse)} for c in COMPONENTS}  # copies: no YAML anchors
    if forecast:
        preset["explicit_forecast"] = {c: {"all": list(forecast)} for c in COMPONENTS}
    return preset


def expand(preset: dict, steps: int):
    """The preset's table for a `steps`-step run of the one-group stand-in model (profile of REF_STEPS)."""
    profile = Profile.from_dict({"schema_version": 1, "name": "stand-in", "steps": REF_STEPS,
                                 "model": {"architecture": "WanTransformer3DModel", "num_blocks": 1},
                                 "step_rule": {"mode": "scale", "min_steps": MIN_STEPS, "max_steps": MAX_STEPS},
                                 "presets": {"p": preset}})
    return build_table(profile.preset("p"), wan_sigmas(steps, 5.0), 1)


def real_size_fraction(model: str, preset, steps: int) -> float:
    """A profile preset's computed fraction from its table with the FLOPs of one real-size call per component
    (the Wan adapter's formulas). Aligned presets skip all components alike, so theirs equals the counted
    fraction of any size; a component-wise preset such as feb depends on the components' FLOP shares."""
    n, d, ffn = REAL_SIZE[model]
    m = 512
    flops = {"self_attn": 8 * n * d * d + 4 * n * n * d, "cross_attn": 4 * n * d * d + 4 * m * d * d + 4 * n * m * d,
             "mlp": 4 * n * d * ffn}
    blocks, shift, _ = MODELS[model]
    return build_table(preset, wan_sigmas(steps, shift), blocks).predicted_computed_fraction(flops)


def wan_sigmas(steps: int, flow_shift: float) -> list[float]:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


def predicted_error(model: str, preset: dict, steps: int) -> tuple[float, float]:
    """(computed fraction, predicted error) of a preset in a `steps`-step run, on the stand-in statistics."""
    table = expand(preset, steps)
    fraction = float((np.asarray(table.actions) == 0).mean())
    return fraction, stand_in_search(model, steps).evaluate(preset, expanded=(table, fraction)).predicted_error


# -- the profiles ------------------------------------------------------------------------------------
FEB_PRESET = {  # FEB-Cache's published stage rule as is (the previous default of these profiles)
    "warmup_steps": 5, "final_steps": 2, "stage_threshold": 0.4,
    "rules": [{"stage": "early", "components": ["mlp"], "blocks": "all", "interval": 2},
              {"stage": "late", "components": ["self_attn", "cross_attn"], "blocks": "all", "interval": 2}],
}
FULL_PRESET = {"warmup_steps": 0, "final_steps": 0, "rules": []}
SCRIPT = "python benchmarks/wan_presets.py --write-profiles"
HUB = {"wan2.1-t2v-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan2.1-t2v-14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def calibration_command(model: str) -> str:
    budgets = " ".join(f"--budget {spec[0]:g}" for spec in PRESETS.values())
    return (f"videocache profile --model {HUB[model]} --prompts prompts.txt --steps 50 {budgets} "
            f"--preset-names {' '.join(PRESETS)} --out {model}.yaml")


def header(model: str, feb_fraction: float) -> str:
    blocks, _, title = MODELS[model]
    command = calibration_command(model).replace(" --budget 0.6", " \\\n#       --budget 0.6")
    return f"""\
# Cache profile for {title} (WanTransformer3DModel, {blocks} blocks), 50 steps ({MIN_STEPS}-{MAX_STEPS} by scaling).
# NOT CALIBRATED on the real weights: no video made with these presets has been measured against an
# uncached one. slow / balanced / fast compute 0.60 / 0.50 / 0.34 of the block work at 50 steps (within
# 0.03 of that at 25 and 100 steps; benchmarks/wan_presets.md). videocache's schedule search chose them on
# stand-in statistics: MagCache's published per-step magnitude ratios of this model, the step sensitivity
# measured on our reference-wan model, MagCache's retention (first 20 % of steps computed; 10 % for fast)
# and at most 3 / 5 / 7 skipped steps in a row, each skip run after two consecutive computes (so that runs
# of other step counts read every refresh). Each is one schedule for all blocks and components (the engine
# skips the whole block stack on a skipped step); skipped steps forecast (order 1), or reuse where
# forecasting predicts worse. feb is FEB-Cache's published stage rule (arXiv 2503.07120) as is, attention
# fresh early and MLP fresh late: at this model's real size it computes {feb_fraction:.2f} of the work at 50
# steps (self-attention holds most of the FLOPs) and all of it at 25. full computes everything.
# Sources and assumptions: metadata below. Made by
#   {SCRIPT}
# With the weights, calibrate a profile instead (prompts.txt: a few prompts, one per line):
#   {command}
"""


def profile_dict(model: str, schedules: dict[str, str]) -> dict:
    """The profile, from each derived preset's 50-step letters."""
    blocks = MODELS[model][0]
    presets = {name: preset_from_letters(letters) for name, letters in schedules.items()}
    return {
        "schema_version": 1,
        "name": model,
        "model": {"architecture": "WanTransformer3DModel", "num_blocks": blocks, "components": list(COMPONENTS)},
        "calibrated": False,
        "steps": REF_STEPS,
        "step_rule": {"mode": "scale", "min_steps": MIN_STEPS, "max_steps": MAX_STEPS},
        "default_preset": "slow",
        "exposure_bias": {"enabled": False, "b_high": 0.98, "b_low": 0.96, "t_threshold": 0.4, "sign": 1},
        "presets": {**presets, "feb": FEB_PRESET, "full": FULL_PRESET},
        "metadata": {
            "made_by": SCRIPT,
            "calibrated_on_real_weights": False,
            "calibrate_with_weights": calibration_command(model),
            "method": (
                "videocache.schedule_search's shortest path over compute steps (aligned: one schedule for all "
                "blocks and components) on stand-in Gram statistics, with retention, a cap on skips in a row and "
                "skips only after two consecutive computes (benchmarks/wan_presets.py)"
            ),
            "source": (
                f"per-step change: {MAGCACHE_SOURCE}; step sensitivity: profiles/reference-wan.json "
                "(videocache profile on reference-wan); retention and skip cap: MagCache's published settings "
                "(R0.2; K 2/4/6, here plus one); preset feb: FEB-Cache (arXiv 2503.07120) stage rule, attention fresh early, "
                "MLP fresh late, t_thre 0.4"
            ),
            "assumptions": (
                f"features whose norm follows MagCache's ratios and whose direction drifts as a random walk "
                f"turning by kappa |log gamma_t| per step (kappa {KAPPA}); sensitivity read by position in the run"
            ),
            "presets": {name: {"budget": PRESETS[name][0], "retention": PRESETS[name][1],
                               "max_skips": PRESETS[name][2], "schedule_50": letters,
                               "schedule_25": read_at(letters, 25)} for name, letters in schedules.items()},
            "measured": {},
        },
    }


def write_profiles() -> list[Path]:
    written = []
    for model in MODELS:
        data = profile_dict(model, {name: derive(model, *spec) for name, spec in PRESETS.items()})
        path = ROOT / "profiles" / f"{model}.yaml"
        profile = Profile.from_dict(data, str(path))  # validate before writing
        feb = real_size_fraction(model, profile.preset("feb"), REF_STEPS)
        path.write_text(header(model, feb) + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110))
        written.append(path)
    return written


# -- the benchmark ------------------------------------------------------------------------------------
def magcache_schedule(model: str, threshold: float, max_skips: int, retention: float = 0.2) -> str:
    """MagCache's own 50-step decisions (R = skip, reusing the residual) on its published ratios: after the
    retention steps, skip while the summed |1 - product of ratios since the last compute| stays under the
    threshold and at most `max_skips` steps in a row are skipped (conditional branch)."""
    gamma = MAG_RATIOS[model][0::2]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-profiles", action="store_true", help="derive the presets and rewrite the profiles first")
    p.add_argument("--out", default=str(Path(__file__).with_name("wan_presets")), help="writes OUT.md and OUT.json")
    args = p.parse_args()
    if args.write_profiles:
        for path in write_profiles():
            print(f"wrote {path.relative_to(ROOT)}")
    import torch

    from tests.test_wan_presets import MODELS as SHIFTS
    from tests.test_wan_presets import STEPS, computed_fractions

    torch.set_num_threads(1)
    names = [*PRESETS, "feb", "full"]
    result: dict = {"command": "python benchmarks/wan_presets.py" + (" --write-profiles" if args.write_profiles else ""),
                    "models": {}}
    for model in MODELS:
        profile = Profile.from_dict(yaml.safe_load((ROOT / "profiles" / f"{model}.yaml").read_text()))
        schedules = {name: profile.metadata["presets"][name]["schedule_50"] for name in PRESETS}
        schedules.update({"MagCache E012K2R02": magcache_schedule(model, 0.12, 2),
                          "MagCache E024K6R02": magcache_schedule(model, 0.24, 6)})
        predicted = {name: {n: [round(v, 4) for v in predicted_error(model, preset_from_letters(s), n)]
                            for n in STEPS} for name, s in schedules.items()}
        real = {name: {n: round(real_size_fraction(model, profile.preset(name), n), 4) for n in STEPS} for name in names}
        every = {name: read_out_range(schedules[name]) for name in PRESETS}
        result["models"][model] = {"flow_shift": SHIFTS[model][1], "computed_fraction": computed_fractions(model, names),
                                   "real_size_table_fraction": real, "steps_25_to_100": every,
                                   "schedule_50": schedules, "predicted": predicted}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(result))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}")


def report(result: dict) -> str:
    steps = (25, 50, 100)
    lines = [
        "# Wan2.1 T2V presets: computed fractions at 25 / 50 / 100 steps",
        "",
        f"`{result['command']}` (one torch thread). Counted by the engine from the modules that ran, on tiny "
        "random WanTransformer3DModels with the real block counts (30 for 1.3B, 40 for 14B, which match the "
        "profiles' fingerprints), driven by Wan's diffusers scheduler (UniPCMultistepScheduler, flow sigmas, "
        "flow_shift of the released Diffusers checkpoint). The same measurement is `tests/test_wan_presets.py`.",
        "",
        "The presets are **not calibrated on the real weights** (see the profiles' headers): the fractions are "
        "exact, the quality is not measured.",
        "",
    ]
    for model, r in result["models"].items():
        lines += [f"## {MODELS[model][2]} (`profiles/{model}.yaml`, flow_shift {r['flow_shift']})", "",
                  "| preset | 25 steps | 50 steps | 100 steps | real size, from the table: 25 / 50 / 100 |",
                  "|---|---:|---:|---:|---:|"]
        for name, by_steps in r["computed_fraction"].items():
            real = " / ".join(f"{r['real_size_table_fraction'][name][n]:.3f}" for n in steps)
            lines.append(f"| {name} | " + " | ".join(f"{by_steps[n]:.3f}" for n in steps) + f" | {real} |")
        lines += ["", "Last column: the FLOP-weighted fraction the expanded table predicts with one real-size call's "
                  "FLOPs per component (81 frames, 480p for 1.3B, 720p for 14B; self-attention holds most of them). "
                  "slow / balanced / fast skip every component of a step together, so their fraction is the same "
                  "at any size; feb reuses single components and saves less at the real size than on the tiny "
                  "model, and nothing at 25 steps (its interval of 2 scales to 1).",
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
            cells = " | ".join(f"{f:.2f} / {e:.3f}" for f, e in (r["predicted"][name][n] for n in steps))
            lines.append(f"| {name} | `{letters}` | {cells} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
