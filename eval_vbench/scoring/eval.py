"""`videocache eval`: VBench scores for every preset of a profile (and any peer method), next to fidelity and
speed, resumable, in a report.

    OUT/generation/          a `videocache compare` run store (records, mp4s, logs, compare's own report): every
                             preset and peer on every (prompt, sample), interleaved with the uncached run, so that
                             PSNR / SSIM against the uncached video, computed fraction and speedups come with it
    OUT/videos/<preset>/     the videos as VBench expects them, `{prompt}-{index}.mp4` (hard links into generation/)
    OUT/vbench/<preset>/     VBench's output and `scores.json` (kept while the preset's videos are unchanged)
    OUT/report.json, report.md, radar.png, quality_speedup.png

Generation is `videocache compare`'s (run_compare): atomic records, an interrupted run continues where it stopped,
a preset whose profile changed reruns. Under `accelerate launch --multi_gpu --num_processes N -m videocache.cli
eval ...` every process generates its share of the (prompt, sample) items (data parallel, one GPU per process);
process 0 then scores and writes the report. Scoring runs VBench's own evaluation in its own environment
(vbench_env.py); the reference pipeline also gets its offline prompt accuracy (metrics/prompt_accuracy.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videocache.pipelines.lora import add_lora_arguments, lora_spec, run_settings_fields

from ..comparison.compare import CompareConfig, CompareResult, run_compare
from ..comparison.run_store import Item, RunSettings, RunStore, method_slug, read_json, write_json
from ..peers import Method, NoCache, parse_method
from .vbench_score import QUALITY_DIMENSIONS, aggregate, normalized
from .vbench_suite import Suite, build_suite


@dataclass(frozen=True)
class SuiteCompareConfig(CompareConfig):
    """A comparison over explicit (prompt, seed) items: VBench's samples differ in number per prompt."""

    item_list: tuple[Item, ...] = ()

    @property
    def items(self) -> list[Item]:
        return list(self.item_list)


@dataclass
class EvalConfig:
    settings: RunSettings
    suite: Suite
    methods: list[Method]  # "none" first
    labels: dict[str, str]  # spec -> preset label
    out: Path
    seed: int = 0
    vbench: bool = True
    vbench_venv: str | None = None
    create_venv: bool = True
    vbench_device: str = "cpu"
    progress: bool = True
    low_memory: bool = False

    @property
    def items(self) -> list[Item]:
        return [
            Item(p.prompt, self.seed + i, index)
            for index, p in enumerate(self.suite.prompts) for i in range(p.samples)
        ]


def preset_methods(profile: str | None, presets: list[str], extra: list[str]) -> tuple[list[Method], dict[str, str]]:
    """`--presets none,slow,fast` (for `--profile P`) and `--methods` peers -> methods, 'none' first."""
    specs, labels = [], {}
    for preset in presets:
        if preset == "none":
            spec = "none"
        else:
            if not profile or profile == "none":
                raise ValueError(f"--presets {preset} needs --profile (a profile name or YAML)")
            spec = f"videocache:{profile}:{preset}"
        specs.append(spec)
    methods: list[Method] = [NoCache()]
    seen = {"none"}
    for spec in specs + list(extra):
        method = parse_method(spec)
        if method.spec in seen:
            continue
        seen.add(method.spec)
        methods.append(method)
    for method, preset in zip(methods[1:], [p for p in presets if p != "none"], strict=False):
        labels[method.spec] = preset
    labels["none"] = "none (uncached)"
    for method in methods:
        labels.setdefault(method.spec, method.label)
    if profile and profile != "none":  # a bad preset or profile fails before anything runs
        import videocache

        prof = videocache.load_profile(profile)
        for preset in presets:
            if preset != "none":
                prof.preset(preset)
    return methods, labels


# -- data parallel generation --------------------------------------------------------------------------
def _barrier() -> None:
    from videocache.distributed.state import process_state

    process_state().wait_for_everyone()


