"""How many bytes of tensors a third-party cache keeps alive, sampled after every transformer call.

diffusers' cache hooks keep their state in the hook registries of the transformer's modules; cache-dit
keeps its buffers in a context manager attached to the pipeline. Neither reports its memory, so we walk
those objects and add up the distinct tensor storages they reference (module parameters excluded).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

_MAX_DEPTH = 8
_SKIP = (
    torch.nn.Module,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    type,
)


def tensor_bytes(roots: Iterable[Any]) -> int:
    """Total bytes of the distinct tensor storages reachable from `roots` (modules are not entered)."""
    seen_objects: set[int] = set()
    storages: dict[tuple[str, int], int] = {}

    def walk(obj: Any, depth: int) -> None:
        if depth > _MAX_DEPTH or id(obj) in seen_objects or isinstance(obj, (str, bytes, int, float, bool)):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter):
                return
            storage = obj.untyped_storage()
            storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
            return
        if isinstance(obj, _SKIP):
            return
        if isinstance(obj, dict):
            children: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = obj
        elif hasattr(obj, "__dict__"):
            children = vars(obj).values()
        else:
            return
        for child in list(children):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return int(sum(storages.values()))


def diffusers_hook_roots(transformer: torch.nn.Module) -> list[Any]:
    """The hook objects diffusers registered on the transformer and its submodules."""
    roots = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            roots.extend(registry.hooks.values())
    return roots


def cachedit_roots(pipe: Any) -> list[Any]:
    """cache-dit's context managers (they own every cached buffer)."""
    return [
        m
        for m in (
            getattr(pipe, "_context_manager", None),
            getattr(pipe.transformer, "_context_manager", None),
        )
        if m is not None
    ]


class CachePeakProbe:
    """Tracks the peak of `bytes_fn()` sampled after every forward of `transformer` (or of each of a list: a
    pipeline's experts)."""

    def __init__(self, transformer: torch.nn.Module | list[torch.nn.Module], bytes_fn: Callable[[], int]):
        self.peak = 0
        self._bytes_fn = bytes_fn
        self._handles = [t.register_forward_hook(self._sample) for t in (transformer if isinstance(transformer, list)
                                                                            else [transformer])]

    def _sample(self, module, args, output) -> None:
        self.peak = max(self.peak, self._bytes_fn())

    def close(self) -> int:
        self._sample(None, None, None)
        for handle in self._handles:
            handle.remove()
        return self.peak
