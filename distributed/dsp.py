"""Two-axis sequence parallelism (DSP, Dynamic Sequence Parallelism) from a plan's `axes` part (ours;
diffusers 0.42.1 has none).

For transformers whose token sequence is a grid (A0, A1), token index a0 * A1 + a1 (Open-Sora's STDiT3:
frames x positions), and whose attentions each mix the tokens along one axis only (spatial attention
within a frame, temporal attention along time at one position), while everything else is token-wise. The
ranks that share a branch's tokens hold the stream split along axis 0 (whole rows: frames), so an
attention within a row needs no communication; a module that mixes along axis 0 (declared in `switch`)
gets its input re-sharded along axis 1 (whole columns: each rank every frame of some positions) by one
all-to-all, and its output re-sharded back by another. No attention processor is involved: the
attentions run locally on whatever tokens they are given.

Why switch around the module and not between blocks (which costs the same, one all-to-all per block on
average): the stream keeps one layout at every block boundary, so a cache sees it the same everywhere
(kept outputs, block runs' deltas over several blocks, the fused skip of the whole stack), and a switched
module whose output a cache serves skips both all-to-alls (PAB's "broadcast sequence parallel").

Uneven sizes: each axis is split as `tensor_split` does (the first A % n ranks one more); the all-to-all
pads every rank's piece to the largest (ceil(A0 / n), ceil(A1 / n)), and the receiver cuts the padding off
again, so nothing padded ever reaches a module. Every axis needs at least one row per rank
(ParallelConfigError, one line, otherwise). The sizes are the same on every rank (they come from the call's
input shapes), so no sizes are exchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from .checks import ParallelConfigError
from .sequence import _get_submodule_by_name, _input_index


def shard_sizes(n: int, degree: int) -> list[int]:
    """The sizes of `tensor_split(n, degree)`: the first n % degree shards one larger."""
    return [n // degree + (1 if r < n % degree else 0) for r in range(degree)]


class Grid:
    """The token grid (A0, A1) of the current top-level call, and this rank's place among `degree` ranks."""

    def __init__(self, degree: int, rank: int, group: Any, names: tuple[str, str]) -> None:
        self.degree, self.rank, self.group, self.names = degree, rank, group, names
        self.shape: tuple[int, int] | None = None
        self.rows: list[int] = []
        self.cols: list[int] = []

    def start_call(self, shape: tuple[int, int]) -> None:
        for n, name in zip(shape, self.names, strict=True):
            if n < self.degree:
                raise ParallelConfigError(
                    f"{n} {name} cannot be split over {self.degree} sequence-parallel ranks (each needs at least one): "
                    f"use a degree <= {min(shape)} or a larger video"
                )
        self.shape = (int(shape[0]), int(shape[1]))
        self.rows, self.cols = shard_sizes(self.shape[0], self.degree), shard_sizes(self.shape[1], self.degree)

    def _need_call(self) -> tuple[int, int]:
        if self.shape is None:
            raise RuntimeError("sequence parallelism: a split module ran outside a call of the parallelised transformer")
        return self.shape

    # -- the four moves; token dim 1, any dims after it -------------------------------------------------
    def split_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, A0 * A1, ...) -> this rank's rows, (B, A0_r * A1, ...) (no communication)."""
        a0, a1 = self._need_call()
        start = sum(self.rows[: self.rank])
        return x.narrow(1, start * a1, self.rows[self.rank] * a1)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (B, A0_r * A1, ...) -> (B, A0 * A1, ...) on every rank (one all_gather)."""
        _, a1 = self._need_call()
        x = x.contiguous()
        largest = self.rows[0] * a1
        if x.shape[1] < largest:
            pad = list(x.shape)
            pad[1] = largest - x.shape[1]
            x = torch.cat([x, x.new_zeros(pad)], dim=1)
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat([p.narrow(1, 0, n * a1) for p, n in zip(parts, self.rows, strict=True)], dim=1)

    def _exchange(self, pieces: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
        """All-to-all of one piece per rank, each zero-padded to `shape` (B, rows, cols, ...); what every
        rank sent to this one, padded."""
        send = torch.zeros((self.degree, *shape), dtype=pieces[0].dtype, device=pieces[0].device)
        for q, piece in enumerate(pieces):
            send[q, :, : piece.shape[1], : piece.shape[2]] = piece
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return list(recv.unbind(0))

    def to_cols(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows (B, A0_r * A1, ...) -> its columns (B, A0 * A1_r, ...), token a0 * A1_r + a1."""
        a0, a1 = self._need_call()
        batch, rest = x.shape[0], x.shape[2:]
        grid = x.reshape(batch, self.rows[self.rank], a1, *rest)
        pieces = list(grid.tensor_split(self.degree, dim=2))
        got = self._exchange(pieces, (batch, self.rows[0], self.cols[0], *rest))
        mine = self.cols[self.rank]
        out = torch.cat([g[:, :n, :mine] for g, n in zip(got, self.rows, strict=True)], dim=1)
        return out.reshape(batch, a0 * mine, *rest)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_cols`: this rank's columns (B, A0 * A1_r, ...) -> its rows (B, A0_r * A1, ...)."""
        a0, a1 = self._need_call()
        batch, rest = x.shape[0], x.shape[2:]
        grid = x.reshape(batch, a0, self.cols[self.rank], *rest)
        pieces = list(grid.tensor_split(self.degree, dim=1))
        got = self._exchange(pieces, (batch, self.rows[0], self.cols[0], *rest))
        mine = self.rows[self.rank]
        out = torch.cat([g[:, :mine, :n] for g, n in zip(got, self.cols, strict=True)], dim=2)
        return out.reshape(batch, mine * a1, *rest)


def _replace(index: int | None, name: str, fn, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with input `name` (at `index` when positional) replaced by fn(value)."""
    if name in kwargs:
        return args, {**kwargs, name: fn(kwargs[name])}
    if index is not None and index < len(args):
        return (*args[:index], fn(args[index]), *args[index + 1 :]), kwargs
    raise RuntimeError(f"sequence parallelism: the plan's input {name!r} was not passed to the module")


def _pre(name: str, index: int | None, fn, module: torch.nn.Module, args: tuple, kwargs: dict):
    return _replace(index, name, fn, args, kwargs)


def _post(fn, module: torch.nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    return (fn(output[0]), *output[1:])


def attach_axes_plan(transformer: torch.nn.Module, axes: Any, group: Any, degree: int, rank: int) -> list[Any]:
    """Attach a plan's `axes` part (`plan.AxesPlan`) as torch module hooks; returns their handles. A root
    pre-hook, first of all, reads the call's grid (and refuses one an axis of which is smaller than the
    degree). torch's module hooks run outside any hook registry's, so a cache applied to the same modules
    sees the split stream whichever was applied first."""
    grid = Grid(degree, rank, group, axes.names)
    handles = []

    def start(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid.start_call(axes.grid(module, args, kwargs))

    def local_rows(value: Any) -> int:
        grid._need_call()
        return grid.rows[grid.rank]

    def modules(path: str) -> list[torch.nn.Module]:
        found = _get_submodule_by_name(transformer, path)
        return found if isinstance(found, list) else [found]

    handles.append(transformer.register_forward_pre_hook(start, with_kwargs=True, prepend=True))
    for path, name in axes.split.items():
        for module in modules(path):
            hook = functools.partial(_pre, name, _input_index(module, name), grid.split_rows)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for path, name in axes.local_rows.items():
        for module in modules(path):
            hook = functools.partial(_pre, name, _input_index(module, name), local_rows)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for path, name in axes.switch.items():
        for module in modules(path):
            hook = functools.partial(_pre, name, _input_index(module, name), grid.to_cols)
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            handles.append(module.register_forward_hook(functools.partial(_post, grid.to_rows)))
    for path in axes.gather:
        for module in modules(path):
            handles.append(module.register_forward_hook(functools.partial(_post, grid.gather_rows)))
    return handles
