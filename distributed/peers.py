"""Third-party caches under videocache's sequence parallelism: what must be agreed across ranks.

Under Ulysses or ring parallelism each rank holds a shard of the tokens, and a cache hook placed on the
blocks (diffusers' caches, videocache's engine) sees only that shard. A cache whose decision is taken
from the data must take the same decision on every rank of a branch: a rank that skips the remaining
blocks while another computes them leaves the computing rank waiting in the next attention all-to-all
(a hang, or a collective paired with the wrong one).

Which diffusers 0.42.1 caches decide from the data:

* First-Block-Cache (`FBCHeadBlockHook._should_compute_remaining_blocks`): the relative change of the
  first block's residual, `mean|r_t - r_{t-1}| / mean|r_{t-1}|`, computed on whatever the hook sees,
  so under sequence parallelism on the local shard, with no collective. The ranks' shards give different
  values; a threshold between them makes the ranks disagree. `agree_first_block_cache` replaces the
  decision of one transformer's FBCache by the global statistic: both sums are all-reduced (float64) over
  the ranks sharing the branch's tokens (the `Agreement` group that `parallelize` sets), which is the
  single-process value up to float rounding, so the decision is the same on every rank and the same as
  in one process. It counts how often the local shard alone would have decided otherwise.
* MagCache, TaylorSeer, Pyramid Attention Broadcast: decide from the step, the timestep or calibrated
  ratios only, the same on every rank (MagCache's ratios must then be the same on every rank: calibrate
  without the parallelism, or broadcast them).

cache-dit (1.5.3) agrees by itself: its DBCache all-reduces (AVG) its residual statistic whenever the
default process group has more than one rank. It cannot run under videocache's parallelism, though: it
replaces the transformer's block loop with its own `CachedBlocks`, which keeps the full-sequence input
while the split hook on `blocks.0` hands the first block a shard (a shape error on the first call). With
its own context parallelism (`ParallelismConfig(ulysses_size=...)`) it runs on gloo, see
`videocache.eval_vbench.peers.cachedit.CacheDitDBCacheMethod`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FBC_HEAD_HOOK = "fbc_leader_block_hook"  # diffusers.hooks.first_block_cache._FBC_LEADER_BLOCK_HOOK


@dataclass
class FirstBlockCacheAgreement:
    """The agreed decision installed on one FBCache head hook; `trace` holds, per decision under
    parallelism, (the local shard's statistic, the agreed statistic, the agreed decision)."""

    transformer: torch.nn.Module
    hook: Any
    original: Any
    trace: list[tuple[float, float, bool]] = field(default_factory=list)
    local_disagreements: int = 0  # decisions the local shard alone would have taken the other way

    def decide(self, hidden_states_residual: torch.Tensor) -> bool:
        from videocache.parallel_plan import AGREE_ATTR

        agreement = getattr(self.transformer, AGREE_ATTR, None)
        if agreement is None:  # one process, or CFG parallelism alone (each rank has its own branch)
            return self.original(hidden_states_residual)
        import torch.distributed as dist

        state = self.hook.state_manager.get_state()
        previous = state.head_block_residual
        if previous is None:  # the first call of a context computes, on every rank
            return True
        sums = torch.stack([(hidden_states_residual - previous).abs().sum(), previous.abs().sum()])
        sums = sums.to(device="cpu", dtype=torch.float64)  # the agreement's group is gloo
        local = (sums[0] / sums[1]).item()
        dist.all_reduce(sums, group=agreement.group)
        agreed = (sums[0] / sums[1]).item()
        decision = agreed > self.hook.threshold
        if (local > self.hook.threshold) != decision:
            self.local_disagreements += 1
        self.trace.append((local, agreed, decision))
        return decision

    def stats(self) -> dict[str, Any]:
        if not self.trace:
            return {}
        return {
            "agreed_decisions": len(self.trace),
            "agreed_computes": sum(d for _, _, d in self.trace),
            "local_disagreements": self.local_disagreements,
        }

    def reset(self) -> None:
        self.trace.clear()
        self.local_disagreements = 0

    def remove(self) -> None:
        if self.hook.__dict__.get("_should_compute_remaining_blocks") == self.decide:
            del self.hook._should_compute_remaining_blocks


def agree_first_block_cache(transformer: torch.nn.Module) -> FirstBlockCacheAgreement:
    """Make the diffusers First-Block-Cache enabled on `transformer` decide on the global statistic when
    the transformer is sequence-parallel (see the module docstring); one process is unchanged. Call after
    `transformer.enable_cache(FirstBlockCacheConfig(...))`, before or after `parallelize`."""
    from diffusers.hooks import HookRegistry

    head = None
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            head = registry.get_hook(FBC_HEAD_HOOK)
            if head is not None:
                break
    if head is None:
        raise ValueError("no diffusers First-Block-Cache head hook on this transformer: enable the cache first")
    agreement = FirstBlockCacheAgreement(transformer, head, head._should_compute_remaining_blocks)
    head._should_compute_remaining_blocks = agreement.decide  # on the instance: the class stays diffusers'
    return agreement
