"""VBench's aggregation against the totals the VBench leaderboard publishes.

Figures (percent) are rows of the VBench leaderboard, https://huggingface.co/spaces/Vchitect/VBench_Leaderboard
(columns Total / Quality / Semantic Score and the 16 dimensions, as shown there; the leaderboard rounds to two
decimals). The normalisation bounds and weights under test are those of `scripts/constant.py` in
https://github.com/Vchitect/VBench (commit d63e77f7b1b9db96fcdad99214d7d9aeaa6920ce).
"""

from __future__ import annotations

import pytest

from videocache.eval_vbench.scoring.vbench_score import (
    ALL_DIMENSIONS,
    QUALITY_DIMENSIONS,
    aggregate,
    check_dimensions,
)

ORDER = (  # the leaderboard's column order
    "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness", "dynamic_degree",
    "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects", "human_action", "color",
    "spatial_relationship", "scene", "appearance_style", "temporal_style", "overall_consistency",
)
# model: (16 dimension scores in ORDER, (total, quality, semantic)), all in percent
LEADERBOARD = {
    "LaVie": (
        [91.41, 97.47, 98.30, 96.38, 49.72, 54.94, 61.90, 91.82, 33.32, 96.80, 86.39, 34.09, 52.69, 23.56, 25.93, 26.41],
        (77.08, 78.78, 70.31),
    ),
    "ModelScope": (
        [89.87, 95.29, 98.28, 95.79, 66.39, 52.06, 58.57, 82.25, 38.98, 92.40, 81.72, 33.68, 39.26, 23.39, 25.37, 25.67],
        (75.75, 78.05, 66.54),
    ),
    "VideoCrafter-2.0": (
        [96.85, 98.22, 98.41, 97.73, 42.50, 63.13, 67.22, 92.55, 40.66, 95.00, 92.92, 35.86, 55.29, 25.13, 25.84, 28.23],
        (80.44, 82.20, 73.42),
    ),
    "CogVideo": (
        [92.19, 96.20, 97.64, 96.47, 42.22, 38.18, 41.03, 73.40, 18.11, 78.20, 79.57, 18.24, 28.24, 22.01, 7.80, 7.70],
        (67.01, 72.06, 46.83),
    ),
    "HunyuanVideo": (
        [97.37, 97.76, 99.44, 98.99, 70.83, 60.36, 67.56, 86.10, 68.55, 94.40, 91.60, 68.68, 53.88, 19.80, 23.89, 26.44],
        (83.24, 85.09, 75.82),
    ),
}
# the leaderboard computes from unrounded dimension scores and rounds to 0.01: allow rounding of both sides
TOLERANCE = 0.015


@pytest.mark.parametrize("model", sorted(LEADERBOARD))
def test_aggregation_reproduces_published_totals(model):
    scores, (total, quality, semantic) = LEADERBOARD[model]
    result = aggregate({d: s / 100 for d, s in zip(ORDER, scores, strict=True)})
    assert result.quality * 100 == pytest.approx(quality, abs=TOLERANCE)
    assert result.semantic * 100 == pytest.approx(semantic, abs=TOLERANCE)
    assert result.total * 100 == pytest.approx(total, abs=TOLERANCE)


def test_aggregation_fails_on_a_wrong_weight():
    """The test can fail: an unweighted dynamic degree moves LaVie's quality score off the published one."""
    scores, (_, quality, _) = LEADERBOARD["LaVie"]
    raw = {d: s / 100 for d, s in zip(ORDER, scores, strict=True)}
    result = aggregate(raw)
    unweighted = (result.quality * 6.5 - result.normalized["dynamic_degree"] + raw["dynamic_degree"]) / 7
    assert abs(unweighted * 100 - quality) > 0.5


def test_partial_dimensions_give_no_total():
    result = aggregate({"temporal_flickering": 0.97})
    assert result.quality is None and result.semantic is None and result.total is None
    assert result.normalized["temporal_flickering"] == pytest.approx((0.97 - 0.6293) / (1 - 0.6293))
    assert set(result.missing_quality) == set(QUALITY_DIMENSIONS) - {"temporal_flickering"}
    assert len(result.missing_semantic) == 9


def test_unknown_dimension_is_one_line_error():
    with pytest.raises(ValueError, match="unknown VBench dimension.*flicker") as info:
        check_dimensions(["flicker"])
    assert "\n" not in str(info.value)
    assert len(ALL_DIMENSIONS) == 16
