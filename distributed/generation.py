"""What `videocache generate` and scripts/generate.py do for `--ulysses N` / `--ring M` / `--cfg-parallel`.

`prepare_parallel` runs before any model is loaded: it reads the process state, checks the degrees
against the number of processes, the video's token count and the model's heads (which the caller reads
from the pipeline folder's config files through the model's family), and makes every rank but rank 0 quiet (no stdout, no warnings, diffusers and
transformers logging at error level), so that one line is printed per error and per result. A rank other
than 0 that finds a configuration error exits with status 2 without printing it (rank 0 prints it).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from .checks import ParallelSettings, check_settings


def settings_from_args(args: argparse.Namespace) -> ParallelSettings:
    ulysses = getattr(args, "ulysses", None)
    ring = getattr(args, "ring", None)
    return ParallelSettings(
        ulysses=1 if ulysses is None else ulysses, ring=1 if ring is None else ring,
        cfg=2 if getattr(args, "cfg_parallel", False) else 1,
    )


def quiet_this_rank() -> None:
    """Rank-0-only output: this (non-main) process prints nothing but errors."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


class ParallelRun:
    """One parallel generation's process state and the transformer's parallelism."""

    def __init__(self, settings: ParallelSettings, state: Any) -> None:
        self.settings = settings
        self.state = state
        self.parallelism: Any = None

    @property
    def is_main(self) -> bool:
        return bool(self.state.is_main_process)

    @property
    def device(self) -> str:
        return str(self.state.device)

    def apply(self, pipe: Any) -> Any:
        """Parallelise the pipeline's transformer (after the cache, if any, was applied)."""
        from .parallel import parallelize

        warnings.filterwarnings("ignore", message=".*all_gather_tensor.*deprecated", category=FutureWarning)
        s = self.settings
        self.parallelism = parallelize(pipe, ulysses=s.ulysses, ring=s.ring, cfg=s.cfg)
        return self.parallelism

    def summary(self, engine: Any) -> dict[str, Any]:
        """The summary's `parallel` entry, with every rank's cache figures (a collective: all ranks call it).
        computed_fraction must be the same on every rank (decisions come from the table); a rank that
        disagrees is reported, not hidden."""
        import torch.distributed as dist

        mine = {"computed_fraction": 1.0, "cache_peak_bytes": 0, "cache_peak_host_bytes": 0}
        if engine is not None:
            stats = engine.stats()
            mine = {k: stats[k] for k in mine}
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        fractions = {round(r["computed_fraction"], 9) for r in ranks}
        return {
            "parallel": {
                **self.parallelism.describe(),
                "per_rank": ranks,
                "ranks_agree": len(fractions) == 1,
            }
        }


def prepare_parallel(
    args: argparse.Namespace, *, geometry: Any, guidance_scale: float | None
) -> ParallelRun | None:
    """None when no parallel flag was given; else the checked ParallelRun (see the module docstring).
    `geometry()` gives the model's (attention heads, video tokens), None where unknown before loading; it
    is called only when a parallel flag was given."""
    settings = settings_from_args(args)
    if settings == ParallelSettings():
        return None
    from .state import process_state

    state = process_state()
    try:
        heads, tokens = geometry()
        check_settings(settings, state.num_processes, tokens=tokens, heads=heads, guidance_scale=guidance_scale)
    except ValueError:  # ParallelConfigError, or a model whose family cannot run in parallel
        if not state.is_main_process:
            raise SystemExit(2) from None
        raise
    if not state.is_main_process:
        quiet_this_rank()
    return ParallelRun(settings, state)
