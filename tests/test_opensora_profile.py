"""The shipped Open-Sora 1.2 profile (derived, not calibrated): it loads, its `model` is the fingerprint the
Open-Sora adapter reports for the released STDiT3-XL/2 (a meta-device model: nothing allocated), so the
profile-vs-model check takes it for that model and refuses it for others; its presets build tables for
every step count of its step rule (15-60), and save what they promise, from the expanded tables with the
real size's FLOPs and counted by the engine on a tiny random STDiT3Model with the real block counts (28
spatial + 28 temporal, interleaved), driven by the pipeline's schedule at 15, 30 and 60 steps (the
measurement `videocache.pipelines.opensora.presets` reports)."""

from __future__ import annotations

import pytest

import videocache as vc
from videocache.pipelines.hunyuan.adapter import HunyuanVideoAdapter
from videocache.pipelines.hunyuan.presets import real_transformer as real_hunyuan
from videocache.pipelines.opensora.adapter import OpenSoraAdapter
from videocache.pipelines.opensora.model.tiny import tiny_transformer
from videocache.pipelines.opensora.presets import (
    OPENSORA,
    computed_fractions,
    opensora_sigmas,
    real_transformer,
)
from videocache.pipelines.stand_in_presets import profile_path, real_size_fraction
from videocache.profile import ProfileError

PROFILE = profile_path("opensora-1.2")
STEPS = (15, 30, 60)
# the most each preset may compute: the budgets at 30 steps, a little slack at 15 and 60
LIMITS = {"slow": {15: 0.75, 30: 0.7, 60: 0.75}, "balanced": {15: 0.55, 30: 0.5, 60: 0.55},
          "fast": {15: 0.45, 30: 0.4, 60: 0.45}}


def real_fingerprint() -> dict:
    return OpenSoraAdapter().fingerprint(real_transformer())


def test_profile_fits_the_real_model_and_says_it_is_not_calibrated():
    text = PROFILE.read_text()
    assert any(line.startswith("# NOT CALIBRATED") for line in text.splitlines()[:3])
    assert "Open-Sora has the fused skip" in text
    profile = vc.load_profile("opensora-1.2")
    assert profile.calibrated is False and profile.metadata["calibrated_on_real_weights"] is False
    assert profile.default_preset == "slow" and profile.steps == 30
    assert set(profile.presets) == {"slow", "balanced", "fast", "feb", "full"}
    fingerprint = real_fingerprint()
    assert fingerprint["num_blocks"] == 56
    assert profile.model.fingerprint() == fingerprint
    profile.check_model(fingerprint)  # raises if it did not fit
    command = profile.metadata["calibrate_with_weights"]
    assert command.startswith("videocache profile --model OPENSORA_FOLDER --prompts prompts.txt --steps 30 ")
    assert "--preset-names slow balanced fast --out opensora-1.2.yaml" in command
    assert "MagCache" in profile.metadata["source"] and "FEB-Cache" in profile.metadata["source"]
    feb = profile.preset("feb")
    assert {c for rule in feb.rules for c in rule.components} == {"spatial_attn", "temporal_attn", "cross_attn", "mlp"}


def test_calibration_command_has_the_cli_flags():
    """The header's command parses with `videocache profile`'s own parser."""
    from videocache.cli import build_parser

    argv = vc.load_profile("opensora-1.2").metadata["calibrate_with_weights"].split()[1:]
    args = build_parser().parse_args(argv)
    assert args.steps == 30 and args.budget == [0.7, 0.5, 0.4] and args.preset_names == ["slow", "balanced", "fast"]
    assert (args.frames, args.height, args.width) == (51, 480, 854)


def test_profile_refuses_other_models():
    profile = vc.load_profile("opensora-1.2")
    with pytest.raises(ProfileError, match="STDiT3Model with 56 blocks"):
        profile.check_model(OpenSoraAdapter().fingerprint(tiny_transformer(depth=2)))
    with pytest.raises(ProfileError, match="STDiT3Model with 56 blocks"):
        profile.check_model(HunyuanVideoAdapter().fingerprint(real_hunyuan()))
    consecutive = real_fingerprint()  # same blocks and components, but the groups one after the other
    consecutive["groups"] = [{k: v for k, v in g.items() if k != "blocks"} for g in consecutive["groups"]]
    with pytest.raises(ProfileError, match="other block groups"):
        profile.check_model(consecutive)
    with pytest.raises(ProfileError):
        vc.load_profile("hunyuanvideo").check_model(real_fingerprint())


def test_every_preset_builds_tables_over_the_step_rule():
    profile = vc.load_profile("opensora-1.2")
    assert (profile.step_rule.min_steps, profile.step_rule.max_steps) == (15, 60)
    layout = profile.model.layout
    for name in profile.presets:
        preset = profile.preset(name)
        for n in range(15, 61):
            preset.check_steps(n)
            table = vc.build_table(preset, opensora_sigmas(n), 56, layout)
            assert table.num_steps == n and table.num_blocks == 56
        for n in (14, 61):
            with pytest.raises(ProfileError):
                preset.check_steps(n)


def test_tables_at_the_real_size_meet_the_budgets():
    profile = vc.load_profile("opensora-1.2")
    fractions = {name: {n: real_size_fraction(OPENSORA, profile.preset(name), n) for n in STEPS}
                 for name in profile.presets}
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            assert limit - 0.1 <= fractions[preset][n] <= limit + 1e-9, (preset, n, fractions[preset][n])
        assert max(fractions[preset].values()) - min(fractions[preset].values()) <= 0.05 + 1e-9, preset
    assert fractions["full"] == dict.fromkeys(STEPS, 1.0)
    # FEB-Cache's interval stays 2 at any step count (it was scaled to 1 at 15 steps, caching nothing)
    assert all(0.5 < f < 1.0 for f in fractions["feb"].values()), fractions["feb"]


@pytest.mark.usefixtures("one_thread")
def test_engine_counts_the_budgets_on_a_tiny_model():
    fractions = computed_fractions(list(LIMITS), STEPS)
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            assert limit - 0.1 <= fractions[preset][n] <= limit + 1e-9, (preset, n, fractions[preset][n])
