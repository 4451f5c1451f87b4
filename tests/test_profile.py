"""Profiles: schema validation, one-line errors, shipped profiles and their measured compute budgets."""

from __future__ import annotations

import pytest
import torch
import yaml

import videocache as vc
from videocache.profile import PROFILES_DIR, ProfileError

SHIPPED = ("reference-wan", "reference-hunyuan", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "hunyuanvideo", "opensora-1.2")
CALIBRATED = ("reference-wan", "reference-hunyuan")  # made by `videocache profile`; the real-model profiles await real weights
PROMPT = "a red circle moving left on a black background"


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert isinstance(excinfo.value, ValueError)
    return msg


def write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def reference_dict() -> dict:
    return yaml.safe_load((PROFILES_DIR / "reference-wan.yaml").read_text())


def run(pipe, steps: int):
    return pipe(
        prompt=PROMPT,
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=5.0,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_round_trip(name, tmp_path):
    prof = vc.load_profile(name)
    assert prof.name == name and prof.calibrated is (name in CALIBRATED)
    assert set(prof.presets) >= {"slow", "fast"}
    architecture = {"hunyuan": "HunyuanVideoTransformer3DModel", "opensora": "STDiT3Model"}
    assert prof.model.architecture == next((a for k, a in architecture.items() if k in name), "WanTransformer3DModel")
    again = vc.load_profile(prof.save(tmp_path / f"{name}.yaml"))
    assert again.to_dict() == prof.to_dict()
    assert vc.load_profile(PROFILES_DIR / f"{name}.yaml").to_dict() == prof.to_dict()  # a path works too


def test_block_counts_of_real_wan_profiles():
    assert vc.load_profile("wan2.1-t2v-1.3b").model.num_blocks == 30
    assert vc.load_profile("wan2.1-t2v-14b").model.num_blocks == 40
    assert "FEB-Cache" in vc.load_profile("wan2.1-t2v-14b").metadata["source"]


def test_unknown_name_lists_available():
    msg = one_line(pytest.raises(ProfileError, vc.load_profile, "no-such-profile"))
    assert "reference-wan" in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "schema_version: 1\nname: [unclosed\n")
    msg = one_line(pytest.raises(ProfileError, vc.load_profile, path))
    assert str(path) in msg and "not valid YAML" in msg and "line" in msg


RULE = {"stage": "early", "components": ["mlp"], "blocks": "all", "interval": 2}  # a valid rule to break


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d.update(bogus=1), "unknown key 'bogus'"),
        (lambda d: d["presets"]["fast"].update(rules=[{**RULE, "interval": 0}]), "presets.fast: rules[0]: interval must be"),
        (lambda d: d["presets"]["slow"].update(rules=[{**RULE, "stage": "middle"}]), "stage must be one of"),
        (lambda d: d["presets"]["slow"].update(rules=[{**RULE, "blocks": "3-99"}]), "block 99 does not exist"),
        (lambda d: d["presets"]["slow"].update(rules=[{**RULE, "components": ["mlp", "norm"]}]), "unknown component 'norm'"),
        (lambda d: d.update(default_preset="turbo"), "default_preset 'turbo' is not one of"),
        (lambda d: d["model"].pop("num_blocks"), "missing required key 'num_blocks'"),
        (lambda d: d["exposure_bias"].update(sign=2), "broken.yaml: exposure_bias.sign must be"),
        (lambda d: d.update(schema_version=2), "schema_version must be 1"),
        (lambda d: d["presets"]["slow"].update(explicit={"mlp": {"all": [30]}}), "lists step 30"),
        (lambda d: d["presets"]["slow"].update(forecast_gain=0), "presets.slow: forecast_gain must be a number in (0, 1]"),
    ],
)
def test_schema_errors_are_one_line_with_file(tmp_path, mutate, expect):
    data = reference_dict()
    mutate(data)
    path = write(tmp_path, yaml.safe_dump(data), "broken.yaml")
    msg = one_line(pytest.raises(ProfileError, vc.load_profile, path))
    assert msg.startswith(str(path)), msg
    assert expect in msg, msg


