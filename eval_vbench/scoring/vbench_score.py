"""VBench's aggregation of per-dimension scores into quality, semantic and total scores.

Exactly as VBench defines it in `scripts/cal_final_score.py` and `scripts/constant.py` of
https://github.com/Vchitect/VBench (constant.py at commit d63e77f7b1b9db96fcdad99214d7d9aeaa6920ce; the same
figures are in the leaderboard's constants, https://huggingface.co/spaces/Vchitect/VBench_Leaderboard):

    normalised[d] = (raw[d] - min[d]) / (max[d] - min[d]) * weight[d]     (weight 0.5 for dynamic_degree, else 1)
    quality  = sum(normalised over the 7 quality dimensions)  / sum(their weights)
    semantic = sum(normalised over the 9 semantic dimensions) / sum(their weights)
    total    = (4 * quality + 1 * semantic) / 5

Raw scores are VBench's own (fractions in [0, 1], as `VBench.evaluate` writes them). A score is computed only
when every dimension it needs is present; otherwise it is None and the missing dimensions are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# (min, max) of every dimension: VBench's NORMALIZE_DIC
NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT: dict[str, float] = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in NORMALIZE}
QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
ALL_DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


def check_dimensions(names: list[str]) -> list[str]:
    """Validate dimension names (one-line ValueError listing the valid ones)."""
    bad = [n for n in names if n not in NORMALIZE]
    if bad:
        raise ValueError(f"unknown VBench dimension(s) {', '.join(bad)}; valid: {', '.join(ALL_DIMENSIONS)}")
    return list(dict.fromkeys(names))


def normalized(dimension: str, raw: float) -> float:
    """VBench's min-max normalisation of one raw score, times the dimension's weight."""
    lo, hi = NORMALIZE[dimension]
    return (raw - lo) / (hi - lo) * DIM_WEIGHT[dimension]


def _group(raw: dict[str, float], dims: tuple[str, ...]) -> float | None:
    if any(d not in raw or raw[d] is None for d in dims):
        return None
    return sum(normalized(d, raw[d]) for d in dims) / sum(DIM_WEIGHT[d] for d in dims)


@dataclass
class Aggregate:
    quality: float | None
    semantic: float | None
    total: float | None
    normalized: dict[str, float] = field(default_factory=dict)
    missing_quality: list[str] = field(default_factory=list)
    missing_semantic: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "quality_score": self.quality,
            "semantic_score": self.semantic,
            "total_score": self.total,
            "normalized": self.normalized,
            "missing_quality": self.missing_quality,
            "missing_semantic": self.missing_semantic,
        }


def aggregate(raw: dict[str, float | None]) -> Aggregate:
    """Quality, semantic and total score from raw per-dimension scores (absent or None: not computed)."""
    present = {d: float(v) for d, v in raw.items() if v is not None}
    check_dimensions(list(present))
    quality = _group(present, QUALITY_DIMENSIONS)
    semantic = _group(present, SEMANTIC_DIMENSIONS)
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return Aggregate(
        quality=quality,
        semantic=semantic,
        total=total,
        normalized={d: normalized(d, v) for d, v in present.items()},
        missing_quality=[d for d in QUALITY_DIMENSIONS if d not in present],
        missing_semantic=[d for d in SEMANTIC_DIMENSIONS if d not in present],
    )
