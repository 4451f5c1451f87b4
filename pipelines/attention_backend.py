"""Choose diffusers' attention kernel (`diffusers.models.attention_dispatch`) for a pipeline's transformer.

diffusers 0.42 routes the attention of its transformers (Wan's `WanAttnProcessor` included) through
`dispatch_attention_fn`, which calls one registered backend: `native` (torch SDPA, the default), `flash`
(flash-attn 2), `sage` (SageAttention), `xformers`, `flex`, hub kernels (`*_hub`, through the `kernels`
package) and a few private variants (`_native_math`, `_native_cudnn`, ...). `ModelMixin.set_attention_backend`
selects one per model, but only checks that its package imports; a kernel that has no CPU version, or
that wants half precision, fails later, in the middle of a generation, with a long traceback.

Here:

* `check_attention_backend(name, device, dtype)`: everything that can be known before a model is
  loaded (a known name, its package installed, a device and dtype it has kernels for), each failure a
  one-line `AttentionBackendError` (a ValueError, so the CLI prints it as `videocache: error: ...`).
* `set_attention_backend(pipe_or_transformer, name)`: the same checks against the loaded model, then
  diffusers' `set_attention_backend`, then one tiny attention call through the chosen kernel, so that a
  kernel that cannot run (an old GPU, a CPU-only xformers build) fails here and not mid-generation.
  On failure the previous backend is restored.

Like diffusers, selecting a backend also makes it the process-wide default of `dispatch_attention_fn`
(what code calling it without a backend, e.g. cache-dit's patched processors, uses).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

# Checks of diffusers 0.42.1 (pinned) that only run under DIFFUSERS_ATTN_CHECKS=1, plus what the
# kernels themselves need: flash-attn, SageAttention and xformers ship CUDA (and ROCm) kernels only;
# torch's cuDNN and memory-efficient SDPA kernels have no CPU version (its flash one does).
NEEDS_CUDA = frozenset({
    "flash", "flash_varlen", "flash_hub", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3",
    "_flash_3_hub", "_flash_3_varlen_hub", "aiter_fa2_hub", "sage", "sage_hub", "sage_blackwell_hub",
    "sage_varlen", "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton", "xformers", "_native_cudnn", "_native_efficient",
})
NEEDS_DEVICE = {"_native_npu": "npu", "_native_xla": "xla"}
NEEDS_HALF = frozenset({  # bfloat16 or float16 activations
    "flash", "flash_varlen", "flash_hub", "flash_varlen_hub", "flash_4_hub", "_flash_3", "_flash_varlen_3",
    "_flash_3_hub", "_flash_3_varlen_hub", "sage", "sage_hub", "sage_blackwell_hub", "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton", "_native_cudnn", "_native_npu",
})
NEEDS_HALF_ON_CUDA = frozenset({"_native_flash"})  # torch's CUDA flash kernel; its CPU one takes float32
NEEDS_BF16 = frozenset({"aiter_fa2_hub"})
WHY_CUDA = {
    "xformers": "xformers has no CPU kernels",
    "_native_cudnn": "cuDNN attention is CUDA-only",
    "_native_efficient": "torch's memory-efficient attention has no CPU kernel",
}
_UNSET = object()
FIRST = ("native", "flash", "sage", "xformers", "flex")  # listed first in messages


class AttentionBackendError(ValueError):
    """A one-line message saying which backend names exist, or what a backend needs."""


def _dispatch():
    from diffusers.models import attention_dispatch

    return attention_dispatch


def backend_names() -> list[str]:
    """Every backend diffusers registers: the public ones (native, flash, sage, xformers, flex, ...) first,
    then diffusers' private variants (_native_math, _native_cudnn, ...)."""
    registered = [b.value for b in _dispatch()._AttentionBackendRegistry._backends]
    first = [n for n in FIRST if n in registered]
    public = sorted(n for n in registered if not n.startswith("_") and n not in first)
    return first + public + sorted(n for n in registered if n.startswith("_"))


