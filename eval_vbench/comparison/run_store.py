"""On-disk layout of a comparison, written incrementally so that nothing is lost on interruption.

    DIR/settings.json             the generation settings every record was made with (checked on rerun)
    DIR/calibration.json          small calibration results shared by methods (MagCache ratios)
    DIR/runs/<method>/<item>.json one record per (method, prompt, seed), written when that run finishes
    DIR/videos/<method>/<item>.mp4 only with --save-videos
    DIR/reference/<item>.npz       parallel comparisons only: the single-process uncached video (uint8
                                  frames) and its timings, that every method's fidelity is measured against
    DIR/logs/<process>.log        everything the worker processes printed (rank r > 0 of a parallel
                                  comparison: <process>.rank<r>.log; records and reports are rank 0's)
    DIR/report.json, report.md, pareto.png

A rerun skips every (method, prompt, seed) whose record exists, so an interrupted comparison resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """Everything that must be equal for two runs to be comparable."""

    model: str
    steps: int
    frames: int
    height: int
    width: int
    guidance_scale: float
    negative_prompt: str = ""
    device: str | None = None
    dtype: str | None = None
    repeats: int = 1
    fps: int = 16
    attention_backend: str | None = None  # diffusers attention backend of every worker (None: diffusers' default)
    lora: str | None = None  # LoRA weights every worker fuses into the transformer (pipelines.lora), at lora_scale
    lora_scale: float = 1.0
    # sequence / CFG parallelism of every run (videocache compare --ulysses N --ring M --cfg-parallel under
    # accelerate launch); all 1: one process per run
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "frames", "height", "width", "repeats", "fps", "ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0, got {self.guidance_scale!r}")

    @property
    def parallel(self) -> bool:
        return self.ulysses * self.ring * self.cfg > 1

    def parallel_settings(self) -> Any:
        """videocache.distributed.ParallelSettings of these degrees."""
        from videocache.distributed.checks import ParallelSettings

        return ParallelSettings(ulysses=self.ulysses, ring=self.ring, cfg=self.cfg)

    def comparable(self) -> dict[str, Any]:
        """The fields a resumed comparison must share (fps only matters for saved videos). The parallel
        degrees are left out when all are 1, so that comparisons made before they existed still resume."""
        data = asdict(self)
        data.pop("fps")
        if self.lora is None:  # comparisons made before --lora existed still resume
            data.pop("lora")
            data.pop("lora_scale")
        if not self.parallel:
            for name in ("ulysses", "ring", "cfg"):
                data.pop(name)
        return data


@dataclass(frozen=True)
class Item:
    """One prompt and seed; every method runs on every item."""

    prompt: str
    seed: int
    index: int = 0  # position of the prompt in the prompts file
    image: str | None = None  # image-to-video: the first frame the run starts from (a file)

    @property
    def key(self) -> str:
        digest = hashlib.sha1(self.prompt.encode()).hexdigest()[:10]
        return f"p{self.index:03d}-{digest}-seed{self.seed}"


def method_slug(spec: str) -> str:
    """A file-system-safe, collision-free folder name for a method spec."""
    readable = re.sub(r"[^A-Za-z0-9.=-]+", "_", spec).strip("_")[:60] or "method"
    return f"{readable}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


def encode_json(value: Any) -> Any:
    """JSON has no infinity: non-finite floats are written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: encode_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_json(v) for v in value]
    return value


def decode_json(value: Any, key: str = "") -> Any:
    """Inverse of encode_json for metric fields (psnr*), leaving other strings such as prompts alone."""
    if isinstance(value, dict):
        return {k: decode_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v, key) for v in value]
    if key.startswith("psnr") and value in ("inf", "-inf", "nan"):
        return float(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temp file + rename) so an interruption never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(encode_json(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return decode_json(json.loads(path.read_text()))


class RunStore:
    """Paths and records of one comparison directory."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    @property
    def settings_path(self) -> Path:
        return self.out / "settings.json"

    @property
    def calibration_path(self) -> Path:
        return self.out / "calibration.json"

    def record_path(self, spec: str, item: Item) -> Path:
        return self.out / "runs" / method_slug(spec) / f"{item.key}.json"

    def video_path(self, spec: str, item: Item) -> Path:
        return self.out / "videos" / method_slug(spec) / f"{item.key}.mp4"

    def log_path(self, process: str, rank: int = 0) -> Path:
        suffix = f".rank{rank}" if rank else ""
        return self.out / "logs" / f"{method_slug(process)}{suffix}.log"

    def reference_path(self, item: Item) -> Path:
        return self.out / "reference" / f"{item.key}.npz"

    def has_reference(self, item: Item) -> bool:
        return self.reference_path(item).is_file()

    def write_reference(
        self,
        item: Item,
        frames: Any,
        transformer_s: list[float],
        wall_s: list[float],
        flops_per_call: dict[str, float] | None = None,
    ) -> Path:
        """The single-process uncached video of a parallel comparison (atomically, like the records), its
        timings and its FLOPs per executed component call (the weights of a parallel computed fraction)."""
        import numpy as np

        path = self.reference_path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp, frames=frames, transformer_s=np.asarray(transformer_s), wall_s=np.asarray(wall_s),
            flops_per_call=np.asarray(json.dumps(flops_per_call or {})),
        )
        os.replace(tmp, path)
        return path

    def read_reference(self, item: Item) -> dict[str, Any]:
        import numpy as np

        with np.load(self.reference_path(item)) as data:
            return {
                "frames": data["frames"],
                "transformer_s": [float(x) for x in data["transformer_s"]],
                "wall_s": [float(x) for x in data["wall_s"]],
                "flops_per_call": json.loads(str(data["flops_per_call"])) if "flops_per_call" in data else {},
            }

    def has_record(self, spec: str, item: Item, digest: str = "") -> bool:
        """A record exists for this method and item, made with the same method configuration `digest`."""
        path = self.record_path(spec, item)
        if not path.is_file():
            return False
        return not digest or read_json(path).get("config_digest") == digest

    def read_record(self, spec: str, item: Item) -> dict[str, Any] | None:
        path = self.record_path(spec, item)
        return read_json(path) if path.is_file() else None

    def write_record(self, spec: str, item: Item, record: dict[str, Any]) -> Path:
        path = self.record_path(spec, item)
        write_json(path, record)
        return path

    def check_settings(self, settings: RunSettings) -> None:
        """Start a new comparison, or resume one made with the same settings; raise ValueError otherwise."""
        wanted = settings.comparable()
        if self.settings_path.is_file():
            found = read_json(self.settings_path)
            diffs = [f"{k}: {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v]
            if diffs:
                raise ValueError(
                    f"{self.out} holds a comparison made with other settings ({'; '.join(diffs)}); "
                    "pass a new --out or delete that folder"
                )
            return
        write_json(self.settings_path, wanted)

    def load_calibration(self) -> dict[str, Any]:
        return read_json(self.calibration_path) if self.calibration_path.is_file() else {}

    def save_calibration(self, data: dict[str, Any]) -> None:
        write_json(self.calibration_path, data)
