"""Shared prefixes: a run that differs from an uncached generation only from step k on computes steps k.. alone.

The calibration's perturbation runs (one per perturbed step and component) each repeat the uncached
generation of the same prompt and seed up to the step they change. Recording the denoiser's outputs of that
generation once and handing them back for the first calls of a later run gives the same outputs to the same
scheduler, so the run is bit-identical and its prefix costs no model call: a perturbation at step t of T
costs (T - t + 1) / T generations (it computes step t - 1, whose outputs step t reuses) instead of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from videocache.experts import denoiser_modules


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output  # a ModelOutput: the pipelines here call with return_dict=False


class PrefixReplay:
    """The denoiser outputs of one generation, in call order (every expert's, CFG branches included)."""

    def __init__(self, pipe: Any, steps: int):
        self.modules = denoiser_modules(pipe)
        self.steps = steps
        self.outputs: list[Any] = []
        self.replayed = 0  # calls handed back, over every replaying run (they ran no model)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs.clear()
        handles = [m.register_forward_hook(lambda module, args, output: self.outputs.append(_detached(output)))
                   for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def calls_per_step(self) -> int | None:
        """Denoiser calls per step of the recorded generation; None where they do not divide evenly."""
        calls, rest = divmod(len(self.outputs), self.steps)
        return calls if calls and not rest else None

    @contextlib.contextmanager
    def replaying(self, from_step: int) -> Iterator[None]:
        """The calls of the steps before `from_step` return the recorded outputs without running the model.
        Install it after anything that wraps the denoisers' forward (videocache.apply), remove it before."""
        per_step = self.calls_per_step
        limit = 0 if per_step is None else from_step * per_step
        served = [0]
        saved = {m: m.__dict__.get("forward") for m in self.modules}

        def replayer(module: Any) -> Any:
            inner = module.forward

            def forward(*args, **kwargs):
                index = served[0]
                served[0] += 1
                if index < limit:
                    return self.outputs[index]
                return inner(*args, **kwargs)
            return forward

        for module in self.modules:
            module.forward = replayer(module)
        try:
            yield
        finally:
            for module, forward in saved.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward
            self.replayed += min(served[0], limit)
