"""`videocache compare`: every method on the same prompts, seeds and settings, side by side.

The uncached pipeline (`none`) always runs as the reference. Methods that can share a process (none,
videocache, diffusers hooks: all removable) run in one worker process; each cache-dit method, which
patches classes process-wide, gets a worker of its own. For every item (prompt, seed) the workers run
in turn, each interleaving its uncached run with its methods, so that slow phases of a shared machine
hit a method and the baseline it is divided by alike. Every finished (method, item) is written at once
and skipped on rerun.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videocache.pipelines.generation import read_prompts

from .methods import VALID_FORMS, Method, parse_methods
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

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompts to compare")
        if not self.seeds:
            raise ValueError("no seeds to compare")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be >= 0, got {list(self.seeds)}")

    @property
    def items(self) -> list[Item]:
        return [Item(prompt, seed, index) for index, prompt in enumerate(self.prompts) for seed in self.seeds]


class WorkerFailed(RuntimeError):
    pass


class WorkerProcess:
    """A spawned worker (see worker.py) driven over a pipe, one item at a time."""

    def __init__(self, group: WorkerGroup, config: CompareConfig):
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
            ),
            daemon=True,
            name=f"videocache-compare-{method_slug(group.name)}",
        )
        self.process.start()
        child.close()
        self.log = RunStore(config.out).log_path(group.name)
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


def run_compare(config: CompareConfig) -> CompareResult:
    """Run what is missing in config.out, then (re)write the report from every record."""
    from tqdm.auto import tqdm

    from .report import build_report, write_report

    store = RunStore(config.out)
    store.check_settings(config.settings)
    items = config.items
    methods = list(config.methods)
    groups = group_methods(methods)
    total = len(methods) * len(items)
    digests = {m.spec: m.config_digest() for m in methods}
    done = sum(store.has_record(m.spec, item, digests[m.spec]) for m in methods for item in items)
    errors: dict[str, str] = {}
    bar = tqdm(
        total=total, initial=done, desc="compare", unit="run", disable=not config.progress, dynamic_ncols=True
    )
    workers: dict[str, WorkerProcess] = {}
    ran = 0

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal ran
        if msg["type"] == "done":
            ran += 1
            bar.update(1)
            bar.set_postfix_str(f"{msg['method']} cf={msg['computed_fraction']:.2f}", refresh=False)
        elif msg["type"] == "error":
            errors[msg["method"]] = msg["message"]
            bar.write(f"videocache compare: {msg['method']} failed: {msg['message']}")

    def run_group_item(group: WorkerGroup, item: Item) -> None:
        pending = [
            m for m in group.methods if m.spec not in errors and not store.has_record(m.spec, item, digests[m.spec])
        ]
        if not pending:
            return
        bar.set_description_str(f"compare p{item.index} seed {item.seed}", refresh=False)
        try:
            worker = workers.get(group.name)
            if worker is None:
                worker = workers[group.name] = WorkerProcess(group, config)
            worker.run_item(item, pending, on_message)
        except WorkerFailed as exc:
            for m in group.methods:
                errors.setdefault(m.spec, str(exc))
            bar.write(f"videocache compare: worker for {group.name} failed: {exc}")
            stale = workers.pop(group.name, None)
            if stale is not None:
                stale.stop()

    try:
        if config.low_memory:
            for group in groups:
                for item in items:
                    run_group_item(group, item)
                stale = workers.pop(group.name, None)
                if stale is not None:
                    stale.stop()
        else:
            for item in items:
                for group in groups:
                    run_group_item(group, item)
    finally:
        for worker in workers.values():
            worker.stop()
        bar.close()
    report = build_report(store, config.settings, methods, items, errors)
    paths = write_report(store, report)
    return CompareResult(report, paths, errors, ran=ran, skipped=done)


# -- command line --------------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="reference-wan", help="reference-wan (default), a diffusers folder or a hub id"
    )
    p.add_argument("--prompts", required=True, help="text file: one prompt per line, # comments allowed")
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
    p.add_argument("--save-videos", action="store_true", help="write every video as mp4 under OUT/videos/")
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="keep one worker process alive at a time (groups run one after another)",
    )
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """Validate the command line (one-line ValueError / FileNotFoundError) before anything is spawned."""
    from videocache.pipelines.loader import (
        check_attention_backend,
        generation_defaults,
        resolve_device,
        resolve_model,
    )

    methods = parse_methods(list(args.methods))
    prompts = read_prompts(args.prompts)
    backend = check_attention_backend(args.attention_backend, resolve_device(args.device), args.dtype)
    source = resolve_model(args.model)
    defaults = generation_defaults(source)
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
    )
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
    )


def format_summary(result: CompareResult) -> str:
    from .fidelity import format_db

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
