"""Which prompts `videocache eval` generates, how many samples each, and which VBench dimensions it scores.

`--suite standard`: VBench's whole prompt suite, read from `VBench_full_info.json` as installed with the
`vbench` package in the VBench environment (946 prompts, each with its dimensions); `--suite DIM[,DIM...]`:
the prompts of those dimensions; `--suite PROMPT_FILE`: your own prompts (VBench's `custom_input` mode,
which cannot score the dimensions that need VBench's per-prompt annotations).

VBench's sampling convention: `--samples` videos per prompt (5 in VBench) named `{prompt}-{index}.mp4`,
25 for the prompts of `temporal_flickering` (VBench samples more of them because its static filter keeps
only still videos). Sample i uses seed `seed + i`; seeds are recorded with every video. VBench's standard-mode
evaluation reads samples 0-4 of each prompt: without its static filter (RAFT weights; not run here) temporal
flickering is scored on those five, and the report says how many videos VBench scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .vbench_score import ALL_DIMENSIONS, check_dimensions

# dimensions VBench's custom_input mode refuses (VBench.check_dimension_requires_extra_info)
NEEDS_STANDARD_PROMPTS = ("object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship")
CUSTOM_INPUT_DIMENSIONS = tuple(d for d in ALL_DIMENSIONS if d not in NEEDS_STANDARD_PROMPTS)
TEMPORAL_FLICKERING_SAMPLES = 25
DEFAULT_PROMPT_FILE_DIMENSIONS = ("temporal_flickering",)  # the one dimension that needs no downloaded weights


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    dimensions: tuple[str, ...]
    samples: int


@dataclass(frozen=True)
class Suite:
    kind: str  # "standard", "dimensions" or "prompt_file"
    mode: str  # VBench evaluate mode: "vbench_standard" or "custom_input"
    prompts: tuple[SuitePrompt, ...]
    dimensions: tuple[str, ...]  # dimensions to score
    source: str  # where the prompts came from

    def video_name(self, prompt: str, index: int) -> str:
        return f"{prompt}-{index}.mp4"

    @property
    def videos(self) -> int:
        return sum(p.samples for p in self.prompts)


def load_full_info(path: str | Path) -> list[dict]:
    """VBench_full_info.json: a list of {"prompt_en": str, "dimension": [str, ...]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VBench prompt suite {path} not found")
    entries = json.loads(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "prompt_en" in e and "dimension" in e for e in entries):
        raise ValueError(f"{path} is not a VBench full-info file (a list of {{prompt_en, dimension}})")
    return entries


def _check_prompt(prompt: str) -> str:
    if "/" in prompt or "\x00" in prompt:
        raise ValueError(f"prompt {prompt!r} cannot name a video file ({{prompt}}-{{index}}.mp4): remove the '/'")
    return prompt


def build_suite(
    spec: str,
    samples: int,
    full_info: str | Path | None = None,
    dimensions: list[str] | None = None,
    limit: int | None = None,
) -> Suite:
    """The suite for `--suite SPEC`. `full_info` (the installed VBench_full_info.json) is needed for the
    standard and dimension suites; `dimensions` overrides what is scored; `limit` keeps the first N prompts."""
    if samples <= 0:
        raise ValueError(f"--samples must be positive, got {samples}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    wanted = check_dimensions(list(dimensions)) if dimensions else None
    path = Path(spec)
    if spec != "standard" and (path.is_file() or path.suffix in (".txt", ".json") or "/" in spec):
        from videocache.pipelines.generation import read_prompts

        wanted = wanted or list(DEFAULT_PROMPT_FILE_DIMENSIONS)
        refused = [d for d in wanted if d in NEEDS_STANDARD_PROMPTS]
        if refused:
            raise ValueError(
                f"VBench cannot score {', '.join(refused)} on your own prompts (custom_input mode); use --suite standard "
                f"or --suite {','.join(refused)}"
            )
        prompts = list(dict.fromkeys(_check_prompt(p) for p in read_prompts(path)))[:limit]
        return Suite("prompt_file", "custom_input", tuple(SuitePrompt(p, tuple(wanted), samples) for p in prompts),
                     tuple(wanted), str(path))
    if full_info is None:
        raise ValueError("the standard and per-dimension suites need VBench's prompt suite (the VBench environment)")
    entries = load_full_info(full_info)
    if spec == "standard":
        kind, chosen = "standard", list(wanted or ALL_DIMENSIONS)
    else:
        kind, chosen = "dimensions", check_dimensions([d.strip() for d in spec.split(",") if d.strip()])
        if wanted:
            chosen = [d for d in chosen if d in wanted]
    prompts = []
    for entry in entries:
        dims = tuple(d for d in entry["dimension"] if d in chosen)
        if not dims:
            continue
        n = TEMPORAL_FLICKERING_SAMPLES if "temporal_flickering" in dims else samples
        prompts.append(SuitePrompt(_check_prompt(entry["prompt_en"]), dims, max(n, samples)))
    if not prompts:
        raise ValueError(f"no prompt of {full_info} belongs to {', '.join(chosen)}")
    return Suite(kind, "vbench_standard", tuple(prompts[:limit]), tuple(chosen), str(full_info))