def default_backend_name() -> str:
    """The backend diffusers uses where none was chosen (`native` unless DIFFUSERS_ATTN_BACKEND says otherwise)."""
    from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

    return str(DIFFUSERS_ATTN_BACKEND)


def _kernel_family(name: str) -> str:
    stem = name.lstrip("_")
    for prefix, family in (("flash", "flash-attn"), ("sage", "SageAttention"), ("aiter", "aiter"),
                           ("native_npu", "torch_npu"), ("native_xla", "torch_xla")):
        if stem.startswith(prefix):
            return family
    return name


def _install_hint(name: str) -> str:
    d = _dispatch()
    if name in ("flash", "flash_varlen"):
        return f"pip install 'flash-attn>={d._REQUIRED_FLASH_VERSION}' --no-build-isolation"
    if name in ("_flash_3", "_flash_varlen_3"):
        return "build FlashAttention 3 from source (github.com/Dao-AILab/flash-attention, hopper/)"
    if name.endswith("_hub"):
        version = "0.12.3" if name == "flash_4_hub" else "0.12"
        return f"pip install 'kernels>={version}' (the kernel is then downloaded from the Hugging Face Hub)"
    if name.startswith(("sage", "_sage")):
        return f"pip install 'sageattention>={d._REQUIRED_SAGE_VERSION}'"
    if name == "xformers":
        return f"pip install 'videocache[xformers]' (xformers>={d._REQUIRED_XFORMERS_VERSION})"
    if name == "flex":
        return "pip install 'torch>=2.5'"
    if name == "_native_npu":
        return "pip install torch_npu"
    if name == "_native_xla":
        return f"pip install 'torch_xla>={d._REQUIRED_XLA_VERSION}'"
    return ""


def _missing_package(name: str) -> str | None:
    """None when the backend's package is importable, else what to install."""
    d = _dispatch()
    try:
        d._check_attention_backend_requirements(d.AttentionBackendName(name))
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        return _install_hint(name) or (text[0] if text else "its package")
    return None


def normalize_backend_name(name: str) -> str:
    """`name` as diffusers spells it, or AttentionBackendError listing the valid names."""
    key = str(name).strip().lower()
    valid = backend_names()
    if key not in valid:
        public = [n for n in valid if not n.startswith("_")]
        private = [n for n in valid if n.startswith("_")]
        raise AttentionBackendError(
            f"unknown attention backend {name!r}; valid names: {', '.join(public)}"
            + (f" (diffusers' private variants: {', '.join(private)})" if private else "")
        )
    return key


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return str(torch.get_default_dtype()).replace("torch.", "")
    return str(dtype).replace("torch.", "")


