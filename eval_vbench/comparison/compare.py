"""`videocache compare`: every method on the same prompts, seeds and settings, side by side.

The uncached pipeline (`none`) always runs as the reference. Methods that can share a process (none,
videocache, diffusers hooks: all removable) run in one worker process; each cache-dit method, which
patches classes process-wide, gets a worker of its own. For every item (prompt, seed) the workers run
in turn, each interleaving its uncached run with its methods, so that slow phases of a shared machine
hit a method and the baseline it is divided by alike. Every finished (method, item) is written at once
and skipped on rerun.

Under sequence or CFG parallelism (`--ulysses N`, `--ring M`, `--cfg-parallel`, launched with
`accelerate launch --multi_gpu --num_processes P --num_machines 1 -m videocache.cli compare ...`) every
launched process runs this loop in lockstep: rank 0 alone reads and writes the run store, decides what
is still to run and broadcasts it; each rank spawns its own worker per group, and the workers of a group
form a process group of their own (on a port rank 0 picks), so that every rank runs the same method on
the same item at the same time. Fidelity is measured against the single-process uncached video; see
worker.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videocache.pipelines.generation import (
    check_first_frame,
    check_images,
    image_of,
    read_prompts,
    source_takes_image,
)
from videocache.pipelines.lora import add_lora_arguments, lora_spec, run_settings_fields

from ..peers import VALID_FORMS, Method, parse_methods
from .run_store import Item, RunSettings, RunStore, method_slug

MAIN_PROCESS = "main"


@dataclass(frozen=True)
class WorkerGroup:
    """Methods that run together in one process."""

    name: str
    methods: tuple[Method, ...]


def group_methods(methods: list[Method]) -> list[WorkerGroup]:
    shared = tuple(m for m in methods if not m.isolated)
    groups = [WorkerGroup(MAIN_PROCESS, shared)] if shared else []
    groups += [WorkerGroup(m.spec, (m,)) for m in methods if m.isolated]
    return groups


@dataclass(frozen=True)
class CompareConfig:
    settings: RunSettings
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    out: Path
    save_videos: bool = False
    low_memory: bool = False  # one worker process alive at a time (groups run one after another)
    progress: bool = True
    parallel_timeout_s: float = 600.0  # a parallel worker's collective that waits longer fails
    images: Path | None = None  # image-to-video: p000.png, p001.png, ... the first frame of each prompt

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts to compare")
        if not self.seeds:
            raise ValueError("no seeds to compare")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {list(self.seeds)}")

    @property
    def items(self) -> list[Item]:
        return [Item(prompt, seed, index, None if self.images is None else str(image_of(self.images, index)))
                for index, prompt in enumerate(self.prompts) for seed in self.seeds]


class WorkerFailed(RuntimeError):
    pass


class WorkerProcess:
    """A spawned worker (see worker.py) driven over a pipe, one item at a time."""

    def __init__(self, group: WorkerGroup, config: CompareConfig, env: dict[str, str] | None = None, rank: int = 0):
        from .worker import worker_main

        self.group = group
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        first = config.items[0]
        self.process = ctx.Process(
            target=worker_main,
            args=(
                child,
                asdict(config.settings),
                str(config.out),
                group.name,
                asdict(first),
                config.save_videos,
                env,
            ),
            daemon=True,
            name=f"videocache-compare-{method_slug(group.name)}",
        )
        self.process.start()
        child.close()
        self.log = RunStore(config.out).log_path(group.name, rank)
        self._expect("ready")

    def _recv(self) -> dict[str, Any]:
        while not self.conn.poll(0.5):
            if not self.process.is_alive():
                raise WorkerFailed(f"worker process died (exit code {self.process.exitcode}); see {self.log}")
        try:
            return self.conn.recv()
        except EOFError:
            raise WorkerFailed(f"worker process closed its pipe; see {self.log}") from None

    def _expect(self, kind: str) -> dict[str, Any]:
        msg = self._recv()
        if msg["type"] == "fatal":
            raise WorkerFailed(f"{msg['message']} (see {self.log})")
        if msg["type"] != kind:
            raise WorkerFailed(f"unexpected message {msg!r} from worker")
        return msg

    def run_item(
        self, item: Item, methods: list[Method], on_message: Callable[[dict[str, Any]], None]
    ) -> None:
        self.conn.send({"type": "item", "item": asdict(item), "methods": [m.spec for m in methods]})
        while True:
            msg = self._recv()
            if msg["type"] == "item_done":
                return
            if msg["type"] == "fatal":
                raise WorkerFailed(f"{msg['message']} (see {self.log})")
            on_message(msg)

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.conn.send({"type": "stop"})
                self.process.join(timeout=10)
        except (BrokenPipeError, OSError):
            pass
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


@dataclass
class CompareResult:
    report: dict[str, Any]
    paths: dict[str, Path]
    errors: dict[str, str] = field(default_factory=dict)
    ran: int = 0
    skipped: int = 0


class ParentRanks:
    """The launched processes of a parallel comparison (accelerate's process group): rank 0 decides, all
    follow. One instance per process."""

    def __init__(self) -> None:
        from videocache.distributed.state import process_state

        state = process_state()
        self.rank = state.process_index
        self.world_size = state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def worker_env(self, config: CompareConfig) -> dict[str, str]:
        """The environment of this rank's worker for one group: a fresh port (picked by rank 0) for the
        workers' own process group, and the collective timeout."""
        import os
        import socket

        from videocache.distributed.state import launch_local_rank

        port = None
        if self.is_main:
            with socket.socket() as sock:
                sock.bind(("", 0))
                port = sock.getsockname()[1]
        port = self.broadcast(port)
        local = launch_local_rank()
        from .worker import PARALLEL_TIMEOUT_ENV

        return {
            "MASTER_PORT": str(port),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.rank if local is None else local),
            # under torchrun / accelerate launch the launcher's agent hosts the store of MASTER_PORT; the workers'
            # store is new, hosted by rank 0's worker
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            PARALLEL_TIMEOUT_ENV: str(config.parallel_timeout_s),
        }


