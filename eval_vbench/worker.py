"""The process that actually generates videos for a comparison.

One worker loads the pipeline once and, for every item (prompt, seed) it is given, runs the uncached
pipeline and then each of its methods, `repeats` times, interleaved (none, m1, m2, none, m1, m2...).
Each method's speed and fidelity are measured against that uncached run from the same process and the
same moment, which keeps timings fair on a noisy shared machine. Records are written as soon as they
are complete, by the worker itself, so a crash of the parent loses nothing.

Workers run in spawned processes (cache-dit patches classes process-wide); `GroupRunner` is the
process-independent part and can be driven in-process too.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .fidelity import psnr, ssim
from .flops import ComponentCounter, ComponentCounts, computed_fraction
from .methods import AppliedMethod, Method, MethodSetup, NoCache, family_of, parse_method
from .run_store import Item, RunSettings, RunStore


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def frames_digest(frames: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()[:16]


@dataclass
class Run:
    """One generation: its frames (first repeat only), timings and executed block work."""

    frames: np.ndarray
    summary: dict[str, Any]
    counts: ComponentCounts
    transformer_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cache_peak_bytes: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def add_timing(self, summary: dict[str, Any]) -> None:
        self.transformer_s.append(float(summary["transformer_s"]))
        self.wall_s.append(float(summary["wall_s"]))


class GroupRunner:
    """Runs items for a group of methods on one loaded pipeline."""

    def __init__(
        self,
        pipe: Any,
        settings: RunSettings,
        store: RunStore,
        first_item: Item,
        process: str = "main",
        save_videos: bool = False,
    ):
        self.pipe = pipe
        self.save_videos = save_videos
        self.settings = settings
        self.store = store
        self.first_item = first_item
        self.process = process
        self._warm = False
        self._calibration = store.load_calibration()
        self.setup = MethodSetup(
            num_inference_steps=settings.steps,
            calibrate=lambda: self._generate(self.first_item),
            store=self._calibration,
            save_store=lambda: self.store.save_calibration(self._calibration),
        )

    def _generate(self, item: Item) -> tuple[Any, ComponentCounts]:
        from videocache.pipelines.generation import generate

        s = self.settings
        with ComponentCounter(self.pipe.transformer) as counter:
            result = generate(
                self.pipe,
                item.prompt,
                negative_prompt=s.negative_prompt,
                seed=item.seed,
                num_inference_steps=s.steps,
                num_frames=s.frames,
                height=s.height,
                width=s.width,
                guidance_scale=s.guidance_scale,
                progress=False,
            )
        return result, counter.counts

    def _run_method(self, method: Method, item: Item) -> tuple[Any, ComponentCounts, int | None, dict, dict]:
        from .cache_memory import CachePeakProbe

        applied: AppliedMethod = method.apply(self.pipe, self.setup)
        probe = None
        try:
            applied.reset_stats()
            if applied.cache_bytes is not None:
                probe = CachePeakProbe(self.pipe.transformer, applied.cache_bytes)
            result, counts = self._generate(item)
            stats = dict(applied.stats() or {})
        finally:
            peak = probe.close() if probe is not None else None
            applied.remove()
        if peak is None:
            peak = stats.get("cache_peak_bytes")
        return result, counts, peak, stats, applied.info

    def run_item(self, item: Item, methods: list[Method], send=lambda msg: None) -> None:
        """Run the uncached pipeline and every method on one item; write one record per method."""
        if not self._warm:  # first call of a fresh process pays one-off costs: keep them out of timings
            self._generate(item)
            self._warm = True
        baseline: Run | None = None
        runs: dict[str, Run] = {}
        failed: dict[str, str] = {}
        for _ in range(self.settings.repeats):
            result, counts = self._generate(item)
            if baseline is None:
                baseline = Run(result.frames, result.summary, counts)
            baseline.add_timing(result.summary)
            for method in methods:
                if isinstance(method, NoCache) or method.spec in failed:
                    continue
                try:
                    result, counts, peak, stats, info = self._run_method(method, item)
                except Exception as exc:  # one method failing must not stop the comparison
                    failed[method.spec] = one_line(exc)
                    print(traceback.format_exc(), file=sys.stderr, flush=True)
                    send({"type": "error", "method": method.spec, "message": failed[method.spec]})
                    continue
                run = runs.get(method.spec)
                if run is None:
                    run = runs[method.spec] = Run(
                        result.frames, result.summary, counts, cache_peak_bytes=peak, stats=stats, info=info
                    )
                elif peak is not None:
                    run.cache_peak_bytes = max(run.cache_peak_bytes or 0, peak)
                run.add_timing(result.summary)
        assert baseline is not None
        for method in methods:
            if method.spec in failed:
                continue
            run = baseline if isinstance(method, NoCache) else runs[method.spec]
            if isinstance(method, NoCache):
                run.cache_peak_bytes = 0
            record = self.record(method, item, run, baseline)
            if self.save_videos:  # before the record: a resumed run skips items that have one
                from videocache.video_io import write_video

                write_video(self.store.video_path(method.spec, item), run.frames, fps=self.settings.fps)
            self.store.write_record(method.spec, item, record)
            send(
                {
                    "type": "done",
                    "method": method.spec,
                    "item": item.key,
                    "computed_fraction": record["computed_fraction"],
                    "psnr": record["psnr"],
                }
            )

    def _attention_backend(self) -> str:
        """The attention backend the pipeline's transformer actually ran with."""
        from videocache.pipelines.attention_backend import attention_backend_of

        return attention_backend_of(self.pipe)

    def record(self, method: Method, item: Item, run: Run, baseline: Run) -> dict[str, Any]:
        t, base_t = min(run.transformer_s), min(baseline.transformer_s)
        w, base_w = min(run.wall_s), min(baseline.wall_s)
        stats = run.stats
        return {
            "method": method.spec,
            "config_digest": method.config_digest(),
            "family": family_of(method),
            "prompt": item.prompt,
            "prompt_index": item.index,
            "seed": item.seed,
            "item": item.key,
            "computed_fraction": computed_fraction(run.counts, baseline.counts),
            "engine_computed_fraction": stats.get("computed_fraction"),
            "transformer_s": t,
            "wall_s": w,
            "baseline_transformer_s": base_t,
            "baseline_wall_s": base_w,
            "transformer_speedup": base_t / t if t > 0 else None,
            "wall_speedup": base_w / w if w > 0 else None,
            "transformer_s_runs": run.transformer_s,
            "wall_s_runs": run.wall_s,
            "baseline_transformer_s_runs": baseline.transformer_s,
            "psnr": psnr(baseline.frames, run.frames),
            "ssim": ssim(baseline.frames, run.frames),
            "cache_peak_bytes": run.cache_peak_bytes,
            "executed": run.counts.as_dict(),
            "baseline_executed": baseline.counts.as_dict(),
            "frames_sha1": frames_digest(run.frames),
            "baseline_sha1": frames_digest(baseline.frames),
            "transformer_calls": run.summary.get("transformer_calls"),
            "peak_mem_bytes": run.summary.get("peak_mem_bytes"),
            "peak_mem_kind": run.summary.get("peak_mem_kind"),
            "info": run.info,
            "engine_stats": {k: v for k, v in stats.items() if k != "computed_fraction"},
            "process": self.process,
            "attention_backend": self._attention_backend(),
            "settings": asdict(self.settings),
        }


