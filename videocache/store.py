"""Where kept component outputs live: their storage format, their device, and the byte budget.

A kept output can be stored as produced, in a lower precision (`bfloat16`; `float8_e4m3fn` with one
float32 scale per token row, so a 1536-wide bf16 row of 3 KB becomes 1.5 KB + 4 B; or `int8`, symmetric
with one float32 scale per 64 channels of a row, 1.5 KB + 96 B, whose rounding error is relative to the
group's largest value rather than e4m3's 3 mantissa bits per value), and/or offloaded to
pinned host memory (with a device budget, only what does not fit on the device: it spills). Offloaded outputs are copied to the host on a side CUDA stream after the compute
stream produced them, and copied back (`prefetch`) on the same side stream ahead of the block that
reads them, so the transfers overlap with the blocks that compute in between. On a CPU-only model there
is no other memory to offload to: outputs stay where they are.

The budget counts what is really held: bytes on the model's device and bytes on the host, separately;
`max_bytes` bounds the device bytes and `max_host_bytes` the host bytes. A store the budget refuses
returns None and the engine computes that cell instead of reusing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_GROUP = 64  # channels sharing one int8 scale


def flatten(out: Any) -> tuple[list[torch.Tensor], type | None]:
    """A component output as a list of tensors plus the container type (None for a bare tensor)."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, tuple | list) and out and all(isinstance(t, torch.Tensor) for t in out):
        return list(out), type(out)
    raise TypeError(
        f"videocache can cache tensors or tuples of tensors; this component returned {type(out).__name__}"
    )


def rebuild(parts: Sequence[torch.Tensor], container: type | None) -> Any:
    return parts[0] if container is None else container(parts)


def _group(width: int) -> int:
    """Channels per int8 scale: INT8_GROUP where it divides the width, else the whole row."""
    return INT8_GROUP if width % INT8_GROUP == 0 else width


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class Kept:
    """One kept output: the step it was computed at, the last step that reads it, and its stored parts.

    Each stored part is (data, scale or None); `dtypes`/`devices` are what the parts were produced as, which
    `CacheStore.load` restores."""

    __slots__ = ("step", "last_use", "stored", "container", "dtypes", "device", "device_bytes",
                 "host_bytes", "flops", "staged", "ready")

    def __init__(self, step: int, last_use: int, container: type | None) -> None:
        self.step = step
        self.last_use = last_use
        self.container = container
        self.stored: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.dtypes: list[torch.dtype] = []
        self.device: torch.device | None = None
        self.device_bytes = 0
        self.host_bytes = 0
        self.flops = 0.0  # FLOPs of the call that produced it (what a reuse of it saves)
        self.staged: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # prefetched copies
        self.ready: Any = None  # CUDA event after which `stored` (offload) or `staged` (prefetch) is complete


