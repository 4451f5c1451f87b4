"""Calibrating the run-time guard (`videocache.guard`) of a profile, as `videocache profile` does after the
table search, or alone on an existing profile (`videocache profile --guard-only`).

1. Drift rates: uncached runs of the calibration prompts at the calibration settings, read through the
   guard's own signal (the relative change of the denoiser input per unit sigma, per step).
2. Threshold: each candidate is run with the profile's middle preset on the calibration settings and on
   shifted ones (guidance scale x1.6, and a longer video), against the uncached videos of each setting. The
   threshold kept gains the most PSNR over the table alone on the shifted settings while costing at most
   `MAX_COST_DB` on the calibration settings and keeping the computed fraction within `MAX_FRACTION_DRIFT`.
   The guard is enabled in the profile when that gain is positive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import videocache
from videocache.guard import GuardConfig
from videocache.profile import Profile
from videocache.table import CacheTable

from ..metrics.fidelity import psnr
from .runs import model_layout

THRESHOLDS = (0.05, 0.1, 0.2, 0.35)
MAX_COST_DB = 0.3
MAX_FRACTION_DRIFT = 0.03
_PROBE = GuardConfig((1.0, 0.0), (1.0, 1.0), threshold=1e9)  # measures the signal, never forces


def shifted_settings(settings: Any, frames_step: int = 4) -> dict[str, Any]:
    """The settings the threshold is chosen on besides the calibration's: a higher guidance scale (where
    CFG is on) and a video about half again as long (in the model's frame step)."""
    out = {"calibration": settings}
    if settings.guidance_scale > 1.0:
        out[f"guidance {settings.guidance_scale * 1.6:g}"] = dataclasses.replace(
            settings, guidance_scale=round(settings.guidance_scale * 1.6, 2))
    longer = settings.frames + max(frames_step, (settings.frames - 1) // 2 // frames_step * frames_step)
    out[f"frames {longer}"] = dataclasses.replace(settings, frames=longer)
    return out


def drift_rates(pipe, prompts: Sequence[str], settings: Any, generate: Callable) -> tuple[list[float], list[float]]:
    """(sigmas, rates): per step t >= 1 the mean over prompts of the input drift per unit sigma, at the
    midpoint of sigma_(t-1) and sigma_t."""
    layout = model_layout(pipe)
    rates = []
    for prompt in prompts:
        engine = videocache.apply(pipe, table=CacheTable.full_compute(settings.steps, layout.num_blocks, layout),
                                  guard=_PROBE, trace=False)
        try:
            generate(pipe, prompt, settings)
            sigmas = engine._sigmas(settings.steps)
            signal = engine.stats()["guard_signal"]
        finally:
            videocache.remove(pipe)
        if sigmas is None or len(signal) != settings.steps - 1:
            raise ValueError("the guard needs the run's sigmas from the scheduler; this pipeline gives none")
        rates.append([d / max(abs(sigmas[t - 1] - sigmas[t]), 1e-12) for t, d, _ in signal])
    mids = [0.5 * (sigmas[t - 1] + sigmas[t]) for t in range(1, settings.steps)]
    return mids, [float(r) for r in np.mean(rates, axis=0)]


def calibrate_guard(pipe, profile: Profile, prompts: Sequence[str], settings: Any, generate: Callable,
                    references: Sequence[np.ndarray] | None = None, preset: str | None = None,
                    log: Callable[[str], None] = print, progress: bool = True) -> tuple[GuardConfig, dict]:
    """The guard for `profile` and a report {drift, preset, trials: [{threshold, setting, ...}], chosen}.
    `generate(pipe, prompt, settings)` returns uint8 frames; `references`: the uncached videos of `prompts`
    at `settings`, when already made."""
    sigmas, rates = drift_rates(pipe, prompts, settings, generate)
    log("guard drift rates: " + " ".join(f"{r:.2f}" for r in rates))
    if preset is None:  # the middle of the computing presets (full computes everything: nothing to guard)
        names = [n for n in profile.presets if n != "full"]
        preset = names[len(names) // 2]
    settings_by_name = shifted_settings(settings)
    refs = {}
    for name, s in tqdm(settings_by_name.items(), desc="guard references", disable=not progress):
        refs[name] = list(references) if name == "calibration" and references is not None else \
            [generate(pipe, p, s) for p in prompts]
    rows = []

    def measure(guard: GuardConfig | None, name: str) -> dict:
        engine = videocache.apply(pipe, profile, preset=preset, guard=False if guard is None else guard, trace=False)
        try:
            scores = [min(psnr(generate(pipe, p, settings_by_name[name]), r), 99.0) for p, r in zip(prompts, refs[name], strict=True)]
            fraction = engine.stats()["computed_fraction"]
        finally:
            videocache.remove(pipe)
        return {"setting": name, "computed_fraction": round(float(fraction), 4), "psnr": round(float(np.mean(scores)), 3)}

    alone = {name: measure(None, name) for name in settings_by_name}
    trials = [(t, name) for t in THRESHOLDS for name in settings_by_name]
    for threshold, name in tqdm(trials, desc="guard thresholds", disable=not progress):
        m = measure(GuardConfig(tuple(sigmas), tuple(rates), threshold), name)
        m.update(threshold=threshold, gain_db=round(m["psnr"] - alone[name]["psnr"], 3),
                 fraction_drift=round(m["computed_fraction"] - alone[name]["computed_fraction"], 4))
        rows.append(m)
    best, best_gain = None, -np.inf
    for threshold in THRESHOLDS:
        mine = [r for r in rows if r["threshold"] == threshold]
        calib = next(r for r in mine if r["setting"] == "calibration")
        shifted = [r["gain_db"] for r in mine if r["setting"] != "calibration"]
        ok = -calib["gain_db"] <= MAX_COST_DB and all(abs(r["fraction_drift"]) <= MAX_FRACTION_DRIFT for r in mine)
        gain = float(np.mean(shifted)) if shifted else 0.0
        log(f"  guard threshold {threshold:g}: calibration {calib['gain_db']:+.2f} dB, shifted {gain:+.2f} dB"
            f"{'' if ok else ' (refused: cost or fraction)'}")
        if ok and gain > best_gain:
            best, best_gain = threshold, gain
    if best is None:
        best, best_gain = max(THRESHOLDS), 0.0
    guard = GuardConfig(tuple(sigmas), tuple(rates), best, enabled=bool(best_gain > 0))
    report = {"preset": preset, "table_alone": list(alone.values()), "trials": rows,
              "chosen": {"threshold": best, "shifted_gain_db": round(best_gain, 3), "enabled": guard.enabled}}
    return guard, report
