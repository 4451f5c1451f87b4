"""Resolve a model argument (a known name, a local diffusers folder or a hub id) to a loaded pipeline, and
read what a folder says about its model before anything is loaded (its family, defaults and configs).

Named models and our own pipeline classes come from the model families (`videocache.family`): nothing here
names a model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from videocache.family import (
    FamilyError,
    GenerationDefaults,
    ModelFamily,
    families,
    family_for_class,
    known_models,
)

from .attention_backend import (  # noqa: F401 - re-exported: the loader is where pipelines are set up
    AttentionBackendError,
    attention_backend_of,
    backend_names,
    check_attention_backend,
    set_attention_backend,
)
from .reference import REFERENCE_DIR, REFERENCE_HUNYUAN_DIR, REFERENCE_OPENSORA_DIR  # noqa: F401 - re-exported
from .reference.shared import load_shared_vae, shared_component_paths

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """Raised with a one-line message that says what to fix."""


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """A hub repository's file from the local Hugging Face cache, without any download; None if absent."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # an unusable cache is the same as an empty one here
        return None
    return Path(found) if isinstance(found, str) else None


def folder_config(source: str, component: str | None = None) -> dict | None:
    """A pipeline's model_index.json (component None) or a component's config.json, read without loading
    anything: from the folder (following its videocache.json shared components), or from the Hugging Face
    cache for a hub id; None where it is not there (a hub id not downloaded yet)."""
    name = "model_index.json" if component is None else f"{component}/config.json"
    if os.path.isdir(source):
        shared = shared_component_paths(source)
        path = shared[component] / "config.json" if component in shared else Path(source) / name
        return _read_json(path)
    if _HUB_ID.match(source):
        cached = _cached_hub_file(source, name)
        return None if cached is None else _read_json(cached)
    return None


def source_transformer_class(source: str) -> str | None:
    """The transformer class a pipeline folder's (or cached hub id's) model_index.json names, or None."""
    entry = (folder_config(source) or {}).get("transformer")
    if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], str):
        return None
    return entry[1]


def source_family(source: str) -> ModelFamily | None:
    """The model family of a pipeline folder or cached hub id, from the transformer class its
    model_index.json names; None when that is not known before loading or no family covers it."""
    name = source_transformer_class(source)
    return None if name is None else family_for_class([name])


def preload_geometry(source: str, frames: int, height: int, width: int) -> tuple[int | None, int | None]:
    """(attention heads, video tokens) for the parallel checks made before loading, from the model family's
    `geometry`; (None, None) when the model is not known before loading (a hub id not downloaded yet: the
    same checks run at the transformer's first call). A model no family covers, or a family without a
    parallel plan or geometry, is a one-line FamilyError."""
    name = source_transformer_class(source)
    if name is None:
        return None, None
    family = family_for_class([name])
    if family is None:
        raise FamilyError(f"no videocache model family covers {name}, so it cannot run in parallel: declare one")
    family.require("parallel_plan", "sequence and CFG parallelism (--ulysses / --ring / --cfg-parallel)")
    geometry = family.require("geometry", "the parallel checks made before the model loads")
    return geometry(source, frames, height, width)


def vae_compression(source: str) -> tuple[int, int] | None:
    """(temporal, spatial) compression of a pipeline's VAE from its config alone (Wan's, HunyuanVideo's and
    Open-Sora's config fields), or None."""
    vcfg = folder_config(source, "vae") or {}
    t, s = vcfg.get("scale_factor_temporal"), vcfg.get("scale_factor_spatial")
    if t is None and isinstance(vcfg.get("temperal_downsample"), list):  # AutoencoderKLWan
        t, s = 2 ** sum(bool(x) for x in vcfg["temperal_downsample"]), 2 ** len(vcfg["temperal_downsample"])
    if t is None:  # AutoencoderKLHunyuanVideo
        t, s = vcfg.get("temporal_compression_ratio"), vcfg.get("spatial_compression_ratio")
    return (int(t), int(s)) if t and s else None


