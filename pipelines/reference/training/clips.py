"""Stage `clips`: the bank of rendered training clips that the vae, decoder and latents stages sample from."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from videocache.pipelines.reference.data import render_clip, split_captions

from .common import save_checkpoint


def _render_video(job) -> np.ndarray:
    caption, seed, motion = job
    return render_clip(caption, seed, motion=motion).video


def render_bank(args, work: Path) -> None:
    """Render every training clip once (uint8); the VAE and the latent stage both sample from it."""
    out = work / "clips.pt"
    if out.exists():
        return
    train_caps, _ = split_captions()
    jobs = [(cap, args.seed * 1000 + i, args.motion or "straight") for cap in train_caps for i in range(args.clips_per_caption)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:  # rendering is deterministic per (caption, seed)
        rendered = pool.map(_render_video, jobs, chunksize=16)
        videos = np.stack(list(tqdm(rendered, total=len(jobs), desc="render", dynamic_ncols=True)))
    save_checkpoint(out, videos=torch.from_numpy(videos), captions=[cap.text for cap, _, _ in jobs])