# -- process entry point ---------------------------------------------------------------------------------
def _redirect_output(path) -> None:
    """Send everything this process prints (Python and C level) to a log file, off the progress bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def worker_main(
    conn, settings: dict[str, Any], out: str, process: str, first_item: dict[str, Any], save_videos: bool
) -> None:
    """Spawned-process loop: load the pipeline, then answer {"type": "item"} messages until "stop"."""
    store = RunStore(out)
    _redirect_output(store.log_path(process))
    try:
        import torch

        from videocache.pipelines.loader import load_pipeline

        run_settings = RunSettings(**settings)
        dtype = getattr(torch, run_settings.dtype) if run_settings.dtype else None
        pipe = load_pipeline(
            run_settings.model, device=run_settings.device, dtype=dtype, attention_backend=run_settings.attention_backend
        )
        pipe.set_progress_bar_config(disable=True)
        runner = GroupRunner(
            pipe, run_settings, store, Item(**first_item), process=process, save_videos=save_videos
        )
    except Exception as exc:
        traceback.print_exc()
        conn.send({"type": "fatal", "message": one_line(exc)})
        return
    conn.send({"type": "ready", "pid": os.getpid()})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg.get("type") != "item":
            return
        try:
            methods = [parse_method(spec) for spec in msg["methods"]]
            runner.run_item(Item(**msg["item"]), methods, send=conn.send)
        except Exception as exc:  # the baseline itself failed: report it for every method of the item
            traceback.print_exc()
            conn.send({"type": "fatal", "message": one_line(exc)})
            return
        conn.send({"type": "item_done"})
