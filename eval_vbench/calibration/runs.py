"""`videocache profile`: calibrate a cache profile for a model from a few prompts, within compute budgets.

1. fg/bg block classes from the model's own attention (ProfilingDiT; `videocache.fgbg`).
2. One uncached run per calibration prompt records per-cell Gram statistics (`videocache.calibrate`)
   and the reference video.
3. Per budget, the table search builds one candidate per ablation stage (static table; + background
   block groups; + exposure-bias scaling; + EOC correction; + forecasting; + optimal compute-step
   schedules found by dynamic programming), each is generated on the calibration prompts, and its
   measured computed fraction and PSNR against the uncached video decide: an addition is kept only
   where it measurably helps.
4. The winners become the profile's presets, with the ablation, the predicted and measured figures, and
   the command in its metadata.

A pipeline with several transformers (Wan2.2 A14B's two experts) is calibrated as one run: the recordings,
the sensitivities and the search are over the generation's steps, each expert running its own steps of a
candidate table (`videocache.experts`), so the search spends the budget across the experts wherever skipping
costs least, and the report gives each expert's measured computed fraction (how the budget split). The
profile is an ExpertsProfile with that table for every expert. fg/bg profiling reads one transformer's
attention, so it is skipped for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import videocache
from videocache.calibrate import (
    Candidate,
    GramRecorder,
    SearchOptions,
    TableSearch,
    step_proxy_errors,
)
from videocache.exposure_bias import ExposureBiasConfig
from videocache.fgbg import FgBgProfile
from videocache.pipelines.attention_capture import default_profile_steps, profile_pipeline
from videocache.pipelines.generation import generate, image_of
from videocache.profile import Profile
from videocache.profile.compile import written_out
from videocache.schedule_search import schedule_preset
from videocache.table import CacheTable
from videocache.weights import loaded_lora

from ..metrics.fidelity import psnr, ssim
from .replay import PrefixReplay

STAGES = ("static", "+fgbg", "+eb", "+correction", "+forecast", "+schedule")
SCHEDULE_GRANULARITIES = ("aligned", "component")  # what the +schedule stage tries (per-block overfits)
# --quick: only the compute-step schedule with every component on the same steps (the stage and granularity
# every shipped calibration chose at every budget; measured on one prompt, the per-component schedule won once
# and was 11 dB worse on held-out prompts), so nothing is chosen by measurement: each preset is measured once, on
# one prompt, for the report. Each perturbation run replays the reference generation up to the step before the one
# it perturbs (calibration.replay), so perturbing step t of T costs (T - t + 1) / T generations: by default quick
# perturbs the last QUICK_LAST_STEPS steps, the step after each expert switch and the Chebyshev-spaced steps (denser
# at both ends, where sensitivities rise) that cost at most QUICK_STEP_GENERATIONS, every step at 25 (12.96), as
# the full calibration does, then what is left on the cheapest others (the last steps), and interpolates the rest
# within each expert's steps (a switch step weighs 0: it cannot reuse); the components at one step, late enough to
# be cheap. --max-generations fits the steps (at least QUICK_MIN_STEPS) in what the rest leaves.
QUICK_STEP_GENERATIONS, QUICK_MIN_STEPS, QUICK_MEASURE_PROMPTS, QUICK_COMPONENT_FRACTION = 13.0, 4, 1, 0.65
QUICK_GRANULARITIES = ("aligned",)
# forecast gains the +forecast and +schedule stages try, each scored and measured (videocache.forecast.served):
# the straight extrapolation overshoots where the trajectory bends, the more so at a higher guidance scale, where
# the forecast tables lost to reuse before (benchmarks/shift_reference); quick keeps 1 (each gain is a measurement)
FORECAST_GAINS, QUICK_FORECAST_GAINS = (1.0, 0.7, 0.4, 0.2), (1.0,)
QUICK_LAST_STEPS = 3  # the cheapest runs, where sensitivities jump (reference-wan's second-to-last: 2.5x the mean)
FULL_COMPONENT_FRACTIONS = (0.15, 0.4, 0.65, 0.9)  # the full calibration's component sensitivities: their mean
TARGET_LOW, TARGET_RESOLUTION = 0.05, 0.01  # a PSNR target's budget: searched on [0.05, 1] to within 0.01
BLOCK_RUN_T_MAX = (3, 4)  # +fgbg block runs: recompute every t_max steps early, every 2 late


@dataclass(frozen=True)
class CalibrationSettings:
    steps: int
    frames: int
    height: int
    width: int
    guidance_scale: float
    seed: int = 0
    attention_backend: str | None = None  # recorded only: the pipeline is loaded with it (None: diffusers' default)
    # image-to-video: the first frame of every run (a file), or a folder with one per prompt (p000.png ...)
    image: str | None = None
    prompts: tuple[str, ...] = ()  # with an image folder: the calibration prompts, in the folder's order

    def image_for(self, prompt: str) -> str | None:
        """The first frame the run of `prompt` starts from (None: a text-to-video model)."""
        if self.image is None or not Path(self.image).is_dir():
            return self.image
        return str(image_of(self.image, self.prompts.index(prompt)))

    def call(self, prompt: str | None = None) -> dict[str, Any]:
        """The pipeline's keyword arguments for a run of `prompt` (its first frame included)."""
        out = {
            "num_inference_steps": self.steps,
            "num_frames": self.frames,
            "height": self.height,
            "width": self.width,
            "guidance_scale": self.guidance_scale,
        }
        if self.image is not None:
            from PIL import Image

            out["image"] = Image.open(self.image_for(prompt)).convert("RGB")
        return out

    def recorded(self) -> dict[str, Any]:
        """What a profile's metadata records of them (the prompts are recorded once, beside)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "prompts"}


@dataclass
class Recording:
    grams: np.ndarray  # (prompts, blocks, components, steps, steps)
    flops: np.ndarray  # (blocks, components) per call
    sigmas: list[float]
    references: list[np.ndarray]  # uncached videos, uint8


class GenerationCount:
    """The denoiser calls a calibration makes, in generations: calls over those of one uncached generation
    (the first recorded one), so that a perturbed run or a cached trial counts as the generation it is."""

    def __init__(self, pipe):
        from videocache.experts import denoiser_modules

        self.calls, self.per_generation, self.phases = 0, None, {}
        self._mark = 0
        self._handles = [m.register_forward_pre_hook(self._count) for m in denoiser_modules(pipe)]

    def _count(self, module, args) -> None:
        self.calls += 1

    def discount(self, calls: int) -> None:
        """Take back calls that ran no model (replayed: calibration.replay)."""
        self.calls -= calls

    def phase(self, name: str) -> None:
        """Close the calls since the last phase under `name` (added to it if it ran before)."""
        self.phases[name] = self.phases.get(name, 0) + self.calls - self._mark
        self._mark = self.calls

    def report(self) -> dict[str, float]:
        unit = self.per_generation or 1
        out = {name: round(calls / unit, 1) for name, calls in self.phases.items()}
        return {**out, "total": round(sum(self.phases.values()) / unit, 1), "record_calls_per_generation": unit}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def model_layout(pipe) -> videocache.BlockLayout:
    """The block layout (groups and their components) of the pipeline's transformer."""
    adapter = videocache.adapters.get_adapter(pipe.transformer)
    return videocache.BlockLayout.from_fingerprint(adapter.fingerprint(pipe.transformer))


