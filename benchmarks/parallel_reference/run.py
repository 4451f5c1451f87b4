"""Benchmark: sequence and CFG parallelism on the reference pipeline, 2 processes on the CPU, against one.

For each mode (one process; Ulysses 2; ring 2; CFG-parallel 2) and each cache setting (uncached and the
reference-wan presets slow / balanced / fast) on held-out prompts of the reference pipeline (17 frames
64x64 = 320 video tokens, 25 steps, CFG 5): transformer time (minimum over repeats, summed over the
prompts), fidelity (PSNR against the single-process uncached video and against the single-process run of
the same preset) and the bytes each rank sends through torch.distributed per denoising step.

The bytes are counted by wrapping, in this benchmark's processes only, the collectives diffusers'
context-parallel attention and videocache.distributed call (torch.distributed.all_gather / all_reduce /
all_to_all_single / broadcast and the functional all_to_all_single / all_gather_tensor / permute_tensor),
classified by the code that called them (in the first repeat; the count costs a stack walk per collective,
about 1 % of a Ulysses step here, so later repeats run without it). Bytes sent per rank per collective (P ranks in its group, B the
bytes of the tensor the rank hands in): all-to-all B (P-1)/P (or the rows addressed to the other ranks
when the split is uneven), all-gather B (P-1), all-reduce 2 B (P-1)/P (ring), broadcast B (P-1) from the
root. Both ranks count; they agree, rank 0's figures are reported.

The two ranks are spawned by this script (torch.multiprocessing, gloo, one thread each); rank 0 also runs
the single-process generations, interleaved with the parallel ones (rank 1 waits at a barrier), so that
slow phases of the shared machine hit every mode alike. One process uses one core, two processes two.

    python benchmarks/parallel_reference/run.py                  # the committed results (about 8 minutes)
    python benchmarks/parallel_reference/run.py --prompts 1 --repeats 1 --steps 10 --out /tmp/par   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks.common (also in the spawned ranks)
from benchmarks.common import (  # noqa: E402
    REFERENCE_VIDEO,
    command,
    environment,
    held_out_prompts,
    markdown_table,
    write_json,
    write_results,
)

MODES = {"ulysses": {"ulysses": 2}, "ring": {"ring": 2}, "cfg": {"cfg": 2}}
MODE_LABELS = {"one": "one process", "ulysses": "Ulysses 2", "ring": "ring 2", "cfg": "CFG-parallel 2"}
PRESETS = ("uncached", "slow", "balanced", "fast")


# -- counting what goes through the collectives ----------------------------------------------------------
def _group_size(group: Any) -> int:
    import torch.distributed as dist

    if group is None:
        return dist.get_world_size()
    if hasattr(group, "size") and callable(group.size) and not isinstance(group, dist.ProcessGroup):
        return int(group.size())  # a DeviceMesh
    try:
        return dist.get_world_size(group)
    except Exception:
        return dist.get_world_size()


def _stack_files(skip: int = 3) -> list[str]:
    """The file names on the call stack, cheaply (frame objects only: inspect.stack resolves source files and
    costs milliseconds per call, which would show in the timings)."""
    frame = sys._getframe(skip)
    files = []
    while frame is not None:
        files.append(frame.f_code.co_filename.replace("\\", "/"))
        frame = frame.f_back
    return files


def _category(kind: str) -> str:
    """Who called: the files on the stack decide."""
    files = _stack_files()
    if any(f.endswith("distributed/cfg.py") for f in files):
        return "CFG exchange of the predictions"
    if any(f.endswith("distributed/parallel.py") or f.endswith("distributed/peers.py") for f in files):
        return "cache decision agreement"
    if kind != "all_to_all" and any(f.endswith("distributed/sequence.py") or f.endswith("hooks/context_parallel.py") for f in files):
        return "final gather of the output"
    if kind == "all_to_all":
        return "Ulysses all-to-all (q, k, v, out)"
    if any(f.endswith("attention_dispatch.py") for f in files):
        return "ring K/V all-gather"
    return f"other {kind}"


class CommCounter:
    """Wraps the collectives at their module attributes (diffusers and videocache look them up there at
    call time); counts only while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.counts: dict[str, dict[str, float]] = {}
        self._installed = False

    def reset(self) -> None:
        self.counts = defaultdict(lambda: {"calls": 0, "sent_bytes": 0.0, "payload_bytes": 0.0})

    def add(self, kind: str, sent: float, payload: float) -> None:
        if not self.active:
            return
        entry = self.counts[_category(kind)]
        entry["calls"] += 1
        entry["sent_bytes"] += sent
        entry["payload_bytes"] += payload

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self.counts.items()}

    def install(self) -> None:
        if self._installed:
            return
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        counter = self
        self.reset()

        def nbytes(t: Any) -> int:
            return int(t.numel() * t.element_size())

        def wrap(module: Any, name: str, account) -> None:
            original = getattr(module, name, None)
            if original is None:
                return

            def wrapper(*args, **kwargs):
                try:
                    account(*args, **kwargs)
                except Exception:  # counting must never break the run
                    pass
                return original(*args, **kwargs)

            setattr(module, name, wrapper)

        def a2a(x, output_split_sizes=None, input_split_sizes=None, group=None, *args, **kwargs):
            p = _group_size(group)
            b = nbytes(x)
            if input_split_sizes:
                rows = x.shape[0]
                own = dist.get_rank(group) if isinstance(group, dist.ProcessGroup) else dist.get_rank() % p
                sent = b * (rows - input_split_sizes[own]) / rows
            else:
                sent = b * (p - 1) / p
            counter.add("all_to_all", sent, b)

        def a2a_dist(output, input, output_split_sizes=None, input_split_sizes=None, group=None, *args, **kwargs):
            a2a(input, output_split_sizes, input_split_sizes, group)

        def gather_tensor(x, gather_dim=0, group=None, *args, **kwargs):
            b = nbytes(x)
            counter.add("all_gather", b * (_group_size(group) - 1), b)

        def gather_list(tensor_list, tensor, group=None, *args, **kwargs):
            b = nbytes(tensor)
            counter.add("all_gather", b * (_group_size(group) - 1), b)

        def reduce(tensor, op=None, group=None, *args, **kwargs):
            p, b = _group_size(group), nbytes(tensor)
            counter.add("all_reduce", 2 * b * (p - 1) / p, b)

        def broadcast(tensor, src=None, group=None, *args, **kwargs):
            b = nbytes(tensor)
            counter.add("broadcast", b * (_group_size(group) - 1), b)

        def permute(x, src_dst, group=None, *args, **kwargs):
            b = nbytes(x)
            counter.add("permute", b, b)

        wrap(funcol, "all_to_all_single", a2a)
        wrap(funcol, "all_gather_tensor", gather_tensor)
        wrap(funcol, "permute_tensor", permute)
        wrap(dist, "all_to_all_single", a2a_dist)
        wrap(dist, "all_gather", gather_list)
        wrap(dist, "all_reduce", reduce)
        wrap(dist, "broadcast", broadcast)
        self._installed = True