def test_unknown_preset_lists_valid_ones():
    prof = vc.load_profile("reference-wan")
    msg = one_line(pytest.raises(ProfileError, prof.preset, "turbo"))
    assert "slow" in msg and "fast" in msg
    assert prof.preset().name == prof.default_preset


def test_wrong_architecture(pipe):
    prof = vc.load_profile("reference-wan")
    msg = one_line(
        pytest.raises(
            ProfileError, prof.check_model, {"architecture": "WanTransformer3DModel", "num_blocks": 30}
        )
    )
    assert msg.startswith("profile reference-wan is for WanTransformer3DModel with 8 blocks; this model is")
    assert "30 blocks" in msg and "wan2.1-t2v-1.3b" in msg  # suggests the shipped profile that fits
    msg = one_line(pytest.raises(ProfileError, vc.apply, pipe, "wan2.1-t2v-14b"))
    assert (
        "is for WanTransformer3DModel with 40 blocks; this model is WanTransformer3DModel with 8 blocks"
        in msg
    )
    assert vc.get_engine(pipe) is None  # nothing half-applied
    with pytest.raises(ValueError, match="no model family for Linear"):
        vc.apply_to_transformer(torch.nn.Linear(2, 2), None, "reference-wan")


def test_step_count_outside_profile(pipe):
    prof = vc.load_profile("reference-wan")
    msg = one_line(pytest.raises(ProfileError, prof.check_steps, 5))
    assert msg.startswith("profile reference-wan covers 10-100 steps; got 5")
    vc.apply(pipe, "reference-wan", "fast")
    try:
        msg = one_line(pytest.raises(ProfileError, run, pipe, 5))
        assert "covers 10-100 steps; got 5" in msg
    finally:
        vc.remove(pipe)
    msg = one_line(pytest.raises(ProfileError, vc.apply, pipe, "reference-wan", num_inference_steps=200))
    assert "covers 10-100 steps; got 200" in msg and vc.get_engine(pipe) is None  # caught at apply time
    engine = vc.apply(pipe, "reference-wan", "slow", num_inference_steps=50)
    assert engine.preset_name == "slow" and engine.table is None  # built at the run's first step
    vc.remove(pipe)
    data = reference_dict()
    data["step_rule"] = {"mode": "exact"}
    exact = vc.Profile.from_dict(data, source="exact.yaml")
    msg = one_line(pytest.raises(ProfileError, exact.check_steps, 30))
    assert "exactly 25 steps" in msg


@pytest.mark.parametrize("preset, limit", [("slow", 0.7), ("fast", 0.5)])
def test_reference_presets_meet_measured_budgets(pipe, preset, limit):
    """Measured (modules actually executed) on the tiny reference transformer, 25 steps with CFG."""
    engine = vc.apply(pipe, "reference-wan", preset)
    try:
        run(pipe, 25)
        stats = engine.stats()
    finally:
        vc.remove(pipe)
    assert stats["calls"]["transformer"] == 50
    assert stats["computed_fraction"] <= limit, stats
    assert stats["computed_fraction"] >= limit - 0.3, stats  # still computing a sensible share
    assert stats["cache_current_bytes"] == 0


@pytest.mark.parametrize("name", ["reference-wan", "reference-hunyuan", "reference-opensora", "wan2.1-t2v-1.3b",
                                  "wan2.1-t2v-14b", "hunyuanvideo", "opensora-1.2"])
def test_presets_keep_their_computed_fraction_at_every_step_count_they_accept(name):
    """A preset's table computes the same share of cells at every step count its step_rule accepts as at the
    profile's own: within 0.02 for the presets made of explicit step lists (slow / balanced / fast: resampled,
    a partial step where the count is not whole); rule presets (feb: FEB-Cache's every-other-step rule per
    stage) keep their intervals, and a stage's first step always computes, so at few steps they compute up to
    one step more per stage: within 0.04 (measured: 0.019 for Wan and HunyuanVideo, 0.036 for Open-Sora at
    15 steps). A preset's variants (its calibrations at other guidance scales or step counts) keep the same
    fraction, within the same bounds."""
    import numpy as np

    profile = vc.load_profile(name)
    layout = profile.model.layout
    lo, hi = profile.step_rule.min_steps or 1, profile.step_rule.max_steps or 4 * profile.steps

    def fraction(spec, n):
        table = vc.build_table(spec, list(np.linspace(1.0, 0.03, n)), profile.model.num_blocks, layout)
        return float((np.asarray(table.actions)[:, layout.present] == 0).mean())

    for preset in profile.presets:
        base = profile.preset(preset)
        own, bound = fraction(base, profile.steps), 0.04 if base.rules else 0.02
        for spec in (base, *(v for _, v in base.variants)):  # and its calibrations at other settings (variants)
            off = {n: round(f, 3) for n in range(lo, hi + 1) if abs((f := fraction(spec, n)) - own) > bound}
            assert not off, (preset, spec.reference_steps, own, off)


