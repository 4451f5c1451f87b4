"""Turn a comparison's per-run records into report.json, report.md and pareto.png.

Aggregates are FLOP- and time-weighted sums over all (prompt, seed) items, not means of ratios:
computed fraction = executed block FLOPs / uncached block FLOPs, speedup = uncached seconds / method
seconds (each method against the uncached runs of its own process, interleaved with it).

A parallel comparison (`--ulysses` / `--ring` / `--cfg-parallel`) reports PSNR / SSIM against the
single-process uncached video, the speedup against the uncached run under the same parallelism and
against one process, whether the ranks sharing a branch executed the same work (their decisions
agreed), and who parallelised the transformer (videocache, or cache-dit's own context parallelism).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..metrics.fidelity import format_db
from ..peers.spec import Method, family_of
from .run_store import Item, RunSettings, RunStore, write_json

MARKERS = {
    "none": ("o", "black"),
    "videocache": ("*", "tab:red"),
    "diffusers:fbcache": ("s", "tab:blue"),
    "diffusers:taylorseer": ("^", "tab:green"),
    "diffusers:magcache": ("D", "tab:purple"),
    "diffusers:pab": ("v", "tab:orange"),
    "cachedit:dbcache": ("P", "tab:brown"),
    "cachedit:dbcache-taylorseer": ("X", "tab:pink"),
}
FRACTION_TOLERANCE = 0.005  # engine-reported vs measured computed fraction


def _total_flops(executed: dict[str, Any]) -> int:
    return int(sum(executed["flops"].values()))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    method: Method, records: list[dict[str, Any]], expected: int, reference: dict[str, str], error: str | None
) -> dict[str, Any]:
    """One report entry for a method from its per-item records. `reference` maps item -> sha of the
    uncached video from the `none` run, to check that every process saw the same uncached video."""
    entry: dict[str, Any] = {"method": method.spec, "family": family_of(method), "label": method.label}
    entry["items"] = len(records)
    entry["items_expected"] = expected
    if error:
        entry["error"] = error
    if not records:
        entry.update(
            computed_fraction=None,
            transformer_speedup=None,
            wall_speedup=None,
            psnr=None,
            ssim=None,
            cache_peak_bytes=None,
        )
        entry["rows"] = []
        return entry
    executed = sum(_total_flops(r["executed"]) for r in records)
    uncached = sum(_total_flops(r["baseline_executed"]) for r in records)
    t = sum(r["transformer_s"] for r in records)
    base_t = sum(r["baseline_transformer_s"] for r in records)
    w = sum(r["wall_s"] for r in records)
    base_w = sum(r["baseline_wall_s"] for r in records)
    engine = [r["engine_computed_fraction"] for r in records if r.get("engine_computed_fraction") is not None]
    peaks = [r["cache_peak_bytes"] for r in records if r.get("cache_peak_bytes") is not None]
    psnrs = [float(r["psnr"]) for r in records]
    entry.update(
        computed_fraction=executed / uncached if uncached else None,
        engine_computed_fraction=_mean(engine),
        transformer_speedup=base_t / t if t > 0 else None,
        wall_speedup=base_w / w if w > 0 else None,
        psnr=_mean(psnrs),
        psnr_min=min(psnrs),
        ssim=_mean([float(r["ssim"]) for r in records]),
        cache_peak_bytes=max(peaks) if peaks else None,
        transformer_s=t,
        baseline_transformer_s=base_t,
        wall_s=w,
        baseline_wall_s=base_w,
        baseline_matches_reference=all(
            reference.get(r["item"], r["baseline_sha1"]) == r["baseline_sha1"] for r in records
        ),
        info=records[0].get("info", {}),
    )
    if all("parallel" in r for r in records):
        computed = sum(r["computed_flops"] for r in records)
        base = sum(r["uncached_flops"] for r in records)
        entry["computed_fraction"] = computed / base if base else None  # single-process FLOP weights (worker.py)
        ref_t = sum(r["reference_transformer_s"] for r in records)
        ref_w = sum(r["reference_wall_s"] for r in records)
        local = [
            sum(int(p.get("stats", {}).get("local_disagreements", 0)) for p in r["parallel"]["per_rank"]) for r in records
        ]
        entry.update(
            speedup_vs_one_process=ref_t / t if t > 0 else None,
            wall_speedup_vs_one_process=ref_w / w if w > 0 else None,
            psnr_vs_parallel_uncached=_mean([float(r["psnr_vs_parallel_uncached"]) for r in records]),
            psnr_baseline_vs_reference=min(float(r["psnr_baseline_vs_reference"]) for r in records),
            ranks_agree=all(r["parallel"]["ranks_agree"] for r in records),
            parallel_impl=records[0]["parallel"]["impl"],
            per_rank_computed_fraction=[
                _mean([p["computed_fraction"] for p in per])
                for per in zip(*(r["parallel"]["per_rank"] for r in records), strict=True)
            ],
            local_disagreements=sum(local),
        )
    entry["rows"] = [
        {
            k: r.get(k)
            for k in (
                "prompt",
                "seed",
                "item",
                "computed_fraction",
                "engine_computed_fraction",
                "transformer_speedup",
                "wall_speedup",
                "psnr",
                "ssim",
                "cache_peak_bytes",
                "transformer_s",
                "baseline_transformer_s",
                "wall_s",
                "baseline_wall_s",
            )
        }
        for r in records
    ]
    return entry


def build_report(
    store: RunStore,
    settings: RunSettings,
    methods: list[Method],
    items: list[Item],
    errors: dict[str, str],
) -> dict[str, Any]:
    none_records = {item.key: store.read_record("none", item) for item in items}
    reference = {k: r["frames_sha1"] for k, r in none_records.items() if r is not None}
    entries = []
    for method in methods:
        records = [r for r in (store.read_record(method.spec, item) for item in items) if r is not None]
        entries.append(summarize(method, records, len(items), reference, errors.get(method.spec)))
    extra: dict[str, Any] = {}
    if settings.parallel:
        extra["parallel"] = {
            "ulysses": settings.ulysses,
            "ring": settings.ring,
            "cfg": settings.cfg,
            "world_size": settings.ulysses * settings.ring * settings.cfg,
            "fidelity": "PSNR / SSIM against the single-process uncached video of the same prompt and seed",
        }
    return extra | {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings.comparable() | {"fps": settings.fps},
        "prompts": sorted({item.prompt for item in items}, key=[i.prompt for i in items].index),
        "seeds": sorted({item.seed for item in items}),
        "timing": "each method is timed against uncached runs interleaved with it in the same process; "
        "times are the minimum over repeats, summed over items",
        "methods": entries,
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "-"


def _sort_key(entry: dict[str, Any]) -> tuple:
    cf = entry.get("computed_fraction")
    return (cf is None, -(cf if cf is not None else 0), entry["family"] != "none", entry["method"])


def notes_for(entry: dict[str, Any]) -> list[str]:
    notes = []
    if entry.get("error"):
        notes.append(f"failed: {entry['error']}")
    if entry["items"] < entry["items_expected"]:
        notes.append(f"{entry['items']}/{entry['items_expected']} items")
    cf = entry.get("computed_fraction")
    if entry["family"] != "none" and cf is not None and cf >= 1.0:
        notes.append("skipped no work")
    engine = entry.get("engine_computed_fraction")
    if engine is not None and cf is not None and abs(engine - cf) > FRACTION_TOLERANCE:
        notes.append(f"engine reports {engine:.3f}")
    if entry.get("baseline_matches_reference") is False:
        notes.append("its uncached run differs from the reference video")
    if entry.get("ranks_agree") is False:
        notes.append("ranks executed different work")
    if entry.get("local_disagreements"):
        notes.append(f"local shards alone would have decided otherwise {entry['local_disagreements']}x (agreed)")
    if entry.get("parallel_impl") not in (None, "videocache"):
        notes.append(f"parallelised by {entry['parallel_impl']}")
    return notes


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    par = report.get("parallel")
    lines = [
        "# Cache comparison",
        "",
        f"Model `{s['model']}`, {s['steps']} steps, {s['frames']} frames {s['height']}x{s['width']}, "
        f"guidance {s['guidance_scale']}, {len(report['prompts'])} prompts x {len(report['seeds'])} seeds, "
        f"{s['repeats']} repeat(s), device {s['device'] or 'default'}, dtype {s['dtype'] or 'default'}, "
        f"attention backend {s.get('attention_backend') or 'diffusers default'}.",
        "",
    ]
    if par is None:
        lines += [
            "Computed fraction: FLOP-weighted share of block components (self-attention, cross-attention, "
            "feed-forward) actually executed, measured by counting executed modules against the uncached run. "
            "PSNR / SSIM: against the uncached video of the same prompt and seed (inf = identical). "
            f"Speedups: {report['timing']}.",
            "",
            "| method | computed fraction | transformer speedup | wall speedup | PSNR (dB) | SSIM | cache peak | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
    else:
        lines += [
            f"Parallel: {par['world_size']} processes (Ulysses {par['ulysses']}, ring {par['ring']}, CFG {par['cfg']}); "
            "every method and the uncached run under the same parallelism, all ranks running the same method at "
            "the same time; rank 0's timings. Computed fraction: executed block FLOPs summed over the ranks against "
            "the uncached run's. PSNR / SSIM: against the single-process uncached video (inf = identical); "
            "'vs parallel uncached': against the uncached run under the same parallelism. Speedups: against the "
            f"parallel uncached run ({report['timing']}) and against the single-process uncached run. 'ranks agree': "
            "the ranks sharing a branch's tokens executed the same block calls (their cache decisions agreed).",
            "",
            "| method | computed fraction | transformer speedup | vs 1 process | PSNR (dB) | SSIM | PSNR vs parallel uncached (dB) | cache peak (rank 0) | ranks agree | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|",
        ]
    for e in sorted(report["methods"], key=_sort_key):
        if par is None:
            lines.append(
                f"| `{e['method']}` | {_fmt(e.get('computed_fraction'))} | {_fmt(e.get('transformer_speedup'), '.2f')}x "
                f"| {_fmt(e.get('wall_speedup'), '.2f')}x | {format_db(e.get('psnr'))} | {_fmt(e.get('ssim'), '.4f')} "
                f"| {_bytes(e.get('cache_peak_bytes'))} | {'; '.join(notes_for(e))} |"
            )
            continue
        agree = e.get("ranks_agree")
        lines.append(
            f"| `{e['method']}` | {_fmt(e.get('computed_fraction'))} | {_fmt(e.get('transformer_speedup'), '.2f')}x "
            f"| {_fmt(e.get('speedup_vs_one_process'), '.2f')}x | {format_db(e.get('psnr'))} | {_fmt(e.get('ssim'), '.4f')} "
            f"| {format_db(e.get('psnr_vs_parallel_uncached'))} | {_bytes(e.get('cache_peak_bytes'))} "
            f"| {'-' if agree is None else ('yes' if agree else 'NO')} | {'; '.join(notes_for(e))} |"
        )
    lines += ["", "Prompts:", ""] + [f"- {p}" for p in report["prompts"]] + [""]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x = less compute, higher y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _place_labels(
    ax, fig, labels: dict[tuple[float, float], list[str]], points: list[tuple[float, float]]
) -> None:
    """Annotate points without overlapping labels: greedy, top to bottom, shifting a label down (with a
    thin leader line) while its box would cover one already placed; right-edge labels go leftwards."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xr = max(max(xs) - min(xs), 0.1)
    yr = max(max(ys) - min(ys), 1.0)
    ax.set_xlim(min(xs) - 0.06 * xr, max(xs) + 0.06 * xr)
    ax.set_ylim(min(ys) - 0.08 * yr, max(ys) + 0.12 * yr)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    width_in, height_in = fig.get_size_inches() * 0.8  # roughly the axes' share of the figure
    char_w = (x1 - x0) * (0.06 / width_in)  # 7 pt text: ~0.06 in per character, ~0.125 in per line
    line_h = (y1 - y0) * (0.125 / height_in)
    placed: list[tuple[float, float, float, float]] = []
    for (x, y), texts in sorted(labels.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        text = "\n".join(texts)
        w, h = char_w * max(len(t) for t in texts), line_h * len(texts)
        right = x > x0 + 0.75 * (x1 - x0)
        left_edge = x - 0.01 * (x1 - x0) - w if right else x + 0.01 * (x1 - x0)
        ty = y + 0.2 * line_h
        for _ in range(12):
            box = (left_edge, left_edge + w, ty, ty + h)
            if not any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3] for b in placed):
                break
            ty -= line_h
        placed.append(box)
        moved = abs(ty - (y + 0.2 * line_h)) > 1e-9
        ax.annotate(
            text,
            (x, y),
            xytext=(left_edge + (w if right else 0.0), ty),
            textcoords="data",
            fontsize=7,
            va="bottom",
            ha="right" if right else "left",
            arrowprops={"arrowstyle": "-", "color": "lightgray", "linewidth": 0.6} if moved else None,
        )


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    """x = computed fraction, y = PSNR; identical videos (inf) are drawn at the top edge, marked 'inf'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [
        e for e in report["methods"] if e.get("computed_fraction") is not None and e.get("psnr") is not None
    ]
    finite = [e["psnr"] for e in entries if math.isfinite(e["psnr"])]
    top = (max(finite) if finite else 30.0) + 5.0
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    points = [(e["computed_fraction"], e["psnr"] if math.isfinite(e["psnr"]) else top) for e in entries]
    seen_families: set[str] = set()
    labels: dict[tuple[float, float], list[str]] = {}  # coincident points share one annotation
    front = pareto_front(points)
    for i, (e, (x, y)) in enumerate(zip(entries, points, strict=True)):
        marker, colour = MARKERS.get(e["family"], ("o", "gray"))
        # videocache presets from profile files (ablations, experiments): hollow and unlabelled unless on
        # the front, so that the named methods stay readable
        variant = e["family"] == "videocache" and any(c in e["label"] for c in ("/", ".yaml", ".yml"))
        family = e["family"] + (" (profile-file variants)" if variant else "")
        legend = family if family not in seen_families else None
        seen_families.add(family)
        ax.scatter(
            [x],
            [y],
            marker=marker,
            color=colour,
            facecolors="none" if variant else colour,
            s=(45 if variant else 90) if marker == "*" else 50,
            label=legend,
            zorder=3,
            alpha=0.85,
        )
        if variant and i not in front:
            continue
        text = e["label"] + (" (inf)" if not math.isfinite(e["psnr"]) else "")
        labels.setdefault((round(x, 3), round(y, 2)), []).append(text)
    _place_labels(ax, fig, labels, points)
    if len(front) > 1:
        fx, fy = zip(*(points[i] for i in front), strict=True)
        ax.step(
            fx, fy, where="post", color="gray", linestyle="--", linewidth=1, label="Pareto front", zorder=2
        )
    if not finite or any(not math.isfinite(e["psnr"]) for e in entries):
        ax.axhline(top, color="lightgray", linewidth=0.8, zorder=1)
    s = report["settings"]
    ax.set_xlabel("computed fraction (FLOP-weighted, measured)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{s['model']}: {s['steps']} steps, {len(report['prompts'])} prompts", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_report(store: RunStore, report: dict[str, Any]) -> dict[str, Path]:
    paths = {
        "json": store.out / "report.json",
        "md": store.out / "report.md",
        "png": store.out / "pareto.png",
    }
    write_json(paths["json"], report)
    paths["md"].write_text(render_markdown(report))
    plot_pareto(report, paths["png"])
    return paths
