"""The Wan2.1 T2V profiles' presets save what they promise, counted from the modules that ran.

Tiny random WanTransformer3DModels with the real block counts (30 for 1.3B, 40 for 14B) match the
profiles' fingerprints; the denoising calls run with Wan's diffusers scheduler (UniPC, flow sigmas, the
released checkpoints' flow_shift), so each preset expands on Wan's own sigmas at 25, 50 and 100 steps. The
measurement is the one `videocache.pipelines.wan.presets` reports (each model's `measure`).
"""

from __future__ import annotations

import pytest

import videocache as vc
from videocache.pipelines.stand_in_presets import profile_path
from videocache.pipelines.wan.presets import MODELS

STEPS = (25, 50, 100)
# the most each preset may compute: the targets at 50 steps, a little slack at 25 and 100
LIMITS = {"slow": {25: 0.65, 50: 0.61, 100: 0.65}, "balanced": {25: 0.55, 50: 0.5, 100: 0.55},
          "fast": {25: 0.4, 50: 0.35, 100: 0.4}}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.usefixtures("one_thread")
def test_presets_meet_their_compute_budgets(model):
    fractions = MODELS[model].measure(list(LIMITS))
    print(f"\n{model} computed fraction at {'/'.join(map(str, STEPS))} steps:")
    for preset, by_steps in fractions.items():
        print(f"  {preset:9s} " + "  ".join(f"{by_steps[n]:.3f}" for n in STEPS))
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            got = fractions[preset][n]
            assert got <= limit + 1e-9, (preset, n, got)
            assert got >= limit - 0.1, (preset, n, got)  # saves what it should, not more than that
        assert max(fractions[preset].values()) - min(fractions[preset].values()) <= 0.04, preset


@pytest.mark.parametrize("model", MODELS)
def test_profiles_say_they_are_not_calibrated(model):
    text = profile_path(model).read_text()
    assert "NOT CALIBRATED" in text.splitlines()[1]
    profile = vc.load_profile(profile_path(model))
    assert profile.calibrated is False and profile.metadata["calibrated_on_real_weights"] is False
    assert profile.default_preset == "slow"
    assert set(profile.presets) == {"slow", "balanced", "fast", "feb", "full"}
    assert f"videocache profile --model Wan-AI/{'Wan2.1-T2V-1.3B' if '1.3b' in model else 'Wan2.1-T2V-14B'}" in (
        profile.metadata["calibrate_with_weights"]
    )
    assert "MagCache" in profile.metadata["source"] and "FEB-Cache" in profile.metadata["source"]


@pytest.mark.usefixtures("one_thread")
def test_wan22_stand_ins_compute_what_their_report_says_and_fit_the_experts():
    """The Wan2.2 stand-ins (pipelines/wan/presets_wan22.py): A14B profiles hold a table per expert with the
    model's boundary, TI2V-5B's fits its 30 blocks; counted again at the default step counts, each preset computes
    what benchmarks/wan22_presets.json reports, and the profiles say they are not calibrated."""
    import json

    from videocache.pipelines.stand_in_presets import ROOT
    from videocache.pipelines.wan.presets_wan22 import MODELS as WAN22
    from videocache.pipelines.wan.presets_wan22 import fractions

    reported = json.loads((ROOT / "benchmarks" / "wan22_presets.json").read_text())["models"]
    for m in WAN22:
        profile = vc.load_profile(m.name)
        assert "NOT CALIBRATED" in profile_path(m.name).read_text()
        if m.boundary_ratio is None:
            assert isinstance(profile, vc.Profile) and profile.model.num_blocks == m.blocks
        else:
            assert isinstance(profile, vc.ExpertsProfile) and profile.boundary_ratio == m.boundary_ratio
            assert all(e.model.num_blocks == m.blocks for e in profile.experts.values())
        profile.check_steps(m.steps)
        assert fractions(m) == reported[m.name]["presets"]
