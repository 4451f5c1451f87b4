"""The shipped HunyuanVideo profile (derived, not calibrated): it loads, fits the real 13B config's
fingerprint (a meta-device model: nothing allocated), and its presets save what they promise, from the
expanded tables with the real size's FLOPs and counted by the engine on a tiny random
HunyuanVideoTransformer3DModel with the real block counts (20 dual-stream + 40 single-stream), driven by
the HunyuanVideo pipeline's sigmas (FlowMatchEulerDiscreteScheduler, shift 7.0) at 25, 50 and 100 steps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import videocache as vc
from videocache.pipelines.hunyuan.adapter import HunyuanVideoAdapter

from .test_hunyuan_adapter import inputs, tiny_hunyuan
from .test_wan_presets import engine_fractions, one_thread  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.hunyuan_presets import FLOW_SHIFT, HUNYUANVIDEO, real_transformer  # noqa: E402
from benchmarks.stand_in_presets import real_size_fraction  # noqa: E402

PROFILE = ROOT / "profiles" / "hunyuanvideo.yaml"
STEPS = (25, 50, 100)
# the most each preset may compute: the budgets at 50 steps, a little slack at 25 and 100 (as for Wan)
LIMITS = {"slow": {25: 0.65, 50: 0.61, 100: 0.65}, "balanced": {25: 0.55, 50: 0.5, 100: 0.55},
          "fast": {25: 0.4, 50: 0.35, 100: 0.4}}


def hunyuan_scheduler(steps: int) -> FlowMatchEulerDiscreteScheduler:
    """HunyuanVideoPipeline's schedule: linspace(1, 0, N + 1)[:-1] through the shift-7 flow-match scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return scheduler


def computed_fractions(model: str, presets, steps=STEPS) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} measured by the engine on a tiny random 20 + 40-block model
    (run it with one torch thread: see `one_thread`)."""
    assert model == "hunyuanvideo"
    transformer = tiny_hunyuan(dual=20, single=40)
    conditions = {k: v for k, v in inputs().items() if k != "hidden_states"}

    def call(x, t):
        return transformer(hidden_states=x, timestep=t.expand(1), **conditions, return_dict=False)[0]

    x0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return engine_fractions(transformer, PROFILE, presets, steps, hunyuan_scheduler, call, x0)


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
    assert fractions["feb"][25] == 1.0 and 0.5 < fractions["feb"][50] < 1.0


@pytest.mark.usefixtures("one_thread")
def test_engine_counts_the_budgets_on_a_tiny_model():
    fractions = computed_fractions("hunyuanvideo", LIMITS)
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            assert limit - 0.1 <= fractions[preset][n] <= limit + 1e-9, (preset, n, fractions[preset][n])
