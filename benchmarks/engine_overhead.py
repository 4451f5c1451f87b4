"""Benchmark: what the engine costs on a skipped step, on the CPU (a proxy for its host overhead).

A skipped step should cost what the model does outside its blocks (patch and time embeddings, text
projection, RoPE, output head) and little more. This run measures it on a tiny-width 30-block
`WanTransformer3DModel` (hidden 32: block work is cheap, so every microsecond of Python on the hot path
shows), driven as WanPipeline drives it: 25 flow-matching Euler steps (shift 3.0), CFG with a "cond" and
an "uncond" call per step, each call inside `transformer.cache_context(name, step_index=i, sigma=...,
num_inference_steps=25)` and timed with perf_counter. One torch thread.

Rows, each its own transformer built from the same seed:
- uncached; "outside blocks": the same transformer with `blocks` emptied (the floor a skipped step can reach);
- videocache with an aligned schedule (compute at COMPUTE_STEPS, every cell skipped alike elsewhere, REUSE or
  FORECAST), fused skip (default) and block by block (`fuse_skipped_steps=False`), `trace` on and off;
- videocache with a split schedule, block by block: on skip steps every cell is skipped but self-attention
  is forecast on even blocks and the MLP on odd blocks, the rest reused (so nothing can be fused); and a
  partial one, where only those cells are reused and the rest computed;
- diffusers MagCache forced to skip (mag ratios 1, huge threshold, at most 3 skips in a row).
Which calls skipped their blocks is found in a separate identification run, by counting the executions of
block 1's attention and MLP modules.

The identification runs warm every row up; per round, every row runs `--repeats` timed generations; per
call (step, context) the minimum over repeats counts, and per row the median over its skipped calls (and
over its compute calls). Rounds interleave the rows in rotating order; reported values are medians over
rounds of per-round values, so ratios come from measurements made next to each other. The compute-step
overhead compares each compute call with a call of the uncached transformer made right before or after
it on the same inputs (the machine's load drifts within seconds). `--profile` adds a cProfile of one
fused and one block-by-block run, over the skipped calls only.

    python benchmarks/engine_overhead.py --rounds 3 --repeats 2 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MagCacheConfig

import videocache
from videocache import Action, CacheTable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    TINY_WIDTH,
    WAN_1_3B_BLOCKS,
    command,
    environment,
    markdown_table,
    wan_transformer,
    write_results,
)

STEPS = 25
BLOCKS = WAN_1_3B_BLOCKS
COMPUTE_STEPS = (0, 1, 2, 3, 5, 8, 11, 14, 17, 20, 22, 24)
CONTEXTS = ("cond", "uncond")
GUIDANCE = 5.0


def make_transformer():
    """Tiny width, 30 blocks, 4 latent and 32 text channels (its own inputs, no pipeline around it)."""
    return wan_transformer(BLOCKS, TINY_WIDTH, in_channels=4, out_channels=4, text_dim=32, rope_max_seq_len=32)


def tables() -> dict[str, tuple[CacheTable, np.ndarray]]:
    """name -> (table, per step: True where the step's cells are all skipped)."""
    compute = np.zeros(STEPS, bool)
    compute[list(COMPUTE_STEPS)] = True
    skip = ~compute
    out = {}
    for name, action in (("reuse", Action.REUSE), ("forecast", Action.FORECAST)):
        acts = np.zeros((STEPS, BLOCKS, 3), int)
        acts[skip] = int(action)
        out[name] = (CacheTable(acts), skip)
    acts = np.zeros((STEPS, BLOCKS, 3), int)
    acts[skip] = int(Action.REUSE)
    acts[np.ix_(skip, np.arange(0, BLOCKS, 2), [0])] = int(Action.FORECAST)
    acts[np.ix_(skip, np.arange(1, BLOCKS, 2), [2])] = int(Action.FORECAST)
    out["split"] = (CacheTable(acts), skip)
    acts = np.zeros((STEPS, BLOCKS, 3), int)
    acts[np.ix_(skip, np.arange(0, BLOCKS, 2), [0])] = int(Action.REUSE)
    acts[np.ix_(skip, np.arange(1, BLOCKS, 2), [2])] = int(Action.REUSE)
    out["partial"] = (CacheTable(acts), np.zeros(STEPS, bool))  # nothing fully skipped
    return out


class Row:
    def __init__(self, name: str, kind: str, transformer: torch.nn.Module, scheduler, *, table=None,
                 table_name=None, skip_steps=None, fuse=True, trace=True) -> None:
        self.name, self.kind, self.transformer, self.scheduler = name, kind, transformer, scheduler
        self.table_name, self.fuse, self.trace = table_name, fuse, trace
        self.engine = None
        self.table_skips = skip_steps  # per step, from the table (videocache rows)
        self.partial_steps = None
        if kind == "videocache":
            self.engine = videocache.apply_to_transformer(
                transformer, scheduler, table, trace=trace, fuse_skipped_steps=fuse,
            )
            if table_name == "partial":
                self.partial_steps = ~np.isin(np.arange(STEPS), COMPUTE_STEPS)
        elif kind == "magcache":
            transformer.enable_cache(MagCacheConfig(
                mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS, threshold=1e9, max_skip_steps=3,
                retention_ratio=0.1,
            ))
        elif kind == "outside_blocks":
            transformer.blocks = torch.nn.ModuleList()
        self.skip = np.zeros((STEPS, len(CONTEXTS)), bool)  # calls whose blocks did not run (identified)
        self.computed = np.ones((STEPS, len(CONTEXTS)), bool)  # calls whose blocks all ran
        self.rounds: list[np.ndarray] = []  # per round: (steps, contexts) seconds, min over repeats
        self.paired: list[np.ndarray] = []  # the same for the uncached calls paired with its compute calls
        self.pair = kind in ("videocache", "magcache")
        self.fused_calls = 0


def generate(transformer, scheduler, latents0, embeds, times=None, profiles=None, profile_mask=None,
             paired=None, paired_times=None, parity=0, before_call=None) -> None:
    """One 25-step CFG generation as WanPipeline runs it; per-call seconds into `times[step, context]`.
    With `paired` (the uncached transformer), every call where `paired_times` is not NaN is timed on it too,
    right before or after (alternating), into `paired_times`: the compute-step reference."""
    scheduler.set_timesteps(STEPS)
    latents = latents0.clone()
    for i, t in enumerate(scheduler.timesteps):
        kw = dict(step_index=i, sigma=float(scheduler.sigmas[i]), num_inference_steps=STEPS)
        preds = []
        for c, (ctx, emb) in enumerate(zip(CONTEXTS, embeds, strict=True)):
            inputs = dict(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=emb, return_dict=False)
            if before_call is not None:
                before_call(i, c)
            pair = paired is not None and not np.isnan(paired_times[i, c])
            if pair and (i + c + parity) % 2:
                paired_times[i, c] = _timed(paired, ctx, kw, inputs)[1]
            on = profiles is not None and profile_mask[i, c]
            if on:  # one profile per call, so that a call the machine preempted can be outvoted
                profiles.append(cProfile.Profile())
                profiles[-1].enable()
            out, dt = _timed(transformer, ctx, kw, inputs)
            if on:
                profiles[-1].disable()
            if pair and not (i + c + parity) % 2:
                paired_times[i, c] = _timed(paired, ctx, kw, inputs)[1]
            if times is not None:
                times[i, c] = dt
            preds.append(out)
        noise = preds[1] + GUIDANCE * (preds[0] - preds[1])
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    transformer._reset_stateful_cache()  # as the pipeline's maybe_free_model_hooks does


def _timed(transformer, ctx: str, kw: dict, inputs: dict) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with transformer.cache_context(ctx, **kw):
        out = transformer(**inputs)[0]
    return out, time.perf_counter() - t0


def identify(row: Row, latents0, embeds) -> None:
    """Which calls ran block 1's components (forward hooks, in a run of its own), and checks."""
    tr = row.transformer
    if row.kind == "outside_blocks":
        row.skip[:], row.computed[:] = False, False
        return
    counts = np.zeros((STEPS, len(CONTEXTS), 3), int)
    where = {"call": (0, 0)}

    def counter(k: int):
        def hook(*_) -> None:
            counts[(*where["call"], k)] += 1
        return hook

    handles = [getattr(tr.blocks[1], m).register_forward_hook(counter(k))
               for k, m in enumerate(("attn1", "attn2", "ffn"))]
    fused = {"n": 0}
    if row.engine is not None and row.fuse:
        skip_stack = row.engine._skip_stack

        def counted(*a, **k):
            out = skip_stack(*a, **k)
            fused["n"] += out is not None
            return out

        row.engine._skip_stack = counted
    try:
        generate(tr, row.scheduler, latents0, embeds, before_call=lambda i, c: where.update(call=(i, c)))
    finally:
        for h in handles:
            h.remove()
        if row.engine is not None and row.fuse:
            del row.engine._skip_stack
    row.skip = counts.sum(axis=2) == 0
    row.computed = (counts == 1).all(axis=2)
    row.fused_calls = fused["n"]
    if row.engine is not None:
        stats = row.engine.stats()
        if stats["fallbacks"]:
            raise SystemExit(f"{row.name}: {stats['fallbacks']} fallbacks; the table is not executed as meant")
        want_skip = np.repeat(row.table_skips[:, None], len(CONTEXTS), axis=1)
        if not (row.skip == want_skip).all():
            raise SystemExit(f"{row.name}: skipped calls {np.argwhere(row.skip).tolist()} differ from the table's")
        if row.fuse and row.table_name in ("reuse", "forecast") and row.fused_calls != want_skip.sum():
            raise SystemExit(f"{row.name}: {row.fused_calls} fused skips, expected {want_skip.sum()}")


def median_ms(times: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.median(times[mask]) * 1e3) if mask.any() else None


def profile_run(row: Row, latents0, embeds, top: int, generations: int = 2) -> dict:
    """cProfile of every skipped call of `generations` runs, one profile per call; per engine function the
    median over calls of its calls, cumulative and own time."""
    mask = row.skip
    generate(row.transformer, row.scheduler, latents0, embeds)  # warm-up
    calls, times = [], np.zeros((generations, STEPS, len(CONTEXTS)))
    for g in range(generations):
        generate(row.transformer, row.scheduler, latents0, embeds, times=times[g], profiles=calls, profile_mask=mask)
    samples: dict[str, np.ndarray] = {}
    for k, prof in enumerate(calls):
        for (file, line, func), (_, ncalls, tt, ct, _) in pstats.Stats(prof).stats.items():
            path = Path(file)
            if REPO in path.parents and path.relative_to(REPO).parts[0] in ("videocache", "pipelines"):
                where = str(path.relative_to(REPO))
            elif "diffusers" in path.parts and "hooks" in path.parts:
                where = "diffusers/hooks/" + path.name
            elif path.name == "eval_frame.py" and func == "_fn":
                where = "torch/_dynamo/eval_frame.py"  # the @torch.compiler.disable wrapper
            else:
                continue
            samples.setdefault(f"{where}:{line}({func})", np.zeros((len(calls), 3)))[k] = (ncalls, tt, ct)
    entries = []
    for name, v in samples.items():
        ncalls, tt, ct = np.median(v, axis=0)
        entries.append({"function": name, "calls_per_skip": round(float(ncalls), 2),
                        "cum_us_per_skip": round(float(ct) * 1e6, 1), "own_us_per_skip": round(float(tt) * 1e6, 1)})
    entries.sort(key=lambda e: -e["cum_us_per_skip"])
    return {"row": row.name, "skipped_calls": len(calls),
            "profiled_ms_per_skip": round(float(np.median(times[:, mask]) * 1e3), 3), "top": entries[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="add a cProfile of the skipped calls (fused, blockwise)")
    p.add_argument("--top", type=int, default=15, help="functions listed per profile")
    p.add_argument("--out", default=str(Path(__file__).with_name("engine_overhead")))
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]

    def scheduler():
        return FlowMatchEulerDiscreteScheduler(shift=3.0)

    torch.manual_seed(1)
    latents0 = torch.randn(1, 4, 3, 8, 8)
    embeds = (torch.randn(1, 8, 32), torch.randn(1, 8, 32))
    tabs = tables()
    rows = [Row("uncached", "uncached", make_transformer(), scheduler()),
            Row("outside blocks (blocks emptied)", "outside_blocks", make_transformer(), scheduler())]
    for tname in ("reuse", "forecast"):
        for fuse in (True, False):
            for trace in (True, False):
                name = f"videocache {tname}, {'fused' if fuse else 'blockwise'}, trace={trace}"
                rows.append(Row(name, "videocache", make_transformer(), scheduler(), table=tabs[tname][0],
                                table_name=tname, skip_steps=tabs[tname][1], fuse=fuse, trace=trace))
    for trace in (True, False):
        rows.append(Row(f"videocache split (forecast/reuse per block), blockwise, trace={trace}", "videocache",
                        make_transformer(), scheduler(), table=tabs["split"][0], table_name="split",
                        skip_steps=tabs["split"][1], fuse=False, trace=trace))
    rows.append(Row("videocache partial (one cell reused per block), blockwise, trace=True", "videocache",
                    make_transformer(), scheduler(), table=tabs["partial"][0], table_name="partial",
                    skip_steps=tabs["partial"][1], fuse=False, trace=True))
    rows.append(Row("diffusers MagCache (forced skips)", "magcache", make_transformer(), scheduler()))
    uncached, floor, mag = rows[0], rows[1], rows[-1]

    with torch.no_grad():
        for row in rows:
            identify(row, latents0, embeds)
        for r in range(args.rounds):
            k = (r * len(rows)) // args.rounds
            order = rows[k:] + rows[:k]
            for row in order:  # the identification run warmed every row up
                reps = np.zeros((args.repeats, STEPS, len(CONTEXTS)))
                pairs = np.full((args.repeats, STEPS, len(CONTEXTS)), np.nan)
                pair = row.pair
                if pair:
                    pairs[:, row.computed] = 0.0
                    if row.partial_steps is not None:
                        pairs[:, row.partial_steps] = 0.0
                for j in range(args.repeats):
                    generate(row.transformer, row.scheduler, latents0, embeds, times=reps[j],
                             paired=uncached.transformer if pair else None, paired_times=pairs[j], parity=j)
                row.rounds.append(reps.min(axis=0))
                row.paired.append(pairs.min(axis=0))
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)", flush=True)
        profiles = []
        if args.profile:
            for row in rows:
                if row.kind == "videocache" and row.table_name == "reuse" and row.trace:
                    profiles.append(profile_run(row, latents0, embeds, args.top))

    every = np.ones((STEPS, len(CONTEXTS)), bool)
    results = []
    for row in rows:
        per_round = []
        for r in range(args.rounds):
            t, base = row.rounds[r], (row.paired[r] if row.pair else uncached.rounds[r])
            floor_ms = median_ms(floor.rounds[r], every)
            mag_skip = median_ms(mag.rounds[r], mag.skip)
            mag_above = mag_skip - floor_ms
            skip_mask = row.partial_steps[:, None].repeat(2, 1) if row.partial_steps is not None else row.skip
            skip = median_ms(t, skip_mask)
            comp_mask = row.computed if row.kind != "outside_blocks" else every
            comp = median_ms(t, comp_mask)
            base_comp = median_ms(base, comp_mask)
            skipped = skip is not None and row.partial_steps is None
            per_round.append({
                "skip_ms": skip,
                "above_floor_ms": skip - floor_ms if skipped else None,
                "vs_magcache_skip": skip / mag_skip if skipped else None,
                "above_floor_vs_magcache": (skip - floor_ms) / mag_above if skipped else None,
                "partial_vs_uncached": None if row.partial_steps is None else skip / median_ms(base, skip_mask),
                "compute_ms": comp,
                "paired_uncached_ms": base_comp if row.pair else None,
                "compute_overhead_ms": comp - base_comp if row.pair else None,
                "compute_overhead_pct": 100 * (comp - base_comp) / base_comp if row.pair else None,
            })

        def med(key: str, per_round=per_round, digits: int = 4):
            v = [x[key] for x in per_round if x[key] is not None]
            return round(float(np.median(v)), digits) if v else None

        results.append({
            "row": row.name, "kind": row.kind, "table": row.table_name,
            "fuse_skipped_steps": row.fuse if row.kind == "videocache" else None,
            "trace": row.trace if row.kind == "videocache" else None,
            "skipped_calls": int(row.skip.sum()),
            "partial_calls": None if row.partial_steps is None else int(row.partial_steps.sum() * 2),
            "fused_calls": row.fused_calls if row.kind == "videocache" and row.fuse else None,
            **{k: med(k) for k in ("skip_ms", "above_floor_ms", "vs_magcache_skip", "above_floor_vs_magcache",
                                   "partial_vs_uncached", "compute_ms", "paired_uncached_ms", "compute_overhead_ms", "compute_overhead_pct")},
            "per_round": [{k: (None if v is None else round(v, 4)) for k, v in x.items()} for x in per_round],
        })
    by = {r["row"]: r for r in results}
    mag_steps = sorted({int(i) for i in np.argwhere(mag.skip.all(axis=1)).ravel()})
    result = {
        "benchmark": (f"engine cost of a skipped call: tiny-width {BLOCKS}-block WanTransformer3DModel (2 heads x 16, "
                      f"FFN 64, latents (1,4,3,8,8), text (1,8,32)), {STEPS} steps FlowMatchEuler shift 3, CFG "
                      "(2 calls per step) inside cache_context as WanPipeline; per-call ms, median over calls of "
                      "min over repeats, median over rounds"),
        "command": command(__file__),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "environment": environment(),
        "load_average_1min": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start and end
        "compute_steps": list(COMPUTE_STEPS),
        "magcache_skipped_steps": mag_steps,
        "uncached_ms": by[uncached.name]["compute_ms"],
        "outside_blocks_ms": by[floor.name]["compute_ms"],
        "magcache_skip_ms": by[mag.name]["skip_ms"],
        "rows": results,
        "profiles": profiles,
        "seconds": round(time.perf_counter() - started, 1),
    }
    env = result["environment"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [
        "# Engine cost of a skipped call (CPU proxy)",
        "",
        f"`{result['command']}` ({env['torch_threads']} torch thread, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"diffusers {env['diffusers']}, 1-minute load average {result['load_average_1min'][0]:.1f} at the start and "
        f"{result['load_average_1min'][1]:.1f} at the end, in {result['seconds']:.0f} s). {result['benchmark']}.",
        "",
        f"Uncached: {result['uncached_ms']:.3f} ms per call; outside the blocks (blocks emptied): "
        f"{result['outside_blocks_ms']:.3f} ms; MagCache on its skipped steps {mag_steps}: "
        f"{result['magcache_skip_ms']:.3f} ms. videocache computes at steps {list(COMPUTE_STEPS)}.",
        "",
    ]

    def cells(r: dict) -> list[str]:
        if r["kind"] in ("uncached", "outside_blocks"):
            return [r["row"], "", "", "", "", f(r["compute_ms"], ".3f"), "", ""]
        skip = f(r["skip_ms"], ".3f")
        if r["partial_calls"]:
            skip += f" (partial step, {r['partial_vs_uncached']:.2f}x uncached)"
        return [r["row"], skip, f(r["above_floor_ms"], "+.3f"), f(r["vs_magcache_skip"], ".2f"),
                f(r["above_floor_vs_magcache"], ".2f"), f(r["compute_ms"], ".3f"), f(r["paired_uncached_ms"], ".3f"),
                f"{f(r['compute_overhead_ms'], '+.3f')} ms ({f(r['compute_overhead_pct'], '+.1f')} %)"]

    lines += markdown_table(["row", "skip ms/call", "above floor ms", "x MagCache skip", "above floor x MagCache's",
                             "compute ms/call", "uncached next to it", "compute overhead vs uncached"],
                            map(cells, results), "lrrrrrrr")
    lines += [
        "",
        "Floor: the same model with `blocks = ModuleList()`, which still runs the text projection and RoPE that "
        "videocache memoises per context (so a skipped call can come in under it). Compute overhead: median over "
        "the row's compute calls (block 1 ran all its components) minus the median of uncached calls made right "
        "next to them (same step, context and inputs, order alternating). Skip and compute values are medians "
        "over rounds of per-round values; `per_round` in the JSON has each round.",
    ]
    for prof in profiles:
        lines += [
            "",
            f"## cProfile, {prof['row']}: {prof['skipped_calls']} skipped calls profiled one by one, "
            f"{prof['profiled_ms_per_skip']:.3f} ms per call under the profiler; medians over the calls",
            "",
            *markdown_table(["function", "calls per skipped call", "cumulative us per skipped call",
                             "own us per skipped call"],
                            ([f"`{e['function']}`", f"{e['calls_per_skip']:g}", f"{e['cum_us_per_skip']:.1f}",
                              f"{e['own_us_per_skip']:.1f}"] for e in prof["top"]), "lrrr"),
        ]
    json_path, md_path = write_results(args.out, result, lines)
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path} in {result['seconds']} s")


if __name__ == "__main__":
    main()
