"""Offline prompt accuracy of reference-pipeline videos: does a video show the prompted colour, shape and
direction? The semantic score that needs no downloaded weights.

Colour and direction are the reference checker's (`videocache.pipelines.reference.checker.check_video`);
the shape is read from the same foreground (pixels far from the dominant colour): the share of its
bounding box the shape fills, median over the frames, is about 1.0 for a square, pi/4 = 0.79 for a circle
and 0.5-0.56 for the triangle (measured on rendered clips of every caption: 0.99-1.0, 0.75-0.82,
0.52-0.56).

Videos are read back from their mp4 files with decord (the design card's reader); where decord is not
installed, with imageio (`videocache.video_io.read_video`), which decodes the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SQUARE_MIN_FILL = 0.9
CIRCLE_MIN_FILL = 0.66
MIN_PIXELS = 12


def read_frames(path: str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a video file: decord when installed, else imageio."""
    try:
        from decord import VideoReader, cpu
    except ImportError:
        from videocache.video_io import read_video

        return read_video(path)
    reader = VideoReader(str(path), ctx=cpu(0))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def video_reader_name() -> str:
    try:
        import decord  # noqa: F401
    except ImportError:
        return "imageio (decord not installed)"
    return "decord"


def detect_shape(frames: np.ndarray) -> str | None:
    from videocache.pipelines.reference.checker import FOREGROUND_DISTANCE, dominant_colour

    frames = np.asarray(frames)
    background = dominant_colour(frames)
    foreground = np.linalg.norm(frames.astype(np.float32) - background, axis=-1) > FOREGROUND_DISTANCE
    fills = []
    for mask in foreground:
        ys, xs = np.nonzero(mask)
        if len(ys) < MIN_PIXELS:
            continue
        fills.append(mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    if not fills:
        return None
    fill = float(np.median(fills))
    return "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"


@dataclass(frozen=True)
class Accuracy:
    colour: bool
    shape: bool
    direction: bool
    seen: tuple[str | None, str | None, str | None] = (None, None, None)  # detected colour, shape, direction


def check(prompt: str, frames: np.ndarray) -> Accuracy | None:
    """None when the prompt is not a reference caption (the check does not apply)."""
    from videocache.pipelines.reference.checker import check_video
    from videocache.pipelines.reference.data import Caption

    try:
        caption = Caption.parse(prompt)
    except ValueError:
        return None
    result = check_video(frames)
    shape = detect_shape(frames)
    return Accuracy(result.colour == caption.colour, shape == caption.shape, result.direction == caption.direction,
                    (result.colour, shape, result.direction))


def agreement(checks: dict[Any, Accuracy], reference: dict[Any, Accuracy]) -> float | None:
    """Share of videos whose detected colour, shape and direction all equal those of the uncached video of the
    same prompt and seed: how often a cache changes what the checker sees, whatever the model draws."""
    keys = [k for k in checks if k in reference]
    return sum(checks[k].seen == reference[k].seen for k in keys) / len(keys) if keys else None


def summarize(checks: list[Accuracy]) -> dict[str, Any] | None:
    if not checks:
        return None
    n = len(checks)
    out = {k: sum(getattr(c, k) for c in checks) / n for k in ("colour", "shape", "direction")}
    out["mean"] = (out["colour"] + out["shape"] + out["direction"]) / 3
    out["all_three"] = sum(c.colour and c.shape and c.direction for c in checks) / n
    out["videos"] = n
    return out
