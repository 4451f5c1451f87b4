"""Benchmark: every cache method side by side on a shipped reference pipeline (reference-wan, or
reference-hunyuan with `--model reference-hunyuan`: results in benchmarks/compare_hunyuan, or
reference-opensora with `--model reference-opensora`: benchmarks/compare_opensora, or the two-expert
reference-wan22 with `--model reference-wan22`: benchmarks/compare_wan22).

A thin wrapper over `videocache compare`: 16 held-out prompts of the grammar
`a {colour} {shape} moving {direction} on a {background} background` (never seen in training),
25 steps, 2 timed repeats (the minimum counts), the uncached pipeline as reference, and every peer at
two or more settings. Results (report.json, report.md, pareto.png, per-run records) go to --out;
rerunning resumes what is missing (and reruns a preset whose profile changed). Expect about an hour
on the 2-core CPU. The per-run records (runs/) and logs are not committed (.gitignore).

    python benchmarks/compare_reference.py                       # the committed results
    python benchmarks/compare_reference.py --model reference-hunyuan    # HunyuanVideo's
    python benchmarks/compare_reference.py --model reference-opensora   # Open-Sora 1.2's (STDiT3)
    python benchmarks/compare_reference.py --model reference-wan22      # Wan2.2 A14B's two experts
    python benchmarks/compare_reference.py --prompts-count 4 --out /tmp/cmp   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import held_out_prompts  # noqa: E402

DEFAULT_METHODS = (  # {profile}: the model's own profile (a reference pipeline's profile has its name)
    "videocache:{profile}:full",  # computes everything: must reproduce the uncached video bit-exactly
    "videocache:{profile}:slow",  # calibrated presets (videocache profile), budgets 0.6 / 0.5 / 0.33
    "videocache:{profile}:balanced",
    "videocache:{profile}:fast",
    "diffusers:fbcache:0.1",
    "diffusers:fbcache:0.2",
    "diffusers:taylorseer:2",
    "diffusers:taylorseer:3",
    "diffusers:taylorseer:4",
    "diffusers:taylorseer:2:attn",  # attention only (diffusers' default modules on HunyuanVideo)
    "diffusers:taylorseer:3:attn",
    "diffusers:magcache:0.12",
    "diffusers:magcache:0.24",
    "diffusers:magcache:0.4",
    "diffusers:pab:2",
    "diffusers:pab:3",
    "cachedit:dbcache:1:0:0.08",
    "cachedit:dbcache:1:0:0.16",
    "cachedit:dbcache:1:0:0.3",
    "cachedit:dbcache-taylorseer:1:0:0.08",
    "cachedit:dbcache-taylorseer:1:0:0.16",
    "cachedit:dbcache-taylorseer:1:0:0.3",
)
# Per model, peers beside DEFAULT_METHODS: on reference-hunyuan the defaults stay above 0.6 computed for most
# peers, and on reference-wan22 above 0.4, so settings that reach 0.5 and 0.33 too; on Open-Sora, PAB also in its published Open-Sora setting
# (spatial 2, temporal 4, cross 6 in 450 < t < 930).
EXTRA_METHODS = {
    "reference-hunyuan": ("diffusers:fbcache:0.4", "diffusers:fbcache:0.8", "diffusers:taylorseer:6",
                          "diffusers:magcache:0.6", "cachedit:dbcache:1:0:0.6", "cachedit:dbcache-taylorseer:1:0:0.6:1"),
    "reference-opensora": ("diffusers:pab:2:4:6",),
    # the two-expert reference: the defaults stop at 0.40 computed (MagCache), so settings that reach 0.33 too
    "reference-wan22-i2v": ("diffusers:fbcache:0.4", "diffusers:fbcache:0.8", "diffusers:taylorseer:6",
                            "diffusers:magcache:0.8", "cachedit:dbcache:1:0:0.6", "cachedit:dbcache-taylorseer:1:0:0.6:1"),
    "reference-wan22": ("diffusers:fbcache:0.4", "diffusers:fbcache:0.8", "diffusers:taylorseer:6",
                        "diffusers:magcache:0.8", "cachedit:dbcache:1:0:0.6", "cachedit:dbcache-taylorseer:1:0:0.6:1"),
}
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
DEFAULT_OUT = {"reference-wan": "compare_reference", "reference-hunyuan": "compare_hunyuan",
               "reference-opensora": "compare_opensora", "reference-wan22": "compare_wan22",
               "reference-wan22-i2v": "compare_wan22_i2v"}


def default_methods(model: str) -> list[str]:
    """DEFAULT_METHODS with the model's profile, and the model's EXTRA_METHODS."""
    return [*(m.format(profile=model) for m in DEFAULT_METHODS), *EXTRA_METHODS.get(model, ())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="reference-wan")
    p.add_argument("--out", default=None, help="default: benchmarks/compare_reference (reference-wan), "
                   "benchmarks/compare_hunyuan (reference-hunyuan), benchmarks/compare_opensora (reference-opensora)")
    p.add_argument("--prompts-count", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per (method, item); the minimum counts")
    p.add_argument("--methods", nargs="+", default=None, help="default: DEFAULT_METHODS with the model's profile")
    p.add_argument("--save-videos", action="store_true")
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the per-stage presets of the calibration report (profiles/MODEL.json)")
    args, extra = p.parse_known_args(argv)  # anything else goes to `videocache compare` unchanged

    out = Path(args.out or Path(__file__).resolve().with_name(DEFAULT_OUT.get(args.model, f"compare_{args.model}")))
    report_path = PROFILES / f"{args.model}.json"  # the calibration report beside the model's profile
    methods = args.methods or default_methods(args.model)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.txt"
    prompts.write_text(
        "# held-out reference prompts (videocache.pipelines.reference.data.split_captions()[1])\n"
        + "\n".join(held_out_prompts(args.prompts_count, "--prompts-count"))
        + "\n"
    )
    images = write_first_frames(out, args.model, args.prompts_count)  # image-to-video: each prompt's first frame
    ablation = args.ablation and report_path.is_file()
    methods = [*methods, *(write_ablation_profile(out / "ablation.yaml", args.model) if ablation else [])]
    command = [
        "compare",
        "--model", args.model,
        "--prompts", str(prompts),
        "--out", str(out),
        "--steps", str(args.steps),
        "--repeats", str(args.repeats),
        "--seeds", *map(str, args.seeds),
        "--methods", *methods,
        *(["--images", str(images)] if images else []),
        *(["--save-videos"] if args.save_videos else []),
        *(["--low-memory"] if args.low_memory else []),
        *extra,
    ]  # fmt: skip
    from videocache.cli import main as videocache_main

    code = videocache_main(command)
    if ablation and (out / "report.json").is_file():
        write_ablation_table(out, args.model)
    return code


def write_first_frames(out: Path, model: str, count: int) -> Path | None:
    """For an image-to-video reference, OUT/images/p000.png ...: each held-out prompt's first frame (see
    videocache.pipelines.reference.first_frames); None for a text-to-video model."""
    from videocache.pipelines.generation import source_takes_image
    from videocache.pipelines.loader import resolve_model
    from videocache.pipelines.reference import first_frames
    from videocache.pipelines.reference.data import split_captions

    if not source_takes_image(resolve_model(model)):
        return None
    return first_frames.write_first_frames(split_captions()[1][:count], out / "images")


def _stage_preset_name(preset: str, stage: str) -> str:
    return f"{preset}__{stage.lstrip('+').replace('-', '_')}"


def write_ablation_profile(path: Path, model: str) -> list[str]:
    """One preset per (budget, ablation stage) of the calibration report, in a profile of their own; the
    method specs that run them."""
    import yaml

    from videocache.profile import PROFILES_DIR

    report = json.loads((PROFILES / f"{model}.json").read_text())
    data = yaml.safe_load((PROFILES_DIR / f"{model}.yaml").read_text())
    presets = {
        _stage_preset_name(b["preset"], row["stage"]): row["preset"] for b in report["budgets"] for row in b["stages"]
    }
    data["name"] = f"{model}-ablation"
    for body in data["experts"].values() if "experts" in data else [data]:  # an experts profile: every expert's
        body.update(presets=presets, default_preset=next(iter(presets)))
        body.pop("variants", None)
    path.write_text(f"# Written by benchmarks/compare_reference.py from profiles/{model}.json\n" + yaml.safe_dump(data, sort_keys=False))
    return [_ablation_spec(path, name) for name in presets]


def _ablation_spec(path: Path, preset: str) -> str:
    """The method spec of one ablation preset; the profile path relative to the working directory when
    it lies below it, so that reports do not carry this machine's absolute paths."""
    rel = os.path.relpath(path)
    return f"videocache:{path if rel.startswith('..') else rel}:{preset}"


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_ablation_table(out: Path, model: str) -> None:
    """ablation.md: each calibration stage on the held-out benchmark prompts, next to its calibration-prompt figures."""
    report = json.loads((PROFILES / f"{model}.json").read_text())
    records = {r["method"]: r for r in json.loads((out / "report.json").read_text())["methods"]}
    lines = [
        f"# Ablation of the calibrated {model} presets",
        "",
        "Each stage adds one thing to the previous kept one; `kept` = the calibration kept it because it raised the",
        "measured PSNR on the calibration prompts. Benchmark columns: the held-out prompts of `report.md`.",
        "",
        "| preset (budget) | stage | kept | calib. fraction | calib. PSNR | bench fraction | bench PSNR | bench SSIM |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for b in report["budgets"]:
        for row in b["stages"]:
            spec = _ablation_spec(out / "ablation.yaml", _stage_preset_name(b["preset"], row["stage"]))
            rec = records.get(spec, {})
            lines.append(
                f"| {b['preset']} ({b['budget']}) | {row['stage']} | {'yes' if row['kept'] else 'no'} | "
                f"{row['computed_fraction']:.3f} | {row['psnr']:.2f} | {_fmt(rec.get('computed_fraction'), 3)} | "
                f"{_fmt(rec.get('psnr'), 2)} | {_fmt(rec.get('ssim'), 4)} |"
            )
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":  # required: the comparison's worker processes are spawned
    sys.exit(main())
