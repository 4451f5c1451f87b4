"""Pipelines with two experts (Wan2.2 A14B: diffusers' WanPipeline with transformer_2 and boundary_ratio): both
transformers cached by one `videocache.apply`, each on its own steps of a table indexed by the generation's step,
nothing read across the switch, the high-noise expert's outputs freed when it is done, `remove` bit-identical;
experts profiles (one profile per expert) and the one-line errors of a profile that does not fit the pipeline."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import yaml

import videocache as vc
from videocache.table import Action, CacheTable

STEPS, BOUNDARY = 10, 0.875  # the first 3 of 10 steps have t >= 875: the high-noise expert runs them


@pytest.fixture(scope="module")
def pipe():
    from diffusers import WanPipeline

    from videocache.pipelines.reference import build

    base = build.build_pipeline(seed=0)
    low_noise = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in low_noise.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer, transformer_2=low_noise, boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    vc.remove(pipe)


def run(pipe, callback=None, guidance_scale_2=None):
    return pipe("a red circle", num_inference_steps=STEPS, num_frames=9, height=32, width=32, guidance_scale=5.0,
                guidance_scale_2=guidance_scale_2, generator=torch.Generator().manual_seed(0), output_type="np",
                callback_on_step_end=callback).frames[0]


def experts_profile(name: str = "two") -> vc.ExpertsProfile:
    profile = vc.load_profile("reference-wan")
    return vc.ExpertsProfile.of(name, {"transformer": profile, "transformer_2": profile}, BOUNDARY)


def test_both_experts_are_cached_each_on_its_own_steps_and_remove_is_bit_identical(pipe):
    reference = run(pipe)
    engine = vc.apply(pipe, experts_profile(), "balanced")
    assert isinstance(engine, vc.ExpertEngines) and vc.get_engine(pipe) is engine
    high, low = engine.engines["transformer"], engine.engines["transformer_2"]
    held_after_switch = []

    def watch(_pipe, step, _t, kwargs):
        if step >= 2:  # the high-noise expert's steps (0-2) are over
            held_after_switch.append(high.store.device_bytes + high.store.host_bytes)
        return kwargs

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: nothing is read across the switch
        cached = run(pipe, watch)
    stats = engine.stats()
    assert [s["calls"]["transformer"] for s in stats["experts"].values()] == [6, 14]  # CFG: 2 calls a step
    blocks = len(pipe.transformer.blocks)
    for part in stats["experts"].values():  # both experts run fewer block components than uncached
        assert part["calls"]["compute"] < part["calls"]["transformer"] * blocks * 3
        assert part["fallbacks"] == 0
    assert 0 < stats["computed_fraction_by_expert"]["transformer_2"] < 1
    assert stats["calls"]["transformer"] == 20 and stats["fallbacks"] == 0
    total = sum(p["executed_flops"] + p["skipped_flops"] for p in stats["experts"].values())
    assert stats["computed_fraction"] == pytest.approx(sum(p["executed_flops"] for p in stats["experts"].values()) / total)
    assert held_after_switch and set(held_after_switch) == {0}
    # each expert's table: every cell computed at its first step, nothing read from before it
    assert low.table.actions[3].max() == Action.COMPUTE
    assert all(min(cell[1], default=3) >= 3 for row in low.table.cells[3:] for cells in row for cell in cells)
    assert all((cell[2] or 0) <= 2 for row in high.table.cells for cells in row for cell in cells)
    assert not np.array_equal(cached, reference)
    assert {r["expert"] for r in engine.trace()} == {"transformer", "transformer_2"}
    vc.remove(pipe)
    assert vc.get_engine(pipe) is None and vc.get_engine(pipe.transformer_2) is None
    assert np.array_equal(run(pipe), reference)


def test_each_expert_picks_the_calibration_made_nearest_its_own_guidance_scale(pipe):
    """guidance_scale_2 is the low-noise expert's: at 8 it runs reference-wan's guidance-8 variant while the
    high-noise expert keeps the guidance-5 calibration."""
    from videocache.profile import build_table

    engine = vc.apply(pipe, experts_profile(), "balanced")
    try:
        run(pipe, guidance_scale_2=8.0)
        tables = {a: e.table for a, e in engine.engines.items()}
        sigmas = vc.get_adapter(pipe.transformer).scheduler_sigmas(pipe.scheduler, STEPS)
        preset = vc.load_profile("reference-wan").preset("balanced")
        at = {g: build_table(preset.for_run(g, STEPS), sigmas, len(pipe.transformer.blocks)) for g in (5.0, 8.0)}
        assert np.array_equal(tables["transformer"].actions, at[5.0].within(0, 3).actions)
        assert np.array_equal(tables["transformer_2"].actions, at[8.0].within(3, STEPS).actions)
        assert not np.array_equal(at[5.0].within(3, STEPS).actions, at[8.0].within(3, STEPS).actions)
    finally:
        vc.remove(pipe)


def test_a_profile_that_does_not_fit_the_experts_is_a_one_line_error_at_apply(pipe):
    with pytest.raises(vc.ProfileError, match=r"has one table; this pipeline has experts transformer, transformer_2") as e:
        vc.apply(pipe, "reference-wan", "fast")
    assert "\n" not in str(e.value)
    profile = experts_profile()
    lacking = vc.ExpertsProfile.of("renamed", {"transformer": profile.experts["transformer"],
                                               "transformer_3": profile.experts["transformer_2"]})
    with pytest.raises(vc.ProfileError, match="no table for transformer_2"):
        vc.apply(pipe, lacking, "fast")
    with pytest.raises(ValueError, match=r"table= names experts transformer; this pipeline has transformer, transformer_2"):
        vc.apply(pipe, table={"transformer": CacheTable.full_compute(STEPS, 8)})
    with pytest.raises(vc.ProfileError, match="apply it to the pipeline"):
        vc.apply_to_transformer(pipe.transformer_2, lambda: pipe.scheduler, profile, "fast")
    for t in (pipe, pipe.transformer, pipe.transformer_2):  # nothing left behind by a refused apply
        assert vc.get_engine(t) is None
    for t in (pipe.transformer, pipe.transformer_2):
        assert not [n for m in t.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                    if n.startswith("videocache")]


def test_an_experts_profile_on_a_one_transformer_pipeline_is_an_error():
    from videocache.pipelines.reference import build

    single = build.build_pipeline(seed=0)
    with pytest.raises(vc.ProfileError, match="runs transformer: use a profile made for it"):
        vc.apply(single, experts_profile(), "fast")


def test_experts_profiles_round_trip_and_refuse_experts_that_do_not_share_a_run(tmp_path):
    profile = experts_profile()
    path = profile.save(tmp_path / "two.yaml")
    loaded = vc.load_profile(path)
    assert isinstance(loaded, vc.ExpertsProfile) and loaded.to_dict() == profile.to_dict()
    assert loaded.steps == 25 and loaded.boundary_ratio == BOUNDARY and list(loaded.presets) == list(
        vc.load_profile("reference-wan").presets)
    loaded.preset("fast").check_steps(40)
    data = yaml.safe_load(path.read_text())
    assert "schema_version" not in data["experts"]["transformer"] and "name" not in data["experts"]["transformer"]
    bad = copy.deepcopy(data)
    bad["experts"]["transformer_2"]["steps"] = 30
    bad["experts"]["transformer_2"].pop("variants")
    with pytest.raises(vc.ProfileError, match=r"experts.transformer_2: steps \(30\) differ"):
        vc.ExpertsProfile.from_dict(bad, "two.yaml")
    bad = copy.deepcopy(data)
    del bad["experts"]["transformer_2"]["presets"]["fast"]
    bad["experts"]["transformer_2"].pop("variants")
    with pytest.raises(vc.ProfileError, match="experts.transformer_2: presets .* differ"):
        vc.ExpertsProfile.from_dict(bad, "two.yaml")
    bad = copy.deepcopy(data)
    bad["boundary_ratio"] = 1.5
    with pytest.raises(vc.ProfileError, match="boundary_ratio must be a number between 0 and 1"):
        vc.ExpertsProfile.from_dict(bad, "two.yaml")
    bad = copy.deepcopy(data)
    del bad["experts"]["transformer_2"]
    with pytest.raises(vc.ProfileError, match="name two or more"):
        vc.ExpertsProfile.from_dict(bad, "two.yaml")


def test_a_table_within_a_span_computes_at_its_start_and_reads_nothing_outside_it():
    f, r, c = Action.FORECAST, Action.REUSE, Action.COMPUTE
    actions = np.array([c, r, c, f, c, f, f, r, c, f], dtype=np.int8)[:, None, None].repeat(3, axis=2)
    table = CacheTable(actions)
    assert table.within(3, 8).actions[:, 0, 0].tolist() == [c, c, c, c, c, f, f, r, c, c]
    part = table.within(4, 8)
    assert part.actions[:, 0, 0].tolist() == [c, c, c, c, c, r, r, r, c, c]  # one compute since 4: forecasts reuse
    assert all(min(cell[1], default=4) >= 4 for row in part.cells[4:8] for cells in row for cell in cells)
    assert all((cell[2] or 0) < 8 for row in part.cells for cells in row for cell in cells)
    assert table.within(0, 10).actions.tolist() == table.actions.tolist()
    assert table.within(10, 10).is_full_compute()
    with pytest.raises(ValueError, match="a step span must lie within 0-10"):
        table.within(4, 11)


def test_calibration_spends_one_budget_across_the_experts_and_predicts_what_they_execute(pipe):
    """`videocache profile`'s calibration on a two-expert pipeline: one search over the generation's steps,
    scored as the experts execute each candidate (the switch step computed, nothing read across it), so every
    stage's predicted computed fraction is what the engines measure; the report gives each expert's share."""
    from videocache.eval_vbench.calibration.runs import CalibrationSettings, calibrate

    settings = CalibrationSettings(steps=8, frames=5, height=32, width=32, guidance_scale=5.0)
    prompts = ["a red circle moving left on a black background", "a blue square moving up on a white background"]
    profile, report = calibrate(pipe, "two", prompts, [0.6], settings, preset_names=["fast"], measure_top=1,
                                log=lambda _: None, progress=False)
    assert isinstance(profile, vc.ExpertsProfile) and list(profile.experts) == ["transformer", "transformer_2"]
    assert profile.boundary_ratio == BOUNDARY and list(profile.presets) == ["fast", "full"]
    for row in report["budgets"][0]["stages"]:
        assert row["computed_fraction"] == pytest.approx(row["predicted_fraction"], abs=1e-3) and row["computed_fraction"] <= 0.6
        assert set(row["computed_fraction_by_expert"]) == {"transformer", "transformer_2"}
    chosen = profile.metadata["measured_on_calibration_prompts"]["fast"]
    assert all(0 < f < 1 for f in chosen["computed_fraction_by_expert"].values())
    engine = vc.apply(pipe, profile, "fast")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe(prompts[0], num_inference_steps=8, num_frames=5, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        assert engine.stats()["computed_fraction"] == pytest.approx(chosen["computed_fraction"], abs=1e-3)
    finally:
        vc.remove(pipe)


def test_quick_calibration_knows_the_switch_step_and_interpolates_within_each_expert(pipe):
    """--quick on two experts: the switch step is never perturbed (an expert's first step cannot reuse, so it
    weighs 0, as the full calibration's perturbation run there measures), quick perturbing every other step
    finds the full calibration's sensitivities, and interpolation does not reach across the switch."""
    from videocache.calibrate import step_proxy_errors
    from videocache.eval_vbench.calibration.replay import PrefixReplay
    from videocache.eval_vbench.calibration.runs import (
        CalibrationSettings,
        calibrate,
        expert_spans,
        model_layout,
        record,
        sensitivity,
    )

    settings = CalibrationSettings(steps=8, frames=5, height=32, width=32, guidance_scale=5.0)
    prompts = ["a red circle moving left on a black background"]
    spans = expert_spans(pipe, settings.steps)
    switch, last = spans[1][0], settings.steps - 1
    quiet = dict(preset_names=["fast"], measure_top=1, log=lambda _: None, progress=False)
    _, full = calibrate(pipe, "full", prompts, [0.6], settings, **quiet)
    _, quick = calibrate(pipe, "quick", prompts, [0.6], settings, quick=True, **quiet)
    assert full["step_sensitivity"][switch] == quick["step_sensitivity"][switch] == 0
    assert quick["step_sensitivity"] == pytest.approx(full["step_sensitivity"], abs=1e-3)
    assert quick["generations"]["sensitivity"] < full["generations"]["sensitivity"]  # no switch run, one component step

    proxy = step_proxy_errors(record(pipe, prompts, settings, progress=False).grams, model_layout(pipe))[0]
    step_w, _ = sensitivity(pipe, prompts[0], settings, proxy, [switch + 1], PrefixReplay(pipe, settings.steps),
                            False, steps=[1, switch - 1, switch + 1, last], spans=spans)
    every = np.asarray(full["step_sensitivity"])
    assert step_w[switch] == 0
    # the low-noise expert's steps: between its own measured steps, not from the high-noise expert's last one
    between = np.interp(range(switch + 1, last + 1), [switch + 1, last], every[[switch + 1, last]])
    assert step_w[switch + 1:] / step_w[switch + 1] == pytest.approx(between / every[switch + 1], rel=1e-3)


def test_peers_run_on_every_expert_and_the_measured_fraction_counts_both(pipe):
    """The comparison's peers: diffusers' MagCache calibrated per expert over its own steps (it counts the calls
    it sees, so one list for the whole run would hand the low-noise expert the first steps' ratios), and the
    measured computed fraction counts the block components of both experts."""
    from videocache.eval_vbench.metrics.flops import ComponentCounter
    from videocache.eval_vbench.peers.diffusers_caches import FBCacheMethod, MagCacheMethod
    from videocache.eval_vbench.peers.spec import MethodSetup

    def generate():
        pipe("a red circle", num_inference_steps=STEPS, num_frames=9, height=32, width=32, output_type="latent",
             generator=torch.Generator().manual_seed(0))

    experts = [pipe.transformer, pipe.transformer_2]
    with ComponentCounter(experts) as uncached:
        generate()
    assert uncached.counts.calls["attn1"] == 2 * STEPS * len(pipe.transformer.blocks)  # CFG: two calls a step
    setup = MethodSetup(num_inference_steps=STEPS, calibrate=generate)
    assert MagCacheMethod.expert_steps(pipe, setup) == [3, 7]
    for method in (FBCacheMethod(0.2), MagCacheMethod(0.24)):
        applied = method.apply(pipe, setup)
        try:
            assert all(t.is_cache_enabled for t in experts)
            with ComponentCounter(experts) as cached:
                generate()
        finally:
            applied.remove()
        assert not any(t.is_cache_enabled for t in experts)
        assert 0 < cached.counts.total_flops < uncached.counts.total_flops
    assert [len(r) for r in setup.store[f"magcache_ratios_{STEPS}_experts"]] == [3, 7]


def test_experts_under_model_cpu_offload_cache_alike_and_free_the_first_expert_at_the_switch(tmp_path):
    """diffusers' enable_model_cpu_offload wraps each expert's forward (accelerate's hooks) and moves it on and off
    the execution device per call; here the execution device is the CPU. The cached output is the one without
    offload (within 1e-5: offloading alone moves the uncached output by 1e-6, the weights landing at other memory
    alignments; the cache moves it by 1e-2), and the high-noise expert holds nothing once the low-noise one runs."""
    from diffusers import WanPipeline

    profile = experts_profile()
    plain = WanPipeline.from_pretrained(_saved(tmp_path))
    offloaded = WanPipeline.from_pretrained(_saved(tmp_path))
    offloaded.enable_model_cpu_offload(device="cpu")
    outputs = []
    for p in (plain, offloaded):
        p.set_progress_bar_config(disable=True)
        engine = vc.apply(p, profile, "fast")
        held = []

        def watch(_pipe, step, _t, kwargs, engine=engine, held=held):
            if step >= 2:
                held.append(engine.engines["transformer"].store.device_bytes)
            return kwargs

        outputs.append(run(p, watch))
        assert set(held) == {0} and all(0 < f < 1 for f in engine.stats()["computed_fraction_by_expert"].values())
        vc.remove(p)
    np.testing.assert_allclose(*outputs, atol=1e-5, rtol=0)


def _saved(tmp_path):
    """The module fixture's two-expert pipeline saved once, so that each test run loads fresh copies."""
    folder = tmp_path / "two"
    if not folder.exists():
        from diffusers import WanPipeline

        from videocache.pipelines.reference import build

        base = build.build_pipeline(seed=0)
        low_noise = copy.deepcopy(base.transformer)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in low_noise.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
                    transformer=base.transformer, transformer_2=low_noise, boundary_ratio=BOUNDARY).save_pretrained(folder)
    return folder


def test_a_profile_made_for_another_switch_warns_in_one_line(pipe):
    """A profile made where the experts switch elsewhere still runs (each expert its own steps of its table), with
    one line saying that the split is not the calibrated one; the boundary it was made for: no warning."""
    import warnings

    profile = experts_profile()
    moved = vc.ExpertsProfile.of("moved", profile.experts, 0.9)
    with pytest.warns(UserWarning, match=r"boundary_ratio 0\.9, this pipeline switches at 0\.875") as caught:
        vc.apply(pipe, moved, "fast")
    vc.remove(pipe)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vc.apply(pipe, profile, "fast")
    vc.remove(pipe)
