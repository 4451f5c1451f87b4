"""Procedural text-video data for the embedded reference pipeline.

One coloured shape moves in a straight line over a flat background. Every clip is a pure function of
its caption and an integer seed, and comes with the ground-truth foreground mask of every frame, so
that both training and the foreground/background profiler can be checked against the truth.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": SHAPE_COLOURS["white"],
    "blue": SHAPE_COLOURS["blue"],
    "green": SHAPE_COLOURS["green"],
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# Unit motion (dx, dy) in image coordinates (y grows downwards).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# How a clip moves for its caption's direction: "straight" is what every reference was trained on; "diagonal"
# (the direction turned 45 degrees counter-clockwise on screen: right -> up-right, up -> up-left, ...) is what
# the reference LoRA teaches and the base never does.
MOTIONS = ("straight", "diagonal")


def motion_vector(direction: str, motion: str = "straight") -> tuple[float, float]:
    """Unit motion (dx, dy) in image coordinates of a caption's direction under a motion style."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    x, y = DIRECTION_VECTORS[direction]
    if motion == "straight":
        return float(x), float(y)
    return (x + y) / np.sqrt(2), (y - x) / np.sqrt(2)


CAPTION_TEMPLATE = "a {colour} {shape} moving {direction} on a {background} background"
VOCABULARY = sorted(
    {"a", "moving", "on", "background", *SHAPE_COLOURS, *BACKGROUND_COLOURS, *SHAPES, *DIRECTIONS}
)

NUM_FRAMES = 17
HEIGHT = 64
WIDTH = 64
NUM_HELD_OUT = 20
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def text(self) -> str:
        return CAPTION_TEMPLATE.format(
            colour=self.colour, shape=self.shape, direction=self.direction, background=self.background
        )

    @classmethod
    def parse(cls, text: str) -> Caption:
        """Parse a caption of the grammar; raises ValueError naming the template otherwise."""
        words = text.strip().lower().split()
        fixed = {0: "a", 3: "moving", 5: "on", 6: "a", 8: "background"}
        if len(words) != 9 or any(words[i] != w for i, w in fixed.items()):
            raise ValueError(f"caption {text!r} does not follow {CAPTION_TEMPLATE!r}")
        caption = cls(colour=words[1], shape=words[2], direction=words[4], background=words[7])
        caption.validate()
        return caption

    def validate(self) -> None:
        for value, allowed, what in (
            (self.colour, SHAPE_COLOURS, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.direction, DIRECTIONS, "direction"),
            (self.background, BACKGROUND_COLOURS, "background"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} shape on a {self.background} background would be invisible")


def all_captions() -> list[Caption]:
    """Every valid caption of the grammar (the shape's colour never equals the background's)."""
    return [
        Caption(c, s, d, b)
        for c, s, d, b in itertools.product(SHAPE_COLOURS, SHAPES, DIRECTIONS, BACKGROUND_COLOURS)
        if c != b
    ]


def split_captions(seed: int = 1234) -> tuple[list[Caption], list[Caption]]:
    """Deterministic (train, held_out) split; held-out prompts are never seen in training."""
    captions = all_captions()
    rng = random.Random(seed)
    held_out = rng.sample(captions, NUM_HELD_OUT)
    held = set(held_out)
    return [c for c in captions if c not in held], held_out


@dataclass
class Clip:
    caption: Caption
    video: np.ndarray  # (frames, height, width, 3) uint8
    mask: np.ndarray  # (frames, height, width) bool, True on the moving shape
    trajectory: np.ndarray  # (frames, 2) centre (x, y) in pixels


def _shape_coverage(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, by supersampling."""
    ss = _SUPERSAMPLE
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= radius * radius
    elif shape == "square":
        half = radius * 0.85
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # upright isosceles triangle inscribed in the circle
        top, bottom = -radius, radius * 0.7
        frac = (dy - top) / (bottom - top)
        inside = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * radius * 1.05)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render_clip(
    caption: Caption | str,
    seed: int,
    num_frames: int = NUM_FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
    motion: str = "straight",
) -> Clip:
    """Render one clip. Size, speed, start position and a mild background shade vary with the seed;
    `motion` is one of MOTIONS."""
    if isinstance(caption, str):
        caption = Caption.parse(caption)
    caption.validate()
    rng = np.random.default_rng(seed)
    scale = min(height, width) / 64.0
    radius = rng.uniform(8.0, 12.0) * scale
    speed = rng.uniform(1.3, 2.0) * scale  # pixels per frame
    travel = speed * (num_frames - 1)
    vx, vy = motion_vector(caption.direction, motion)
    margin = radius + 1.0
    # Along each axis of motion start so that the whole path stays inside the frame.
    def start(extent: float, v: float) -> float:
        if v == 0:
            return rng.uniform(margin, extent - margin)
        lo, hi = margin, extent - margin - travel * abs(v)
        pos = rng.uniform(lo, max(lo, hi))
        return pos if v > 0 else extent - pos

    x0, y0 = start(width, vx), start(height, vy)
    bg = np.array(BACKGROUND_COLOURS[caption.background], dtype=np.float32)
    bg = np.clip(bg + rng.uniform(-8, 8), 0, 255)
    fg = np.array(SHAPE_COLOURS[caption.colour], dtype=np.float32)
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    mask = np.empty((num_frames, height, width), dtype=bool)
    trajectory = np.empty((num_frames, 2), dtype=np.float32)
    for f in range(num_frames):
        cx, cy = x0 + vx * speed * f, y0 + vy * speed * f
        cov = _shape_coverage(caption.shape, cx, cy, radius, height, width)[..., None]
        video[f] = np.round(bg * (1 - cov) + fg * cov).astype(np.uint8)
        mask[f] = cov[..., 0] >= 0.5
        trajectory[f] = (cx, cy)
    return Clip(caption, video, mask, trajectory)