# -- the two ranks ---------------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, port: int, settings: dict[str, Any], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    import videocache
    from videocache.distributed import parallelize, process_state
    from videocache.pipelines.generation import generate
    from videocache.pipelines.loader import load_pipeline

    process_state()
    counter = CommCounter()
    counter.install()
    pipe = load_pipeline("reference-wan", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    s = settings
    prompts = held_out_prompts(s["prompts"])

    def run(prompt: str, preset: str, mode: str | None, count: bool = True):
        engine = None
        if preset != "uncached":
            engine = videocache.apply(pipe, "reference-wan", preset, num_inference_steps=s["steps"])
        par = parallelize(pipe, **MODES[mode]) if mode else None
        try:
            if mode:
                dist.barrier()
            counter.reset()
            counter.active = mode is not None and count
            result = generate(pipe, prompt, seed=0, num_inference_steps=s["steps"], num_frames=s["frames"],
                              height=s["height"], width=s["width"], guidance_scale=s["guidance_scale"], progress=False)
            counter.active = False
            fraction = engine.stats()["computed_fraction"] if engine is not None else 1.0
            return result, counter.snapshot(), fraction
        finally:
            counter.active = False
            if par is not None:
                par.remove()
            if engine is not None:
                videocache.remove(pipe)

    # warm-up (not recorded): one call of every path
    if rank == 0:
        run(prompts[0], "uncached", None)
    dist.barrier()
    for mode in MODES:
        run(prompts[0], "uncached", mode)

    frames: dict[tuple, Any] = {}
    times: dict[tuple, list[float]] = defaultdict(list)
    comm: dict[tuple, Any] = {}
    fractions: dict[tuple, list[float]] = {}
    started = time.time()
    for repeat in range(s["repeats"]):
        for p, prompt in enumerate(prompts):
            for preset in PRESETS:
                if rank == 0:
                    result, _, fraction = run(prompt, preset, None)
                    key = ("one", preset, p)
                    times[key].append(result.summary["transformer_s"])
                    frames.setdefault(key, result.frames)
                    fractions[key] = [fraction]
                dist.barrier()
                for mode in MODES:
                    # bytes counted in the first repeat (they depend on shapes only); later repeats time without it
                    result, counted, fraction = run(prompt, preset, mode, count=repeat == 0)
                    both: list = [None] * world
                    dist.all_gather_object(both, (fraction, counted))
                    if rank == 0:
                        key = (mode, preset, p)
                        times[key].append(result.summary["transformer_s"])
                        frames.setdefault(key, result.frames)
                        fractions[key] = [b[0] for b in both]
                        if repeat == 0:
                            comm[key] = [b[1] for b in both]
            if rank == 0:
                print(f"repeat {repeat + 1}/{s['repeats']} prompt {p + 1}/{len(prompts)}: {time.time() - started:.0f} s",
                      flush=True)
    if rank == 0:
        write_json(out_path, _results(s, prompts, frames, times, comm, fractions))
    dist.barrier()


def _results(s, prompts, frames, times, comm, fractions) -> dict[str, Any]:
    from videocache.eval_vbench.metrics.fidelity import psnr

    def mean_db(values: list[float]) -> float | str:
        if all(math.isinf(v) for v in values):
            return "inf"
        finite = [v for v in values if math.isfinite(v)]
        return round(sum(finite) / len(finite), 2) if len(finite) == len(values) else round(min(finite), 2)

    n = len(prompts)
    rows = []
    one_uncached = sum(min(times[("one", "uncached", p)]) for p in range(n))
    for mode in ("one", *MODES):
        for preset in PRESETS:
            t = sum(min(times[(mode, preset, p)]) for p in range(n))
            t_one = sum(min(times[("one", preset, p)]) for p in range(n))
            row: dict[str, Any] = {
                "mode": mode,
                "preset": preset,
                "transformer_s": round(t, 3),
                "speedup_vs_one_process_uncached": round(one_uncached / t, 3),
                "speedup_vs_one_process_same_preset": round(t_one / t, 3),
                "psnr_vs_one_process_uncached": mean_db(
                    [psnr(frames[("one", "uncached", p)], frames[(mode, preset, p)]) for p in range(n)]
                ),
                "psnr_vs_one_process_same_preset": mean_db(
                    [psnr(frames[("one", preset, p)], frames[(mode, preset, p)]) for p in range(n)]
                ),
                "computed_fraction": round(fractions[(mode, preset, 0)][0], 4),
                "ranks_agree": all(len(set(fractions[(mode, preset, p)])) == 1 for p in range(n)),
                "transformer_s_runs": {prompts[p]: times[(mode, preset, p)] for p in range(n)},
            }
            if mode != "one":
                per_rank = comm[(mode, preset, 0)]  # the same on every prompt (it depends on shapes only)
                rank0 = per_rank[0]
                row["comm_per_step"] = {
                    cat: {"calls": v["calls"] / s["steps"], "sent_bytes": v["sent_bytes"] / s["steps"],
                          "payload_bytes": v["payload_bytes"] / s["steps"]}
                    for cat, v in sorted(rank0.items())
                }
                row["sent_bytes_per_step"] = sum(v["sent_bytes"] for v in rank0.values()) / s["steps"]
                row["collectives_per_step"] = sum(v["calls"] for v in rank0.values()) / s["steps"]
                row["ranks_sent_the_same"] = len({round(sum(v["sent_bytes"] for v in r.values())) for r in per_rank}) == 1
            rows.append(row)
    return {
        "benchmark": "parallel_reference",
        "command": command(__file__, s["argv"]),
        "settings": {k: v for k, v in s.items() if k != "argv"},
        "tokens": s["tokens"],
        "prompts": prompts,
        "environment": {**environment(), "backend": "gloo", "threads_per_process": 1},
        "rows": rows,
    }


# -- the markdown ----------------------------------------------------------------------------------------
def _mb(value: float) -> str:
    return f"{value / 1e6:.3f}" if value < 1e7 else f"{value / 1e6:.0f}"


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Sequence and CFG parallelism on the reference pipeline: 2 processes on the CPU against one",
        "",
        f"`{results['command'].strip()}`",
        "",
        f"reference-wan, {s['frames']} frames {s['height']}x{s['width']} ({results['tokens']} video tokens), {s['steps']} "
        f"steps, CFG {s['guidance_scale']}, {len(results['prompts'])} held-out prompts, {s['repeats']} repeat(s) "
        f"(minimum per prompt, summed); torch {results['environment']['torch']}, diffusers "
        f"{results['environment']['diffusers']}, gloo, one thread per process on a "
        f"{results['environment']['cpu_count']}-core machine shared with other jobs. Rank 0 runs the single-process "
        "generations interleaved with the parallel ones.",
        "",
        "Speedups are transformer time. PSNR: against the single-process uncached video, and against the "
        "single-process run of the same preset (inf = identical frames). Computed fraction: the engine's, the "
        "same on both ranks where 'agree' says yes. Bytes: what one rank sends per denoising step through "
        "torch.distributed (both ranks send the same).",
        "",
        *markdown_table(
            ["mode", "cache", "transformer s", "vs 1 process uncached", "vs 1 process same preset",
             "PSNR vs uncached (dB)", "PSNR vs same preset (dB)", "computed fraction", "agree",
             "MB sent per step per rank", "collectives per step"],
            ([MODE_LABELS[r["mode"]], r["preset"], f"{r['transformer_s']:.2f}",
              f"{r['speedup_vs_one_process_uncached']:.2f}x", f"{r['speedup_vs_one_process_same_preset']:.2f}x",
              r["psnr_vs_one_process_uncached"], r["psnr_vs_one_process_same_preset"], f"{r['computed_fraction']:.3f}",
              "yes" if r["ranks_agree"] else "NO", "-" if r["mode"] == "one" else _mb(r["sent_bytes_per_step"]),
              "-" if r["mode"] == "one" else f"{r['collectives_per_step']:.1f}"] for r in results["rows"]),
            "llrrrrrrcrr"),
        "",
        "Bytes per step per rank by what sent them (uncached and fast):",
        "",
        *markdown_table(
            ["mode", "cache", "what", "collectives per step", "MB sent per step", "MB handed in per step"],
            ([MODE_LABELS[r["mode"]], r["preset"], cat, f"{v['calls']:.1f}", _mb(v["sent_bytes"]), _mb(v["payload_bytes"])]
             for r in results["rows"] if r["mode"] != "one" and r["preset"] in ("uncached", "fast")
             for cat, v in r["comm_per_step"].items()),
            "lllrrr"),
    ]
    rows = {(r["mode"], r["preset"]): r for r in results["rows"]}
    one = rows[("one", "uncached")]["transformer_s"]
    runs = len(results["prompts"]) * s["steps"]
    from videocache.pipelines.loader import REFERENCE_DIR

    blocks = json.loads((REFERENCE_DIR / "transformer" / "config.json").read_text())["num_layers"]
    block_ms = one / (runs * 2 * blocks) * 1e3  # two guidance calls per step
    lines += ["", "Reading:", ""]
    for mode in ("ulysses", "ring"):
        r = rows[(mode, "uncached")]
        extra_ms = (r["transformer_s"] - one / 2) / (r["collectives_per_step"] * runs) * 1e3
        lines.append(
            f"- {MODE_LABELS[mode]}, uncached: {r['speedup_vs_one_process_uncached']:.2f}x of one process with "
            f"{r['collectives_per_step']:.0f} collectives per step; its time above half the single-process time is "
            f"{extra_ms:.1f} ms per collective (an upper bound on what one costs: gloo over loopback, two processes on "
            "two shared cores, waiting for the other rank; ring adds its log-sum-exp merge). One block call takes "
            f"{block_ms:.1f} ms in one process here: halving it saves less than the block's collectives cost, so "
            "sequence parallelism cannot pay at this size; it is for the tens of thousands of tokens of real videos "
            "(scaling_model.md)."
        )
    r = rows[("cfg", "uncached")]
    lines.append(
        f"- CFG-parallel 2: {r['speedup_vs_one_process_uncached']:.2f}x of one process (2x ideal) with one all-gather "
        "of the prediction per step; with a preset it multiplies the cache's speedup "
        f"(fast: {rows[('cfg', 'fast')]['speedup_vs_one_process_uncached']:.2f}x of one process uncached)."
    )
    for mode in ("ulysses", "ring"):
        base = rows[(mode, "uncached")]["comm_per_step"]
        attention = next(k for k in base if k.startswith(("Ulysses", "ring")))
        shares = ", ".join(
            f"{p} {rows[(mode, p)]['comm_per_step'][attention]['sent_bytes'] / base[attention]['sent_bytes']:.2f} "
            f"(computed fraction {rows[(mode, p)]['computed_fraction']:.2f})"
            for p in PRESETS[1:]
        )
        lines.append(f"- {MODE_LABELS[mode]}: attention bytes per step against the uncached run: {shares}. Skipped "
                     "work skips its collectives; only the final gather of the output stays.")
    lines += [
        "- Fidelity: Ulysses and CFG parallelism give the single-process frames exactly (inf), with and without a "
        "preset; ring merges two partial softmaxes by their log-sum-exp (another float order), about 95 dB from the "
        "single-process frames. Every preset decides the same on both ranks.",
        "- The scaling model for Wan2.1-14B on 8 H100s is in scaling_model.md.",
        "",
    ]
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the minimum counts (default 2)")
    parser.add_argument("--steps", type=int, default=REFERENCE_VIDEO["num_inference_steps"])
    parser.add_argument("--frames", type=int, default=REFERENCE_VIDEO["num_frames"])
    parser.add_argument("--height", type=int, default=REFERENCE_VIDEO["height"])
    parser.add_argument("--width", type=int, default=REFERENCE_VIDEO["width"])
    parser.add_argument("--guidance-scale", type=float, default=REFERENCE_VIDEO["guidance_scale"])
    parser.add_argument("--out", default=str(HERE), help="folder for results.json and results.md")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the ranks are stopped")
    parser.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        write_results(Path(args.out) / "results", results, render(results))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)

    import torch.multiprocessing as mp

    from videocache.pipelines.loader import REFERENCE_DIR
    from videocache.pipelines.wan.loading import wan_geometry

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tokens = wan_geometry(str(REFERENCE_DIR), args.frames, args.height, args.width)
    settings = {"prompts": args.prompts, "repeats": args.repeats, "steps": args.steps, "frames": args.frames,
                "height": args.height, "width": args.width, "guidance_scale": args.guidance_scale,
                "tokens": tokens, "argv": argv}
    raw = out / "results.json"
    ctx = mp.start_processes(_rank_main, args=(2, _free_port(), settings, str(raw)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + args.timeout
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                print(f"the ranks did not finish within {args.timeout:.0f} s", file=sys.stderr)
                return 1
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = json.loads(raw.read_text())
    write_results(out / "results", results, render(results))
    print(f"wrote {raw} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
