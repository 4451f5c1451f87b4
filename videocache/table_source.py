"""The table for a run: one fixed CacheTable, or a profile preset expanded for the run's step count and
sigmas (memoised, so a generation expands its preset once), from the preset's calibration made nearest to the
run's guidance scale and step count where the profile has several (`PresetSpec.for_run`); for one expert of
several, restricted to the steps it runs (`CacheTable.within`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .profile import build_table
from .table import BlockLayout, CacheTable


class TableSource:
    def __init__(self, source: CacheTable | Any, layout: BlockLayout) -> None:
        self.fixed = source if isinstance(source, CacheTable) else None
        self.preset = None if self.fixed is not None else source
        self.layout = layout
        self._built: dict[tuple, CacheTable] = {}
        self._within: dict[tuple, tuple[CacheTable, CacheTable]] = {}

    @property
    def has_block_runs(self) -> bool:
        """Whether any table from this source can have block runs."""
        if self.fixed is not None:
            return bool(self.fixed.block_runs)
        return getattr(self.preset, "block_runs", None) is not None

    def __call__(self, num_steps: int, sigmas: Sequence[float] | None, guidance_scale: float | None = None,
                 span: tuple[int, int] | None = None) -> CacheTable:
        table = self._table(num_steps, sigmas, guidance_scale)
        if span is None or span == (0, num_steps):
            return table
        key = (id(table), span)
        if key not in self._within:
            if len(self._within) >= 8:
                self._within.clear()
            self._within[key] = (table, table.within(*span))  # the table is held so its id stays its own
        return self._within[key][1]

    def _table(self, num_steps: int, sigmas: Sequence[float] | None, guidance_scale: float | None) -> CacheTable:
        if self.fixed is not None:
            if num_steps != self.fixed.num_steps:
                raise ValueError(
                    f"the cache table was made for {self.fixed.num_steps} steps; this run has {num_steps}: "
                    f"run {self.fixed.num_steps} steps or apply a table for {num_steps}"
                )
            return self.fixed
        if sigmas is None or len(sigmas) != num_steps:
            raise ValueError(
                "videocache needs the scheduler's sigmas to expand a profile preset: apply it to a pipeline "
                "with a scheduler, or pass the scheduler to apply_to_transformer"
            )
        preset = self.preset.for_run(guidance_scale, num_steps)
        made_at = self.preset.guidance_scale if preset is self.preset else next(
            g for g, v in self.preset.variants if v is preset)
        key = (num_steps, tuple(round(float(s), 6) for s in sigmas), made_at, preset.reference_steps)
        table = self._built.get(key)
        if table is None:
            if len(self._built) >= 8:
                self._built.clear()
            table = self._built[key] = build_table(preset, sigmas, self.layout.num_blocks, self.layout)
        return table
