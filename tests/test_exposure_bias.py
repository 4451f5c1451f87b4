"""FEB-Cache's exposure-bias schedule and its flow-matching velocity correction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import videocache as vc
from videocache import ExposureBiasConfig, b_schedule, correct_velocity

B_H, B_L, T_THRE = 0.98, 0.96, 0.4


def test_schedule_endpoints_and_shape():
    assert b_schedule(1.0) == pytest.approx(1.0)
    assert b_schedule(T_THRE) == pytest.approx(B_H + (1 - B_H) * math.exp(-5))
    assert b_schedule(0.0) == pytest.approx(B_L + (B_H - B_L) * math.exp(-5 * T_THRE / (1 - T_THRE)))
    ts = np.linspace(0.0, 1.0, 201)
    bs = np.array([b_schedule(t) for t in ts])
    assert np.all(np.diff(bs) >= 0)  # b grows with t: the correction is strongest at low noise
    assert bs.min() > B_L and bs.max() <= 1.0


def test_schedule_is_continuous_at_threshold_up_to_published_jump():
    below, at = b_schedule(T_THRE - 1e-12), b_schedule(T_THRE)
    assert below == pytest.approx(B_H, abs=1e-10)
    jump = (1 - B_H) * math.exp(-5)  # the two published pieces meet only up to this
    assert abs(at - below) == pytest.approx(jump, abs=1e-10)
    assert abs(at - below) < 2e-4
    for eps in (1e-3, 1e-5):  # no other discontinuity nearby
        assert abs(b_schedule(T_THRE + eps) - at) < 10 * eps
        assert abs(b_schedule(T_THRE - eps) - below) < 10 * eps


def test_correction_matches_its_derivation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    s, b = 0.7, 0.97
    x_t = (1 - s) * x0 + s * eps
    v = eps - x0
    x0_hat, eps_hat = x_t - s * v, x_t + (1 - s) * v
    assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(eps_hat, eps, atol=1e-6)
    assert torch.allclose(correct_velocity(v, x_t, s, b), b * eps_hat - x0_hat, atol=1e-6)
    assert torch.equal(correct_velocity(v, x_t, s, 1.0), v)  # b = 1 is the identity, bit-exactly


def test_correction_commutes_with_classifier_free_guidance():
    """v' is affine in v and CFG weights sum to one, so correcting each branch == correcting the guided v."""
    g = torch.Generator().manual_seed(1)
    x_t, v_cond, v_uncond = (torch.randn(1, 16, 2, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for s, scale in ((0.9, 5.0), (0.2, 7.5)):
        b = b_schedule(s)
        guided_then_fixed = correct_velocity(v_uncond + scale * (v_cond - v_uncond), x_t, s, b)
        u, c = correct_velocity(v_uncond, x_t, s, b), correct_velocity(v_cond, x_t, s, b)
        assert torch.allclose(guided_then_fixed, u + scale * (c - u), atol=1e-10)
        assert not torch.allclose(guided_then_fixed, v_uncond + scale * (v_cond - v_uncond))


def test_sign_option_uses_reciprocal():
    cfg = ExposureBiasConfig(enabled=True, sign=-1)
    assert cfg.factor(0.3) == pytest.approx(1 / b_schedule(0.3))
    assert ExposureBiasConfig(enabled=True).factor(0.3) == pytest.approx(b_schedule(0.3))
    with pytest.raises(ValueError, match="sign"):
        ExposureBiasConfig(sign=0)
    with pytest.raises(ValueError, match="b_low <= b_high"):
        ExposureBiasConfig(b_high=0.9, b_low=0.95)


@pytest.fixture(scope="module")
def transformer():
    from videocache.pipelines.reference import build

    torch.manual_seed(0)
    return build.build_transformer().eval()


def test_engine_applies_correction_to_the_transformer_output(transformer):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 16, 64, generator=g)
    t = torch.tensor([700.0])
    sigma = 0.7

    def call():
        with transformer.cache_context("cond", step_index=1, sigma=sigma, num_inference_steps=4):
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    with torch.no_grad():
        raw = call()
        off = vc.apply_to_transformer(
            transformer, None, vc.CacheTable.full_compute(4, 8), exposure_bias=False
        )
        assert torch.equal(call(), raw)  # disabled: untouched, bit-exact
        vc.remove(transformer)
        on = vc.apply_to_transformer(transformer, None, vc.CacheTable.full_compute(4, 8), exposure_bias=True)
        corrected = call()
        vc.remove(transformer)
    assert off.config.exposure_bias.enabled is False and on.config.exposure_bias.enabled is True
    expected = correct_velocity(raw, x, sigma, b_schedule(sigma))
    assert torch.allclose(corrected, expected, atol=1e-6)
    assert not torch.allclose(corrected, raw)


def test_profile_setting_and_apply_override(transformer):
    prof = vc.load_profile("reference-wan")
    assert prof.exposure_bias.enabled is False
    engine = vc.apply_to_transformer(transformer, None, prof, "slow", exposure_bias=True)
    try:
        eb = engine.config.exposure_bias
        assert eb.enabled and (eb.b_high, eb.b_low, eb.t_threshold) == (B_H, B_L, T_THRE)
    finally:
        vc.remove(transformer)
