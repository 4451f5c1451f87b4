"""The shipped HunyuanVideo profile (derived, not calibrated): it loads, fits the real 13B config's
fingerprint (a meta-device model: nothing allocated), and its presets save what they promise, from the
expanded tables with the real size's FLOPs and counted by the engine on a tiny random
HunyuanVideoTransformer3DModel with the real block counts (20 dual-stream + 40 single-stream), driven by
the HunyuanVideo pipeline's sigmas (FlowMatchEulerDiscreteScheduler, shift 7.0) at 25, 50 and 100 steps
(the measurement `videocache.pipelines.hunyuan.presets` reports)."""

from __future__ import annotations

import pytest

import videocache as vc
from videocache.pipelines.hunyuan.adapter import HunyuanVideoAdapter
from videocache.pipelines.hunyuan.presets import HUNYUANVIDEO, computed_fractions, real_transformer
from videocache.pipelines.stand_in_presets import profile_path, real_size_fraction

PROFILE = profile_path("hunyuanvideo")
STEPS = (25, 50, 100)
# the most each preset may compute: the budgets at 50 steps, a little slack at 25 and 100 (as for Wan)
LIMITS = {"slow": {25: 0.65, 50: 0.61, 100: 0.65}, "balanced": {25: 0.55, 50: 0.5, 100: 0.55},
          "fast": {25: 0.4, 50: 0.35, 100: 0.4}}


def test_profile_fits_the_real_model_and_says_it_is_not_calibrated():
    text = PROFILE.read_text()
    assert any(line.startswith("# NOT CALIBRATED") for line in text.splitlines()[:3])
    profile = vc.load_profile("hunyuanvideo")
    assert profile.calibrated is False and profile.metadata["calibrated_on_real_weights"] is False
    assert profile.default_preset == "slow" and profile.steps == 50
    assert set(profile.presets) == {"slow", "balanced", "fast", "feb", "full"}
    fingerprint = HunyuanVideoAdapter().fingerprint(real_transformer())
    assert fingerprint["num_blocks"] == 60
    assert profile.model.fingerprint() == fingerprint
    profile.check_model(fingerprint)  # raises if it did not fit
    assert "videocache profile --model hunyuanvideo-community/HunyuanVideo" in profile.metadata["calibrate_with_weights"]
    assert "MagCache4HunyuanVideo" in profile.metadata["source"] and "FEB-Cache" in profile.metadata["source"]
    feb = profile.preset("feb")
    assert {c for rule in feb.rules for c in rule.components} == {"attn", "ff", "ff_context", "mlp"}


def test_tables_at_the_real_size_meet_the_budgets():
    profile = vc.load_profile("hunyuanvideo")
    fractions = {name: {n: real_size_fraction(HUNYUANVIDEO, profile.preset(name), n) for n in STEPS}
                 for name in profile.presets}
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            assert limit - 0.1 <= fractions[preset][n] <= limit + 1e-9, (preset, n, fractions[preset][n])
        assert max(fractions[preset].values()) - min(fractions[preset].values()) <= 0.04 + 1e-9, preset
    assert fractions["full"] == dict.fromkeys(STEPS, 1.0)
    # FEB-Cache's interval stays 2 at any step count (it was scaled to 1 at 25 steps, caching nothing)
    assert all(0.5 < f < 1.0 for f in fractions["feb"].values()), fractions["feb"]


@pytest.mark.usefixtures("one_thread")
def test_engine_counts_the_budgets_on_a_tiny_model():
    fractions = computed_fractions(list(LIMITS), STEPS)
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            assert limit - 0.1 <= fractions[preset][n] <= limit + 1e-9, (preset, n, fractions[preset][n])
