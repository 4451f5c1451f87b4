"""What a skipped cell returns from the values kept at earlier compute steps: reuse, or a forecast."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .table import _REUSE


def newton_extrapolate(xs: Sequence[int], fs: Sequence[torch.Tensor], x: int) -> torch.Tensor:
    """Value at `x` of the polynomial through (xs[i], fs[i]) (Newton divided differences, float32).

    With two points this is the linear extrapolation f1 + (f1 - f0) (x - x1) / (x1 - x0); with k+1 points it
    is the order-k finite-difference Taylor forecast, valid for uneven step spacing too.
    """
    coeffs = [f.float() for f in fs]
    n = len(xs)
    for j in range(1, n):
        for i in range(n - 1, j - 1, -1):
            coeffs[i] = (coeffs[i] - coeffs[i - 1]) / float(xs[i] - xs[i - j])
    result = coeffs[n - 1]
    for i in range(n - 2, -1, -1):
        result = coeffs[i] + result * float(x - xs[i])
    return result.to(fs[0].dtype)


MIN_GAIN = 0.05  # where the model below asks for 0 or less: as good as reuse, still a valid gain


def gain_at(gain: float, step_ratio: float) -> float:
    """The forecast gain for a run with `step_ratio` = its steps / the steps the gain was calibrated at.

    Along a trajectory that bends, y(t) = a + b t + c t^2 locally, the damped forecast y_0 + g (y_0 - y_-h)
    is exact at t = h for g = (1 + x) / (1 - x), x = c h / b: the calibrated gain fixes x, and x scales with
    the step size h, which goes as 1 / step_ratio. Fewer steps reach further and damp more; more steps damp
    less. On reference-opensora's guidance-8 presets run at 15 and 50 steps and at 20 steps (guidance 7, 21
    frames) it beat the calibrated gain in all nine preset-and-case runs, by 0.5 to 2.9 dB
    (benchmarks/shift_reference/README.md)."""
    if gain == 1.0 or step_ratio == 1.0:
        return gain
    x = (gain - 1.0) / (gain + 1.0) / step_ratio
    return min(1.0, max(MIN_GAIN, (1.0 + x) / (1.0 - x)))


def served(
    action: int, steps: Sequence[int], kept: Sequence[list[torch.Tensor]], step: int, scale: float
) -> list[torch.Tensor]:
    """What a skipped cell (or a whole uniform skip step) returns at `step` from the values kept at `steps`
    (one list of tensors per kept step): the last ones times the reuse factor `scale`, or their forecast
    damped by the gain `scale` (last + gain (extrapolated - last); 1: the plain polynomial forecast). A gain
    under 1 holds back what a straight extrapolation overshoots where the trajectory bends: reference-opensora's
    tables gain 0.4 to 7.7 dB on held-out prompts at gains 0.4-0.8 (benchmarks/experiments/forecast_gain.py)."""
    if action == _REUSE:
        return kept[-1] if scale == 1.0 else [t * scale for t in kept[-1]]
    if len(steps) == 2:  # order 1, the common case: one fused lerp instead of Newton's steps
        weight = 1.0 + scale * (step - steps[1]) / (steps[1] - steps[0])
        return [torch.lerp(a, b, weight) for a, b in zip(kept[0], kept[1], strict=True)]
    out = [newton_extrapolate(steps, [k[i] for k in kept], step) for i in range(len(kept[0]))]
    return out if scale == 1.0 else [torch.lerp(last, f, scale) for last, f in zip(kept[-1], out, strict=True)]
