"""One text-to-video generation with the measurements every videocache report needs."""

from __future__ import annotations

import inspect
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from videocache.experts import denoiser_modules


@dataclass
class GenerationResult:
    frames: np.ndarray  # (frames, height, width, 3) uint8
    summary: dict[str, Any] = field(default_factory=dict)


class TransformerTimer:
    """Accumulates wall time spent inside the denoisers' forwards (a pipeline's transformer, or each of its
    experts), through hooks on those instances only."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._cuda = next(modules[0].parameters()).is_cuda
        self._handles = [hook for module in modules for hook in (
            module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after))]

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _before(self, module, args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak accelerator allocation on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"


def to_uint8_frames(video: Any) -> np.ndarray:
    """Pipeline output (list or array, float in [0, 1]) of one video -> (F, H, W, 3) uint8."""
    array = np.asarray(video, dtype=np.float32)
    return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)


def generate(
    pipe: DiffusionPipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    num_inference_steps: int,
    num_frames: int,
    height: int,
    width: int,
    guidance_scale: float,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
    image: str | Path | np.ndarray | None = None,
) -> GenerationResult:
    """Run the pipeline once with a seeded generator; time the whole call and the transformer alone.
    `image`: the first frame of an image-to-video pipeline (a file, or (H, W, 3) uint8)."""
    inputs: dict[str, Any] = {}
    check_first_frame(type(pipe).__name__, takes_image(pipe), image is not None, "--image FILE")
    if image is not None:
        from PIL import Image

        inputs["image"] = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(image).convert("RGB")
    device = pipe.transformer.device
    pipe.set_progress_bar_config(disable=not progress, leave=False, desc="denoise")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = TransformerTimer(denoiser_modules(pipe))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = time.perf_counter()
    try:
        output = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            num_frames=num_frames,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="np",
            **inputs,
        )
    finally:
        timer.close()
    wall = time.perf_counter() - start
    peak, peak_kind = peak_memory_bytes(device)
    frames = to_uint8_frames(output.frames[0])
    summary = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": num_inference_steps,
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "guidance_scale": guidance_scale,
        **({"image": str(image)} if isinstance(image, str | Path) else {}),
        "wall_s": round(wall, 4),
        "transformer_s": round(timer.seconds, 4),
        "transformer_calls": timer.calls,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "device": str(device),
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        **(extra or {}),
    }
    return GenerationResult(frames=frames, summary=summary)


def takes_image(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline makes a video from a given first frame (image-to-video)."""
    return "image" in inspect.signature(pipe.__call__).parameters


def source_takes_image(source: str | Path) -> bool | None:
    """Whether the pipeline in a local folder (its model_index.json's class) is image-to-video, before loading it;
    None where that cannot be told (a hub id, a class diffusers does not have)."""
    import json

    import diffusers

    index = Path(source) / "model_index.json"
    if not index.is_file():
        return None
    cls = getattr(diffusers, json.loads(index.read_text()).get("_class_name", ""), None)
    return None if cls is None else takes_image(cls)


def check_first_frame(model: str, image_to_video: bool | None, given: bool, flag: str) -> None:
    """One-line errors for an image-to-video model given no first frame and for a text-only one given one
    (`image_to_video`: None where it is not known yet, as for a hub id not downloaded; `flag`: how to give it)."""
    if image_to_video and not given:
        raise ValueError(f"{model} is an image-to-video model: give its first frame with {flag}")
    if given and image_to_video is False:
        raise ValueError(f"{flag.split()[0]}: {model} makes videos from text only; give an image-to-video model")


def image_of(folder: str | Path, index: int) -> Path:
    """The first frame of prompt `index` in an images folder (p000.png, p001.png, ...)."""
    return Path(folder) / f"p{index:03d}.png"


def check_images(folder: str | Path, count: int, flag: str) -> None:
    """A one-line error unless the images folder holds a first frame for each of `count` prompts."""
    missing = [str(image_of(folder, i)) for i in range(count) if not image_of(folder, i).is_file()]
    if missing:
        raise ValueError(f"{flag}: {missing[0]} is missing ({len(missing)} of the {count} prompts have no first frame; "
                         "the folder holds p000.png, p001.png, ... one per prompt)")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one per line, # starts a comment)")
    return prompts