def experts_of(pipe) -> list[str]:
    """The pipeline's transformers (one, or its experts), checked to share one architecture."""
    from videocache.experts import pipeline_denoisers

    names = [d.attribute for d in pipeline_denoisers(pipe)]
    adapter = videocache.adapters.get_adapter(pipe.transformer)
    prints = {name: adapter.fingerprint(getattr(pipe, name)) for name in names}
    if any(f != prints[names[0]] for f in prints.values()):
        raise ValueError(f"the experts {', '.join(names)} differ in architecture: videocache profile calibrates "
                         "experts of one architecture")
    return names


def expert_spans(pipe, steps: int) -> list[tuple[int, int]] | None:
    """The steps each expert runs of a `steps`-step run (None: one transformer runs them all)."""
    from videocache.experts import expert_steps

    spans = list(expert_steps(pipe, steps).values())
    return None if len(spans) == 1 else spans


def for_pipeline(pipe, profile: Profile) -> Profile | videocache.ExpertsProfile:
    """The profile to apply to `pipe`: as it is, or (several experts) the same presets for every expert."""
    experts = experts_of(pipe)
    if len(experts) == 1:
        return profile
    boundary = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    each = dataclasses.replace(profile, metadata={})  # the metadata once, at the top
    return videocache.ExpertsProfile.of(profile.name, dict.fromkeys(experts, each), boundary, profile.metadata)


def generate_frames(pipe, prompt: str, s: CalibrationSettings) -> np.ndarray:
    call = s.call(prompt)
    call.pop("image", None)
    return generate(pipe, prompt, seed=s.seed, progress=False, image=s.image_for(prompt), **call).frames


