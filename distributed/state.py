"""The one process-state object every entry point uses.

accelerate's `PartialState()` reports a single process on a machine without CUDA even when
`accelerate launch` started several (WORLD_SIZE > 1); asking for the CPU backend there gives the
real multi-process state over gloo. With CUDA it is the usual NCCL state.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


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
