"""LoRA weights on a loaded pipeline: `--lora PATH [--lora-scale S]` of generate, compare, profile and eval.

The LoRA is loaded through the pipeline's own diffusers loader (`load_lora_weights`, peft), fused into the
transformer's weights at the scale and the adapter unloaded: the transformer is then a plain model again,
as fast as the base, and the cache and torch.compile see nothing new. What was fused is recorded on the
pipeline (videocache.weights.LORA_ATTR), so that a profile calibrated on it records it and one calibrated on
other weights warns.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videocache.weights import LORA_ATTR

from .reference import REFERENCE_LORA_ROOT

ADAPTER = "videocache_lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


class LoraError(ValueError):
    """A LoRA that cannot be used as given (one line, says what to fix)."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file (or a folder holding one) and the scale it is fused at; checked before any model loads."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise LoraError(f"--lora-scale must be a finite number, got {self.scale!r}")
        self.file  # noqa: B018 (raises LoraError for a missing or ambiguous path)

    @property
    def file(self) -> Path:
        """The .safetensors file: PATH itself, or the folder's pytorch_lora_weights.safetensors, or its only one;
        a name that is no path is one of the shipped reference LoRAs (pipelines/reference/loras/NAME)."""
        path = Path(self.path).expanduser()
        if not path.exists() and (REFERENCE_LORA_ROOT / self.path).is_dir():
            path = REFERENCE_LORA_ROOT / self.path
        if path.is_file():
            if path.suffix != ".safetensors":
                raise LoraError(f"--lora {self.path}: not a .safetensors file")
            return path
        if not path.is_dir():
            shipped = ", ".join(sorted(p.name for p in REFERENCE_LORA_ROOT.glob("*") if p.is_dir()))
            raise LoraError(f"--lora {self.path}: no such file or folder" + (f" (shipped: {shipped})" if shipped else ""))
        if (path / WEIGHT_NAME).is_file():
            return path / WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(f"--lora {self.path}: the folder holds {len(found)} .safetensors files and no {WEIGHT_NAME}; "
                            "give the file's path")
        return found[0]

    def record(self) -> dict:
        """What a profile records of it: a name, the file's content hash and the scale."""
        file = self.file
        name = file.parent.name if file.name == WEIGHT_NAME else file.stem
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        return {"name": name, "sha256": digest, "scale": float(self.scale)}


def lora_spec(path: str | None, scale: float | None) -> LoraSpec | None:
    """--lora / --lora-scale as given (None without --lora; --lora-scale alone is an error)."""
    if path is None:
        if scale is not None:
            raise LoraError("--lora-scale goes with --lora PATH")
        return None
    return LoraSpec(path, 1.0 if scale is None else scale)


def run_settings_fields(spec: LoraSpec | None) -> dict[str, Any]:
    """The RunSettings fields of a comparison or evaluation run on this LoRA (none without one)."""
    return {} if spec is None else {"lora": spec.path, "lora_scale": spec.scale}


def load_lora(pipe: Any, spec: LoraSpec) -> None:
    """Load `spec` through the pipeline's diffusers LoRA loader, fuse it at its scale and unload the adapter."""
    cls = type(pipe).__name__
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"{cls} has no diffusers LoRA loader: --lora applies to diffusers' Wan and HunyuanVideo pipelines")
    if getattr(pipe, "transformer_2", None) is not None:
        raise LoraError(f"{cls} runs two experts (transformer, transformer_2): --lora is not supported on them yet")
    file = spec.file
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise LoraError(f"--lora {spec.path}: {cls} could not load it ({first}; a LoRA of another model?)") from None
    if ADAPTER not in (pipe.get_list_adapters().get("transformer") or []):
        pipe.unload_lora_weights()
        raise LoraError(f"--lora {spec.path}: it holds no weights for {cls}'s transformer (a LoRA of another model?)")
    pipe.fuse_lora(lora_scale=spec.scale, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()  # the fused weights stay; the peft layers go
    setattr(pipe, LORA_ATTR, spec.record())


def add_lora_arguments(p: Any) -> None:
    """--lora and --lora-scale, the same on every command that loads a model."""
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="LoRA weights (diffusers format: a .safetensors file or a folder holding "
                   f"{WEIGHT_NAME}) fused into the transformer after loading")
    p.add_argument("--lora-scale", type=float, default=None, metavar="S", help="the LoRA's scale (default 1)")