class CacheStore:
    """Keeps, restores and frees component outputs under a byte budget; see the module docstring."""

    def __init__(
        self,
        max_bytes: int | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        max_host_bytes: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_host_bytes = max_host_bytes
        self.dtype = dtype
        self.offload = offload
        self.device_bytes = self.host_bytes = 0
        self.peak_device = self.peak_host = 0
        self.refused = 0
        # under sequence parallelism: a callable that turns this rank's yes/no into the one all ranks
        # agree on (the budget sees this rank's token shard, whose size can differ between ranks)
        self.agree: Any = None
        self._stream: Any = None
        self._pinned: dict[tuple, list[torch.Tensor]] = {}  # free pinned host buffers by (shape, dtype)

    # -- accounting ---------------------------------------------------------------------------------
    def reserve(self, device_bytes: int, host_bytes: int = 0) -> bool:
        """Count bytes about to be held; False (and nothing counted) when the budget refuses them."""
        if self.max_bytes is None and self.max_host_bytes is None:
            return self._count(device_bytes, host_bytes)
        fits = not (
            (self.max_bytes is not None and self.device_bytes + device_bytes > self.max_bytes)
            or (self.max_host_bytes is not None and self.host_bytes + host_bytes > self.max_host_bytes)
        )
        if self.agree is not None:
            fits = self.agree(fits)
        if not fits:
            self.refused += 1
            return False
        return self._count(device_bytes, host_bytes)

    def _count(self, device_bytes: int, host_bytes: int) -> bool:
        self.device_bytes += device_bytes
        self.host_bytes += host_bytes
        self.peak_device = max(self.peak_device, self.device_bytes)
        self.peak_host = max(self.peak_host, self.host_bytes)
        return True

    def unreserve(self, device_bytes: int, host_bytes: int = 0) -> None:
        self.device_bytes -= device_bytes
        self.host_bytes -= host_bytes

    def reset_peaks(self) -> None:
        self.peak_device, self.peak_host = self.device_bytes, self.host_bytes

    # -- formats ------------------------------------------------------------------------------------
    def _encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dtype is None or self.dtype == t.dtype or not t.is_floating_point():
            return t, None
        if self.dtype == FP8:  # one scale per token row, kept on the device: no host round trip
            amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
            scale = amax / _FP8_MAX
            return (t.float() / scale).to(FP8), scale
        if self.dtype == torch.int8:  # symmetric, one scale per group of channels of a token row
            groups = t.float().unflatten(-1, (-1, _group(t.shape[-1])))
            scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
            return (groups / scale).round_().to(torch.int8), scale
        return t.to(self.dtype), None

    @staticmethod
    def _decode(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if scale is None:
            return data if data.dtype == dtype else data.to(dtype)
        if data.dtype == torch.int8:
            return (data.float() * scale).flatten(-2).to(dtype)
        return (data.float() * scale).to(dtype)

    def _offloading(self, device: torch.device) -> bool:
        return self.offload and device.type != "cpu"

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None and device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pinned_like(self, t: torch.Tensor) -> torch.Tensor:
        free = self._pinned.get((tuple(t.shape), t.dtype))
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())

    # -- keep / load / free -------------------------------------------------------------------------
    def keep(self, step: int, parts: list[torch.Tensor], container: type | None, last_use: int) -> Kept | None:
        """Store `parts` (computed at `step`, read until `last_use`), or None when the budget refuses."""
        kept = Kept(step, last_use, container)
        kept.dtypes = [p.dtype for p in parts]
        kept.device = parts[0].device
        encoded = [self._encode(p.detach()) for p in parts]
        data_bytes = sum(_nbytes(d) for d, _ in encoded)
        scale_bytes = sum(_nbytes(s) for _, s in encoded)  # fp8 row scales stay on the device
        # with a device budget, offloading spills: device memory first, the host for what does not fit
        offload = self._offloading(kept.device) and (
            self.max_bytes is None or self.device_bytes + data_bytes + scale_bytes > self.max_bytes
        )
        device_bytes = scale_bytes + (0 if offload else data_bytes)
        host_bytes = data_bytes if offload else 0
        if not self.reserve(device_bytes, host_bytes):
            return None
        kept.device_bytes, kept.host_bytes = device_bytes, host_bytes
        if not offload:
            kept.stored = encoded
            return kept
        stream = self._side_stream(kept.device)
        stream.wait_stream(torch.cuda.current_stream(kept.device))  # the outputs must be complete first
        with torch.cuda.stream(stream):
            for data, scale in encoded:
                host = self._pinned_like(data)
                host.copy_(data, non_blocking=True)
                data.record_stream(stream)  # the allocator must not reuse it before the copy ran
                kept.stored.append((host, scale))
            kept.ready = torch.cuda.Event()
            kept.ready.record(stream)
        return kept

    def prefetch(self, kept: Kept) -> None:
        """Start copying an offloaded output back to its device on the side stream (no-op otherwise)."""
        if kept.staged is not None or not kept.host_bytes or not kept.stored:
            return
        stream = self._side_stream(kept.device)
        with torch.cuda.stream(stream):
            kept.staged = [(d.to(kept.device, non_blocking=True), s) for d, s in kept.stored]
            kept.ready = torch.cuda.Event()
            kept.ready.record(stream)

    def load(self, kept: Kept) -> list[torch.Tensor]:
        """The kept output as produced (dtype and device), waiting for its prefetch if one is under way."""
        stored = kept.stored
        if kept.host_bytes:
            self.prefetch(kept)
            current = torch.cuda.current_stream(kept.device)
            current.wait_event(kept.ready)
            stored = kept.staged
            for d, _ in stored:
                d.record_stream(current)
            kept.staged = None  # the caller holds the device copy only while it uses it
        return [self._decode(d, s, t) for (d, s), t in zip(stored, kept.dtypes, strict=True)]

    def release(self, kept: Kept) -> None:
        self.unreserve(kept.device_bytes, kept.host_bytes)
        if kept.host_bytes:
            for data, _ in kept.stored:
                self._pinned.setdefault((tuple(data.shape), data.dtype), []).append(data)
        kept.stored, kept.staged, kept.device_bytes, kept.host_bytes = [], None, 0, 0

    def clear_pool(self) -> None:
        """Drop the free pinned buffers (at the end of a generation)."""
        self._pinned.clear()
