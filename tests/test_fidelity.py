"""PSNR / SSIM against hand-computed values, an independent loop implementation and their properties."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from videocache.eval_vbench.comparison.run_store import decode_json, encode_json
from videocache.eval_vbench.metrics.fidelity import format_db, gaussian_window, psnr, ssim, ssim_maps_mean

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def video(value, frames=2, height=16, width=16) -> np.ndarray:
    return np.full((frames, height, width, 3), value, dtype=np.uint8)


def noisy(base: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        np.clip(base.astype(np.float64) + rng.normal(0, sigma, base.shape), 0, 255).round().astype(np.uint8)
    )


def test_psnr_hand_computed():
    # every pixel off by 1: MSE 1 -> 10 log10(255^2) = 48.1308 dB
    assert psnr(video(0), video(1)) == pytest.approx(20 * math.log10(255), abs=1e-12)
    assert psnr(video(0), video(1)) == pytest.approx(48.1308036, abs=1e-6)
    # one pixel of one channel off by 16 in a 2x16x16x3 video: MSE = 256 / 1536
    a, b = video(100), video(100)
    b[1, 3, 4, 2] = 116
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (256 / 1536)), abs=1e-9)
    # one MSE over the whole video, not a mean of per-frame PSNRs: frame 0 exact, frame 1 off by 2 -> MSE 2
    c = video(50)
    c[1] = 52
    assert psnr(video(50), c) == pytest.approx(10 * math.log10(255**2 / 2), abs=1e-9)


def test_identical_videos_give_inf_and_one():
    v = noisy(video(128), 40)
    assert psnr(v, v) == math.inf
    assert ssim(v, v) == 1.0
    assert format_db(psnr(v, v)) == "inf"
    assert format_db(31.2345) == "31.23" and format_db(None) == "-"


def test_symmetric_and_noise_lowers_both():
    base = noisy(video(128, frames=3, height=24, width=20), 30, seed=1)
    slightly, very = noisy(base, 3, seed=2), noisy(base, 25, seed=3)
    assert psnr(base, slightly) == psnr(slightly, base)
    assert ssim(base, slightly) == pytest.approx(ssim(slightly, base), abs=1e-12)
    assert math.inf > psnr(base, slightly) > psnr(base, very)
    assert 1.0 > ssim(base, slightly) > ssim(base, very)


def test_ssim_of_constant_frames_is_the_luminance_term():
    # sigma = 0 everywhere, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    want = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)
    assert ssim(video(100), video(110)) == pytest.approx(want, abs=1e-9)


def test_ssim_averages_frames_and_channels():
    a = video(100, frames=2)
    b = a.copy()
    b[1, ..., 0] = 110  # frame 1, channel 0 only
    term = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)
    per = ssim_maps_mean(a, b)
    assert per.shape == (2, 3)
    assert per[1, 0] == pytest.approx(term, abs=1e-9)
    assert ssim(a, b) == pytest.approx((5 + term) / 6, abs=1e-9)


def naive_ssim_plane(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. with explicit loops over every window position that fits inside the plane."""
    g = gaussian_window().numpy()
    w = np.outer(g, g)
    k = w.shape[0]
    vals = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            px, py = x[i : i + k, j : j + k], y[i : i + k, j : j + k]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2)))
    return float(np.mean(vals))


def test_ssim_matches_a_loop_implementation():
    a = noisy(video(120, frames=2, height=14, width=13), 45, seed=4)
    b = noisy(a, 20, seed=5)
    want = np.mean(
        [
            naive_ssim_plane(a[f, ..., c].astype(np.float64), b[f, ..., c].astype(np.float64))
            for f in range(2)
            for c in range(3)
        ]
    )
    assert ssim(a, b) == pytest.approx(want, abs=1e-10)


def test_gaussian_window():
    g = gaussian_window()
    assert g.numel() == 11 and float(g.sum()) == pytest.approx(1.0)
    assert float(g[5]) == pytest.approx(1 / sum(math.exp(-(i * i) / 4.5) for i in range(-5, 6)))


@pytest.mark.parametrize(
    "a, b, message",
    [
        (video(0), video(0, frames=3), "differ in shape"),
        (video(0).astype(np.float32), video(0), "must be uint8"),
        (
            np.zeros((2, 16, 16), np.uint8),
            np.zeros((2, 16, 16), np.uint8),
            "shape (frames, height, width, 3)",
        ),
    ],
)
def test_bad_input_is_one_line(a, b, message):
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            fn(a, b)
        assert "\n" not in str(info.value)


def test_ssim_needs_the_window_to_fit():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(video(0, height=10, width=32), video(0, height=10, width=32))


def test_inf_survives_json_as_the_string_inf():
    record = {"psnr": math.inf, "psnr_min": 30.5, "prompt": "inf", "rows": [{"psnr": math.inf}]}
    text = json.dumps(encode_json(record))
    assert '"psnr": "inf"' in text and "Infinity" not in text
    back = decode_json(json.loads(text))
    assert back["psnr"] == math.inf and back["rows"][0]["psnr"] == math.inf
    assert back["prompt"] == "inf"  # only metric fields are decoded
