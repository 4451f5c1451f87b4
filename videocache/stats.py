"""What the engine executed: FLOP counters per component, call counts, block runs and the per-cell trace.

Counting is plain Python arithmetic on numbers the engine already has (FLOPs per call are memoised per
input shape), so it costs no device work and no host-device synchronisation.
"""

from __future__ import annotations

from typing import Any

from .table import COMPONENTS

TRACE_LETTERS = "CRFD"
SKIPPED = 3  # trace code of a component whose block a block-run reuse skipped
COUNT_KEYS = ("compute", "reuse", "forecast")
_NC = len(COMPONENTS)


class EngineStats:
    def __init__(self, trace: bool = True) -> None:
        self.tracing = trace
        self.reset()

    def reset(self) -> None:
        self.executed = [0.0] * _NC
        self.skipped = [0.0] * _NC
        self.counts = {"transformer": 0, "compute": 0, "reuse": 0, "forecast": 0}
        self.runs = {"compute": 0, "reuse": 0, "skipped_blocks": 0}
        self.fallbacks = 0
        self.call_log: list[tuple[int, int, float | None]] = []  # (context id, step, sigma) per call
        self.trace: list[tuple[int, int, int, int]] = []  # (call, block, component, action code)
        self.context_names: list[str] = []
        self._context_ids: dict[str, int] = {}

    def call(self, context: str, step: int, sigma: float | None) -> int:
        """Record a transformer call; its index in the call log (-1 when not tracing)."""
        self.counts["transformer"] += 1
        if not self.tracing:
            return -1
        cid = self._context_ids.get(context)
        if cid is None:
            cid = self._context_ids[context] = len(self.context_names)
            self.context_names.append(context)
        self.call_log.append((cid, step, sigma))
        return len(self.call_log) - 1

    def cell(self, call: int, block: int, comp: int, action: int, flops: float) -> None:
        if action == 0:
            self.executed[comp] += flops
        else:
            self.skipped[comp] += flops
        self.counts[COUNT_KEYS[action]] += 1
        if self.tracing:
            self.trace.append((call, block, comp, action))

    def stack(self, call: int, num_blocks: int, action: int, flops: list[float]) -> None:
        """Every cell of a uniform skip step at once."""
        self.counts[COUNT_KEYS[action]] += num_blocks * _NC
        for c in range(_NC):
            self.skipped[c] += flops[c]
        if self.tracing:
            self.trace.extend((call, b, c, action) for b in range(num_blocks) for c in range(_NC))

    def skipped_block(self, call: int, block: int, flops: list[float | None]) -> None:
        for comp in range(_NC):
            if flops[comp] is not None:
                self.skipped[comp] += flops[comp]
            if self.tracing:
                self.trace.append((call, block, comp, SKIPPED))
        self.runs["skipped_blocks"] += 1

    def summary(self) -> dict[str, Any]:
        ex, sk = sum(self.executed), sum(self.skipped)
        by_comp = {
            c: (self.executed[i] / (self.executed[i] + self.skipped[i]) if self.executed[i] + self.skipped[i] else None)
            for i, c in enumerate(COMPONENTS)
        }
        return {
            "computed_fraction": ex / (ex + sk) if ex + sk else None,
            "computed_fraction_by_component": by_comp,
            "executed_flops": ex,
            "skipped_flops": sk,
            "calls": dict(self.counts),
            "block_runs": dict(self.runs),
            "fallbacks": self.fallbacks,
        }

    def records(self) -> list[dict[str, Any]]:
        out = []
        for call, block, comp, code in self.trace:
            cid, step, sigma = self.call_log[call]
            out.append({
                "context": self.context_names[cid], "step": step, "sigma": sigma, "block": block,
                "component": COMPONENTS[comp], "action": TRACE_LETTERS[code],
            })
        return out
