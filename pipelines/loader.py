"""Resolve a model argument (a known name, a local diffusers folder or a hub id) to a loaded pipeline."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .attention_backend import (  # noqa: F401 - re-exported: the loader is where pipelines are set up
    AttentionBackendError,
    attention_backend_of,
    backend_names,
    check_attention_backend,
    set_attention_backend,
)

REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "reference-wan"
REFERENCE_HUNYUAN_DIR = REFERENCE_DIR.parent / "reference-hunyuan"
REFERENCE_OPENSORA_DIR = REFERENCE_DIR.parent / "reference-opensora"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """Raised with a one-line message that says what to fix."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Settings a model was made for; the CLI uses them where the user gave none."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    fps: int


WAN_DEFAULTS = GenerationDefaults(81, 480, 832, 50, 5.0, 16)
KNOWN_MODELS = {"reference-wan": REFERENCE_DIR, "reference-hunyuan": REFERENCE_HUNYUAN_DIR,
                "reference-opensora": REFERENCE_OPENSORA_DIR}


def _our_pipeline_classes() -> dict[str, type]:
    """Pipeline classes of ours that a folder's model_index.json may name (diffusers does not know them)."""
    from .opensora.pipeline import OpenSoraPipeline
    from .reference.pipeline_hunyuan import ReferenceHunyuanVideoPipeline
    from .reference.pipeline_opensora import ReferenceOpenSoraPipeline

    classes = (ReferenceHunyuanVideoPipeline, OpenSoraPipeline, ReferenceOpenSoraPipeline)
    return {cls.__name__: cls for cls in classes}


def pipeline_class(source: str) -> type[DiffusionPipeline]:
    """The class that loads `source`: ours when its model_index.json names one, else DiffusionPipeline
    (which resolves diffusers' own classes)."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ModelLoadError(f"{index} is not a valid model_index.json ({exc})") from exc
        ours = _our_pipeline_classes()
        if name in ours:
            return ours[name]
    return DiffusionPipeline


def resolve_model(model: str) -> str:
    """Map a model argument to a local folder or a hub id, or raise ModelLoadError."""
    if model in KNOWN_MODELS:
        path = KNOWN_MODELS[model]
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"the {model} weights are missing at {path}; reinstall videocache or run scripts/train_reference.py"
            )
        return str(path)
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise ModelLoadError(f"{model} is not a diffusers pipeline folder (no model_index.json in it)")
        return expanded
    if os.path.exists(expanded):
        raise ModelLoadError(f"{model} is a file; pass a diffusers pipeline folder, a hub id or one of {', '.join(KNOWN_MODELS)}")
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/") and not _HUB_ID.match(model)
    if looks_like_path or not _HUB_ID.match(model):
        raise ModelLoadError(
            f"model {model!r} not found: pass one of {', '.join(KNOWN_MODELS)}, an existing diffusers folder, "
            "or a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
    return model


def generation_defaults(source: str) -> GenerationDefaults:
    """Defaults stored beside a pipeline in videocache.json (the reference pipeline has one), else those of
    its pipeline class (a `generation_defaults` dict, e.g. OpenSoraPipeline's), else Wan2.1's."""
    meta = Path(source) / "videocache.json"
    if meta.is_file():
        return GenerationDefaults(**json.loads(meta.read_text())["generation_defaults"])
    own = getattr(pipeline_class(source), "generation_defaults", None)
    return GenerationDefaults(**own) if isinstance(own, dict) else WAN_DEFAULTS


def resolve_device(device: str | None = None) -> str:
    """The device a pipeline is loaded on: `device`, else CUDA when present, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(
    model: str = "reference-wan",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
) -> DiffusionPipeline:
    """Load a pipeline by name, folder or hub id, on `device` (default: CUDA when present, else CPU).

    `attention_backend`: diffusers' attention kernel for the transformer (native, flash, sage, xformers,
    flex, ...; None keeps diffusers' default), checked before loading and tried once after it
    (AttentionBackendError, one line, when it cannot run on this device and dtype)."""
    source = resolve_model(model)
    if attention_backend is not None:
        check_attention_backend(attention_backend, resolve_device(device), dtype)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    cls = pipeline_class(source)
    # Our classes say what is missing in a ValueError/FileNotFoundError; diffusers' own ValueErrors pass through.
    errors = (OSError,) if cls is DiffusionPipeline else (OSError, ValueError)
    try:
        pipe = cls.from_pretrained(source, **kwargs)
    except errors as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {model!r}: {first}") from exc
    target = torch.device(resolve_device(device))
    if target.type == "cpu":
        # 'cpu:0' (what accelerate's process state names the CPU) is 'cpu', but .to('cpu:0') copies every weight
        # out of its safetensors memory map into freshly aligned memory; on an AVX512 CPU MKL's float32 matmuls
        # round differently for the two alignments, so the parallel ranks' video differed from one process's.
        target = torch.device("cpu")
    pipe = pipe.to(target)
    if attention_backend is not None:
        set_attention_backend(pipe, attention_backend)
    return pipe
