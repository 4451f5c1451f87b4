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
