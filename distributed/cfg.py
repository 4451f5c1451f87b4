"""CFG parallelism: the two classifier-free-guidance branches on different ranks (ours; diffusers 0.42.1
has none).

Diffusers' Wan pipeline (like most) calls the transformer twice per step, inside
`cache_context("cond")` and then `cache_context("uncond")`, and combines the two predictions after the
second call. One hook on the transformer lets each rank of a CFG pair compute only its branch:

* first-branch call: the rank of branch 0 computes it; the rank of branch 1 returns an empty tensor of
  the prediction's shape (the plan's `empty_output`) and keeps a reference to it;
* second-branch call: the rank of branch 1 computes it, the rank of branch 0 returns an empty tensor;
  one all_gather over the pair exchanges the two computed predictions, and each rank writes the other
  branch's prediction into the empty tensor it returned, in place, before the pipeline combines them.

So every rank ends the step with both predictions and steps the scheduler identically, one collective per
step. A cache applied to the transformer sees only the calls of its rank's branch, so each rank keeps
only its branch's cache. The hook must be the outermost hook on the transformer (a cache applied after it
would see, and post-process, the empty tensor): apply the cache first; otherwise the first call raises.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from videocache.parallel_plan import ParallelPlan

CFG_HOOK = "videocache_cfg_parallel"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CfgParallelHook(ModelHook):
    """See the module docstring. `branch` is this rank's branch (0 or 1), `group` the pair's process group."""

    _is_stateful = True  # so that cache_context reaches its state manager

    def __init__(self, plan: ParallelPlan, group: Any, branch: int) -> None:
        super().__init__()
        self.plan = plan
        self.group = group
        self.branch = branch
        self.state_manager = StateManager(_NoState)
        self.pending: torch.Tensor | None = None  # this step's first-branch prediction (computed or to fill)
        self.pending_step: int | None = None
        self.exchanges = 0

    def _check_outermost(self, module: torch.nn.Module) -> None:
        order = module._diffusers_hook._hook_order
        if order[-1] != CFG_HOOK:
            raise RuntimeError(
                f"CFG parallelism must be the outermost hook on the transformer, but {order[-1]!r} was added after "
                "it: apply the cache (videocache.apply) before videocache.distributed.parallelize"
            )

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._check_outermost(module)
        context = self.state_manager._context
        name = None if context is None else context.name
        first, second = self.plan.cfg_branches
        if name not in (first, second):
            raise RuntimeError(
                f"CFG parallelism: the transformer was called in cache context {name!r}; it needs the pipeline's "
                f"{first!r} / {second!r} calls (a pipeline that runs both branches in separate transformer calls)"
            )
        step = getattr(context, "step_index", None)
        if name == first:
            if self.pending is not None and step is not None and self.pending_step is not None \
                    and step <= self.pending_step:
                self.pending = None  # a new generation after one that stopped between the two calls
            if self.pending is not None:
                raise RuntimeError(
                    f"CFG parallelism: two {first!r} calls without a {second!r} call between them; guidance must be "
                    "on (guidance_scale > 1)"
                )
            self.pending_step = step
            if self.branch == 0:
                out = self.fn_ref.original_forward(*args, **kwargs)
                self.pending = self.plan.output_tensor(out)
                return out
            self.pending = self.plan.empty_output(module, args, kwargs)
            return self.plan.wrap_output(self.pending, kwargs)
        if self.pending is None:
            raise RuntimeError(f"CFG parallelism: a {second!r} call without a {first!r} call before it")
        cond, self.pending = self.pending, None
        if self.branch == 1:
            out = self.fn_ref.original_forward(*args, **kwargs)
            uncond = self.plan.output_tensor(out)
            mine = uncond
        else:
            uncond = torch.empty_like(cond)
            out = self.plan.wrap_output(uncond, kwargs)
            mine = cond
        if cond.shape != uncond.shape:
            raise RuntimeError(
                f"CFG parallelism: the plan's empty output {tuple(cond.shape)} does not match the prediction "
                f"{tuple(uncond.shape)}"
            )
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=self.group)
        (uncond if self.branch == 0 else cond).copy_(parts[1 - self.branch])
        self.exchanges += 1
        return out

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.pending = None
        return module