def test_a_rule_preset_written_out_is_the_same_table_and_keeps_its_fraction_at_other_step_counts():
    """Calibration writes rule presets out as explicit step lists (`written_out`): the same table at the
    calibration's step count, and resampled (not re-ruled) elsewhere, so the computed share holds."""
    import numpy as np

    from videocache.profile.compile import written_out

    raw = {"schema_version": 1, "name": "rules", "model": {"architecture": "WanTransformer3DModel", "num_blocks": 4},
           "steps": 25, "presets": {"p": {"warmup_steps": 5, "rules": [
               {"stage": "early", "components": ["self_attn", "cross_attn"], "blocks": "all", "interval": 3},
               {"stage": "late", "components": ["mlp"], "blocks": "0-1", "interval": 3, "mode": "forecast"}]}}}
    profile = vc.Profile.from_dict(raw)
    layout = profile.model.layout

    def sigmas(n):
        return list(np.linspace(1.0, 0.03, n))

    def share(spec, n):
        return float((vc.build_table(spec, sigmas(n), 4, layout).actions[:, layout.present] == 0).mean())

    rules = profile.preset("p")
    out = written_out(rules, sigmas(25), layout, profile.exposure_bias)
    assert out["rules"] == [] and out["warmup_steps"] == 0 and set(out["explicit_forecast"]["mlp"]) == {0, 1}
    explicit = vc.Profile.from_dict({**raw, "presets": {"p": out}}).preset("p")
    assert np.array_equal(vc.build_table(rules, sigmas(25), 4, layout).actions,
                          vc.build_table(explicit, sigmas(25), 4, layout).actions)
    own = share(rules, 25)
    assert max(abs(share(explicit, n) - own) for n in range(10, 60)) <= 0.02
    assert max(abs(share(rules, n) - own) for n in range(10, 60)) > 0.03  # what the rules alone do


def test_the_forecast_gain_follows_the_step_count():
    """A gain calibrated at one step count is carried to another by the local quadratic model
    (`videocache.forecast.gain_at`): exact for y = b t + c t^2 forecast one step ahead, whatever the step size;
    fewer steps damp more, more steps less; gain 1 stays 1. Tables built at another step count carry it."""
    from videocache.forecast import MIN_GAIN, gain_at
    from videocache.profile.compile import build_table
    from videocache.profile.schema import preset_from_dict

    def exact(b: float, c: float, h: float) -> float:  # the g with y(0) + g (y(0) - y(-h)) = y(h)
        y = lambda t: b * t + c * t * t  # noqa: E731
        return (y(h) - y(0)) / (y(0) - y(-h))

    assert gain_at(exact(1.0, -0.2, 1.0), 0.5) == pytest.approx(exact(1.0, -0.2, 2.0))
    assert gain_at(exact(1.0, -0.2, 1.0), 2.0) == pytest.approx(exact(1.0, -0.2, 0.5))
    assert gain_at(1.0, 0.6) == 1.0 and gain_at(0.4, 1.0) == 0.4 and gain_at(0.2, 0.5) == MIN_GAIN
    rule = {"stage": "all", "components": list(vc.COMPONENTS), "interval": 2, "mode": "forecast"}
    preset = preset_from_dict("p", {"warmup_steps": 2, "rules": [rule], "forecast_gain": 0.4}, steps=25)
    for steps in (15, 25, 50):
        table = build_table(preset, [1 - s / steps for s in range(steps)], 2)
        assert table.forecast_gain == pytest.approx(gain_at(0.4, steps / 25))