def record(pipe, prompts: Sequence[str], s: CalibrationSettings, band: int = 9, progress: bool = True) -> Recording:
    """Uncached runs with a Gram recorder on every component (a compute-everything table is exact).
    Component outputs of more than `videocache.calibrate.SKETCH_ABOVE` values (Wan2.1 at 480p x 81
    frames: 50 M) are recorded as fixed CountSketches, which bounds the recorder's device memory."""
    layout = model_layout(pipe)
    grams, refs = [], []
    flops = None
    for prompt in tqdm(prompts, desc="record", disable=not progress, dynamic_ncols=True):
        recorder = GramRecorder(s.steps, layout.num_blocks, band, layout=layout)
        engine = videocache.apply(
            pipe, table=CacheTable.full_compute(s.steps, layout.num_blocks, layout), observer=recorder, trace=False
        )
        try:
            refs.append(generate_frames(pipe, prompt, s))
            flops = engine.component_flops()
        finally:
            videocache.remove(pipe)
        grams.append(recorder.gram)
        recorder.clear()  # its kept outputs (sketches beyond SKETCH_ABOVE values) before the next run
    sigmas = videocache.adapters.get_adapter(pipe.transformer).scheduler_sigmas(pipe, s.steps)
    return Recording(np.stack(grams), flops, sigmas, refs)


def _latent(pipe, prompt: str, s: CalibrationSettings) -> torch.Tensor:
    generator = torch.Generator().manual_seed(s.seed)
    return pipe(prompt=prompt, generator=generator, output_type="latent", **s.call(prompt)).frames.float()


def _perturbed_error(pipe, prompt: str, s: CalibrationSettings, reference: torch.Tensor, cells: np.ndarray,
                     replay: PrefixReplay) -> float:
    """Relative error of the final latent when the `cells` (steps, blocks, components) bool mask reuse the
    previous step's output and everything else is computed; the steps before the one whose outputs the first
    reuse reads are the reference generation's (`replay`: recorded, not run again)."""
    actions = np.where(cells, int(videocache.Action.REUSE), int(videocache.Action.COMPUTE)).astype(np.int8)
    first = int(np.flatnonzero(cells.any(axis=(1, 2)))[0])
    videocache.apply(pipe, table=CacheTable(actions, layout=model_layout(pipe)), trace=False)
    try:
        with replay.replaying(max(first - 1, 0)):
            latent = _latent(pipe, prompt, s)
    finally:
        videocache.remove(pipe)
    return float((latent - reference).norm() / reference.norm())


def perturbation_cost(steps: int, perturbed: Sequence[int]) -> float:
    """Generations of the perturbation runs at `perturbed` steps: each computes from the step before it on."""
    return sum((steps - t + 1) / steps for t in perturbed)


def quick_sensitivity_steps(steps: int, count: int) -> list[int]:
    """`count` of the steps 1..steps-1, Chebyshev-spaced (denser at both ends, where a one-step error is amplified
    most: the first steps and the last few before the final one)."""
    count = min(count, steps - 1)
    x = (1 - np.cos(np.pi * np.arange(count) / max(count - 1, 1))) / 2
    return sorted({int(round(1 + (steps - 2) * v)) for v in x})


def switch_steps(spans: Sequence[tuple[int, int]]) -> set[int]:
    """The steps where an expert takes over from another (its first step: nothing of it cached to reuse)."""
    return {start for start, _ in spans if start > 0}


def quick_steps_within(steps: int, generations: float, spans: Sequence[tuple[int, int]] = ()) -> list[int]:
    """The last QUICK_LAST_STEPS steps and the most Chebyshev-spaced ones whose perturbation runs cost at most
    `generations` (every one of 1..steps-1 where they fit), what is left spent on the cheapest others. With
    several experts (`spans`), the step after each switch is always among them (interpolation stops at a
    switch) and the switch steps themselves never are (an expert's first step cannot reuse: nothing to perturb)."""
    starts = switch_steps(spans)
    every = [t for t in range(1, steps) if t not in starts]
    first = {start + 1 for start in starts if start + 1 < steps} | set(every[-QUICK_LAST_STEPS:])
    for count in range(steps - 1, 0, -1):
        chosen = every if count == steps - 1 else \
            sorted({t for t in quick_sensitivity_steps(steps, count) if t not in starts} | first)
        if perturbation_cost(steps, chosen) <= generations + 1e-9:
            break
    else:
        return []
    for t in reversed(every):  # what is left buys the cheapest steps not yet perturbed: the last ones
        if t not in chosen and perturbation_cost(steps, [*chosen, t]) <= generations + 1e-9:
            chosen = sorted([*chosen, t])
    return chosen


