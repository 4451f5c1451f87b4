"""The one process-state object every entry point uses, and the one way to read the launcher's rank.

`launch_rank`, `launched_world` and `launch_local_rank` read what `accelerate launch` or torchrun put in
the environment (RANK, WORLD_SIZE, LOCAL_RANK) without starting torch.distributed: for what is decided
before or without a process group (which process prints an error, which share of a data-parallel run is
this one's). `process_state` joins the group.

accelerate's `PartialState()` reports a single process on a machine without CUDA even when
`accelerate launch` started several (WORLD_SIZE > 1); asking for the CPU backend there gives the
real multi-process state over gloo. With CUDA it is the usual NCCL state.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def launch_rank() -> int:
    """This process's rank among the launched processes (RANK); 0 when it was not launched by one."""
    return int(os.environ.get("RANK", "0"))


def launched_world() -> int:
    """How many processes the launcher started (WORLD_SIZE); 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_local_rank() -> int | None:
    """This process's rank on its machine (LOCAL_RANK: which GPU is its own); None when not launched."""
    local = os.environ.get("LOCAL_RANK")
    return None if local is None else int(local)


def process_state(**kwargs) -> PartialState:
    """The process state (made once per process); `kwargs` go to torch.distributed.init_process_group
    the first time (e.g. `timeout=timedelta(seconds=600)`)."""
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def end_processes(state: PartialState) -> None:
    """After a run every rank finished: meet, then tear the process group down, so that no rank exits
    while a collective's threads of the others still talk to it (gloo aborts such a process)."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def leave_on_error(state: PartialState) -> None:
    """A rank that stops on an error: tear its process group down (no meeting: the others may be inside a
    collective), so that it exits with its own code instead of being aborted by gloo's threads at exit."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_initialized():
        dist.destroy_process_group()


def exit_processes(state: PartialState, code: int) -> None:
    """End a launched script's process after every rank finished: meet, flush, and leave without the
    interpreter's teardown. Once in a few full test-suite runs (CI's too) a rank of scripts/generate.py
    was aborted at exit by gloo ("terminate called without an active exception") after all its work and
    output were done, and the launcher then killed the others; not reproduced alone or under load. Nothing
    is left to tear down that matters once the ranks have met: the files are closed and the output flushed."""
    import sys

    if state.num_processes > 1:
        state.wait_for_everyone()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
