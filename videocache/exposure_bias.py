"""FEB-Cache's exposure-bias correction, re-derived for flow-matching (velocity) models.

FEB-Cache scales the predicted noise by b(t) < 1 to counter the exposure bias that caching amplifies.
Wan and HunyuanVideo predict a velocity v = eps - x0 for x_t = (1 - s) x0 + s eps (Open-Sora 1.2 predicts
-v, on the first half of its 8 output channels: its adapter says so with `velocity_sign = -1`), so the
scaling is applied to the noise implied by v and the velocity is re-formed:

    x0_hat = x_t - s v,   eps_hat = x_t + (1 - s) v,   v' = b eps_hat - x0_hat
           = (b - 1) x_t + (b (1 - s) + s) v.

v' is affine in v with weights that do not depend on the prediction, so correcting each CFG branch and
then guiding equals correcting the guided velocity (guidance weights sum to one).
`sign=-1` uses 1/b instead of b, the direction the public FEB-Cache code effectively applies; which one
helps is for the benchmark to measure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ExposureBiasConfig:
    enabled: bool = False
    b_high: float = 0.98
    b_low: float = 0.96
    t_threshold: float = 0.4
    sign: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"exposure_bias.enabled must be true or false; got {self.enabled!r}")
        for name in ("b_high", "b_low", "t_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"exposure_bias.{name} must be a number; got {v!r}")
        if not 0.0 < self.b_low <= self.b_high <= 1.5:
            raise ValueError(
                f"exposure_bias needs 0 < b_low <= b_high (<= 1.5); got b_low={self.b_low}, b_high={self.b_high}"
            )
        if not 0.0 < self.t_threshold < 1.0:
            raise ValueError(f"exposure_bias.t_threshold must be in (0, 1); got {self.t_threshold}")
        if self.sign not in (1, -1):
            raise ValueError(
                f"exposure_bias.sign must be 1 (scale by b) or -1 (scale by 1/b); got {self.sign!r}"
            )

    def factor(self, t: float) -> float:
        """The factor actually applied at normalised time t: b(t), or 1/b(t) for sign=-1."""
        b = b_schedule(t, self.b_high, self.b_low, self.t_threshold)
        return b if self.sign == 1 else 1.0 / b

    def to_dict(self) -> dict:
        return asdict(self)


def b_schedule(t: float, b_high: float = 0.98, b_low: float = 0.96, t_threshold: float = 0.4) -> float:
    """FEB-Cache's b(t), t in [0, 1] with 1 = noisiest.

    Early (t >= t_thre) it decays from 1 at t=1 towards b_high; late it decays from b_high towards b_low.
    As published, the two pieces meet only up to (1 - b_high) * e^-5 at t_thre (1.3e-4 for the defaults).
    """
    t = float(t)
    span = 1.0 - t_threshold
    if t >= t_threshold:
        return b_high + (1.0 - b_high) * math.exp(-5.0 * (1.0 - t) / span)
    return b_low + (b_high - b_low) * math.exp(5.0 * (t - t_threshold) / span)


def correct_velocity(v: torch.Tensor, x_t: torch.Tensor, sigma: float, b: float) -> torch.Tensor:
    """v' = b * eps_hat - x0_hat for flow matching (see module docstring); computed in at least float32."""
    s = float(sigma)
    dtype = torch.promote_types(v.dtype, torch.float32)
    vf = v.to(dtype)
    xf = x_t.to(device=v.device, dtype=dtype)
    out = (b - 1.0) * xf + (b * (1.0 - s) + s) * vf
    return out.to(v.dtype)