@dataclass(frozen=True)
class QuickPlan:
    steps: int  # of the calibration's runs
    sensitivity_steps: tuple[int, ...]  # the steps perturbed (the others interpolated); none: reused
    measure_prompts: int  # prompts each preset's schedule is measured on
    reused: tuple[np.ndarray, np.ndarray] | None = None  # (step, component) sensitivities of another calibration
    spans: tuple[tuple[int, int], ...] = ()  # each expert's (start, stop) steps where there are several

    @property
    def component_step(self) -> int:
        step = round(QUICK_COMPONENT_FRACTION * (self.steps - 1))
        return step + 1 if step in switch_steps(self.spans) else step  # a switch cannot reuse

    def generations(self, prompts: int, components: int, presets: int) -> float:
        """What it runs: the recording, the sensitivity's reference and replayed perturbation runs (none when
        reused), the measurements (PSNR targets add their bisection's probes)."""
        sensitivity = 0.0 if self.reused is not None else 1 + perturbation_cost(self.steps, self.sensitivity_steps) \
            + components * perturbation_cost(self.steps, [self.component_step])
        return prompts + sensitivity + self.measure_prompts * presets


def reused_sensitivities(report: dict, steps: int, names: Sequence[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """The step and component sensitivities of another calibration's report (a base model's, for its LoRA or
    fine-tune), resampled to `steps` over the run's progress. ValueError: they are for other components."""
    step_w, comp = report.get("step_sensitivity"), report.get("component_sensitivity") or {}
    if not step_w or sorted(comp) != sorted(names):
        raise ValueError(f"--sensitivity-from {source}: its report has no sensitivities for the components "
                         f"{', '.join(names)} (it has {', '.join(comp) or 'none'})")
    step_w = np.asarray(step_w, dtype=float)
    resampled = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(step_w)), step_w)
    return resampled / resampled[1:].mean(), np.array([comp[n] for n in names], dtype=float)


def quick_plan(steps: int, prompts: int, components: int, presets: int, max_generations: int | None = None,
               spans: Sequence[tuple[int, int]] | None = None) -> QuickPlan:
    """--quick's runs: the perturbed steps that QUICK_STEP_GENERATIONS buys, or within `max_generations` as many as
    fit (`spans`: each expert's steps, where there are several). ValueError: not even QUICK_MIN_STEPS fit."""
    plan = QuickPlan(steps, (), QUICK_MEASURE_PROMPTS, spans=tuple(spans or ()))
    fixed, need = plan.generations(prompts, components, presets), min(QUICK_MIN_STEPS, steps - 1)
    chosen = quick_steps_within(steps, QUICK_STEP_GENERATIONS if max_generations is None else max_generations - fixed,
                                plan.spans)
    if len(chosen) < need:
        least = next(n for n in range(math.ceil(fixed), math.ceil(fixed) + steps + 1)
                     if len(quick_steps_within(steps, n - fixed, plan.spans)) >= need)
        raise ValueError(f"--max-generations {max_generations}: a quick calibration of {presets} preset(s) from "
                         f"{prompts} prompts needs at least {least} generations here")
    return dataclasses.replace(plan, sensitivity_steps=tuple(chosen))


def sensitivity(pipe, prompt: str, s: CalibrationSettings, proxy: np.ndarray, component_steps: Sequence[int],
                replay: PrefixReplay, progress: bool = True, steps: Sequence[int] | None = None,
                spans: Sequence[tuple[int, int]] = ()) -> tuple[np.ndarray, np.ndarray]:
    """How much the rest of sampling amplifies a one-step feature error, measured by perturbation (each run
    replays the reference generation up to the step before the one it perturbs: `replay`).

    Per step t: the final latent's relative error when every component reuses its step t-1 output at t,
    divided by the proxy error of that reuse (`proxy`: (steps, component names)); `steps`: perturb only these
    (>= 1) and interpolate the others within each expert's span (`spans`; an expert's first step cannot reuse,
    so it weighs 0, as a perturbation run there measures). Per component name: the same with only that
    component reused, averaged over `component_steps`. Both normalised to mean 1."""
    layout = model_layout(pipe)
    shape = (s.steps, layout.num_blocks, layout.width)
    pipe.set_progress_bar_config(disable=True)
    names = layout.names
    perturbed = list(range(1, s.steps)) if steps is None else sorted(set(steps))
    jobs = [(t, None) for t in perturbed] + [(t, c) for c in range(len(names)) for t in component_steps]
    step_w, comp_w = np.zeros(s.steps), np.zeros(len(names))
    with torch.no_grad():
        with replay.recording():
            reference = _latent(pipe, prompt, s)
        for t, c in tqdm(jobs, desc="sensitivity", disable=not progress, dynamic_ncols=True):
            cells = np.zeros(shape, dtype=bool)
            if c is None:
                cells[t] = layout.present
            else:
                for blocks, i in layout.cells_of(names[c]):
                    cells[t, blocks, i] = True
            error = _perturbed_error(pipe, prompt, s, reference, cells, replay)
            if c is None:
                step_w[t] = error / max(float(proxy[t].sum()), 1e-12)
            else:
                comp_w[c] += error / max(float(proxy[t, c]), 1e-12) / len(component_steps)
    if steps is not None:
        for start, stop in spans or [(0, s.steps)]:
            inside = [t for t in perturbed if start < t < stop]
            if inside:  # else the span is its first step alone
                step_w[start + 1:stop] = np.interp(np.arange(start + 1, stop), inside, step_w[inside])
    step_w[0] = step_w[1:].max()
    return step_w / step_w[1:].mean(), comp_w / comp_w.mean()


