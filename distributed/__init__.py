"""Sequence (Ulysses) and CFG parallelism for video transformers, with the videocache cache on every rank.

    from videocache.distributed import parallelize, process_state
    state = process_state()                      # under accelerate launch / torchrun: one process per rank
    pipe = load_pipeline("reference-wan", device=state.device)
    videocache.apply(pipe, "reference-wan", "fast")   # optional, before parallelize
    parallelize(pipe, ulysses=2)                 # or cfg=2, or ulysses=N, cfg=2 on 2N processes

Model families declare a `parallel_plan` (`videocache.parallel_plan.ParallelPlan`); the machinery here is
generic. Which parts are diffusers' and which are ours: see `sequence` and `cfg`.
"""

from videocache.parallel_plan import ParallelPlan

from .checks import ParallelConfigError, ParallelSettings, check_settings
from .parallel import Parallelism, get_parallel_plan, get_parallelism, parallelize
from .state import process_state

__all__ = [
    "ParallelConfigError",
    "ParallelPlan",
    "ParallelSettings",
    "Parallelism",
    "check_settings",
    "get_parallel_plan",
    "get_parallelism",
    "parallelize",
    "process_state",
]
