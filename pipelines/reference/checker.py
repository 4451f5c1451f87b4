"""Deterministic pixel-statistics checker: does a video show the prompted shape colour and motion?

Background = the dominant colour of the video; foreground = pixels far from it. The foreground's
median colour is matched to the nearest palette colour, and the direction is read from a straight
line fitted through the foreground centroid of every frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import DIRECTION_VECTORS, SHAPE_COLOURS, Caption

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground
MIN_FOREGROUND_PIXELS = 12  # per frame, for a centroid to count
MIN_DISPLACEMENT = 4.0  # pixels over the clip, below which the motion is "none"


@dataclass(frozen=True)
class CheckResult:
    colour: str | None
    direction: str | None
    displacement: tuple[float, float]
    background_rgb: tuple[int, int, int]

    def matches(self, caption: Caption) -> tuple[bool, bool]:
        return self.colour == caption.colour, self.direction == caption.direction


def dominant_colour(frames: np.ndarray) -> np.ndarray:
    pixels = frames.reshape(-1, 3).astype(np.int32)
    bins = pixels // 16
    keys = bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2]
    mode = np.bincount(keys).argmax()
    return np.median(pixels[keys == mode], axis=0)


def check_video(frames: np.ndarray) -> CheckResult:
    """frames: (F, H, W, 3) uint8."""
    frames = np.asarray(frames)
    background = dominant_colour(frames)
    distance = np.linalg.norm(frames.astype(np.float32) - background, axis=-1)
    foreground = distance > FOREGROUND_DISTANCE
    bg_rgb = tuple(int(v) for v in background)
    if foreground.sum() < MIN_FOREGROUND_PIXELS:
        return CheckResult(None, None, (0.0, 0.0), bg_rgb)
    fg_colour = np.median(frames[foreground].astype(np.float32), axis=0)
    names = list(SHAPE_COLOURS)
    palette = np.array([SHAPE_COLOURS[n] for n in names], dtype=np.float32)
    colour = names[int(np.linalg.norm(palette - fg_colour, axis=1).argmin())]

    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    times, cx, cy = [], [], []
    for f, mask in enumerate(foreground):
        if mask.sum() >= MIN_FOREGROUND_PIXELS:
            times.append(f)
            cx.append(xs[mask].mean())
            cy.append(ys[mask].mean())
    if len(times) < 2:
        return CheckResult(colour, None, (0.0, 0.0), bg_rgb)
    span = frames.shape[0] - 1
    dx = float(np.polyfit(times, cx, 1)[0] * span)
    dy = float(np.polyfit(times, cy, 1)[0] * span)
    direction = None
    if max(abs(dx), abs(dy)) >= MIN_DISPLACEMENT:
        unit = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, vec in DIRECTION_VECTORS.items() if vec == unit)
    return CheckResult(colour, direction, (dx, dy), bg_rgb)