def measure(pipe, profile: Profile, preset: str, prompts: Sequence[str], refs: Sequence[np.ndarray],
            s: CalibrationSettings) -> dict[str, float]:
    """Computed fraction (engine-measured; per expert too where the pipeline has several), mean PSNR and SSIM
    against the uncached videos."""
    engine = videocache.apply(pipe, for_pipeline(pipe, profile), preset=preset, trace=False)
    psnrs, ssims = [], []
    try:
        for prompt, ref in zip(prompts, refs, strict=True):
            video = generate_frames(pipe, prompt, s)
            psnrs.append(min(psnr(video, ref), 99.0))
            ssims.append(ssim(video, ref))
        stats = engine.stats()
    finally:
        videocache.remove(pipe)
    out = {"computed_fraction": round(float(stats["computed_fraction"]), 4), "psnr": round(float(np.mean(psnrs)), 3),
           "ssim": round(float(np.mean(ssims)), 4)}
    if "computed_fraction_by_expert" in stats:
        out["computed_fraction_by_expert"] = {k: round(float(v), 4) for k, v in stats["computed_fraction_by_expert"].items()}
    return out


def _profile(base: dict, presets: dict[str, dict]) -> Profile:
    return Profile.from_dict({**base, "presets": presets, "default_preset": next(iter(presets))}, "<calibration>")