def _our_pipeline_classes() -> dict[str, type]:
    """Pipeline classes of ours that a folder's model_index.json may name (diffusers does not know them)."""
    classes = [cls for fam in families().values() if fam.pipelines is not None for cls in fam.pipelines()]
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
    named = known_models()
    if model in named:
        path = named[model]
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
        raise ModelLoadError(f"{model} is a file; pass a diffusers pipeline folder, a hub id or one of {', '.join(named)}")
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/") and not _HUB_ID.match(model)
    if looks_like_path or not _HUB_ID.match(model):
        raise ModelLoadError(
            f"model {model!r} not found: pass one of {', '.join(named)}, an existing diffusers folder, "
            "or a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
    return model


def generation_defaults(source: str, family: ModelFamily | None = None) -> GenerationDefaults | None:
    """Defaults stored beside a pipeline in videocache.json (the reference pipelines have one), else those of
    its model family (`family`, or the one its model_index.json names); None when neither is known before
    loading (a hub id not downloaded yet: `defaults_of` answers once the pipeline is loaded). A family
    without defaults is a one-line FamilyError."""
    meta = Path(source) / "videocache.json"
    if meta.is_file():
        return GenerationDefaults(**json.loads(meta.read_text())["generation_defaults"])
    family = family or source_family(source)
    if family is None:
        return None
    return family.require("defaults", "running it without --frames/--height/--width/--steps/--guidance-scale")


def known_defaults(source: str) -> GenerationDefaults:
    """`generation_defaults`, for runs that fix their settings before loading (comparisons, evaluation): a
    one-line ModelLoadError when the model is not known yet (a hub id not downloaded)."""
    found = generation_defaults(source)
    if found is None:
        raise ModelLoadError(
            f"{source} is not downloaded yet, so its model family and defaults are unknown: download it first "
            "(e.g. `hf download` or one `videocache generate` run) or pass a local pipeline folder"
        )
    return found


def defaults_of(pipe: Any, source: str) -> GenerationDefaults:
    """The defaults of a loaded pipeline: from its folder, else from its transformer's model family."""
    from videocache.family import family_of

    found = generation_defaults(source, family_of(pipe.transformer))
    if found is None:  # unreachable: a family is known here
        raise FamilyError(f"no generation defaults for {source}")
    return found


def resolve_device(device: str | None = None) -> str:
    """The device a pipeline is loaded on: `device`, else CUDA when present, else CPU (ModelLoadError, one
    line, for a name torch does not know)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"--device {device!r} is not a device: use cpu, cuda, cuda:1, ...") from None
    return device


def load_pipeline(
    model: str,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    attention_backend: str | None = None,
    lora: Any = None,
) -> DiffusionPipeline:
    """Load a pipeline by name, folder or hub id, on `device` (default: CUDA when present, else CPU).

    `attention_backend`: diffusers' attention kernel for the transformer (native, flash, sage, xformers,
    flex, ...; None keeps diffusers' default), checked before loading and tried once after it
    (AttentionBackendError, one line, when it cannot run on this device and dtype).
    `lora`: a pipelines.lora.LoraSpec, fused into the transformer once it is on the device (LoraError, one line)."""
    source = resolve_model(model)
    if attention_backend is not None:
        check_attention_backend(attention_backend, resolve_device(device), dtype)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    cls = pipeline_class(source)
    # Our classes say what is missing in a ValueError/FileNotFoundError; diffusers' own ValueErrors pass through.
    errors = (OSError,) if cls is DiffusionPipeline else (OSError, ValueError)
    try:
        if cls is DiffusionPipeline:  # a diffusers pipeline folder that names a shipped VAE (reference-wan22)
            kwargs = load_shared_vae(source, kwargs)
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
    if lora is not None:
        from .lora import load_lora

        load_lora(pipe, lora)
    if attention_backend is not None:
        set_attention_backend(pipe, attention_backend)
    return pipe


def video_tokens(source: str, frames: int, height: int, width: int, patch: Any) -> int | None:
    """Video tokens of a pipeline folder's model for this size, from its VAE's compression and the
    transformer's (t, h, w) patch; None where a config or field is not there. The frame count is rounded
    as the pipelines round it (to 1 + a multiple of the temporal compression)."""
    factors = vae_compression(source)
    if not factors or not patch:
        return None
    t, s = factors
    if frames % t != 1:
        frames = frames // t * t + 1
    latent_frames = (frames - 1) // t + 1
    return (latent_frames // patch[0]) * (height // s // patch[1]) * (width // s // patch[2])
