"""Fidelity of an accelerated video against the uncached video of the same prompt, seed and settings.

Every cache paper reports PSNR / SSIM against the uncached output next to its speedup; these are our
own implementations so that the numbers do not depend on which image library happens to be installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_SSIM_FRAME_CHUNK = 8  # frames per convolution batch: bounds memory on 480p/81-frame videos


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    for name, video in (("a", a), ("b", b)):
        if video.dtype != np.uint8:
            raise ValueError(f"video {name} must be uint8, got {video.dtype}")
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video {name} must have shape (frames, height, width, 3), got {video.shape}")
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("videos have no frames")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over the whole video (one MSE over all frames, pixels and channels), peak 255.

    Identical videos give float('inf'); reports print it as "inf".
    """
    a, b = _check_pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(PEAK * PEAK / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian (float64); the 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, 1, H, W)."""
    k = g.numel()
    x = torch.nn.functional.conv2d(x, g.view(1, 1, k, 1))
    return torch.nn.functional.conv2d(x, g.view(1, 1, 1, k))


def _planes(v: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F*3, 1, H, W) float64, one plane per frame and channel."""
    f, h, w, c = v.shape
    t = torch.from_numpy(np.ascontiguousarray(v)).to(torch.float64)
    return t.permute(0, 3, 1, 2).reshape(f * c, 1, h, w)


def ssim_maps_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM of every (frame, channel) plane, shape (frames, 3).

    Wang et al. 2004: Gaussian window 11 / sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255, the
    window only at positions where it fits inside the frame ('valid'), no downsampling.
    """
    a, b = _check_pair(a, b)
    frames, height, width, _ = a.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}"
        )
    g = gaussian_window()
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    out = np.empty((frames, 3), dtype=np.float64)
    for start in range(0, frames, _SSIM_FRAME_CHUNK):
        stop = min(frames, start + _SSIM_FRAME_CHUNK)

        x, y = _planes(a[start:stop]), _planes(b[start:stop])
        mu_x, mu_y = _filter(x, g), _filter(y, g)
        var_x = _filter(x * x, g) - mu_x * mu_x
        var_y = _filter(y * y, g) - mu_y * mu_y
        cov = _filter(x * y, g) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        out[start:stop] = (num / den).mean(dim=(1, 2, 3)).view(stop - start, 3).numpy()
    return out


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 videos: per frame and channel, then averaged. Identical videos give 1.0."""
    return float(ssim_maps_mean(a, b).mean())


def format_db(value: float | None, digits: int = 2) -> str:
    """PSNR for reports: 'inf' for identical videos, '-' when missing."""
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"