def generate(config: EvalConfig) -> tuple[dict[str, str], int, int]:
    """Run what is missing (this process's share of the items under accelerate launch); returns the errors and
    the numbers of runs made and found done (this process's)."""
    from videocache.distributed.state import launch_local_rank, launch_rank, launched_world

    rank, world = launch_rank(), launched_world()
    items = config.items
    mine = tuple(items[rank::world])
    if world > 1:
        from videocache.distributed.state import process_state

        process_state()  # join the launched processes first, while this process still sees every GPU
        local = launch_local_rank()
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if local is not None:  # the workers this process spawns see one GPU: its own
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[local] if local < len(visible) else str(local)
    errors: dict[str, str] = {}
    ran = skipped = 0
    if mine:
        compare = SuiteCompareConfig(
            settings=config.settings,
            prompts=tuple(dict.fromkeys(i.prompt for i in mine)),
            seeds=tuple(sorted({i.seed for i in mine})),
            methods=tuple(config.methods),
            out=config.out / "generation",
            save_videos=True,
            low_memory=config.low_memory,
            progress=config.progress and rank == 0,
            item_list=mine,
        )
        result = run_compare(compare)
        errors, ran, skipped = result.errors, result.ran, result.skipped
    if world > 1:
        _barrier()
        if rank == 0:  # every process wrote compare's report for its own share: rewrite it for all items
            from ..comparison.report import build_report, write_report

            store = RunStore(config.out / "generation")
            write_report(store, build_report(store, config.settings, list(config.methods), items, errors))
    return errors, ran, skipped


# -- VBench videos, scores, accuracy ---------------------------------------------------------------------
def link_videos(config: EvalConfig, store: RunStore, method: Method) -> tuple[Path, list[dict[str, Any]]]:
    """OUT/videos/<slug>/{prompt}-{index}.mp4 for every finished item (hard link, else copy; replaced
    atomically); returns the folder and one row per video (prompt, index, seed, path, frames digest)."""
    import shutil

    folder = config.out / "videos" / method_slug(method.spec)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in config.items:
        record = store.read_record(method.spec, item)
        source = store.video_path(method.spec, item)
        if record is None or not source.is_file():
            continue
        target = folder / config.suite.video_name(item.prompt, item.seed - config.seed)
        if not (target.is_file() and os.path.samefile(source, target)):
            tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        rows.append({"prompt": item.prompt, "index": item.seed - config.seed, "seed": item.seed, "path": str(target),
                     "frames_sha1": record.get("frames_sha1")})
    return folder, rows


