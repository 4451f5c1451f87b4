"""Benchmark: videocache and diffusers' caches on a Wan2.1-1.3B-sized transformer on one GPU.

The reference pipeline (its tiny text encoder and VAE, its scheduler) with the transformer swapped for a
random WanTransformer3DModel of Wan2.1-T2V-1.3B's size (30 blocks, 12 heads x 128 = 1536 hidden, FFN
8960, bf16 with the modules diffusers keeps in float32 left in float32), 81 frames at 240x416 through the
reference VAE = 21 x 30 x 52 = 32,760 video tokens (Wan2.1's 480p x 81 frames), 25 steps, CFG 5. Weights
are random: only time, memory and the computed fractions mean something, not the videos.

Rows, all in one run (`--rows` picks a subset by name or group: eager, compiled, all):
  eager     uncached (3 runs: before, between and after the cached rows; their median is the baseline),
            videocache presets fast / balanced / slow of profiles/wan2.1-t2v-1.3b.yaml (fused skip),
            fast blockwise (fuse_skipped_steps=False), fast blockwise with int8 storage offloaded to the
            host beyond 8 GiB on the device, diffusers MagCache 0.12 (ratios calibrated by one
            calibrate=True run first), TaylorSeer 2 and 4 (Wan cache identifiers), FBCache 0.1
  compiled  pipe.transformer.compile_repeated_blocks() uncached (the baseline of this group), and with
            videocache fast and balanced (applied before compiling); one warm-up generation each, then one
            timed generation whose new dynamo graphs are reported as recompiles

Transformer time is `generate`'s transformer_s: perf_counter around every transformer call with
torch.cuda.synchronize on both sides. Computed fraction: videocache's own count (engine.stats()); for
diffusers' caches the FLOP-weighted share of block components that ran, counted by forward hooks on
the components' first projections (eval_vbench/metrics/flops.py) in the eager run, never inside a compiled one.
Efficiency = speedup x computed fraction (1.0: every skipped FLOP saved its time, nothing else cost).
Peak memory is torch.cuda.max_memory_allocated over the generation; cache bytes are the most the method
held (videocache: cache_peak_bytes / cache_peak_host_bytes; diffusers: its hooks' tensors, sampled before
every transformer call). Results (JSON + markdown) are written after every row, so a timeout keeps what
finished. `--budget-s` (default 280 s at full size) skips rows that would not fit, keeping time for the
last uncached run; the skipped rows are listed with the command that runs them (`--merge` adds them to
the same files).

    python benchmarks/gpu_scale.py                       # full size, CUDA: under 5 minutes on an H100
    python benchmarks/gpu_scale.py --rows compiled --merge
    python benchmarks/gpu_scale.py --smoke --out /tmp/gpu_scale_smoke   # the same rows, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.utils import counters

import videocache
from videocache.eval_vbench.metrics.flops import ComponentCounter, computed_fraction
from videocache.eval_vbench.peers import MethodSetup, parse_method
from videocache.pipelines.generation import generate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    WAN_1_3B,
    WAN_1_3B_BLOCKS,
    cast_keeping_fp32_modules,  # noqa: F401 (wan_transformer's cast; tests check it here)
    environment,
    fail,
    markdown_table,
    reference_pipeline,
    repo_path,
    write_results,
)
from benchmarks.common import wan_transformer as stand_in_wan  # noqa: E402

PROMPT = "a green circle moving right on a gray background"
PROFILE = "wan2.1-t2v-1.3b"
GIB = 2**30


@dataclass(frozen=True)
class Size:
    blocks: int
    heads: int
    head_dim: int
    ffn: int
    freq_dim: int
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    dtype: torch.dtype


FULL = Size(blocks=WAN_1_3B_BLOCKS, heads=WAN_1_3B["num_attention_heads"], head_dim=WAN_1_3B["attention_head_dim"],
            ffn=WAN_1_3B["ffn_dim"], freq_dim=WAN_1_3B["freq_dim"], frames=81, height=240, width=416, steps=25,
            guidance=5.0, dtype=torch.bfloat16)
# 30 blocks and 25 steps so that the wan2.1-t2v-1.3b profile and its presets apply as at full size
SMOKE = Size(blocks=30, heads=2, head_dim=32, ffn=256, freq_dim=64, frames=5, height=32, width=32,
             steps=25, guidance=5.0, dtype=torch.float32)


@dataclass(frozen=True)
class RowSpec:
    name: str
    method: str
    group: str  # "eager": baseline = eager uncached; "compiled": baseline = compiled uncached
    kind: str  # "uncached" | "videocache" | "peer"
    preset: str | None = None
    fused: bool = True
    low_precision: bool = False  # int8 storage (scale per 64 channels), offloaded beyond 8 GiB on the device
    peer: str | None = None  # a method spec (eval_vbench.peers.spec.parse_method)
    guess: float = 1.0  # rough share of the uncached time, for the budget only


ROWS = (
    RowSpec("uncached", "uncached", "eager", "uncached"),
    RowSpec("vc-fast", "videocache fast (fused skip)", "eager", "videocache", "fast", guess=0.36),
    RowSpec("vc-balanced", "videocache balanced (fused skip)", "eager", "videocache", "balanced", guess=0.52),
    RowSpec("vc-slow", "videocache slow (fused skip)", "eager", "videocache", "slow", guess=0.63),
    RowSpec("vc-fast-blockwise", "videocache fast, blockwise", "eager", "videocache", "fast", fused=False,
            guess=0.4),
    RowSpec("vc-fast-blockwise-int8-offload", "videocache fast, blockwise, int8 storage + host offload "
            "beyond 8 GiB", "eager", "videocache", "fast", fused=False, low_precision=True, guess=0.45),
    RowSpec("magcache", "diffusers MagCache 0.12 (calibrated)", "eager", "peer", peer="diffusers:magcache:0.12",
            guess=1.5),  # the calibration run counts
    RowSpec("taylorseer-2", "diffusers TaylorSeer interval 2", "eager", "peer", peer="diffusers:taylorseer:2",
            guess=0.65),
    RowSpec("taylorseer-4", "diffusers TaylorSeer interval 4", "eager", "peer", peer="diffusers:taylorseer:4",
            guess=0.45),
    RowSpec("fbcache", "diffusers FBCache 0.1", "eager", "peer", peer="diffusers:fbcache:0.1", guess=1.0),
    RowSpec("compiled-uncached", "compile_repeated_blocks(), uncached", "compiled", "uncached", guess=1.1),
    RowSpec("compiled-vc-fast", "compile_repeated_blocks() + videocache fast (fused skip)", "compiled",
            "videocache", "fast", guess=0.75),
    RowSpec("compiled-vc-balanced", "compile_repeated_blocks() + videocache balanced (fused skip)", "compiled",
            "videocache", "balanced", guess=1.0),
)
BY_NAME = {r.name: r for r in ROWS}
GROUPS = {"all": [r.name for r in ROWS], "eager": [r.name for r in ROWS if r.group == "eager"],
          "compiled": [r.name for r in ROWS if r.group == "compiled"]}
# --smoke's default: uncached, a videocache preset fused and blockwise, a diffusers cache, compiled
# videocache (and compiled uncached, its baseline); `--smoke --rows all` runs every row (about a minute)
SMOKE_ROWS = "uncached,vc-fast,vc-fast-blockwise,taylorseer-2,compiled-vc-fast"


# -- the model --------------------------------------------------------------------------------------
def wan_transformer(size: Size, device: str, seed: int = 0) -> WanTransformer3DModel:
    """Random WanTransformer3DModel of `size`, built and initialised on `device` in float32, then cast as
    from_pretrained(torch_dtype=size.dtype) casts (cast_keeping_fp32_modules)."""
    sizes = {"num_attention_heads": size.heads, "attention_head_dim": size.head_dim, "ffn_dim": size.ffn,
             "freq_dim": size.freq_dim}
    return stand_in_wan(size.blocks, sizes, seed=seed, device=device, dtype=size.dtype, rope_max_seq_len=1024)


def video_tokens(pipe: Any, size: Size) -> int:
    frames = (size.frames - 1) // pipe.vae_scale_factor_temporal + 1
    _, ph, pw = pipe.transformer.config.patch_size
    s = pipe.vae_scale_factor_spatial
    return frames * (size.height // s // ph) * (size.width // s // pw)


def uncompile(transformer: torch.nn.Module) -> None:
    """Undo compile_repeated_blocks (the blocks run their eager forward again)."""
    for block in transformer.blocks:
        block._compiled_call_impl = None


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# -- the run ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, size: Size, device: str):
        self.args, self.size, self.device = args, size, device
        self.cuda = device.startswith("cuda")
        self.t0 = time.perf_counter()
        self.pipe = reference_pipeline(device=device)
        self.pipe.transformer = wan_transformer(size, device)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = dict(num_inference_steps=size.steps, num_frames=size.frames, height=size.height,
                             width=size.width, guidance_scale=size.guidance, progress=False)
        self.rows: dict[str, dict] = {}
        self.uncached: list[float] = []  # eager uncached transformer seconds, this run
        self.uncached_wall: list[float] = []
        self.skipped: list[dict] = []
        self.uncached_counts = None  # ComponentCounts of an eager uncached run
        self.base_guess: float | None = None  # seconds of one uncached generation, for the budget
        self.kept: dict[str, dict] = {}  # rows of an earlier run (--merge)
        self.profile = videocache.load_profile(PROFILE)
        self.environment = environment(device)

    # timing -------------------------------------------------------------------------------------
    def generate(self, steps: int | None = None) -> dict:
        settings = dict(self.settings, **({"num_inference_steps": steps} if steps else {}))
        with torch.no_grad():
            summary = generate(self.pipe, PROMPT, seed=0, **settings).summary
        return summary

    def measured(self, summary: dict) -> dict:
        return {"transformer_s": summary["transformer_s"], "wall_s": summary["wall_s"],
                "transformer_calls": summary["transformer_calls"], "peak_mem_bytes": summary["peak_mem_bytes"],
                "peak_mem_kind": summary["peak_mem_kind"]}

    def clean(self) -> None:
        videocache.remove(self.pipe)
        if getattr(self.pipe.transformer, "is_cache_enabled", False):  # a peer whose row failed
            with contextlib.suppress(Exception):
                self.pipe.transformer.disable_cache()
        uncompile(self.pipe.transformer)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def preset(self, name: str) -> tuple[str, str | None]:
        """The preset to run for `name`, and a note when the profile lacks it."""
        if name in self.profile.presets:
            return name, None
        fallback = self.profile.default_preset
        return fallback, f"profile {PROFILE} has no preset {name!r}; ran its default {fallback!r}"

    def apply_videocache(self, spec: RowSpec, compiled: bool) -> tuple[Any, dict]:
        preset, note = self.preset(spec.preset)
        options: dict[str, Any] = {"fuse_skipped_steps": spec.fused}
        if spec.low_precision:
            options.update(cache_dtype=torch.int8, offload_to_cpu=True, max_cache_bytes=8 * GIB)
        if compiled:
            options["compile_options"] = {"backend": self.args.compile_backend}
        engine = videocache.apply(self.pipe, PROFILE, preset, num_inference_steps=self.size.steps, trace=False,
                                  **options)
        info = {"profile": PROFILE, "preset": engine.preset_name,
                "options": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
                            for k, v in options.items()}}
        if note:
            info["note"] = note
        return engine, info

    @staticmethod
    def engine_fields(engine: Any) -> dict:
        stats = engine.stats()
        return {"computed_fraction": round(float(stats["computed_fraction"]), 4), "fraction_source": "engine.stats",
                "cache_peak_bytes": int(stats["cache_peak_bytes"]),
                "cache_peak_host_bytes": int(stats["cache_peak_host_bytes"]),
                "fallbacks": stats.get("fallbacks"), "refused_stores": stats.get("refused_stores"),
                "engine_compiled": bool(stats.get("compiled"))}

    def eager_row(self, spec: RowSpec) -> dict:
        row: dict[str, Any] = {}
        engine, applied, peak_cache = None, None, [0]
        sampler = None
        if spec.kind == "videocache":
            engine, row["info"] = self.apply_videocache(spec, compiled=False)
        elif spec.kind == "peer":
            method = parse_method(spec.peer)
            start = time.perf_counter()
            setup = MethodSetup(num_inference_steps=self.size.steps, calibrate=self.generate)
            applied = method.apply(self.pipe, setup)
            row["info"] = {"spec": method.spec, **applied.info}
            if spec.peer.startswith("diffusers:magcache"):
                row["calibration_s"] = round(time.perf_counter() - start, 3)
            if applied.cache_bytes is not None:
                def sample(module, args, _held=applied.cache_bytes):  # before each call: outside the timer
                    peak_cache[0] = max(peak_cache[0], _held())
                sampler = self.pipe.transformer.register_forward_pre_hook(sample)
        try:
            with ComponentCounter(self.pipe.transformer) as counter:
                summary = self.generate()
            if applied is not None and applied.cache_bytes is not None:
                peak_cache[0] = max(peak_cache[0], applied.cache_bytes())
        finally:
            if sampler is not None:
                sampler.remove()
            if applied is not None:
                applied.remove()
        row.update(self.measured(summary))
        counts = counter.counts
        if spec.kind == "uncached":
            self.uncached.append(summary["transformer_s"])
            self.uncached_counts = self.uncached_counts or counts
            self.uncached_wall.append(summary["wall_s"])
            row.update(computed_fraction=1.0, fraction_source="uncached", cache_peak_bytes=0, cache_peak_host_bytes=0)
        if self.uncached_counts is not None and self.uncached_counts.total_flops:
            row["hook_fraction"] = round(computed_fraction(counts, self.uncached_counts), 4)
        if engine is not None:
            row.update(self.engine_fields(engine))
        elif spec.kind == "peer":
            row.update(computed_fraction=row.get("hook_fraction"), fraction_source="hooks",
                       cache_peak_bytes=peak_cache[0], cache_peak_host_bytes=0)
        return row

    def compiled_row(self, spec: RowSpec) -> dict:
        row: dict[str, Any] = {"compile_backend": self.args.compile_backend}
        uncompile(self.pipe.transformer)
        engine = None
        if spec.kind == "videocache":  # apply first, then compile (the engine takes the compilation over)
            engine, row["info"] = self.apply_videocache(spec, compiled=True)
        self.pipe.transformer.compile_repeated_blocks(backend=self.args.compile_backend)
        before = graphs()
        start = time.perf_counter()
        # the uncached warm-up needs the shapes only (2 steps); a cache table needs every step of the run
        self.generate(steps=2 if engine is None else None)
        row["warmup_s"] = round(time.perf_counter() - start, 3)
        row["warmup_graphs"] = graphs() - before
        if engine is not None:
            engine.reset_stats()
        before = graphs()
        summary = self.generate()
        row["recompiles_after_warmup"] = graphs() - before
        row.update(self.measured(summary))
        if engine is not None:
            row.update(self.engine_fields(engine))
        else:
            row.update(computed_fraction=None, fraction_source=None, cache_peak_bytes=0, cache_peak_host_bytes=0)
        return row

    # budget -------------------------------------------------------------------------------------
    def estimate(self, spec: RowSpec) -> float | None:
        if self.base_guess is None:
            return None
        seconds = self.base_guess * spec.guess
        if spec.group == "compiled":
            seconds += self.base_guess * spec.guess * (0.1 if spec.kind == "uncached" else 1.0)  # warm-up
            # the first row of a kind compiles its graphs; later ones should find them compiled
            first = not any(BY_NAME[n].group == "compiled" and BY_NAME[n].kind == spec.kind for n in self.rows)
            seconds += self.args.compile_estimate_s * (1.0 if first else 0.25)
        return seconds

    def fits(self, spec: RowSpec, reserve: float) -> tuple[bool, float | None]:
        est = self.estimate(spec)
        if self.args.budget_s is None or est is None:
            return True, est
        return time.perf_counter() - self.t0 + est + reserve <= self.args.budget_s, est

    # the plan ----------------------------------------------------------------------------------
    def plan(self, selected: list[str]) -> list[RowSpec]:
        eager = [BY_NAME[n] for n in GROUPS["eager"] if n in selected and n != "uncached"]
        steps: list[RowSpec] = []
        if eager or "uncached" in selected:
            n = max(1, self.args.uncached_repeats)
            cuts = [round(i * len(eager) / (n - 1)) for i in range(n)] if n > 1 else [0]
            for i in range(len(eager) + 1):
                steps += [BY_NAME["uncached"]] * cuts.count(i)
                if i < len(eager):
                    steps.append(eager[i])
        compiled = [BY_NAME[n] for n in GROUPS["compiled"] if n in selected and n != "compiled-uncached"]
        if compiled or "compiled-uncached" in selected:
            steps += [BY_NAME["compiled-uncached"], *compiled]
        return steps

    def run(self, selected: list[str]) -> None:
        steps = self.plan(selected)
        # warm-up: CUDA context, kernels, allocator (2 steps are enough)
        start = time.perf_counter()
        self.generate(steps=2)
        self.warmup_s = round(time.perf_counter() - start, 3)
        for i, spec in enumerate(steps):
            rest = steps[i + 1:]
            pending = sum(r.name == "uncached" for r in rest)  # never skipped: keep time for them
            reserve = pending * (self.estimate(BY_NAME["uncached"]) or 0.0)
            ok, est = (True, None) if spec.name == "uncached" else self.fits(spec, reserve)
            why = "budget"
            if ok and spec.group == "compiled" and any(s["row"] == "compiled-uncached" for s in self.skipped):
                ok, why = False, "its baseline (compiled-uncached) was skipped"
            if not ok:
                est = round(est, 1) if est is not None else None
                self.skipped.append({"row": spec.name, "estimate_s": est, "why": why})
                print(f"{spec.name:32s} skipped ({why}): about {fmt(est, '.0f')} s, --budget-s "
                      f"{fmt(self.args.budget_s, 'g')}", flush=True)
                self.write()
                continue
            start = time.perf_counter()
            try:
                row = self.compiled_row(spec) if spec.group == "compiled" else self.eager_row(spec)
            except Exception as exc:  # keep going: one method failing must not lose the others
                row = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
            finally:
                self.clean()
            row["row_s"] = round(time.perf_counter() - start, 3)
            row.update(name=spec.name, method=spec.method, group=spec.group)
            self.rows[spec.name] = row
            if spec.kind == "uncached" and "transformer_s" in row:
                self.base_guess = row["wall_s"]
            self.write()
            self.print_row(self.rows[spec.name])

    # output ----------------------------------------------------------------------------------
    def derived(self) -> list[dict]:
        """Rows in ROWS order with speedups against this run's baselines (kept rows keep theirs)."""
        compiled_base = self.rows.get("compiled-uncached", {}).get("transformer_s")
        eager_base = statistics.median(self.uncached) if self.uncached else None
        out = []
        for spec in ROWS:
            row = self.rows.get(spec.name)
            if row is None:
                if spec.name in self.kept:
                    out.append(self.kept[spec.name])
                continue
            row = dict(row)
            if spec.name == "uncached" and self.uncached:  # the median run; every run listed
                row["transformer_s"] = round(eager_base, 4)
                row["wall_s"] = round(statistics.median(self.uncached_wall), 4)
                row["runs_s"], row["runs_wall_s"] = list(self.uncached), list(self.uncached_wall)
            base = compiled_base if spec.group == "compiled" else eager_base
            if "transformer_s" in row and base:
                row["baseline_s"] = round(base, 4)
                row["speedup"] = round(base / row["transformer_s"], 3)
                fraction = row.get("computed_fraction")
                row["efficiency"] = round(row["speedup"] * fraction, 3) if fraction is not None else None
            eager_ref = eager_base or self.kept.get("uncached", {}).get("transformer_s")  # --merge
            if spec.name == "compiled-uncached" and eager_ref and "transformer_s" in row:
                row["speedup_vs_eager_uncached"] = round(eager_ref / row["transformer_s"], 3)
            out.append(row)
        return out

    def result(self) -> dict:
        size, pipe = self.size, self.pipe
        rows = self.derived()
        todo = [s["row"] for s in self.skipped]
        return {
            "benchmark": ("videocache and diffusers caches on a Wan2.1-T2V-1.3B-sized transformer (random weights) "
                          "in the reference pipeline; transformer time of one generation per row"),
            "smoke": self.args.smoke,
            "command": self.args.command,
            "device": (torch.cuda.get_device_name(self.device) if self.cuda
                       else platform.processor() or platform.machine()),
            "environment": self.environment,
            "setup": {
                "blocks": size.blocks, "heads": size.heads, "head_dim": size.head_dim,
                "hidden": size.heads * size.head_dim, "ffn": size.ffn, "dtype": str(size.dtype).replace("torch.", ""),
                "frames": size.frames, "height": size.height, "width": size.width, "steps": size.steps,
                "guidance_scale": size.guidance, "video_tokens": video_tokens(pipe, size),
                "scheduler": type(pipe.scheduler).__name__, "profile": PROFILE, "prompt": PROMPT, "seed": 0,
                "compile_backend": self.args.compile_backend, "uncached_repeats": self.args.uncached_repeats,
            },
            "peak_memory": ("torch.cuda.max_memory_allocated, reset per generation" if self.cuda
                            else "peak resident set size of the process (CPU: it never goes down)"),
            "warmup_s": getattr(self, "warmup_s", None),
            "budget_s": self.args.budget_s,
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
            "rows": rows,
            "skipped": self.skipped,
            "rerun_skipped": (shlex.join([*self.args.argv_base, "--rows", ",".join(todo), "--merge"]) if todo else None),
        }

    def write(self) -> None:
        result = self.result()
        write_results(self.args.out, result, markdown(result))

    def print_row(self, row: dict) -> None:
        if "error" in row:
            print(f"{row['name']:32s} ERROR {row['error']}", flush=True)
            return
        shown = next(r for r in self.derived() if r["name"] == row["name"])
        print(f"{row['name']:32s} fraction {fmt(shown.get('computed_fraction'), '.3f')}  "
              f"transformer {shown['transformer_s']:.2f} s  speedup {fmt(shown.get('speedup'), '.2f', 'x')}  "
              f"peak {shown['peak_mem_bytes'] / GIB:.2f} GiB"
              + (f"  recompiles {row['recompiles_after_warmup']}" if "recompiles_after_warmup" in row else ""),
              flush=True)


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def markdown(result: dict) -> str:
    s, env = result["setup"], result["environment"]
    title = "GPU scale benchmark" + (" (SMOKE: tiny model on the CPU, timings meaningless)" if result["smoke"] else "")

    def cells(r: dict) -> list[str]:
        if "error" in r:
            return [r["method"], f"error: {r['error']}", "", "", "", "", "", ""]
        t = f"{r['transformer_s']:.2f}"
        if r["name"] == "uncached" and len(r.get("runs_s", [])) > 1:
            t += " (" + " / ".join(f"{x:.2f}" for x in r["runs_s"]) + ")"
        cache = (f"{size_text(r.get('cache_peak_bytes'))} / {size_text(r.get('cache_peak_host_bytes'))}"
                 if r.get("cache_peak_bytes") is not None else "-")
        return [r["method"], fmt(r.get("computed_fraction"), ".3f"), t, fmt(r.get("speedup"), ".2f", "x"),
                fmt(r.get("efficiency"), ".2f"), size_text(r.get("peak_mem_bytes")), cache,
                fmt(r.get("recompiles_after_warmup"), "d")]

    lines = [
        f"# {title}", "",
        f"`{result['command']}` on {result['device']} (torch {env['torch']}, diffusers {env['diffusers']}). "
        f"{result['benchmark']}: {s['blocks']} blocks, {s['heads']} heads x {s['head_dim']} = {s['hidden']} hidden, "
        f"FFN {s['ffn']}, {s['dtype']}; {s['frames']} frames {s['height']}x{s['width']} = {s['video_tokens']:,} video "
        f"tokens, {s['steps']} steps, CFG {s['guidance_scale']:g}. Eager rows are compared with the median of the "
        "eager uncached runs, compiled rows with the compiled uncached run. Efficiency = speedup x computed "
        f"fraction. Peak memory: {result['peak_memory']}.", "",
        *markdown_table(["method", "computed fraction", "transformer s", "speedup", "efficiency", "peak memory",
                         "cache device / host", "recompiles after warm-up"], map(cells, result["rows"]), "lrrrrrrr"),
    ]
    compiled = next((r for r in result["rows"] if r["name"] == "compiled-uncached"), {})
    if compiled.get("speedup_vs_eager_uncached"):
        lines += ["", f"compile_repeated_blocks() alone, uncached: speedup {compiled['speedup_vs_eager_uncached']:.2f}x over "
                  f"eager uncached (warm-up {compiled['warmup_s']:.0f} s, {compiled['warmup_graphs']} graphs)."]
    if result["skipped"]:
        lines += ["", "Skipped to stay within the time budget: "
                  + ", ".join(f"{x['row']} (about {fmt(x['estimate_s'], '.0f')} s)" for x in result["skipped"])
                  + f"; run them with `{result['rerun_skipped']}`."]
    notes = [r for r in result["rows"] if r.get("info", {}).get("note")]
    lines += [f"Note: {r['name']}: {r['info']['note']}." for r in notes]
    return "\n".join(lines) + "\n"


