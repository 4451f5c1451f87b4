"""Writing and reading videos as (frames, height, width, 3) uint8 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write an mp4 (H.264, near-lossless) or, for a .gif suffix, a GIF."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
        return path
    # crf 10 keeps tiny synthetic videos visually exact; 64x64 is already a multiple of the macro block.
    with imageio.get_writer(
        path, fps=fps, codec="libx264", macro_block_size=16, output_params=["-crf", "10"], ffmpeg_log_level="error"
    ) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))
    return path


def read_video(path: str | Path) -> np.ndarray:
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(path, memtest=False))
