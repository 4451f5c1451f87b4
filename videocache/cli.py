"""The `videocache` command line: generate, compare, profile.

This module is an entry point (the same layer as scripts/): it may import videocache.pipelines and
videocache.eval_vbench, which the engine modules never do. Heavy imports happen inside the commands
so that `videocache --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from videocache.pipelines.lora import add_lora_arguments

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _fail(message: str) -> int:
    print(f"videocache: error: {message}", file=sys.stderr)
    return 2


ATTENTION_BACKEND_HELP = (
    "diffusers attention kernel for the transformer: native (torch SDPA), flash (flash-attn), sage "
    "(sageattention), xformers, flex, ... (default: diffusers' default, native); checked before the model loads"
)


def add_attention_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention-backend", default=None, metavar="NAME", help=ATTENTION_BACKEND_HELP)


def weights_dtype(name: str | None, model: str, device: str) -> Any:
    """The dtype to load weights in: the one asked for; else bfloat16 for a real model on a GPU (Wan2.1 in
    float32 does not leave room for the cache and calibration at 480p on one 80 GB GPU); else the model's."""
    import torch

    if name:
        return getattr(torch, name)
    from videocache.family import known_models

    return torch.bfloat16 if model not in known_models() and not device.startswith("cpu") else None


CACHE_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float8": "float8_e4m3fn", "int8": "int8"}


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference-wan", help="reference-wan (default), a diffusers folder or a hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", default=None,
                   help="first frame (an image file) for an image-to-video model (WanImageToVideoPipeline)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default)")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--profile", default="none", help="cache profile name or YAML path; 'none' runs uncached")
    p.add_argument("--preset", default=None, help="profile preset (the profile's default when omitted)")
    p.add_argument("--max-cache-bytes", type=int, default=None, help="cache memory budget on the model's device")
    p.add_argument("--cache-dtype", default=None, choices=sorted(CACHE_DTYPES),
                   help="store kept outputs in this precision (float8: e4m3 with a per-token scale; int8: a scale per 64 channels)")
    p.add_argument("--offload-cache", action="store_true",
                   help="keep cached outputs in pinned host memory (with --max-cache-bytes: what does not fit)")
    p.add_argument("--compile", default="none", choices=["none", "blocks", "model"],
                   help="torch.compile the repeated blocks or the whole transformer (the cache compiles with it)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 for a model other than reference-wan on a GPU, else float32)")
    add_attention_backend_argument(p)
    add_lora_arguments(p)
    p.add_argument("--ulysses", type=int, default=1, metavar="N",
                   help="Ulysses sequence parallelism: N processes share each video's tokens (under accelerate launch; "
                        "Open-Sora: DSP, frames and positions split in turn)")
    p.add_argument("--ring", type=int, default=1, metavar="M",
                   help="ring attention: M processes share each video's tokens (with --ulysses N: N x M processes)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="the two classifier-free-guidance branches on two process groups (twice the processes)")
    p.add_argument("--out", default="out.mp4", help="video file to write (.mp4 or .gif)")
    p.add_argument("--summary", default=None, help="JSON summary to write")
    p.add_argument("--no-progress", action="store_true")


VIDEO_SETTINGS = (("steps", "num_inference_steps"), ("frames", "num_frames"), ("height", "height"),
                  ("width", "width"), ("guidance_scale", "guidance_scale"))


def video_settings(args: argparse.Namespace, defaults: Any) -> dict[str, Any]:
    """steps, frames, height, width and guidance_scale: the user's, else the model's defaults (None where
    neither is known yet: a hub id whose family is known only once it is loaded)."""
    out = {}
    for arg, field in VIDEO_SETTINGS:
        value = getattr(args, arg, None)
        out[arg] = value if value is not None else (getattr(defaults, field) if defaults is not None else None)
    return out


def run_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Load, optionally cache, generate and write; returns the summary. Raises USER_ERRORS on bad input."""
    import torch

    from videocache.pipelines.generation import check_first_frame, generate, source_takes_image
    from videocache.pipelines.loader import (
        attention_backend_of,
        check_attention_backend,
        defaults_of,
        generation_defaults,
        load_pipeline,
        preload_geometry,
        resolve_device,
        resolve_model,
    )
    from videocache.pipelines.lora import lora_spec
    from videocache.video_io import write_video
    from videocache.weights import loaded_lora

    image = getattr(args, "image", None)
    if image is not None and not Path(image).is_file():
        raise ValueError(f"--image {image}: no such file")
    lora = lora_spec(getattr(args, "lora", None), getattr(args, "lora_scale", None))
    source = resolve_model(args.model)
    # before loading where the folder tells (a hub id not downloaded yet: at generation)
    check_first_frame(args.model, source_takes_image(source), image is not None, "--image FILE")
    defaults = generation_defaults(source)  # None until loaded for a hub id not downloaded yet
    video = video_settings(args, defaults)
    for name in ("steps", "frames", "height", "width"):
        if video[name] is not None and video[name] <= 0:
            raise ValueError(f"--{name} must be positive, got {video[name]}")
    if args.profile != "none":  # cheap checks first: a bad profile, preset or step count fails before loading
        import videocache

        preset = videocache.load_profile(args.profile).preset(args.preset)
        if video["steps"] is not None:
            preset.check_steps(video["steps"])
    from videocache.distributed.generation import prepare_parallel

    def geometry() -> tuple[int | None, int | None]:
        if None in (video["frames"], video["height"], video["width"]):
            return None, None  # checked at the transformer's first call
        return preload_geometry(source, video["frames"], video["height"], video["width"])

    # None unless --ulysses / --ring / --cfg-parallel; checked before loading
    parallel = prepare_parallel(args, guidance_scale=video["guidance_scale"], geometry=geometry)
    device = parallel.device if parallel is not None and args.device is None else args.device
    dtype = weights_dtype(args.dtype, args.model, resolve_device(device))
    backend = check_attention_backend(getattr(args, "attention_backend", None), resolve_device(device), dtype)
    pipe = load_pipeline(args.model, device=device, dtype=dtype, attention_backend=backend, lora=lora)
    if defaults is None:
        defaults = defaults_of(pipe, source)
        video = video_settings(args, defaults)
    extra: dict[str, Any] = {"model": args.model, "profile": None, "preset": None,
                             "attention_backend": attention_backend_of(pipe), "lora": loaded_lora(pipe)}
    engine = None
    if args.profile != "none":
        import videocache

        cache_dtype = getattr(args, "cache_dtype", None)
        engine = videocache.apply(
            pipe, args.profile, preset=args.preset, max_cache_bytes=args.max_cache_bytes,
            num_inference_steps=video["steps"], cache_dtype=getattr(torch, CACHE_DTYPES[cache_dtype]) if cache_dtype else None,
            offload_to_cpu=getattr(args, "offload_cache", False),
        )
        extra.update(profile=args.profile, preset=engine.preset_name)
    if parallel is not None:  # after the cache: CFG parallelism must be the outermost hook
        parallel.apply(pipe)
    compile_mode = getattr(args, "compile", "none")
    if compile_mode != "none":
        from videocache.experts import pipeline_denoisers

        for denoiser in pipeline_denoisers(pipe):  # every expert of a pipeline with several
            transformer = getattr(pipe, denoiser.attribute)
            if compile_mode == "blocks":
                transformer.compile_repeated_blocks()
            else:
                transformer.compile()
    extra["compile"] = compile_mode
    result = generate(
        pipe,
        args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_inference_steps=video["steps"],
        num_frames=video["frames"],
        height=video["height"],
        width=video["width"],
        guidance_scale=video["guidance_scale"],
        progress=not args.no_progress and (parallel is None or parallel.is_main),
        extra=extra,
        image=image,
    )
    summary = result.summary
    if engine is not None:
        stats = engine.stats()
        summary.update(computed_fraction=stats["computed_fraction"], cache_peak_bytes=stats["cache_peak_bytes"],
                       cache_peak_host_bytes=stats["cache_peak_host_bytes"])
        if "computed_fraction_by_expert" in stats:  # a pipeline with several transformers
            summary["computed_fraction_by_expert"] = stats["computed_fraction_by_expert"]
    else:
        summary.update(computed_fraction=1.0, cache_peak_bytes=0, cache_peak_host_bytes=0)
    if parallel is not None:
        summary.update(parallel.summary(engine))  # every rank's cache figures (a collective)
    summary["video"] = str(args.out)
    if parallel is not None and not parallel.is_main:  # rank 0 writes
        return summary
    write_video(args.out, result.frames, fps=defaults.fps)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cmd_generate(args: argparse.Namespace) -> int:
    summary = run_generation(args)
    print(
        f"wrote {summary['video']}: {summary['frames']} frames {summary['height']}x{summary['width']}, "
        f"{summary['steps']} steps, {summary['wall_s']:.2f} s (transformer {summary['transformer_s']:.2f} s), "
        f"computed fraction {summary['computed_fraction']:.3f}"
    )
    return 0


def _leave_on_error() -> None:
    """A launched rank stopping on an error leaves its process group first (see distributed.state)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from videocache.distributed.state import leave_on_error, process_state

        leave_on_error(process_state())


def cmd_compare(args: argparse.Namespace) -> int:
    from videocache.distributed.state import launch_rank
    from videocache.eval_vbench.comparison.compare import config_from_args, format_summary, run_compare

    try:
        config = config_from_args(args)
        result = run_compare(config)
    except USER_ERRORS:
        _leave_on_error()
        if launch_rank() != 0:  # under accelerate launch rank 0 prints the one-line error
            raise SystemExit(2) from None
        raise
    if config.settings.parallel:  # every rank finished: leave together (gloo aborts a process that exits alone)
        from videocache.distributed.state import end_processes, process_state

        end_processes(process_state())
    if config.settings.parallel and launch_rank() != 0:
        return 2 if result.errors else 0
    print(format_summary(result))
    if result.errors:
        failed = ", ".join(sorted(result.errors))
        return _fail(f"{len(result.errors)} method(s) failed ({failed}); details in {result.paths['md']} and {args.out}/logs/")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from videocache.distributed.state import launch_rank
    from videocache.eval_vbench.scoring.eval import config_from_args, format_summary, run_eval
    from videocache.eval_vbench.scoring.vbench_env import VBenchUnavailable

    try:
        result = run_eval(config_from_args(args))
    except VBenchUnavailable as exc:
        raise ValueError(str(exc)) from None
    except USER_ERRORS:
        _leave_on_error()
        if launch_rank() != 0:  # under accelerate launch rank 0 prints the one-line error
            raise SystemExit(2) from None
        raise
    if result is None:  # another process of a data-parallel run: process 0 scores and reports
        return 0
    print(format_summary(result))
    if result.errors:
        return _fail(f"{len(result.errors)} method(s) failed ({', '.join(sorted(result.errors))}); see {args.out}/generation/logs/")
    return 0


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference-wan", help="reference-wan (default), a diffusers folder or a hub id")
    p.add_argument("--prompts", default=None,
                   help="calibration prompts, one per line (reference pipelines default: 4 training captions, none of "
                        "which the benchmarks use)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="computed-fraction budget in (0, 1]; repeat for several presets (e.g. --budget 0.5 --budget 0.33); "
                        "with --add-to, default: the budgets of that profile's presets")
    p.add_argument("--target-psnr", type=float, action="append", default=None, metavar="DB",
                   help="a preset at the lowest computed fraction whose table reaches DB dB PSNR against the uncached "
                        "videos of the calibration prompts; repeat for several (named after the budgets' presets)")
    p.add_argument("--quick", action="store_true",
                   help="about a tenth of the generations: the compute-step schedule only (every component on the "
                        "same steps), sensitivities at the steps its generations pay for (every one at 25 steps), each preset measured on "
                        "one prompt, no fg/bg profile, no run-time guard")
    p.add_argument("--sensitivity-from", default=None, metavar="PROFILE",
                   help="--quick with the step and component sensitivities of PROFILE's calibration report (a base "
                        "model's, for its LoRA or fine-tune): no sensitivity runs at all")
    p.add_argument("--max-generations", type=int, default=None, metavar="N",
                   help="--quick within N generations (every run counted, in uncached generations): as many "
                        "sensitivity steps as fit")
    p.add_argument("--preset-names", nargs="+", default=None,
                   help="one preset name per budget, then per PSNR target (default budget_0_5 ..., psnr_40 ...)")
    p.add_argument("--out", required=True, help="profile YAML to write (the report goes next to it, .json)")
    p.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--image", default=None,
                   help="image-to-video models: the first frame every calibration run starts from (an image file), or a "
                        "folder with one per calibration prompt (p000.png, p001.png, ...)")
    p.add_argument("--fgbg-prompts", type=int, default=2, help="prompts used for the fg/bg attention profile")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--add-to", default=None, metavar="PROFILE",
                      help="calibrate the presets of this profile YAML again at --guidance-scale and/or --steps and add "
                           "them to it as a variant (runs then use the calibration nearest their guidance scale, then "
                           "their step count); --out: where to write the extended profile")
    mode.add_argument("--guard-only", action="store_true",
                      help="calibrate only the run-time guard of the profile at --out (made earlier) and write it back")
    p.add_argument("--no-guard", action="store_true", help="skip the run-time guard's calibration")
    p.add_argument("--guard-prompts", type=int, default=2, help="prompts used to calibrate the run-time guard")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 for a model other than reference-wan on a GPU, else "
                        "float32; flash and sage need bfloat16 or float16)")
    add_attention_backend_argument(p)
    add_lora_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def variant_name(guidance_scale: float, steps: int, profile_steps: int) -> str:
    """The report name of a variant calibration: guidance-8, or guidance-5-steps-15 at another step count."""
    return f"guidance-{guidance_scale:g}" + ("" if steps == profile_steps else f"-steps-{steps}")


