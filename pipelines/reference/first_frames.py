"""First frames for an image-to-video reference (reference-wan22-i2v): the first frame of each prompt's clip,
rendered with the prompt's index as its seed (as the quality gates give it), saved as p000.png, p001.png, ...:
the folder `videocache profile --image` and `videocache compare --images` take.

    python -m videocache.pipelines.reference.first_frames --prompts calibration --out DIR
    python -m videocache.pipelines.reference.first_frames --prompts held-out --count 16 --out DIR
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import Caption, render_clip, split_captions


def calibration_captions() -> list[Caption]:
    """The four training captions `videocache profile` calibrates a reference on by default."""
    return split_captions()[0][::61][:4]


def first_frame(caption: Caption, seed: int) -> np.ndarray:
    """The first frame of the caption's clip rendered with `seed`, (H, W, 3) uint8: what an image-to-video
    reference is given for that prompt and seed."""
    return render_clip(caption, seed).video[0]


def write_first_frames(captions: Sequence[Caption], folder: str | Path) -> Path:
    """FOLDER/p000.png ...: caption i's first frame, rendered with seed i."""
    from PIL import Image

    from ..generation import image_of

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.fromarray(first_frame(caption, i)).save(image_of(folder, i))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", choices=["calibration", "held-out"], required=True,
                   help="calibration: videocache profile's default prompts; held-out: the comparison's")
    p.add_argument("--count", type=int, default=16, help="held-out: how many prompts (the first COUNT)")
    p.add_argument("--out", required=True, help="folder to write p000.png, p001.png, ... into")
    args = p.parse_args(argv)
    captions = calibration_captions() if args.prompts == "calibration" else split_captions()[1][:args.count]
    print(f"wrote {len(captions)} first frames to {write_first_frames(captions, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
