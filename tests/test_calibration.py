"""Budgeted calibration: Gram statistics, predicted vs measured computed fraction, the `profile` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import videocache as vc
from videocache.calibrate import GramRecorder, SearchOptions, TableSearch, step_proxy_errors
from videocache.cli import main
from videocache.eval_vbench.calibration.runs import CalibrationSettings, measure, record

SETTINGS = CalibrationSettings(steps=6, frames=5, height=32, width=32, guidance_scale=5.0)
PROMPTS = ["a red circle moving left on a black background", "a blue square moving up on a white background"]


@pytest.fixture(scope="module")
def recording(pipe):
    return record(pipe, PROMPTS, SETTINGS, progress=False)


def test_gram_recorder_is_exact():
    rec = GramRecorder(num_steps=3, num_blocks=1, band=1)
    outs = [torch.randn(2, 4) for _ in range(3)]
    for ctx in ("cond", "uncond"):
        for step, out in enumerate(outs):
            rec(ctx, step, 0, "mlp", out)
    c = vc.COMPONENTS.index("mlp")
    flat = torch.stack([o.reshape(-1) for o in outs]).double()
    expected = 2 * (flat @ flat.T).numpy()  # summed over the two contexts
    band = np.abs(np.subtract.outer(range(3), range(3))) <= 1
    np.testing.assert_allclose(rec.gram[0, c][band], expected[band], rtol=1e-12)
    assert rec.gram[0, c, 0, 2] == 0.0  # outside the band: not recorded


def test_reuse_error_from_gram_matches_the_tensors(recording):
    search = TableSearch(recording.grams, recording.flops, recording.sigmas)
    err = search.cell_error(1, 0, 3, (2,), (1.0,))
    assert err.shape == (len(PROMPTS),) and (err > 0).all()
    proxy = step_proxy_errors(recording.grams)
    assert proxy.shape == (len(PROMPTS), SETTINGS.steps, len(vc.COMPONENTS)) and (proxy[:, 0] == 0).all()
    assert (proxy[:, 1:] > 0).all()


@pytest.mark.parametrize(
    "opts",
    [
        SearchOptions(warmup_steps=(1, 2), final_steps=(0, 1), intervals=(1, 2, 3), forecast=True),
        # ProfilingDiT block runs: whole blocks skipped as one delta, counted in the predicted fraction
        SearchOptions(warmup_steps=(1,), final_steps=(0,), intervals=(1, 2),
                      block_runs={"blocks": [5, 6, 7], "t_max": 3, "t_min": 2}),
    ],
    ids=["forecast", "block-runs"],
)
def test_predicted_fraction_is_what_the_engine_measures(pipe, recording, opts):
    search = TableSearch(recording.grams, recording.flops, recording.sigmas)
    [best] = search.best_within(0.6, opts, keep=1, slack=0.3)
    assert best.predicted_fraction <= 0.6
    profile = vc.Profile.from_dict(
        {
            "schema_version": 1,
            "name": "t",
            "model": {"architecture": "WanTransformer3DModel", "num_blocks": 8,
                      "components": list(vc.COMPONENTS)},
            "steps": SETTINGS.steps,
            "presets": {"p": best.preset},
        }
    )
    measured = measure(pipe, profile, "p", PROMPTS[:1], recording.references[:1], SETTINGS)
    assert measured["computed_fraction"] == pytest.approx(best.predicted_fraction, abs=1e-4)
    assert 10 < measured["psnr"] < 99


def test_correction_factors_go_into_the_preset(recording):
    search = TableSearch(recording.grams, recording.flops, recording.sigmas)
    preset = {"warmup_steps": 1, "final_steps": 0, "rules": [{"stage": "all", "components": ["mlp"], "interval": 2}]}
    plain = search.evaluate(preset)
    corrected = search.evaluate(preset, correction=True)
    assert "correction" not in plain.preset and set(corrected.preset["correction"]) == {"mlp"}
    assert corrected.predicted_error <= plain.predicted_error + 1e-12  # least-squares scale never hurts


def test_unreachable_budget_is_a_clear_error(recording):
    search = TableSearch(recording.grams, recording.flops, recording.sigmas)
    with pytest.raises(ValueError, match="no candidate has a computed fraction"):
        search.best_within(0.01, SearchOptions(intervals=(1, 2)))


def test_exposure_bias_stage_without_an_earlier_table_is_skipped(recording):
    """+eb adds scaling to the best table so far; when no earlier stage met the budget it is skipped with
    a logged reason (a ValueError, as for a rule stage that cannot meet it), not a TypeError."""
    from videocache.eval_vbench.calibration.runs import _stage_trials

    search = TableSearch(recording.grams, recording.flops, recording.sigmas)
    with pytest.raises(ValueError, match="no earlier stage met the budget"):
        _stage_trials("+eb", SearchOptions(), search, 0.3, None, None, 3)


def test_profile_command_writes_a_loadable_profile(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "tiny.yaml"
    code = main(["profile", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--budget", "0.75",
                 "--budget", "0.6", "--preset-names", "slow", "fast", "--out", str(out), "--steps", "10",
                 "--no-progress", "--no-guard"])
    assert code == 0
    profile = vc.load_profile(out)
    assert {"slow", "fast", "full"} <= set(profile.presets) and profile.calibrated
    report = json.loads(out.with_suffix(".json").read_text())
    for entry in report["budgets"]:
        assert entry["chosen"]["computed_fraction"] <= entry["budget"] + 1e-9
        assert entry["stages"][0]["stage"] == "static"
    assert "videocache profile" in yaml.safe_load(out.read_text())["metadata"]["made_by"]
    assert "predicted fraction" in capsys.readouterr().out
    assert out.with_suffix(".fgbg.png").is_file() == (profile.fgbg is not None)  # the blocks x steps heatmap

    # the same presets calibrated at guidance 8, added as a guidance variant
    extended = tmp_path / "tiny-g.yaml"
    assert main(["profile", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--add-to", str(out),
                 "--guidance-scale", "8", "--out", str(extended), "--no-progress", "--fgbg-prompts", "0"]) == 0
    profile = vc.load_profile(extended)
    assert [v.guidance_scale for v in profile.variants] == [8.0] and profile.guidance_scale == 5.0
    assert set(profile.variants[0].presets) == {"slow", "fast"}
    assert profile.preset("fast").for_run(7.5) is profile.variants[0].presets["fast"].for_run(None)
    assert extended.with_name("tiny-g.guidance-8.json").is_file()
    # and the slow preset calibrated at 8 steps (the profile's guidance scale), a step-count variant
    assert main(["profile", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--add-to", str(extended),
                 "--steps", "8", "--budget", "0.75", "--preset-names", "slow", "--out", str(extended),
                 "--no-progress", "--fgbg-prompts", "0"]) == 0
    profile = vc.load_profile(extended)
    assert [(v.guidance_scale, v.steps) for v in profile.variants] == [(5.0, 8), (8.0, None)]
    assert profile.preset("slow").for_run(5.0, 8).reference_steps == 8
    assert profile.preset("fast").for_run(5.0, 8) is profile.preset("fast")  # no 8-step fast: its own
    assert extended.with_name("tiny-g.guidance-5-steps-8.json").is_file()
    capsys.readouterr()
    assert main(["profile", "--model", str(tiny_model_dir), "--add-to", str(extended), "--steps", "10",
                 "--out", str(extended)]) == 2
    assert "already calibrated at guidance 5 and 10 steps" in capsys.readouterr().err
    # then the run-time guard alone, written back into it (one threshold to try: the test's time)
    monkeypatch.setattr("videocache.eval_vbench.calibration.guard.THRESHOLDS", (0.2,))
    assert main(["profile", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--guard-only",
                 "--out", str(extended), "--guard-prompts", "1", "--no-progress"]) == 0
    guarded = vc.load_profile(extended)
    assert guarded.guard is not None and len(guarded.guard.sigmas) == 9 and guarded.variants
    report = json.loads(extended.with_name("tiny-g.guard.json").read_text())["guard"]
    assert {r["setting"] for r in report["trials"]} == {"calibration", "guidance 8", "frames 9"}
    assert report["chosen"]["threshold"] == guarded.guard.threshold


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "1.5"], "--budget must be in (0, 1]"),
        (["--budget", "0.5", "--preset-names", "a", "b"], "gives 2 names for 1 presets"),
        (["--budget", "0.5", "--target-psnr", "40", "--preset-names", "a"], "gives 1 names for 2 presets"),
        (["--target-psnr", "0"], "--target-psnr must be a PSNR in dB between 0 and 99"),
        (["--preset-names", "a"], "give --budget"),
        (["--budget", "0.5", "--model", "/no/such/model"], "not found"),
    ],
)
def test_profile_command_bad_input(tmp_path, capsys, argv, message):
    assert main(["profile", *argv, "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_psnr_target_gets_the_lowest_budget_that_reaches_it(pipe):
    """--target-psnr: a bisection over budgets on the compute-step schedule's measured PSNR, then the staged
    search at the budget found; the preset reaches its target and records it, a higher target costs more."""
    from videocache.eval_vbench.calibration.runs import TARGET_RESOLUTION, calibrate

    quiet = dict(fgbg_prompts=0, measure_top=1, log=lambda message: None, progress=False)
    _, report = calibrate(pipe, "b", PROMPTS, [0.5], SETTINGS, **quiet)
    at_half = report["budgets"][0]["chosen"]["psnr"]
    targets = [round(at_half - 2.0, 2), round(at_half + 2.0, 2)]
    profile, report = calibrate(pipe, "t", PROMPTS, [], SETTINGS, targets=targets, **quiet)
    assert set(profile.presets) == {"psnr_" + f"{t:g}".replace(".", "_") for t in targets} | {"full"}
    entries = report["budgets"]
    for target, entry in zip(targets, entries, strict=True):
        budget, probes = entry["budget"], entry["probes"]
        assert entry["target_psnr"] == target and entry["reached"] and entry["chosen"]["psnr"] >= target
        assert all(p["psnr"] < target for p in probes if p["budget"] < budget)
        assert all(p["psnr"] >= target for p in probes if p["budget"] >= budget)
        below = [budget - p["budget"] for p in probes if p["budget"] < budget]
        assert not below or min(below) <= TARGET_RESOLUTION + 1e-9  # no lower budget left untried
        name = "psnr_" + f"{target:g}".replace(".", "_")
        assert profile.metadata["measured_on_calibration_prompts"][name]["target_psnr"] == target
    assert entries[0]["budget"] < entries[1]["budget"]
    assert entries[0]["chosen"]["computed_fraction"] < entries[1]["chosen"]["computed_fraction"]


def test_calibration_counts_its_generations_and_quick_runs_a_fraction_of_them(pipe):
    """Every phase's transformer calls, in generations: the recording is one per prompt, the sensitivity one
    reference and one perturbed run per step and per (component, step); --quick runs the schedule stage only,
    perturbs a few steps and measures candidates on one prompt."""
    from videocache.eval_vbench.calibration.runs import (
        FULL_COMPONENT_FRACTIONS,
        calibrate,
        perturbation_cost,
        quick_plan,
        quick_sensitivity_steps,
    )

    assert quick_sensitivity_steps(25, 10) == [1, 2, 4, 7, 11, 14, 18, 21, 23, 24]
    # a perturbation at step t of 25 replays the steps before t - 1: it costs (26 - t) / 25 generations
    assert perturbation_cost(25, [1, 24]) == pytest.approx(1.0 + 0.08)
    assert quick_plan(25, 4, 3, 3).sensitivity_steps == tuple(range(1, 25))  # every step: 12.96 generations
    fitted = quick_plan(25, 4, 3, 3, max_generations=15)  # 4 recorded + 1 + 3 x 0.4 components + 3 measured
    # the last 3 steps, Chebyshev-spaced ones, and with what is left the cheapest others (none more fits)
    assert fitted.sensitivity_steps == (1, 3, 5, 8, 11, 14, 17, 20, 21, 22, 23, 24)
    assert fitted.generations(4, 3, 3) <= 15 < fitted.generations(4, 3, 3) + perturbation_cost(25, [19])
    # two experts switching at step 8: the switch cannot reuse (never perturbed), the step after it always is
    experts = quick_plan(25, 4, 3, 3, max_generations=16, spans=[(0, 8), (8, 25)])
    assert 8 not in experts.sensitivity_steps and 9 in experts.sensitivity_steps
    left = 16 - experts.generations(4, 3, 3)
    assert 0 <= left < min(perturbation_cost(25, [t]) for t in range(1, 25) if t not in (8, *experts.sensitivity_steps))
    with pytest.raises(ValueError, match="needs at least 11 generations"):
        quick_plan(25, 4, 3, 3, max_generations=10)
    assert len(quick_plan(25, 4, 3, 3, max_generations=11).sensitivity_steps) >= 4

    quiet = dict(fgbg_prompts=0, measure_top=1, log=lambda message: None, progress=False)
    _, full = calibrate(pipe, "full", PROMPTS, [0.6, 0.4], SETTINGS, **quiet)
    _, quick = calibrate(pipe, "quick", PROMPTS, [0.6, 0.4], SETTINGS, quick=True, **quiet)
    steps, components = SETTINGS.steps, 3
    full_counts, quick_counts = full["generations"], quick["generations"]
    assert full_counts["record"] == quick_counts["record"] == len(PROMPTS)
    component_steps = sorted({round(f * (steps - 1)) for f in FULL_COMPONENT_FRACTIONS})
    assert full_counts["sensitivity"] == pytest.approx(
        1 + perturbation_cost(steps, range(1, steps)) + components * perturbation_cost(steps, component_steps), abs=0.1)
    plan = quick_plan(steps, len(PROMPTS), components, 2)
    assert quick_counts["total"] == pytest.approx(plan.generations(len(PROMPTS), components, 2), abs=0.1)
    assert quick_counts["search"] == 2  # one schedule per budget, measured on one prompt
    for counts in (full_counts, quick_counts):
        phases = sum(v for k, v in counts.items() if k in ("fgbg", "record", "sensitivity", "search"))
        assert counts["total"] == pytest.approx(phases)
    assert quick_counts["total"] < full_counts["total"]  # at 6 steps most stages find no candidate: the ratio at
    # 25 steps is benchmarks/quick_calibration's
    assert quick["quick"] and quick["measured_on_prompts"] == 1
    assert all(b["chosen"]["stage"] == "+schedule" and b["chosen"]["computed_fraction"] <= b["budget"] + 1e-9
               for b in quick["budgets"])


def test_quick_reuses_another_calibrations_sensitivities(pipe, tmp_path, capsys):
    """--sensitivity-from: a base model's measured sensitivities (resampled to the run's steps) instead of any
    perturbation run; a report for other components, or none, is a one-line error."""
    from videocache.eval_vbench.calibration.runs import calibrate, reused_sensitivities

    report = {"step_sensitivity": [3.0, 1.0, 2.0], "component_sensitivity": {"self_attn": 1.0, "cross_attn": 2.0,
                                                                             "mlp": 0.5}}
    steps, comps = reused_sensitivities(report, 5, ["self_attn", "cross_attn", "mlp"], "base")
    assert np.allclose(steps * 1.625, [3.0, 2.0, 1.0, 1.5, 2.0])  # 3, 2, 1, 1.5, 2 over its mean on steps 1-4
    assert comps.tolist() == [1.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="no sensitivities for the components attn, ff"):
        reused_sensitivities(report, 5, ["attn", "ff"], "base")
    quiet = dict(fgbg_prompts=0, log=lambda message: None, progress=False)
    _, reused = calibrate(pipe, "reused", PROMPTS, [0.6], SETTINGS, sensitivity_report=("base", report), **quiet)
    assert reused["generations"]["sensitivity"] == 0 and reused["generations"]["total"] == len(PROMPTS) + 1
    assert main(["profile", "--sensitivity-from", str(tmp_path / "none.yaml"), "--budget", "0.5",
                 "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sensitivity-from" in err and "no calibration report" in err


def test_correction_factors_survive_a_json_round_trip():
    from videocache.profile import preset_from_dict

    raw = {"warmup_steps": 1, "rules": [{"stage": "all", "components": ["mlp"], "interval": 2}],
           "correction": {"mlp": {"0-3": {3: 1.02, 5: 0.99}}}}
    spec = preset_from_dict("p", json.loads(json.dumps(raw)), steps=8)  # JSON turns the step keys into strings
    assert spec.correction == {"mlp": {"0-3": {3: 1.02, 5: 0.99}}}
    with pytest.raises(vc.ProfileError, match=r"factors in \(0, 4\)"):
        preset_from_dict("p", {**raw, "correction": {"mlp": {0: {3: 9.0}}}}, steps=8)


def test_perturbation_runs_replay_the_reference_prefix_bit_for_bit(pipe):
    """A perturbation run hands back the reference generation's outputs up to the step before the one it
    perturbs instead of running them: the final latent is the one a run computing every step gives."""
    from videocache.eval_vbench.calibration.replay import PrefixReplay
    from videocache.eval_vbench.calibration.runs import (
        GenerationCount,
        _latent,
        _perturbed_error,
        model_layout,
    )

    layout = model_layout(pipe)
    replay = PrefixReplay(pipe, SETTINGS.steps)
    with torch.no_grad():
        with replay.recording():
            reference = _latent(pipe, PROMPTS[0], SETTINGS)
        assert replay.calls_per_step == 2  # the two CFG branches
        cells = np.zeros((SETTINGS.steps, layout.num_blocks, layout.width), dtype=bool)
        cells[4] = layout.present
        count = GenerationCount(pipe)
        try:
            replayed = _perturbed_error(pipe, PROMPTS[0], SETTINGS, reference, cells, replay)
            count.discount(replay.replayed)
            calls = count.calls
            computed = _perturbed_error(pipe, PROMPTS[0], SETTINGS, reference, cells, PrefixReplay(pipe, SETTINGS.steps))
        finally:
            count.close()
    assert replayed == computed > 0  # bit-identical
    assert replay.replayed == 3 * 2 and calls == (SETTINGS.steps - 3) * 2  # steps 0-2 replayed, 3-5 computed
    assert "PrefixReplay" not in getattr(pipe.transformer.forward, "__qualname__", "")  # no replayer left behind
