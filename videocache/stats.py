"""What the engine executed: FLOP counters per component, call counts, block runs and the per-cell trace.

Counting is plain Python arithmetic on numbers the engine already has (FLOPs per call are memoised per
input shape), so it costs no device work and no host-device synchronisation.
"""

from __future__ import annotations

from typing import Any

from .table import BlockLayout

TRACE_LETTERS = "CRFD"
SKIPPED = 3  # trace code of a component whose block a block-run reuse skipped
COUNT_KEYS = ("compute", "reuse", "forecast")


class EngineStats:
    """FLOPs are counted per component name (`layout.names`); a cell (block, c) adds to the name of
    component c of its block's group."""

    def __init__(self, layout: BlockLayout, trace: bool = True) -> None:
        self.tracing = trace
        self.layout = layout
        self.name_index = [[layout.names.index(c) for c in comps] for comps in layout.components_of]
        self.reset()

    def reset(self) -> None:
        self.executed = [0.0] * len(self.layout.names)
        self.skipped = [0.0] * len(self.layout.names)
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
            self.executed[self.name_index[block][comp]] += flops
        else:
            self.skipped[self.name_index[block][comp]] += flops
        self.counts[COUNT_KEYS[action]] += 1
        if self.tracing:
            self.trace.append((call, block, comp, action))

    def stack(self, call: int, action: int, flops: list[float]) -> None:
        """Every cell of a uniform skip step at once; `flops` per component name, summed over blocks."""
        self.counts[COUNT_KEYS[action]] += int(self.layout.present.sum())
        for c, f in enumerate(flops):
            self.skipped[c] += f
        if self.tracing:
            self.trace.extend((call, b, c, action) for b, idx in enumerate(self.name_index) for c in range(len(idx)))

    def skipped_block(self, call: int, block: int, flops: list[float | None]) -> None:
        for comp in range(len(self.name_index[block])):
            if flops[comp] is not None:
                self.skipped[self.name_index[block][comp]] += flops[comp]
            if self.tracing:
                self.trace.append((call, block, comp, SKIPPED))
        self.runs["skipped_blocks"] += 1

    def summary(self) -> dict[str, Any]:
        ex, sk = sum(self.executed), sum(self.skipped)
        by_comp = {
            c: (self.executed[i] / (self.executed[i] + self.skipped[i]) if self.executed[i] + self.skipped[i] else None)
            for i, c in enumerate(self.layout.names)
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
                "component": self.layout.name(block, comp), "action": TRACE_LETTERS[code],
            })
        return out