def _rank_failures(failures: list[str | None]) -> str | None:
    """One message for the ranks' failures: each distinct message once, with the ranks that gave it."""
    by_message: dict[str, list[int]] = {}
    for rank, failure in enumerate(failures):
        if failure:
            by_message.setdefault(failure, []).append(rank)
    if not by_message:
        return None
    return " | ".join(
        f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {message}" for message, r in by_message.items()
    )


def run_compare(config: CompareConfig) -> CompareResult:
    """Run what is missing in config.out, then (re)write the report from every record. In a parallel
    comparison every launched process calls it; rank 0 reads and writes the store."""
    from tqdm.auto import tqdm

    from .report import build_report, write_report

    ranks = ParentRanks() if config.settings.parallel else None
    main = ranks is None or ranks.is_main
    store = RunStore(config.out)
    problem = None
    if main:
        try:
            store.check_settings(config.settings)
        except ValueError as exc:
            problem = str(exc)
    if ranks is not None:  # every rank stops on rank 0's refusal (one line, printed by rank 0)
        problem = ranks.broadcast(problem)
    if problem is not None:
        raise ValueError(problem)
    items = config.items
    methods = list(config.methods)
    groups = group_methods(methods)
    total = len(methods) * len(items)
    digests = {m.spec: m.config_digest() for m in methods}
    done = sum(store.has_record(m.spec, item, digests[m.spec]) for m in methods for item in items) if main else 0
    errors: dict[str, str] = {}
    bar = tqdm(
        total=total, initial=done, desc="compare", unit="run", disable=not (config.progress and main),
        dynamic_ncols=True,
    )
    workers: dict[str, WorkerProcess] = {}
    ran = 0

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal ran
        if not main:  # rank 0 keeps the account
            return
        if msg["type"] == "done":
            ran += 1
            bar.update(1)
            bar.set_postfix_str(f"{msg['method']} cf={msg['computed_fraction']:.2f}", refresh=False)
        elif msg["type"] == "error":
            errors[msg["method"]] = msg["message"]
            bar.write(f"videocache compare: {msg['method']} failed: {msg['message']}")

    def stop_worker(group: WorkerGroup) -> None:
        stale = workers.pop(group.name, None)
        if stale is not None:
            stale.stop()

    def run_group_item(group: WorkerGroup, item: Item) -> None:
        pending = None
        if main:
            pending = [
                m.spec for m in group.methods
                if m.spec not in errors and not store.has_record(m.spec, item, digests[m.spec])
            ]
        if ranks is not None:
            pending = ranks.broadcast(pending)
        if not pending:
            return
        bar.set_description_str(f"compare p{item.index} seed {item.seed}", refresh=False)
        failure = None
        try:
            worker = workers.get(group.name)
            if worker is None:
                env = ranks.worker_env(config) if ranks is not None else None
                worker = workers[group.name] = WorkerProcess(group, config, env, ranks.rank if ranks else 0)
            worker.run_item(item, [m for m in group.methods if m.spec in pending], on_message)
        except WorkerFailed as exc:
            failure = str(exc)
        if ranks is not None:  # a worker that failed on one rank has failed on all
            failure = _rank_failures(ranks.gather(failure))
        if failure is not None:
            for m in group.methods:
                errors.setdefault(m.spec, failure)
            if main:
                bar.write(f"videocache compare: worker for {group.name} failed: {failure}")
            stop_worker(group)

    try:
        if config.low_memory:
            for group in groups:
                for item in items:
                    run_group_item(group, item)
                stop_worker(group)
        else:
            for item in items:
                for group in groups:
                    run_group_item(group, item)
    finally:
        for worker in workers.values():
            worker.stop()
        bar.close()
    if not main:  # rank 0 writes the report; every rank returns its errors, for the same exit status
        errors = ranks.broadcast(None)
        paths = {k: store.out / name for k, name in (("json", "report.json"), ("md", "report.md"), ("png", "pareto.png"))}
        return CompareResult({"methods": []}, paths, errors, ran=0, skipped=0)
    report = build_report(store, config.settings, methods, items, errors)
    paths = write_report(store, report)
    if ranks is not None:
        ranks.broadcast(errors)
    return CompareResult(report, paths, errors, ran=ran, skipped=done)