def parse_rows(text: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in GROUPS:
            names += GROUPS[part]
        elif part in BY_NAME:
            names.append(part)
        else:
            fail(f"unknown row {part!r}; valid: {', '.join([*GROUPS, *BY_NAME])}")
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (30 blocks of hidden 64, 5 frames 32x32)")
    p.add_argument("--rows", default=None, help="comma-separated row names or groups (all, eager, compiled); "
                   f"default all (--smoke: {SMOKE_ROWS})")
    p.add_argument("--out", default=None, help="output path without suffix (default benchmarks/gpu_scale; "
                   "--smoke: benchmarks/gpu_scale_smoke)")
    p.add_argument("--device", default=None, help="default: cuda at full size, cpu with --smoke")
    p.add_argument("--uncached-repeats", type=int, default=None,
                   help="eager uncached runs, spread over the eager rows (default 3; --smoke: 2)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip rows that would end the run after this many seconds after the imports (default 280 at "
                   "full size: the imports take 10 to 20 s more)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --smoke: eager)")
    p.add_argument("--compile-estimate-s", type=float, default=60.0, help="first compilation, for the budget")
    p.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    script = repo_path(__file__)
    args.command = shlex.join(["python", script, *argv])
    args.argv_base = ["python", script, *_without(argv, ("--rows", "--budget-s"), ("--merge",))]
    size = SMOKE if args.smoke else FULL
    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("no CUDA device here: run the full-size benchmark on a GPU, or pass --smoke for the tiny CPU run")
    if not args.smoke and not device.startswith("cuda"):
        fail("the full-size benchmark needs a CUDA device; pass --smoke for the tiny CPU run")
    if args.uncached_repeats is None:
        args.uncached_repeats = 2 if args.smoke else 3
    if args.uncached_repeats < 1:
        fail("--uncached-repeats must be at least 1")
    args.out = args.out or str(Path(__file__).with_name("gpu_scale_smoke" if args.smoke else "gpu_scale"))
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.budget_s is None and not args.smoke:
        args.budget_s = 280.0
    selected = parse_rows(args.rows or (SMOKE_ROWS if args.smoke else "all"))
    if not selected:
        fail("--rows selects no row")
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread beats two fighting over shared cores
    bench = Bench(args, size, device)
    if args.merge and Path(args.out).with_suffix(".json").is_file():
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        new_setup = bench.result()["setup"]
        if old.get("setup") != new_setup:
            fail(f"--merge: {args.out}.json was made with other settings; pass another --out")
        bench.kept = {r["name"]: r for r in old.get("rows", [])}
    bench.run(selected)
    print(f"wrote {Path(args.out).with_suffix('.json')} and {Path(args.out).with_suffix('.md')}")


def _without(argv: list[str], with_value: tuple[str, ...], flags: tuple[str, ...]) -> list[str]:
    """argv less the given options (the rerun command of skipped rows sets its own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in with_value:
            skip = True
        elif a not in flags and not any(a.startswith(o + "=") for o in with_value):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