def check_attention_backend(
    name: str | None, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> str | None:
    """Check before loading a model that backend `name` can run on `device` (default: CUDA when present,
    else CPU) with weights of `dtype` (default: float32, what diffusers loads without torch_dtype).
    Returns the normalized name (None for None: diffusers' default); raises AttentionBackendError."""
    if name is None:
        return None
    name = normalize_backend_name(name)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    missing = _missing_package(name)
    package = f"; it also needs its package: {missing}" if missing else ""
    wanted = "cuda" if name in NEEDS_CUDA else NEEDS_DEVICE.get(name)
    if wanted is not None and device.type != wanted:
        why = WHY_CUDA.get(name, f"{_kernel_family(name)} has {wanted.upper()} kernels only")
        fallback = "; on CPU use native, flex or _native_math" if device.type == "cpu" else ""
        raise AttentionBackendError(
            f"attention backend {name!r} needs a {wanted.upper()} device ({why}), not {device.type}{fallback}{package}"
        )
    if wanted == "cuda" and not torch.cuda.is_available():
        raise AttentionBackendError(
            f"attention backend {name!r} needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)"
            f"{package}"
        )
    if missing:
        raise AttentionBackendError(f"attention backend {name!r} is not installed: {missing}")
    dtype_name = _dtype_name(dtype)
    if name in NEEDS_BF16 and dtype_name != "bfloat16":
        raise AttentionBackendError(
            f"attention backend {name!r} needs bfloat16 weights, not {dtype_name} (--dtype bfloat16)"
        )
    half = name in NEEDS_HALF or (name in NEEDS_HALF_ON_CUDA and device.type == "cuda")
    if half and dtype_name not in ("bfloat16", "float16"):
        raise AttentionBackendError(
            f"attention backend {name!r} needs bfloat16 or float16 weights, not {dtype_name} (--dtype bfloat16)"
        )
    return name


def _transformer(pipe_or_transformer: Any) -> torch.nn.Module:
    transformer = getattr(pipe_or_transformer, "transformer", None)
    module = transformer if transformer is not None else pipe_or_transformer
    if not hasattr(module, "set_attention_backend"):
        raise AttentionBackendError(
            f"{type(module).__name__} has no set_attention_backend (a diffusers ModelMixin transformer is needed)"
        )
    return module


def _processors(module: torch.nn.Module) -> list[Any]:
    found = []
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            found.append(processor)
    return found


def attention_backend_of(pipe_or_transformer: Any) -> str:
    """The backend the transformer's attention runs with now (its processors' choice, else diffusers' active one)."""
    transformer = getattr(pipe_or_transformer, "transformer", None)
    module = transformer if transformer is not None else pipe_or_transformer
    chosen = {p._attention_backend for p in _processors(module)}
    chosen.discard(None)
    if len(chosen) == 1:
        value = chosen.pop()
        return getattr(value, "value", str(value))
    if chosen:
        return "mixed:" + ",".join(sorted(getattr(v, "value", str(v)) for v in chosen))
    active = _dispatch()._AttentionBackendRegistry._active_backend
    return getattr(active, "value", str(active))


def _probe(module: torch.nn.Module, name: str) -> None:
    """One small attention call through the backend with the model's device, dtype, heads and head size."""
    d = _dispatch()
    config = getattr(module, "config", {})
    heads = int(getattr(config, "num_attention_heads", None) or 1)
    head_dim = int(getattr(config, "attention_head_dim", None) or 64)
    param = next(module.parameters())
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    q = torch.randn(1, 16, heads, head_dim, generator=generator).to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        out = d.dispatch_attention_fn(q, q, q, backend=d.AttentionBackendName(name))
    if out.shape != q.shape or not torch.isfinite(out).all():
        raise RuntimeError(f"a test call returned {'shape ' + str(tuple(out.shape)) if out.shape != q.shape else 'non-finite values'}")


def set_attention_backend(pipe_or_transformer: Any, name: str) -> str:
    """Run the transformer of a pipeline (or a transformer itself) on diffusers' attention backend `name`
    (native, flash, sage, xformers, flex, ...): checked against the model's device and dtype, set with
    diffusers' `set_attention_backend`, then tried once on a tiny input. Returns the normalized name;
    raises AttentionBackendError (one line) and keeps the previous backend when it cannot run."""
    module = _transformer(pipe_or_transformer)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else None
    name = check_attention_backend(name, device=device, dtype=dtype)
    registry = _dispatch()._AttentionBackendRegistry
    previous_active = registry._active_backend
    previous = [(p, p.__dict__.get("_attention_backend", _UNSET)) for p in _processors(module)]
    quiet = logging.getLogger("diffusers.models.modeling_utils")  # "attention backends are experimental"
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        try:
            module.set_attention_backend(name)
        finally:
            quiet.setLevel(level)
        if param is not None:
            _probe(module, name)
    except Exception as exc:
        registry.set_active_backend(previous_active)
        for processor, value in previous:
            if value is _UNSET:
                with contextlib.suppress(AttributeError):
                    del processor._attention_backend
            else:
                processor._attention_backend = value
        text = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise AttentionBackendError(
            f"attention backend {name!r} cannot run on {device.type}/{_dtype_name(dtype)}: {detail}"
        ) from exc
    return name

