"""The process that actually generates videos for a comparison.

One worker loads the pipeline once and, for every item (prompt, seed) it is given, runs the uncached
pipeline and then each of its methods, `repeats` times, interleaved (none, m1, m2, none, m1, m2...).
Each method's speed and fidelity are measured against that uncached run from the same process and the
same moment, which keeps timings fair on a noisy shared machine. Records are written as soon as they
are complete, by the worker itself, so a crash of the parent loses nothing.

Workers run in spawned processes (cache-dit patches classes process-wide); `GroupRunner` is the
process-independent part and can be driven in-process too.

In a parallel comparison (`--ulysses N` / `--ring M` / `--cfg-parallel` under accelerate launch) every
launched rank spawns its own worker for a group, and the workers of one group form a process group of
their own (`ParallelRanks`). They run the same methods on the same items in the same order: for every
item the single-process uncached video (the fidelity reference; computed by every rank at once, so
that no rank waits on another for a whole generation, and kept in the run store by the worker that runs
`none`), then per repeat the uncached run and each method under the parallelism. After every run the
ranks exchange their outcome and executed work, so a method that failed on one rank counts as failed
on all and the ranks' decisions can be compared. Only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from videocache.experts import denoiser_modules

from ..metrics.fidelity import psnr, ssim
from ..metrics.flops import ComponentCounter, ComponentCounts, computed_fraction
from ..peers import AppliedMethod, Method, MethodSetup, NoCache, family_of, parse_method
from .run_store import Item, RunSettings, RunStore


class ParallelRanks:
    """A parallel comparison's worker: its rank in the process group of its group's workers, the degrees,
    and the few collectives the runner needs (all on the default group, which holds only these workers)."""

    def __init__(self, settings: Any, rank: int, world_size: int) -> None:
        self.settings = settings  # videocache.distributed.ParallelSettings
        self.rank = rank
        self.world_size = world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def branch_of(self, rank: int) -> int:
        """The CFG branch of a rank (its ring x ulysses group)."""
        return rank // self.settings.sequence_degree

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"ulysses": s.ulysses, "ring": s.ring, "cfg": s.cfg, "world_size": self.world_size}


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
        parallel: ParallelRanks | None = None,
    ):
        self.pipe = pipe
        self.save_videos = save_videos
        self.settings = settings
        self.store = store
        self.first_item = first_item
        self.process = process
        self.parallel = parallel
        self.writes = parallel is None or parallel.is_main  # only rank 0 writes
        self._warm = False
        calibration = store.load_calibration() if self.writes else None
        # every rank must see rank 0's calibration (MagCache ratios): a rank without them would calibrate alone
        self._calibration = parallel.broadcast(calibration) if parallel is not None else calibration
        self.own_parallel: dict[str, Any] | None = None  # set when a method's own parallelism holds the pipeline
        self.setup = MethodSetup(
            num_inference_steps=settings.steps,
            # one process on every rank, with the same seed: the same ratios everywhere, as in one process
            calibrate=lambda: self._generate(self.first_item),
            store=self._calibration,
            save_store=lambda: self.store.save_calibration(self._calibration) if self.writes else None,
            parallel=parallel.settings if parallel is not None else None,
        )

    def _generate(self, item: Item, sequence_degree: int = 1) -> tuple[Any, ComponentCounts]:
        from videocache.pipelines.generation import generate

        s = self.settings
        with ComponentCounter(denoiser_modules(self.pipe), sequence_degree) as counter:
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
                image=item.image,
            )
        return result, counter.counts

    def _run_method(self, method: Method, item: Item) -> tuple[Any, ComponentCounts, int | None, dict, dict]:
        from ..metrics.cache_memory import CachePeakProbe

        applied: AppliedMethod = method.apply(self.pipe, self.setup)
        probe = None
        try:
            applied.reset_stats()
            if applied.cache_bytes is not None:
                probe = CachePeakProbe(denoiser_modules(self.pipe), applied.cache_bytes)
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
        if self.parallel is not None:
            return self._run_item_parallel(item, methods, send)
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

    # -- parallel comparison --------------------------------------------------------------------------
    def _own_parallelism(self, methods: list[Method]) -> None:
        """A group whose method brings its own parallelism (cache-dit) puts the pipeline on it, once."""
        if self.own_parallel is None:
            own = [m for m in methods if m.parallel_impl == "own"]
            if own:
                self.own_parallel = own[0].parallelize_pipeline(self.pipe, self.setup)

    def _parallel_generate(self, item: Item, method: Method | None = None) -> dict[str, Any]:
        """One run under the parallelism (the method's cache first, then `parallelize`); this rank's
        outcome, with "error" (one line) when it failed."""
        from videocache.distributed import parallelize

        from ..metrics.cache_memory import CachePeakProbe

        applied: AppliedMethod | None = None
        par = probe = None
        try:
            if method is not None:
                applied = method.apply(self.pipe, self.setup)
                applied.reset_stats()
            if self.own_parallel is None:
                s = self.parallel.settings
                par = parallelize(self.pipe, ulysses=s.ulysses, ring=s.ring, cfg=s.cfg)
            if applied is not None and applied.cache_bytes is not None:
                probe = CachePeakProbe(denoiser_modules(self.pipe), applied.cache_bytes)
            self.parallel.barrier()  # start together: no rank's time includes waiting for another
            result, counts = self._generate(item, self.parallel.settings.sequence_degree)
            stats = dict(applied.stats() or {}) if applied is not None else {}
            peak = probe.close() if probe is not None else None
            probe = None
            if peak is None:
                peak = stats.get("cache_peak_bytes", 0 if method is None or isinstance(method, NoCache) else None)
            return {"result": result, "counts": counts, "cache_peak_bytes": peak, "stats": stats,
                    "info": applied.info if applied is not None else {}}
        except Exception as exc:
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            return {"error": one_line(exc)}
        finally:
            if probe is not None:
                probe.close()
            if par is not None:
                par.remove()
            if applied is not None:
                applied.remove()

    def _exchange(self, outcome: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's outcome of the same run: error, executed work, cache bytes, the method's stats.
        A run that failed inside a collective can leave the group unusable (pending sends of the other
        rank): then this rank's own error is raised, not the collective's."""
        try:
            return self.parallel.gather(self._outcome_summary(outcome))
        except Exception as exc:
            raise RuntimeError(outcome.get("error") or one_line(exc)) from exc

    def _outcome_summary(self, outcome: dict[str, Any]) -> dict[str, Any]:
        mine: dict[str, Any] = {"error": outcome.get("error")}
        if mine["error"] is None:
            stats = outcome["stats"]
            mine.update(
                counts=outcome["counts"].as_dict(),
                cache_peak_bytes=outcome["cache_peak_bytes"],
                engine_computed_fraction=stats.get("computed_fraction"),
                stats={k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) and k != "computed_fraction"},
            )
        return mine

    def _run_item_parallel(self, item: Item, methods: list[Method], send) -> None:
        """The parallel counterpart of run_item (see the module docstring); every rank calls it alike."""
        par = self.parallel
        self._own_parallelism(methods)
        if not self._warm:
            if self.own_parallel is None:
                self._generate(item)
            outcome = self._parallel_generate(item)
            if outcome.get("error"):  # raised here: the other ranks fail alike, or time out
                raise RuntimeError(f"the uncached parallel run failed: {outcome['error']}")
            self._exchange(outcome)
            self._warm = True
        have_reference = par.broadcast(self.store.has_reference(item) if par.is_main else None)
        if not have_reference and self.own_parallel is not None:
            raise RuntimeError(
                "the single-process reference video of this item is not in the run store (the worker that runs "
                "'none' writes it before the other workers run the item)"
            )
        reference: Run | None = None
        baseline: Run | None = None
        runs: dict[str, Run] = {}
        ranks: dict[str, list[dict[str, Any]]] = {}
        failed: dict[str, str] = {}
        for _ in range(self.settings.repeats):
            if not have_reference:  # one process, on every rank at once (no collective, no waiting)
                result, counts = self._generate(item)
                if reference is None:
                    reference = Run(result.frames, result.summary, counts)
                reference.add_timing(result.summary)
            outcome = self._parallel_generate(item)
            outcomes = self._exchange(outcome)
            errors = [o["error"] for o in outcomes if o["error"]]
            if errors:
                raise RuntimeError(f"the uncached parallel run failed: {errors[0]}")
            if baseline is None:
                baseline = Run(outcome["result"].frames, outcome["result"].summary, outcome["counts"])
                ranks["none"] = outcomes
            baseline.add_timing(outcome["result"].summary)
            for method in methods:
                if isinstance(method, NoCache) or method.spec in failed:
                    continue
                outcome = self._parallel_generate(item, method)
                outcomes = self._exchange(outcome)  # a method failed on one rank has failed on all
                errors = [f"rank {r}: {o['error']}" for r, o in enumerate(outcomes) if o["error"]]
                if errors:
                    failed[method.spec] = errors[0]
                    if self.writes:
                        send({"type": "error", "method": method.spec, "message": failed[method.spec]})
                    continue
                result, peak = outcome["result"], outcome["cache_peak_bytes"]
                run = runs.get(method.spec)
                if run is None:
                    run = runs[method.spec] = Run(
                        result.frames, result.summary, outcome["counts"], cache_peak_bytes=peak,
                        stats=outcome["stats"], info=outcome["info"],
                    )
                    ranks[method.spec] = outcomes
                elif peak is not None:
                    run.cache_peak_bytes = max(run.cache_peak_bytes or 0, peak)
                run.add_timing(result.summary)
        assert baseline is not None
        if not self.writes:
            return
        if reference is not None:
            per_call = {
                k: reference.counts.flops[k] / reference.counts.calls[k] for k in reference.counts.calls if reference.counts.calls[k]
            }
            self.store.write_reference(item, reference.frames, reference.transformer_s, reference.wall_s, per_call)
            ref = {"frames": reference.frames, "transformer_s": reference.transformer_s, "wall_s": reference.wall_s,
                   "flops_per_call": per_call}
        else:
            ref = self.store.read_reference(item)
        for method in methods:
            if method.spec in failed:
                continue
            run = baseline if isinstance(method, NoCache) else runs[method.spec]
            if isinstance(method, NoCache):
                run.cache_peak_bytes = 0
            record = self.parallel_record(method, item, run, baseline, ref, ranks[method.spec], ranks["none"])
            if self.save_videos:
                from videocache.video_io import write_video

                write_video(self.store.video_path(method.spec, item), run.frames, fps=self.settings.fps)
            self.store.write_record(method.spec, item, record)
            send({"type": "done", "method": method.spec, "item": item.key,
                  "computed_fraction": record["computed_fraction"], "psnr": record["psnr"]})

    def parallel_record(
        self,
        method: Method,
        item: Item,
        run: Run,
        baseline: Run,
        reference: dict[str, Any],
        outcomes: list[dict[str, Any]],
        baseline_outcomes: list[dict[str, Any]],
    ) -> dict[str, Any]:
        """A record of a parallel run: fidelity against the single-process uncached video, speed against
        the parallel uncached run (and against one process). Computed fraction: the component calls the
        ranks executed, weighted by their single-process FLOPs, against the uncached run's (so it is the
        single-process figure when the decisions are; FLOPs summed over the ranks would also count the work
        every rank repeats, such as the text's keys and values, in `computed_fraction_rank_flops`)."""
        import json

        record = self.record(method, item, run, baseline)

        def flops(o: dict[str, Any]) -> int:
            return int(sum(o["counts"]["flops"].values()))

        def weighted(group: list[dict[str, Any]], weights: dict[str, float]) -> float:
            return sum(o["counts"]["calls"].get(k, 0) * w for o in group for k, w in weights.items())

        executed = sum(flops(o) for o in outcomes)
        uncached = sum(flops(o) for o in baseline_outcomes)
        weights = reference.get("flops_per_call") or {}
        computed_flops, uncached_flops = float(executed), float(uncached)
        if weights and weighted(baseline_outcomes, weights):
            computed_flops, uncached_flops = weighted(outcomes, weights), weighted(baseline_outcomes, weights)
        fraction = computed_flops / uncached_flops if uncached_flops else None
        per_rank = [
            {
                "computed_fraction": flops(o) / flops(b) if flops(b) else None,
                "calls": o["counts"]["calls"],
                "cache_peak_bytes": o["cache_peak_bytes"],
                "stats": o["stats"],
            }
            for o, b in zip(outcomes, baseline_outcomes, strict=True)
        ]
        branches: dict[int, set[str]] = {}
        for r, o in enumerate(outcomes):  # the ranks sharing a branch's tokens must execute the same calls
            branches.setdefault(self.parallel.branch_of(r), set()).add(json.dumps(o["counts"]["calls"], sort_keys=True))
        engine = [o["engine_computed_fraction"] for o in outcomes if o["engine_computed_fraction"] is not None]
        t, w = min(run.transformer_s), min(run.wall_s)
        ref_t, ref_w = min(reference["transformer_s"]), min(reference["wall_s"])
        record.update(
            computed_fraction=fraction,
            computed_flops=computed_flops,  # the report's aggregate: sum over items of these, divided
            uncached_flops=uncached_flops,
            computed_fraction_rank_flops=executed / uncached if uncached else None,
            engine_computed_fraction=sum(engine) / len(engine) if engine else None,
            psnr=psnr(reference["frames"], run.frames),
            ssim=ssim(reference["frames"], run.frames),
            psnr_vs_parallel_uncached=record["psnr"],
            ssim_vs_parallel_uncached=record["ssim"],
            psnr_baseline_vs_reference=psnr(reference["frames"], baseline.frames),
            reference_sha1=frames_digest(reference["frames"]),
            reference_transformer_s=ref_t,
            reference_wall_s=ref_w,
            speedup_vs_one_process=ref_t / t if t > 0 else None,
            wall_speedup_vs_one_process=ref_w / w if w > 0 else None,
            parallel={
                **self.parallel.describe(),
                "impl": (self.own_parallel or {}).get("impl", "videocache"),
                "ranks_agree": all(len(calls) == 1 for calls in branches.values()),
                "per_rank": per_rank,
            },
        )
        return record


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