def _stage_trials(stage: str, opts: SearchOptions, search: TableSearch, budget: float,
                  best: tuple[dict, Candidate] | None, fgbg: FgBgProfile | None, measure_top: int,
                  granularities: Sequence[str] = SCHEDULE_GRANULARITIES,
                  gains: Sequence[float] = FORECAST_GAINS) -> list[tuple[Candidate, SearchOptions]]:
    """The candidates one ablation stage generates, each with the search options it came from (what the
    later stages build on if it is kept). ValueError: no candidate of the stage meets the budget."""
    if stage == "+eb":  # the same table, now with exposure-bias scaling
        if best is None:
            raise ValueError("no earlier stage met the budget: no table to add exposure-bias scaling to")
        return [(best[1], opts)]
    if stage == "+schedule":  # optimal compute steps, not a rule family (videocache.schedule_search)
        presets = {json.dumps(p, sort_keys=True): p for p in (schedule_preset(search, budget, g, gain)
                                                              for g in granularities for gain in gains)}
        return [(search.evaluate(p), opts) for p in presets.values()]  # a gain with no forecast left: measured once
    if stage == "+fgbg":  # background blocks one step coarser, or reused whole as block runs: the best of each
        bg = list(fgbg.background_blocks)
        variants = [dataclasses.replace(opts, group_blocks=tuple(bg))] + [
            dataclasses.replace(opts, block_runs={"blocks": bg, "t_max": t_max, "t_min": 2}) for t_max in BLOCK_RUN_T_MAX
        ]
        trials = []
        for variant in variants:
            with contextlib.suppress(ValueError):  # a variant that cannot meet the budget
                trials += [(c, variant) for c in search.best_within(budget, variant, keep=1)]
        return trials
    if stage == "+forecast":  # the best of each gain
        keep = max(1, measure_top // len(gains))
        variants = [dataclasses.replace(opts, forecast=True, forecast_gain=gain) for gain in gains]
        return [(c, v) for v in variants for c in search.best_within(budget, v, keep=keep)]
    variant = {"static": opts, "+correction": dataclasses.replace(opts, correction=True)}[stage]
    return [(c, variant) for c in search.best_within(budget, variant, keep=measure_top)]


def calibrate(
    pipe,
    name: str,
    prompts: Sequence[str],
    budgets: Sequence[float],
    settings: CalibrationSettings,
    *,
    targets: Sequence[float] = (),
    quick: bool = False,
    max_generations: int | None = None,
    sensitivity_report: tuple[str, dict] | None = None,
    preset_names: Sequence[str] | None = None,
    fgbg: FgBgProfile | None = None,
    fgbg_prompts: int = 2,
    sensitivity_prompts: int = 1,
    measure_top: int = 3,
    base_options: SearchOptions | None = None,
    eb: ExposureBiasConfig | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Profile, dict]:
    """The calibrated profile (an ExpertsProfile for a pipeline with several transformers) and a report {fgbg,
    budgets: [{budget, stages: [...], chosen}], seconds}. A preset per computed-fraction budget, then one per PSNR
    target (`targets`, dB on the calibration prompts: the lowest budget that reaches it; its report entry adds
    target_psnr, the probes and whether it was reached). `quick`: about a tenth of the generations (see
    QUICK_STEP_GENERATIONS), within `max_generations` where given, or with no sensitivity runs at all where
    `sensitivity_report` (name, report) gives another calibration's; the report counts the generations of every
    phase either way."""
    plan = None
    if sensitivity_report is not None:
        reused = reused_sensitivities(sensitivity_report[1], settings.steps, model_layout(pipe).names,
                                      sensitivity_report[0])
        plan = QuickPlan(settings.steps, (), QUICK_MEASURE_PROMPTS, reused)
    elif quick or max_generations is not None:
        components = len(model_layout(pipe).names)
        plan = quick_plan(settings.steps, len(prompts), components, len(budgets) + len(targets), max_generations,
                          expert_spans(pipe, settings.steps))
    count = GenerationCount(pipe)
    try:
        return _calibrate(pipe, name, prompts, budgets, settings, count, targets=targets, quick=plan,
                          preset_names=preset_names, fgbg=fgbg, fgbg_prompts=fgbg_prompts,
                          sensitivity_prompts=sensitivity_prompts, measure_top=measure_top, base_options=base_options,
                          eb=eb, command=command, log=log, progress=progress)
    finally:
        count.close()


def _calibrate(pipe, name: str, prompts: Sequence[str], budgets: Sequence[float], settings: CalibrationSettings,
               count: GenerationCount, *, targets, quick: QuickPlan | None, preset_names, fgbg, fgbg_prompts,
               sensitivity_prompts, measure_top, base_options, eb, command, log, progress) -> tuple[Profile, dict]:
    started = time.time()
    adapter = videocache.adapters.get_adapter(pipe.transformer)
    fingerprint = adapter.fingerprint(pipe.transformer)
    names = list(preset_names or [f"budget_{b:g}".replace(".", "_") for b in budgets]
                 + [f"psnr_{t:g}".replace(".", "_") for t in targets])
    if len(names) != len(budgets) + len(targets):
        raise ValueError(f"{len(budgets)} budgets and {len(targets)} PSNR targets but {len(names)} preset names")
    if quick is not None:
        planned = quick.generations(len(prompts), len(model_layout(pipe).names), len(budgets) + len(targets))
        where = "reused" if quick.reused is not None else f"at {len(quick.sensitivity_steps)} steps"
        log(f"quick: the compute-step schedule only ({', '.join(QUICK_GRANULARITIES)}), step sensitivities {where}, "
            f"measured on {quick.measure_prompts} prompt(s), no fg/bg profile: {planned:.1f} generations"
            + (" and the targets' probes" if targets else ""))
        fgbg_prompts = 0
    if len(experts_of(pipe)) > 1 and fgbg is None and fgbg_prompts > 0:
        log("fg/bg block profiling reads one transformer's attention: skipped for this pipeline's experts")
        fgbg_prompts = 0
    if fgbg is None and fgbg_prompts > 0:
        log("profiling foreground/background blocks from the model's attention ...")
        try:
            fgbg = profile_pipeline(pipe, prompts[:fgbg_prompts], default_profile_steps(settings.steps),
                                    progress=progress, call_of=settings.call)
        except ValueError as exc:  # e.g. no foreground found at all (an untrained model)
            log(f"no fg/bg block classes ({exc}); the +fgbg stage is skipped")
    if fgbg is not None:
        log(f"block classes: {' '.join(fgbg.classes)} (R_attn {', '.join(f'{v:.2f}' for v in fgbg.r_attn)})")
    count.phase("fgbg")
    rec = record(pipe, prompts, settings, progress=progress)
    count.phase("record")
    count.per_generation = count.phases["record"] / len(prompts)
    layout = model_layout(pipe)
    proxy = step_proxy_errors(rec.grams[:sensitivity_prompts], layout)
    perturbed = quick.sensitivity_steps if quick else None
    component_steps = [quick.component_step] if quick else \
        sorted({round(f * (settings.steps - 1)) for f in FULL_COMPONENT_FRACTIONS})
    replay = PrefixReplay(pipe, settings.steps)
    sensitivities = [quick.reused] if quick and quick.reused is not None else [
        sensitivity(pipe, prompts[i], settings, proxy[i], component_steps, replay, progress, perturbed,
                    quick.spans if quick else ())
        for i in range(sensitivity_prompts)]
    count.discount(replay.replayed)  # handed back from the reference runs: no model ran
    count.phase("sensitivity")
    stages_run = ("+schedule",) if quick else STAGES
    granularities = QUICK_GRANULARITIES if quick else SCHEDULE_GRANULARITIES
    gains = QUICK_FORECAST_GAINS if quick else FORECAST_GAINS
    measured_on = quick.measure_prompts if quick else len(prompts)
    trial_prompts, trial_refs = prompts[:measured_on], rec.references[:measured_on]
    weights = np.mean([w for w, _ in sensitivities], axis=0)
    comp_weights = np.mean([w for _, w in sensitivities], axis=0)
    log("step sensitivity: " + " ".join(f"{w:.2f}" for w in weights))
    log("component sensitivity: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(layout.names, comp_weights, strict=True)))
    search = TableSearch(rec.grams, rec.flops, rec.sigmas, step_weights=weights, component_weights=comp_weights,
                         layout=layout, spans=expert_spans(pipe, settings.steps))
    opts0 = dataclasses.replace(base_options or SearchOptions(), components=layout.names)
    eb_on = dataclasses.replace(eb or ExposureBiasConfig(), enabled=True)
    base = {
        "schema_version": 1,
        "name": name,
        "model": {k: fingerprint[k] for k in ("architecture", "num_blocks", "components", "groups") if k in fingerprint},
        "calibrated": True,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "step_rule": {"mode": "scale", "min_steps": max(1, round(0.4 * settings.steps)), "max_steps": settings.steps * 4},
        "exposure_bias": (eb or ExposureBiasConfig()).to_dict(),
        **({"fgbg": fgbg.to_dict()} if fgbg is not None else {}),
    }
    lora = loaded_lora(pipe)  # the weights measured: recorded, so that applying the profile elsewhere warns
    if lora is not None:
        base["metadata"] = {"lora": lora}
    report: dict[str, Any] = {"fgbg": None if fgbg is None else fgbg.to_dict(), "step_sensitivity": [round(float(w), 4) for w in weights],
                              "component_sensitivity": dict(zip(layout.names, np.round(comp_weights, 4).tolist(), strict=True)),
                              "budgets": []}
    chosen_presets: dict[str, dict] = {}

    def search_budget(budget: float) -> tuple[list[dict], tuple[dict, Candidate] | None]:
        """The ablation stages at one budget, each kept where its measured PSNR rises: (stage rows, best)."""
        stages: list[dict] = []
        best: tuple[dict, Candidate] | None = None  # (report row, candidate)
        opts = dataclasses.replace(opts0, forecast=False, correction=False, group_blocks=(), block_runs=None)
        use_eb = False
        for stage in stages_run:
            if stage == "+fgbg" and (fgbg is None or not fgbg.background_blocks):
                continue
            try:
                trials = _stage_trials(stage, opts, search, budget, best, fgbg, measure_top, granularities, gains)
            except ValueError as exc:
                log(f"  {stage:12s} {exc}")
                continue
            if not trials:
                continue
            trial_eb = use_eb or stage == "+eb"
            if trial_eb:
                trials = [(dataclasses.replace(c, preset={**c.preset, "exposure_bias": eb_on.to_dict()}), o)
                          for c, o in trials]
            trial = None
            for candidate, origin in trials:
                measured = measure(pipe, _profile(base, {"trial": candidate.preset}), "trial", trial_prompts,
                                   trial_refs, settings)
                if trial is None or measured["psnr"] > trial[0]["psnr"]:
                    trial = (measured, candidate, origin)
            measured, candidate, trial_opts = trial
            row = {"stage": stage, "predicted_fraction": round(candidate.predicted_fraction, 4),
                   "predicted_error": round(candidate.predicted_error, 5), **measured}
            kept = best is None or measured["psnr"] > best[0]["psnr"]
            row["kept"] = bool(kept)
            row["preset"] = candidate.preset
            stages.append(row)
            split = "".join(f" {k} {v:.3f}" for k, v in measured.get("computed_fraction_by_expert", {}).items())
            log(f"  {stage:12s} predicted fraction {row['predicted_fraction']:.3f}  measured "
                f"{measured['computed_fraction']:.3f}{f' ({split.strip()})' if split else ''}  PSNR {measured['psnr']:.2f} dB"
                f"  SSIM {measured['ssim']:.4f}{'  (kept)' if kept else ''}")
            if kept:
                best = (row, candidate)
                opts, use_eb = trial_opts, trial_eb
        return stages, best

    schedules_measured: dict[str, dict] = {}  # a schedule's measurement by its table: budgets a step apart share one

    def schedule_psnr(budget: float) -> tuple[float, float]:
        """(PSNR, computed fraction) of the best optimal compute-step schedule within `budget`: the stage that
        wins at every budget of the shipped calibrations, so the one a quality target is searched on."""
        best_row = None
        for candidate, _ in _stage_trials("+schedule", opts0, search, budget, None, fgbg, measure_top, granularities,
                                          gains):
            key = json.dumps(candidate.preset, sort_keys=True)
            if key not in schedules_measured:
                schedules_measured[key] = measure(pipe, _profile(base, {"trial": candidate.preset}), "trial",
                                                  trial_prompts, trial_refs, settings)
            measured = schedules_measured[key]
            if best_row is None or measured["psnr"] > best_row["psnr"]:
                best_row = measured
        return best_row["psnr"], best_row["computed_fraction"]

    def budget_for(target: float) -> tuple[float, list[dict]]:
        """The lowest budget whose compute-step schedule reaches `target` dB on the calibration prompts
        (bisection on [TARGET_LOW, 1]: PSNR rises with the budget), and the probes it measured."""
        low, high, probes = TARGET_LOW, 1.0, []
        while high - low > TARGET_RESOLUTION:
            mid = round((low + high) / 2, 4)
            try:
                psnr_mid, fraction = schedule_psnr(mid)
            except ValueError:  # nothing fits this budget
                low = mid
                continue
            probes.append({"budget": mid, "computed_fraction": fraction, "psnr": round(psnr_mid, 3)})
            log(f"  probe budget {mid:.4f}: computed {fraction:.3f}, PSNR {psnr_mid:.2f} dB "
                f"({'reaches' if psnr_mid >= target else 'below'} {target:g})")
            if psnr_mid >= target:
                high = mid
            else:
                low = mid
        return high, probes

    goals = [("budget", b) for b in budgets] + [("target_psnr", t) for t in targets]
    for (kind, goal), preset_name in zip(goals, names, strict=True):
        probes: list[dict] = []
        if kind == "budget":
            budget = goal
            log(f"budget {budget}:")
        else:
            log(f"target {goal:g} dB: searching the lowest budget that reaches it")
            budget, probes = budget_for(goal)
            log(f"budget {budget:.4f} (for the target {goal:g} dB):")
        stages, best = search_budget(budget)
        if best is None:
            raise ValueError(f"no table reaches the budget {budget}: raise it")
        chosen_presets[preset_name] = best[1].preset
        entry = {"budget": budget, "preset": preset_name, "stages": stages, "chosen": best[0]}
        if kind == "target_psnr":
            entry.update(target_psnr=goal, probes=probes, reached=bool(best[0]["psnr"] >= goal))
            if not entry["reached"]:
                log(f"  the target {goal:g} dB is not reached ({best[0]['psnr']:.2f} dB): even the full budget misses it")
        report["budgets"].append(entry)
    chosen_presets["full"] = {"warmup_steps": 0, "final_steps": 0, "rules": []}  # exactness check: computes all
    count.phase("search")
    report["seconds"] = round(time.time() - started, 1)
    report["generations"] = count.report()
    report["quick"] = quick is not None
    report["perturbed_steps"] = list(range(1, settings.steps) if quick is None else quick.sensitivity_steps)
    report["measured_on_prompts"] = measured_on
    base["metadata"] = {
        "made_by": command or "videocache profile",
        "calibration_prompts": list(prompts),
        "settings": settings.recorded(),
        "calibration_seconds": report["seconds"],
        "calibration_generations": report["generations"]["total"],
        **({"lora": lora} if lora is not None else {}),
        **({"quick": True} if quick else {}),
        "measured_on_calibration_prompts": {
            b["preset"]: {"budget": b["budget"], **({"target_psnr": b["target_psnr"]} if "target_psnr" in b else {}),
                          **{k: b["chosen"][k] for k in
                          ("stage", "predicted_fraction", "computed_fraction", "computed_fraction_by_expert", "psnr",
                           "ssim") if k in b["chosen"]}}
            for b in report["budgets"]
        },
    }
    profile = _profile(base, chosen_presets)  # rule presets written out: other step counts keep their fraction
    profile = _profile(base, {k: written_out(profile.preset(k), rec.sigmas, layout, profile.exposure_bias)
                              for k in chosen_presets})
    return for_pipeline(pipe, profile), report