def _digest(rows: list[dict[str, Any]], extra: Any) -> str:
    text = json.dumps([[r["path"], r["frames_sha1"]] for r in rows] + [extra], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def score_vbench(config: EvalConfig, method: Method, folder: Path, rows: list[dict[str, Any]], pkg: Any) -> dict[str, Any]:
    """VBench's scores of one preset's videos, kept per dimension in OUT/vbench/<slug>/scores.json while the videos
    are unchanged; a dimension that failed (e.g. its checkpoint was absent) is tried again on every run."""
    from .vbench_env import evaluate

    work = config.out / "vbench" / method_slug(method.spec)
    cache = work / "scores.json"
    digest = _digest(rows, [config.suite.mode, pkg.version, str(pkg.venv)])
    kept: dict[str, Any] = {"digest": digest, "videos": len(rows), "scores": {}, "per_video": {}, "seconds": {}}
    if cache.is_file():
        found = read_json(cache)
        if found.get("digest") == digest:
            kept = found
    todo = [d for d in config.suite.dimensions if d not in kept["scores"]]
    errors: dict[str, str] = {}
    if todo:
        result = evaluate(pkg, folder, todo, config.suite.mode, work, device=config.vbench_device, name="vbench")
        errors = result["errors"]
        if result["scores"]:
            for key in ("scores", "per_video", "seconds"):
                kept[key].update({d: v for d, v in result[key].items() if d in result["scores"]})
            kept["vbench_version"] = result["vbench_version"]
            write_json(cache, kept)
    wanted = set(config.suite.dimensions)
    return {**kept, "scores": {d: v for d, v in kept["scores"].items() if d in wanted}, "errors": errors}


def prompt_checks(rows: list[dict[str, Any]]) -> dict[tuple[str, int], Any]:
    """The reference checker on every video whose prompt is a reference caption, by (prompt, seed)."""
    from ..metrics import prompt_accuracy as pa

    checks = {}
    for row in rows:
        result = pa.check(row["prompt"], pa.read_frames(row["path"]))
        if result is not None:
            checks[(row["prompt"], row["seed"])] = result
    return checks


def prompt_accuracy(checks: dict[tuple[str, int], Any], reference: dict[tuple[str, int], Any]) -> dict[str, Any] | None:
    from ..metrics import prompt_accuracy as pa

    summary = pa.summarize(list(checks.values()))
    if summary is not None:
        summary["reader"] = pa.video_reader_name()
        summary["agreement_with_uncached"] = pa.agreement(checks, reference)
    return summary


def lpips_status() -> str:
    """LPIPS needs the `lpips` package and its backbone weights (torchvision's AlexNet), which are not
    downloaded here: say why it is absent."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "not computed: the lpips package (and its AlexNet weights) is not installed"
    return "not computed: lpips is installed but videocache eval does not download its backbone weights"


# -- report ------------------------------------------------------------------------------------------------
def build_eval_report(config: EvalConfig, errors: dict[str, str]) -> dict[str, Any]:
    from ..comparison.report import summarize
    from .vbench_env import VBenchUnavailable, ensure

    store = RunStore(config.out / "generation")
    items = config.items
    none_records = {i.key: store.read_record("none", i) for i in items}
    reference = {k: r["frames_sha1"] for k, r in none_records.items() if r is not None}
    pkg, vbench_error = None, None
    if config.vbench:
        try:
            pkg = ensure(config.vbench_venv, create_missing=config.create_venv)
        except VBenchUnavailable as exc:
            vbench_error = str(exc)
    else:
        vbench_error = "VBench scoring skipped (--no-vbench)"
    entries = []
    reference_checks: dict[tuple[str, int], Any] = {}
    for method in config.methods:  # "none" first: its checks are what the others are compared with
        records = [r for r in (store.read_record(method.spec, i) for i in items) if r is not None]
        entry = summarize(method, records, len(items), reference, errors.get(method.spec))
        entry.pop("rows", None)
        entry["label"] = config.labels.get(method.spec, method.label)
        folder, rows = link_videos(config, store, method)
        entry["videos"] = len(rows)
        entry["videos_dir"] = str(folder)
        entry["seeds"] = sorted({r["seed"] for r in rows})
        entry["vbench"] = {"scores": {}, "errors": {}}
        if rows and pkg is not None:
            try:
                result = score_vbench(config, method, folder, rows, pkg)
                entry["vbench"] = {"scores": result["scores"], "errors": result["errors"],
                                   "version": result.get("vbench_version"),
                                   "videos_scored": {d: len(result["per_video"].get(d, [])) for d in result["scores"]}}
            except Exception as exc:  # VBench failing for one preset must not lose the rest of the report
                entry["vbench"]["errors"] = {d: str(exc).splitlines()[0] for d in config.suite.dimensions}
        elif vbench_error:
            entry["vbench"]["errors"] = {d: vbench_error for d in config.suite.dimensions}
        agg = aggregate(entry["vbench"]["scores"])
        entry["vbench"].update(agg.as_dict())
        present = [d for d in QUALITY_DIMENSIONS if d in entry["vbench"]["scores"]]
        entry["vbench"]["quality_partial"] = (
            sum(normalized(d, entry["vbench"]["scores"][d]) for d in present)
            / sum(0.5 if d == "dynamic_degree" else 1.0 for d in present) if present else None
        )
        entry["vbench"]["quality_partial_dimensions"] = present
        checks = prompt_checks(rows)
        if isinstance(method, NoCache):
            reference_checks = checks
        entry["prompt_accuracy"] = prompt_accuracy(checks, reference_checks)
        entry["lpips"] = None
        entries.append(entry)
    s = config.settings
    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": s.comparable() | {"fps": s.fps},
        "suite": {"kind": config.suite.kind, "mode": config.suite.mode, "source": config.suite.source,
                  "dimensions": list(config.suite.dimensions), "prompts": len(config.suite.prompts),
                  "videos_per_method": config.suite.videos, "seed": config.seed,
                  "seeds": "sample i of a prompt uses seed + i"},
        "vbench": {"version": pkg.version if pkg else None, "venv": str(pkg.venv) if pkg else None,
                   "prompt_suite": str(pkg.full_info) if pkg else None, "error": vbench_error},
        "lpips": lpips_status(),
        "timing": "each method is timed against uncached runs interleaved with it in the same process; "
        "times are the minimum over repeats, summed over items",
        "prompts": [p.prompt for p in config.suite.prompts],
        "methods": entries,
    }


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def render_markdown(report: dict[str, Any]) -> str:
    from ..comparison.report import _fmt
    from ..metrics.fidelity import format_db

    s, suite = report["settings"], report["suite"]
    dims = suite["dimensions"]
    vb = report["vbench"]
    lines = [
        "# VBench evaluation",
        "",
        f"Model `{s['model']}`, {s['steps']} steps, {s['frames']} frames {s['height']}x{s['width']}, guidance "
        f"{s['guidance_scale']}; suite `{suite['kind']}` ({suite['source']}): {suite['prompts']} prompts, "
        f"{suite['videos_per_method']} videos per method (VBench naming `{{prompt}}-{{index}}.mp4`, sample i with seed "
        f"{suite['seed']} + i), VBench mode `{suite['mode']}`.",
        "",
        f"VBench: {'vbench ' + vb['version'] + ' in ' + vb['venv'] if vb['version'] else vb['error']}. Dimensions are "
        "VBench's raw scores; quality / semantic / total follow VBench's aggregation (min-max normalised, dynamic "
        "degree weighted 0.5, total = (4 x quality + semantic) / 5) and are given only when every dimension they "
        "need was computed; 'quality (computed dims)' is the same normalised weighted mean over the quality dimensions "
        "that were. Prompt accuracy (reference pipeline, no weights needed): share of videos showing the prompted "
        "colour / shape / direction, and how often the checker sees exactly what it sees in the uncached video of the "
        "same prompt and seed (agreement). PSNR / SSIM: against the uncached video of the same prompt and seed. "
        f"LPIPS: {report['lpips']}. Speedups: {report['timing']}.",
        "",
    ]
    head = ["method", *dims, "quality", "semantic", "total", "quality (computed dims)", "prompt acc. colour / shape / direction",
            "agreement with uncached",
            "PSNR (dB)", "SSIM", "computed fraction", "transformer speedup", "wall speedup", "videos"]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes: list[str] = []
    scored: list[str] = []
    for e in report["methods"]:
        v = e["vbench"]
        acc = e.get("prompt_accuracy")
        acc_text = "-" if not acc else f"{_pct(acc['colour'], 1)} / {_pct(acc['shape'], 1)} / {_pct(acc['direction'], 1)}"
        cells = [f"`{e['label']}`" + (f" (`{e['method']}`)" if e["label"] != e["method"] and e["method"] != "none" else "")]
        cells += [_pct(v["scores"].get(d)) if d in v["scores"] else "error" for d in dims]
        cells += [_pct(v["quality_score"]), _pct(v["semantic_score"]), _pct(v["total_score"]),
                  _pct(v["quality_partial"]), acc_text, _pct(acc.get("agreement_with_uncached") if acc else None, 1), format_db(e.get("psnr")), _fmt(e.get("ssim"), ".4f"),
                  _fmt(e.get("computed_fraction")), _fmt(e.get("transformer_speedup"), ".2f") + "x",
                  _fmt(e.get("wall_speedup"), ".2f") + "x", f"{e['videos']}/{e['items_expected']}"]
        lines.append("| " + " | ".join(cells) + " |")
        for dim, message in v["errors"].items():
            notes.append(f"- `{e['label']}` {dim}: {message}")
        for dim, n in v.get("videos_scored", {}).items():
            if n < e["videos"]:
                scored.append(f"- `{e['label']}` {dim}: VBench scored {n} of its {e['videos']} videos")
        if e.get("error"):
            notes.append(f"- `{e['label']}` failed: {e['error']}")
    if notes:
        lines += ["", "Not computed:", "", *sorted(set(notes), key=notes.index)]
    if scored:
        lines += ["", "VBench's standard mode reads samples 0-4 of every prompt (the 25 samples of a temporal-flickering "
                  "prompt are for its static filter, which needs RAFT's weights and is not run here):", "", *scored]
    lines += ["", f"Prompts ({len(report['prompts'])}):", ""] + [f"- {p}" for p in report["prompts"]] + [""]
    return "\n".join(lines)


def plot_radar(report: dict[str, Any], path: Path) -> None:
    """One polygon per method over every computed VBench dimension (normalised) and prompt-accuracy axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..comparison.report import MARKERS

    axes: list[str] = []
    for e in report["methods"]:
        axes += [d for d in e["vbench"]["scores"] if d not in axes]
    has_acc = any(e.get("prompt_accuracy") for e in report["methods"])
    acc_keys = ("colour", "shape", "direction", "agreement_with_uncached")
    labels = [d.replace("_", " ") for d in axes] + (
        ["colour accuracy", "shape accuracy", "direction accuracy", "agreement with uncached"] if has_acc else [])
    fig = plt.figure(figsize=(9, 6), dpi=120)
    if len(labels) < 3:
        ax = fig.add_subplot(111)
        ax.text(0.5, 0.5, "fewer than 3 scored axes", ha="center", va="center")
    else:
        ax = fig.add_subplot(111, polar=True)
        angles = np.linspace(0, 2 * math.pi, len(labels), endpoint=False).tolist()
        for e in report["methods"]:
            values = [normalized(d, e["vbench"]["scores"][d]) if d in e["vbench"]["scores"] else 0.0 for d in axes]
            acc = e.get("prompt_accuracy")
            if has_acc:
                values += [(acc.get(k) or 0.0) if acc else 0.0 for k in acc_keys]
            _, colour = MARKERS.get(e["family"], ("o", "gray"))
            ax.plot(angles + angles[:1], values + values[:1], label=e["label"], linewidth=1.2, alpha=0.8,
                    color=colour if e["family"] in ("none",) else None)
        ax.set_xticks(angles)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.05))
    ax.set_title(f"{report['settings']['model']}: VBench dimensions (normalised) and prompt accuracy", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.72)
    fig.savefig(path)
    plt.close(fig)