PARALLEL_TIMEOUT_ENV = "VIDEOCACHE_COMPARE_PARALLEL_TIMEOUT"


def _join_parallel(settings: RunSettings) -> tuple[ParallelRanks, str | None]:
    """Join the process group of this group's workers (the launcher's environment, with the port the
    parents agreed on); returns the ranks and this rank's device."""
    import warnings
    from datetime import timedelta

    from videocache.distributed.checks import check_settings
    from videocache.distributed.state import process_state

    warnings.filterwarnings("ignore", message=".*all_gather_tensor.*deprecated", category=FutureWarning)
    timeout = float(os.environ.get(PARALLEL_TIMEOUT_ENV, "600"))
    state = process_state(timeout=timedelta(seconds=timeout))
    ranks = ParallelRanks(settings.parallel_settings(), state.process_index, state.num_processes)
    check_settings(ranks.settings, state.num_processes)
    device = settings.device
    if device is None or device == state.device.type:  # cuda -> this rank's cuda:LOCAL_RANK
        device = str(state.device)
    return ranks, device


def worker_main(
    conn,
    settings: dict[str, Any],
    out: str,
    process: str,
    first_item: dict[str, Any],
    save_videos: bool,
    env: dict[str, str] | None = None,
) -> None:
    """Spawned-process loop: load the pipeline, then answer {"type": "item"} messages until "stop".
    `env`: a parallel comparison's launcher variables for this worker (its rank, the agreed port)."""
    from videocache.distributed.state import launch_rank

    if env:
        os.environ.update(env)
    store = RunStore(out)
    rank = launch_rank() if env else 0
    _redirect_output(store.log_path(process, rank))
    try:
        import torch

        from videocache.pipelines.loader import load_pipeline
        from videocache.pipelines.lora import LoraSpec

        run_settings = RunSettings(**settings)
        parallel, device = None, run_settings.device
        if run_settings.parallel:
            parallel, device = _join_parallel(run_settings)
        dtype = getattr(torch, run_settings.dtype) if run_settings.dtype else None
        lora = None if run_settings.lora is None else LoraSpec(run_settings.lora, run_settings.lora_scale)
        pipe = load_pipeline(
            run_settings.model, device=device, dtype=dtype, attention_backend=run_settings.attention_backend, lora=lora
        )
        pipe.set_progress_bar_config(disable=True)
        runner = GroupRunner(
            pipe, run_settings, store, Item(**first_item), process=process, save_videos=save_videos,
            parallel=parallel,
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
            if parallel is not None:  # a clean stop: leave with the other ranks' workers (gloo aborts a lone exit)
                from videocache.distributed.state import end_processes, process_state

                end_processes(process_state())
            return
        try:
            methods = [parse_method(spec) for spec in msg["methods"]]
            runner.run_item(Item(**msg["item"]), methods, send=conn.send)
        except Exception as exc:  # the baseline itself failed: report it for every method of the item
            traceback.print_exc()
            conn.send({"type": "fatal", "message": one_line(exc)})
            return
        conn.send({"type": "item_done"})
