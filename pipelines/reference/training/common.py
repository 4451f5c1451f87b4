"""What several stages share: the VAE's pixel range, and checkpoints that an interrupted run resumes from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good checkpoint