def cmd_profile(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex
    import time

    import videocache
    from videocache.eval_vbench.calibration.runs import CalibrationSettings, calibrate
    from videocache.pipelines.generation import (
        check_first_frame,
        check_images,
        read_prompts,
        source_takes_image,
        takes_image,
    )
    from videocache.pipelines.loader import (
        attention_backend_of,
        check_attention_backend,
        defaults_of,
        generation_defaults,
        load_pipeline,
        resolve_device,
        resolve_model,
        source_family,
    )
    from videocache.pipelines.lora import lora_spec
    from videocache.pipelines.reference import is_reference
    from videocache.weights import describe, same_lora

    out = Path(args.out)
    lora = lora_spec(args.lora, args.lora_scale)
    if out.suffix not in (".yaml", ".yml"):
        raise ValueError(f"--out must be a .yaml file; got {args.out}")
    base = None  # the profile --add-to extends or --guard-only completes
    if args.add_to or args.guard_only:
        base = videocache.load_profile(args.add_to or args.out)
        if isinstance(base, videocache.ExpertsProfile):
            raise ValueError(f"{'--add-to' if args.add_to else '--guard-only'} does not take a profile with a table per "
                             f"expert yet ({base.name}); calibrate the pipeline again with --guidance-scale / --steps")
        if not same_lora(base.metadata.get("lora"), lora and lora.record()):
            raise ValueError(f"{base.name} was calibrated on {describe(base.metadata.get('lora'))}, not on "
                             f"{describe(lora and lora.record())}: give the same --lora/--lora-scale, or calibrate anew")
        made = base.metadata.get("settings") or {}
        for arg, key in (("steps", "steps"), ("frames", "frames"), ("height", "height"), ("width", "width")):
            if getattr(args, arg) is None and key in made:
                setattr(args, arg, made[key])
        if args.guidance_scale is None:
            args.guidance_scale = made.get("guidance_scale")
    if args.add_to:
        if args.guidance_scale is None:
            raise ValueError("--add-to needs --guidance-scale: the guidance scale to calibrate the presets at")
        if (args.guidance_scale, args.steps) == (base.guidance_scale, base.steps):
            raise ValueError(f"--add-to: {args.add_to} is already calibrated at guidance {args.guidance_scale:g} and "
                             f"{base.steps} steps; give another --guidance-scale or --steps")
        measured = base.metadata.get("measured_on_calibration_prompts") or {}
        if args.budget is None and args.target_psnr is None:  # the same presets: a budget each, or a PSNR target
            by_budget = [n for n in measured if "target_psnr" not in measured[n]]
            by_target = [n for n in measured if "target_psnr" in measured[n]]
            args.budget = [measured[n]["budget"] for n in by_budget]
            args.target_psnr = [measured[n]["target_psnr"] for n in by_target]
            args.preset_names = by_budget + by_target
        if not (args.budget or args.target_psnr):
            raise ValueError(f"--add-to: {args.add_to} records no preset budgets; give --budget and --preset-names")
    args.budget, args.target_psnr = args.budget or [], args.target_psnr or []
    if not args.guard_only:
        if not (args.budget or args.target_psnr):
            raise ValueError("give --budget (a computed-fraction budget per preset, e.g. --budget 0.5 --budget 0.33) "
                             "or --target-psnr (a PSNR per preset, e.g. --target-psnr 40)")
        for budget in args.budget:
            if not 0.0 < budget <= 1.0:
                raise ValueError(f"--budget must be in (0, 1]; got {budget}")
        for target in args.target_psnr:
            if not 0.0 < target < 99.0:
                raise ValueError(f"--target-psnr must be a PSNR in dB between 0 and 99; got {target:g}")
        if args.max_generations is not None and args.max_generations <= 0:
            raise ValueError(f"--max-generations must be a positive number of generations; got {args.max_generations}")
        goals = len(args.budget) + len(args.target_psnr)
        if args.preset_names and len(args.preset_names) != goals:
            raise ValueError(f"--preset-names gives {len(args.preset_names)} names for {goals} presets (one per "
                             "--budget, then one per --target-psnr)")
    sensitivity_report = None
    if args.sensitivity_from is not None:
        from videocache.profile.search_path import find_profile

        named = Path(args.sensitivity_from) if args.sensitivity_from.endswith((".yaml", ".yml")) else \
            find_profile(args.sensitivity_from)
        report_file = None if named is None else named.with_suffix(".json")
        if report_file is None or not report_file.is_file():
            raise ValueError(f"--sensitivity-from {args.sensitivity_from}: no calibration report (the .json beside "
                             "its profile YAML) found")
        sensitivity_report = (args.sensitivity_from, json.loads(report_file.read_text()))
    dtype = weights_dtype(args.dtype, args.model, resolve_device(args.device))
    backend = check_attention_backend(args.attention_backend, resolve_device(args.device), dtype)
    source = resolve_model(args.model)
    if args.image is not None and not Path(args.image).exists():
        raise ValueError(f"--image {args.image}: no such file or folder")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif is_reference(source):  # the reference pipelines share the procedural captions
        from videocache.pipelines.reference.first_frames import calibration_captions

        prompts = [c.text for c in calibration_captions()]
    else:
        raise ValueError("give --prompts FILE (calibration prompts, one per line) for a model other than the references")
    if args.image is not None and Path(args.image).is_dir():
        check_images(args.image, len(prompts), "--image")
    first_frame = "--image FILE, or a folder with one per prompt (p000.png, ...)"
    check_first_frame(args.model, source_takes_image(source), args.image is not None, first_frame)
    family = source_family(source)
    if family is not None:  # its fg/bg stage needs the family's attention probe: say so before loading
        family.require("attention_probe", "the fg/bg stage of videocache profile")
    defaults = generation_defaults(source, family)
    pipe = load_pipeline(args.model, device=args.device, dtype=dtype, attention_backend=backend, lora=lora)
    video = video_settings(args, defaults or defaults_of(pipe, source))
    check_first_frame(args.model, takes_image(pipe), args.image is not None, first_frame)  # a hub id: now known
    settings = CalibrationSettings(
        steps=video["steps"], frames=video["frames"], height=video["height"], width=video["width"],
        guidance_scale=video["guidance_scale"], attention_backend=backend, image=args.image, prompts=tuple(prompts),
    )
    command = "videocache " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("videocache") else "videocache profile"
    if base is not None:
        base.check_model(videocache.adapters.get_adapter(pipe.transformer).fingerprint(pipe.transformer))
    args.quick = args.quick or args.max_generations is not None or args.sensitivity_from is not None
    if args.guard_only:
        profile, report = base, {"seconds": 0.0}
    else:
        profile, report = calibrate(
            pipe, args.name or out.stem, prompts, args.budget, settings, targets=args.target_psnr, quick=args.quick,
            max_generations=args.max_generations, sensitivity_report=sensitivity_report,
            preset_names=args.preset_names,
            fgbg_prompts=args.fgbg_prompts, command=command, progress=not args.no_progress,
        )
        report["attention_backend"] = attention_backend_of(pipe)
    if args.add_to:
        profile = base.with_variant(profile)
    if isinstance(profile, videocache.ExpertsProfile) and not args.no_guard:
        print("the run-time guard is not calibrated for a pipeline's experts (it ships off): --no-guard")
        args.no_guard = True
    if args.quick and not args.no_guard and not args.guard_only:
        print("--quick: no run-time guard (its calibration alone costs more generations; --guard-only adds it later)")
        args.no_guard = True
    if not args.no_guard and not args.add_to:
        from videocache.eval_vbench.calibration.guard import calibrate_guard
        from videocache.eval_vbench.calibration.runs import GenerationCount, generate_frames

        started = time.time()
        count = GenerationCount(pipe)
        try:
            guard, guard_report = calibrate_guard(pipe, profile, prompts[:args.guard_prompts], settings,
                                                  generate_frames, progress=not args.no_progress)
        finally:
            count.close()
        profile = dataclasses.replace(profile, guard=guard)
        report["guard"] = guard_report
        report["seconds"] = round(report["seconds"] + time.time() - started, 1)
        generations = report.get("generations")
        if generations:  # the guard's runs, in the calibration's generations
            generations["guard"] = round(count.calls / generations["record_calls_per_generation"], 1)
            generations["total"] = round(generations["total"] + generations["guard"], 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    report_path = out.with_suffix(".json") if base is None else out.with_name(
        f"{out.stem}.{'guard' if args.guard_only else variant_name(args.guidance_scale, args.steps, base.steps)}.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    written = [str(out), str(report_path)]
    if getattr(profile, "fgbg", None) is not None and profile.fgbg.per_step:
        from videocache.fgbg import save_heatmap

        heatmap = save_heatmap(profile.fgbg, out.with_suffix(".fgbg.png"), f"{profile.name}: R_attn per block and step")
        written.append(str(heatmap))
    generations = (report.get("generations") or {}).get("total")
    print(f"wrote {', '.join(written)} (presets {', '.join(profile.presets)}) in {report['seconds']:.0f} s"
          + ("" if generations is None else f", {generations:g} generations"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videocache", description="Training-free caching for video diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one video (reference pipeline by default)")
    add_generation_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    from videocache.eval_vbench.comparison.compare import add_compare_arguments

    cmp_ = sub.add_parser("compare", help="compare cache methods side by side (speed, computed fraction, PSNR/SSIM)")
    add_compare_arguments(cmp_)
    cmp_.set_defaults(func=cmd_compare)
    from videocache.eval_vbench.scoring.eval import add_eval_arguments

    ev = sub.add_parser("eval", help="VBench scores of every preset (real vbench, own environment), fidelity and speed, resumable")
    add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    prof = sub.add_parser("profile", help="calibrate a cache profile (fg/bg blocks, budgeted table search) from a few prompts")
    add_profile_arguments(prof)
    prof.set_defaults(func=cmd_profile)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """videocache's own warnings on one line, as its errors are; others as Python shows them."""
    text = str(message)
    if text.startswith("videocache: "):
        print(f"videocache: warning: {text.removeprefix('videocache: ')}", file=sys.stderr if file is None else file)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return _fail(str(message).splitlines()[0] if str(message) else type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
