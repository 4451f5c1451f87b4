"""Deterministic pixel-statistics checker: does a video show the prompted shape colour and motion?

Background = the dominant colour of the video; foreground = pixels far from it. The foreground's
median colour is matched to the nearest palette colour, and the direction is read from a straight
line fitted through the foreground centroid of every frame. The per-frame gate reads the colour of each
frame's foreground alone (against the same background): every frame must show the prompted colour, so a
video whose first frames show another shape colour fails it even when its overall median is right.
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
    frame_colours: tuple[str | None, ...] = ()  # per frame; None where the frame shows no foreground

    def matches(self, caption: Caption) -> tuple[bool, bool]:
        return self.colour == caption.colour, self.direction == caption.direction

    def moves_along(self, vector: tuple[float, float], tolerance_degrees: float = 22.5) -> bool:
        """The fitted motion is at least MIN_DISPLACEMENT long and within `tolerance_degrees` of `vector`'s
        direction (a diagonal: data.motion_vector(direction, "diagonal"))."""
        dx, dy = self.displacement
        length = float(np.hypot(dx, dy))
        if length < MIN_DISPLACEMENT:
            return False
        cos = (dx * vector[0] + dy * vector[1]) / (length * float(np.hypot(*vector)))
        return cos >= np.cos(np.radians(tolerance_degrees))

    def frame_colour_fraction(self, caption: Caption) -> float:
        """Fraction of frames whose foreground shows the prompted colour (a frame without one does not)."""
        if not self.frame_colours:
            return 0.0
        return sum(c == caption.colour for c in self.frame_colours) / len(self.frame_colours)

    def every_frame_matches(self, caption: Caption) -> bool:
        """The per-frame gate: every frame shows the prompted colour."""
        return bool(self.frame_colours) and all(c == caption.colour for c in self.frame_colours)


def dominant_colour(frames: np.ndarray) -> np.ndarray:
    pixels = frames.reshape(-1, 3).astype(np.int32)
    bins = pixels // 16
    keys = bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2]
    mode = np.bincount(keys).argmax()
    return np.median(pixels[keys == mode], axis=0)


def nearest_shape_colour(pixels: np.ndarray) -> str:
    """The palette colour nearest to the median of (N, 3) pixels."""
    names = list(SHAPE_COLOURS)
    palette = np.array([SHAPE_COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.linalg.norm(palette - np.median(pixels.astype(np.float32), axis=0), axis=1).argmin())]


def check_video(frames: np.ndarray) -> CheckResult:
    """frames: (F, H, W, 3) uint8."""
    frames = np.asarray(frames)
    background = dominant_colour(frames)
    distance = np.linalg.norm(frames.astype(np.float32) - background, axis=-1)
    foreground = distance > FOREGROUND_DISTANCE
    bg_rgb = tuple(int(v) for v in background)
    per_frame = tuple(
        nearest_shape_colour(frame[mask]) if mask.sum() >= MIN_FOREGROUND_PIXELS else None
        for frame, mask in zip(frames, foreground, strict=True)
    )
    if foreground.sum() < MIN_FOREGROUND_PIXELS:
        return CheckResult(None, None, (0.0, 0.0), bg_rgb, per_frame)
    colour = nearest_shape_colour(frames[foreground])

    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    times, cx, cy = [], [], []
    for f, mask in enumerate(foreground):
        if mask.sum() >= MIN_FOREGROUND_PIXELS:
            times.append(f)
            cx.append(xs[mask].mean())
            cy.append(ys[mask].mean())
    if len(times) < 2:
        return CheckResult(colour, None, (0.0, 0.0), bg_rgb, per_frame)
    span = frames.shape[0] - 1
    dx = float(np.polyfit(times, cx, 1)[0] * span)
    dy = float(np.polyfit(times, cy, 1)[0] * span)
    direction = None
    if max(abs(dx), abs(dy)) >= MIN_DISPLACEMENT:
        unit = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
        direction = next(name for name, vec in DIRECTION_VECTORS.items() if vec == unit)
    return CheckResult(colour, direction, (dx, dy), bg_rgb, per_frame)
