"""What several model families' adapters and plans share: the flow-matching schedule's sigmas, a call's
(x_t, timestep), multiply-add counts of linear layers, and an empty prediction of a call's shape."""

from __future__ import annotations

from typing import Any

import torch


def flow_scheduler_sigmas(pipe_or_scheduler: Any, num_steps: int | None = None) -> list[float]:
    """Per-step sigmas of a pipeline's (or a scheduler's) current schedule, the trailing terminal sigma
    dropped; from the timesteps / num_train_timesteps where a scheduler has no sigmas."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    timesteps = getattr(scheduler, "timesteps", None)
    n = num_steps if num_steps is not None else (len(timesteps) if timesteps is not None else None)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and (n is None or len(sigmas) >= n):
        values = [float(s) for s in sigmas]
        return values[: n if n is not None else max(len(values) - 1, 1)]
    if timesteps is None:
        raise ValueError(f"{type(scheduler).__name__} exposes neither sigmas nor timesteps")
    total = float(getattr(scheduler.config, "num_train_timesteps", 1000))
    return [float(t) / total for t in timesteps][:n]


def denoiser_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """(hidden_states, timestep) of a diffusers video transformer call, both first in its signature."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if "timestep" in kwargs:
        timestep = kwargs["timestep"]
    else:
        timestep = args[1] if len(args) > 1 else None
    return hidden, timestep


def linear_macs(*linears: torch.nn.Linear | None) -> int:
    """Multiply-adds per token of these linear layers (None: absent)."""
    return sum(m.in_features * m.out_features for m in linears if m is not None)


def module_macs(module: torch.nn.Module) -> int:
    """Multiply-adds per token of every linear layer inside `module`."""
    return linear_macs(*(m for m in module.modules() if isinstance(m, torch.nn.Linear)))


def empty_prediction(args: tuple, kwargs: dict, out_channels: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised prediction shaped like a (batch, channels, frames, height, width) call's input with
    `out_channels` channels (CFG parallelism: the branch a rank does not compute is received into it)."""
    hidden = denoiser_inputs(args, kwargs)[0]
    b, _, f, h, w = hidden.shape
    return torch.empty((b, out_channels, f, h, w), dtype=dtype or hidden.dtype, device=hidden.device)


def first_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The first Linear layer inside `module` (a feed-forward's input projection: it runs once per call)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            return sub
    raise ValueError(f"{type(module).__name__} has no Linear layer to probe")


def last_linear(module: torch.nn.Module) -> torch.nn.Linear:
    found = [sub for sub in module.modules() if isinstance(sub, torch.nn.Linear)]
    if not found:
        raise ValueError(f"{type(module).__name__} has no Linear layer to probe")
    return found[-1]


def attention_output_projection(attn: torch.nn.Module) -> torch.nn.Linear:
    """A diffusers attention's output projection `to_out[0]`: it runs exactly once per executed attention,
    whether or not q/k/v are fused."""
    to_out = getattr(attn, "to_out", None)
    if isinstance(to_out, torch.nn.ModuleList) and len(to_out) and isinstance(to_out[0], torch.nn.Linear):
        return to_out[0]
    if isinstance(to_out, torch.nn.Linear):
        return to_out
    raise ValueError(f"{type(attn).__name__} has no to_out projection to probe")