# -- command line --------------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="reference-wan", help="reference-wan (default), a diffusers folder or a hub id"
    )
    p.add_argument("--prompts", required=True, help="text file: one prompt per line, # comments allowed")
    p.add_argument("--images", default=None,
                   help="image-to-video models: a folder with the first frame of each prompt, p000.png, p001.png, ...")
    p.add_argument(
        "--methods",
        nargs="+",
        default=[],
        metavar="METHOD",
        help="method specs; 'none' always runs. Forms: " + ", ".join(VALID_FORMS),
    )
    p.add_argument("--out", required=True, help="output folder (reruns resume what is missing)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0)")
    seeds.add_argument("--seed", type=int, default=None, help="a single seed")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--repeats", type=int, default=1, help="timed runs per (method, prompt, seed); the minimum counts"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--attention-backend",
        default=None,
        metavar="NAME",
        help="diffusers attention kernel for every method's transformer: native, flash, sage, xformers, flex, "
        "... (default: diffusers' default, native); checked before any worker starts",
    )
    add_lora_arguments(p)
    p.add_argument("--save-videos", action="store_true", help="write every video as mp4 under OUT/videos/")
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="keep one worker process alive at a time (groups run one after another)",
    )
    p.add_argument("--no-progress", action="store_true")
    par = p.add_argument_group(
        "parallelism",
        "run every method (and the uncached reference) with sequence / CFG parallelism, under `accelerate launch "
        "--multi_gpu --num_processes P --num_machines 1 -m videocache.cli compare ...` (P = the product of the "
        "degrees); fidelity is measured against the single-process uncached video",
    )
    par.add_argument("--ulysses", type=int, default=1, metavar="N", help="Ulysses sequence parallelism over N ranks")
    par.add_argument("--ring", type=int, default=1, metavar="M", help="ring attention over M ranks")
    par.add_argument("--cfg-parallel", action="store_true", help="the two guidance branches on two rank groups")
    par.add_argument(
        "--parallel-timeout", type=float, default=600.0, metavar="S",
        help="seconds a parallel worker waits in one collective before failing (default 600)",
    )


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Validate the command line (one-line ValueError / FileNotFoundError) before anything is spawned."""
    from videocache.distributed.generation import settings_from_args
    from videocache.distributed.state import launched_world
    from videocache.pipelines.loader import (
        check_attention_backend,
        known_defaults,
        preload_geometry,
        resolve_device,
        resolve_model,
        source_family,
    )

    degrees = settings_from_args(args)
    if not degrees.enabled and launched_world() > 1:
        raise ValueError(
            f"videocache compare was launched as {launched_world()} processes without --ulysses / --ring / "
            "--cfg-parallel: give the degrees (their product is the process count) or launch one process"
        )
    methods = parse_methods(list(args.methods))
    prompts = read_prompts(args.prompts)
    lora = lora_spec(args.lora, args.lora_scale)  # a missing file fails before any worker starts
    backend = check_attention_backend(args.attention_backend, resolve_device(args.device), args.dtype)
    source = resolve_model(args.model)
    defaults = known_defaults(source)
    family = source_family(source)
    if family is not None:  # the computed fraction is measured at the family's FLOP points: say so before any run
        family.require("flop_points", "videocache compare (its measured computed fraction)")
    settings = RunSettings(
        model=args.model,
        steps=args.steps,
        frames=args.frames if args.frames is not None else defaults.num_frames,
        height=args.height if args.height is not None else defaults.height,
        width=args.width if args.width is not None else defaults.width,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else defaults.guidance_scale,
        negative_prompt=args.negative_prompt,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        fps=defaults.fps,
        attention_backend=backend,
        **run_settings_fields(lora),
        ulysses=degrees.ulysses,
        ring=degrees.ring,
        cfg=degrees.cfg,
    )
    if degrees.enabled:  # degrees against the launched processes, tokens and heads: before any worker starts
        from videocache.distributed.generation import prepare_parallel

        if args.parallel_timeout <= 0:
            raise ValueError(f"--parallel-timeout must be positive, got {args.parallel_timeout}")
        from videocache.distributed.checks import ParallelConfigError

        try:
            prepare_parallel(args, guidance_scale=settings.guidance_scale, geometry=lambda: preload_geometry(
                source, settings.frames, settings.height, settings.width))
        except ParallelConfigError as exc:
            raise ParallelConfigError(str(exc).replace("scripts/generate.py", "-m videocache.cli compare")) from None
    images = None if args.images is None else Path(args.images)
    if images is not None:
        check_images(images, len(prompts), "--images")
    check_first_frame(args.model, source_takes_image(source), images is not None,
                      "--images DIR, one per prompt (p000.png, p001.png, ...)")
    seeds = args.seeds if args.seeds is not None else [args.seed if args.seed is not None else 0]
    return CompareConfig(
        settings=settings,
        prompts=tuple(prompts),
        seeds=tuple(dict.fromkeys(seeds)),
        methods=tuple(methods),
        out=Path(args.out),
        save_videos=args.save_videos,
        low_memory=args.low_memory,
        progress=not args.no_progress,
        images=images,
        parallel_timeout_s=getattr(args, "parallel_timeout", 600.0),
    )


def format_summary(result: CompareResult) -> str:
    from ..metrics.fidelity import format_db

    lines = [f"ran {result.ran} runs ({result.skipped} already done); wrote {result.paths['md']}"]
    for e in sorted(result.report["methods"], key=lambda e: -(e.get("computed_fraction") or 0)):
        if e.get("computed_fraction") is None:
            lines.append(f"  {e['method']:<44} failed: {e.get('error', 'no runs')}")
            continue
        lines.append(
            f"  {e['method']:<44} computed {e['computed_fraction']:.3f}  speedup {e['transformer_speedup']:.2f}x  "
            f"PSNR {format_db(e['psnr'])}  SSIM {e['ssim']:.4f}"
        )
    return "\n".join(lines)
