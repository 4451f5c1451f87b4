"""What the benchmark tools share, so that each script holds only its own measurement.

- `environment()`: the record every result carries (library versions, machine, torch threads, git commit).
- `command()`: the command line that regenerates a result, with repository-relative paths.
- `write_results()` / `write_json()` / `markdown_table()`: a result as JSON plus a short markdown report.
- `REFERENCE_VIDEO`, `reference_pipeline()`, `held_out_prompts()`, `generate_with()`: the reference
  pipeline's benchmark setting (17 frames 64x64, 25 steps, CFG 5) and one generation with a preset applied.
- `WAN_1_3B`, `TINY_WIDTH`, ... and `wan_transformer()`: the stand-in Wan transformers (random weights at
  Wan2.1-1.3B's width, or tiny width with its 30 blocks) that time the engine without the real weights.

Scripts import it as `benchmarks.common` with the repository root on sys.path (they put it there), so that a
script under benchmarks/experiments/ and a test that loads a script by its path find it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Wan2.1-T2V-1.3B's transformer: 30 blocks of 12 heads x 128 (hidden 1536), FFN 8960. At 480p x 81 frames its
# VAE gives 21 x 60 x 104 latents, 21 x 30 x 52 = 32,760 video tokens after the 1 x 2 x 2 patch; UMT5 gives
# 512 text tokens of 4096 channels.
WAN_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "freq_dim": 256}
WAN_1_3B_BLOCKS = 30
WAN_1_3B_HIDDEN = 1536
WAN_480P_81_TOKENS = 32_760
WAN_TEXT_TOKENS, WAN_TEXT_DIM = 512, 4096
# Tiny width (2 heads x 16, FFN 64): block work is cheap, so what the engine itself costs shows, and with
# WAN_1_3B_BLOCKS blocks a Wan2.1-1.3B profile's presets apply.
TINY_WIDTH = {"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 32}

# The reference pipeline's benchmark video (generate() / pipe() keyword arguments).
REFERENCE_VIDEO = {"num_inference_steps": 25, "num_frames": 17, "height": 64, "width": 64, "guidance_scale": 5.0}


def fail(message: str) -> None:
    """Bad input: the house's one-line error, exit status 2."""
    print(f"videocache: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- the record of a result ---------------------------------------------------------------------------
def git_state() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differed from it; None where there is no git (a copy
    of the tree on another machine)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if head.returncode or status.returncode:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def environment(device: Any = None) -> dict[str, Any]:
    """What a result's numbers depend on besides its command: library versions, the machine, torch's thread
    count now, and the code's commit. A CUDA `device` adds the GPU's name and the CUDA version."""
    import diffusers
    import torch

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), **git_state()}
    if device is not None and str(device).startswith("cuda"):
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def repo_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository root where it lies below it: results carry no machine paths."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def command(script: str | os.PathLike, argv: Sequence[str] | None = None) -> str:
    """The command line that reruns `script` (its __file__) with `argv` (default: this process's), from the
    repository root."""
    return shlex.join(["python", repo_path(script), *(sys.argv[1:] if argv is None else argv)])


# -- writing a result ---------------------------------------------------------------------------------
def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """OUT.json and OUT.md; OUT may end in either suffix."""
    base = Path(out)
    if base.suffix in (".json", ".md"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".md")


def _replace(path: Path, text: str) -> None:
    """Write beside, then rename over: a run stopped mid-write keeps the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    _replace(path, json.dumps(data, indent=2) + "\n")
    return path


def write_results(out: str | os.PathLike, result: dict, markdown: str | Sequence[str]) -> tuple[Path, Path]:
    """OUT.json (`result`, indented) and OUT.md (`markdown`: text, or lines joined with newlines)."""
    json_path, md_path = output_paths(out)
    write_json(json_path, result)
    text = markdown if isinstance(markdown, str) else "\n".join(markdown) + "\n"
    _replace(md_path, text)
    return json_path, md_path


def publish(out: str | os.PathLike, result: dict, lines: Sequence[str]) -> None:
    """write_results(), then the markdown on stdout and where both went."""
    json_path, md_path = write_results(out, result, lines)
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A markdown table's lines; `align` has a letter per column: l (the default for missing ones), r or c."""
    rule = {"l": "---", "r": "---:", "c": ":---:"}

    def line(cells: Sequence[Any]) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join(rule[a] for a in align.ljust(len(header), "l")) + "|",
            *(line(row) for row in rows)]


# -- the reference pipeline -----------------------------------------------------------------------------
def reference_pipeline(vae_weights: str | None = None, device: str = "cpu"):
    """The shipped reference-wan pipeline; `vae_weights`: a VAE checkpoint of scripts/train_reference.py to
    use instead of the shipped decoder."""
    from videocache.pipelines.loader import load_pipeline
    from videocache.pipelines.reference.shared import load_vae_weights

    pipe = load_pipeline("reference-wan", device=device)
    if vae_weights:
        load_vae_weights(pipe.vae, vae_weights)
    return pipe


def held_out_prompts(count: int, option: str = "--prompts") -> list[str]:
    """The first `count` held-out captions of the reference data (never seen in training; there are 20)."""
    from videocache.pipelines.reference.data import split_captions

    held_out = split_captions()[1]
    if not 1 <= count <= len(held_out):
        fail(f"{option} must be 1-{len(held_out)}, got {count}")
    return [caption.text for caption in held_out[:count]]


def generate_with(pipe, prompt: str, preset: str | None = None, *, profile: str = "reference-wan", seed: int = 0,
                  settings: dict | None = None, **options):
    """One generation (`videocache.pipelines.generation.generate`, no progress bar), with `profile`'s
    `preset` applied for it and removed after when given (`options` go to `videocache.apply`); returns the
    generation and the engine's stats (None uncached)."""
    import videocache
    from videocache.pipelines.generation import generate

    settings = REFERENCE_VIDEO if settings is None else settings
    engine = videocache.apply(pipe, profile, preset, **options) if preset else None
    try:
        result = generate(pipe, prompt, seed=seed, progress=False, **settings)
        return result, engine.stats() if engine else None
    finally:
        if engine:
            videocache.remove(pipe)


# -- stand-in transformers ----------------------------------------------------------------------------
def cast_keeping_fp32_modules(model, dtype):
    """Cast floating parameters to `dtype` except those of the modules the class keeps in float32
    (`_keep_in_fp32_modules`), by the rule from_pretrained(torch_dtype=...) applies to each parameter
    name; buffers (RoPE tables) stay as built. `.to(dtype)` on the whole model would cast those too."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        if param.is_floating_point() and not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model


def wan_transformer(num_blocks: int, sizes: dict, *, seed: int | None = 0, device: Any = None, dtype: Any = None,
                    **config):
    """A random WanTransformer3DModel of `num_blocks` blocks of `sizes` (WAN_1_3B, TINY_WIDTH, ...), with the
    reference pipeline's latent and text channels unless `config` sets others: seeded (None: not), built in
    float32 on `device`, then cast to `dtype` as from_pretrained(torch_dtype=dtype) would. Eval mode, no
    gradients: a benchmark only runs it."""
    import torch
    from diffusers import WanTransformer3DModel

    from videocache.pipelines.reference.build import TEXT_DIM, Z_DIM

    config = {"patch_size": (1, 2, 2), "in_channels": Z_DIM, "out_channels": Z_DIM, "text_dim": TEXT_DIM,
              "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64, **sizes, **config}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = WanTransformer3DModel(num_layers=num_blocks, **config)
    if dtype is not None:
        cast_keeping_fp32_modules(model, dtype)
    return model.eval().requires_grad_(False)