def plot_quality_speedup(report: dict[str, Any], path: Path) -> None:
    """x = transformer speedup, y = VBench quality score (or its computed-dimension mean), the uncached point too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..comparison.report import MARKERS, _place_labels

    full = all(e["vbench"]["quality_score"] is not None for e in report["methods"])
    key = "quality_score" if full else "quality_partial"
    entries = [e for e in report["methods"] if e.get("transformer_speedup") and e["vbench"].get(key) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    points, labels = [], {}
    for e in entries:
        x, y = e["transformer_speedup"], 100 * e["vbench"][key]
        marker, colour = MARKERS.get(e["family"], ("o", "gray"))
        ax.scatter([x], [y], marker=marker, color=colour, s=90 if marker == "*" else 50, zorder=3, alpha=0.85)
        points.append((x, y))
        labels.setdefault((round(x, 3), round(y, 3)), []).append(e["label"])
    if points:
        _place_labels(ax, fig, labels, points)
    dims = sorted({d for e in entries for d in e["vbench"].get("quality_partial_dimensions", [])})
    ax.set_xlabel("transformer speedup vs uncached (measured)")
    ax.set_ylabel("VBench quality score (%)" if full else f"VBench quality over computed dims (%): {', '.join(dims) or 'none'}")
    ax.set_title(f"{report['settings']['model']}: quality against speedup", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_eval_report(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "report.json", "md": out / "report.md", "radar": out / "radar.png",
             "quality": out / "quality_speedup.png"}
    write_json(paths["json"], report)
    paths["md"].write_text(render_markdown(report))
    plot_radar(report, paths["radar"])
    plot_quality_speedup(report, paths["quality"])
    return paths


EvalResult = CompareResult  # report, paths, errors, runs made and found done


def run_eval(config: EvalConfig) -> EvalResult | None:
    """Generate what is missing, then (process 0) score and write the report; None on other processes."""
    from videocache.distributed.state import launch_rank

    errors, ran, skipped = generate(config)
    if launch_rank() != 0:
        return None
    report = build_eval_report(config, errors)
    return EvalResult(report, write_eval_report(config.out, report), errors, ran, skipped)


# -- command line --------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference-wan", help="reference-wan (default), a diffusers folder or a hub id")
    p.add_argument("--profile", default=None, help="cache profile name or YAML whose presets are evaluated")
    p.add_argument("--presets", default="none", help="comma-separated presets of --profile; 'none' = uncached (default none)")
    p.add_argument("--methods", nargs="*", default=[], metavar="METHOD",
                   help="further methods, as for videocache compare (e.g. diffusers:magcache:0.12 cachedit:dbcache:1:0:0.16)")
    p.add_argument("--suite", default="standard",
                   help="'standard' (VBench's 946 prompts), DIM[,DIM...] (their prompts), or a prompt file (default standard)")
    p.add_argument("--dimensions", default=None, help="comma-separated VBench dimensions to score (default: the suite's; "
                   "a prompt file: temporal_flickering)")
    p.add_argument("--samples", type=int, default=5, help="videos per prompt (VBench: 5; 25 for temporal_flickering prompts)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of the suite (a quick look)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 0; sample i uses seed + i")
    p.add_argument("--out", required=True, help="output folder (reruns resume)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per (method, prompt, sample); the minimum counts")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--vbench-venv", default=None, help="VBench environment (default $VIDEOCACHE_VBENCH_VENV or "
                   "~/.cache/videocache/vbench-venv; created when absent)")
    p.add_argument("--no-create-venv", action="store_true", help="do not create a missing VBench environment")
    p.add_argument("--no-vbench", action="store_true", help="skip VBench scoring (fidelity, speed, prompt accuracy only)")
    p.add_argument("--vbench-device", default="cpu", help="device VBench scores on (cpu, cuda)")
    p.add_argument("--low-memory", action="store_true", help="one worker process alive at a time")
    add_lora_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from videocache.pipelines.loader import known_defaults, resolve_model

    from .vbench_env import VBenchUnavailable, ensure

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not presets:
        raise ValueError("--presets is empty")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    methods, labels = preset_methods(args.profile, presets, args.methods)
    dims = [d.strip() for d in args.dimensions.split(",") if d.strip()] if args.dimensions else None
    full_info = None
    is_file = Path(args.suite).is_file() or args.suite.endswith((".txt",))
    if not is_file:  # the prompt suite comes from the installed vbench package
        if args.no_vbench:
            raise ValueError("the standard and per-dimension suites are read from the vbench package: drop --no-vbench")
        try:
            full_info = ensure(args.vbench_venv, create_missing=not args.no_create_venv).full_info
        except VBenchUnavailable as exc:
            raise ValueError(str(exc)) from None
    suite = build_suite(args.suite, args.samples, full_info, dims, args.limit)
    lora = lora_spec(args.lora, args.lora_scale)
    source = resolve_model(args.model)
    d = known_defaults(source)
    settings = RunSettings(
        model=args.model, steps=args.steps, frames=args.frames or d.num_frames, height=args.height or d.height,
        width=args.width or d.width,
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else d.guidance_scale,
        negative_prompt=args.negative_prompt, device=args.device, dtype=args.dtype, fps=d.fps, repeats=args.repeats,
        **run_settings_fields(lora),
    )
    for method in methods:  # a profile that does not cover the step count fails before anything runs
        if getattr(method, "profile", None):
            import videocache

            videocache.load_profile(method.profile).preset(method.preset).check_steps(settings.steps)
    return EvalConfig(
        settings=settings, suite=suite, methods=methods, labels=labels, out=Path(args.out), seed=args.seed,
        vbench=not args.no_vbench, vbench_venv=args.vbench_venv, create_venv=not args.no_create_venv,
        vbench_device=args.vbench_device, progress=not args.no_progress, low_memory=args.low_memory,
    )


def format_summary(result: EvalResult) -> str:
    from ..metrics.fidelity import format_db

    lines = [f"generated {result.ran} videos ({result.skipped} already done); wrote {result.paths['md']}"]
    for e in result.report["methods"]:
        v = e["vbench"]
        scores = ", ".join(f"{d} {100 * s:.2f}%" for d, s in v["scores"].items()) or "no VBench scores"
        acc = e.get("prompt_accuracy")
        acc_text = f"  prompt accuracy {100 * acc['mean']:.1f}%" if acc else ""
        lines.append(
            f"  {e['label']:<16} {scores}{acc_text}  PSNR {format_db(e.get('psnr'))}  computed "
            f"{(e.get('computed_fraction') or 0):.3f}  speedup {(e.get('transformer_speedup') or 0):.2f}x"
        )
        for dim, message in v["errors"].items():
            lines.append(f"    {dim}: {message}")
    return "\n".join(lines)
