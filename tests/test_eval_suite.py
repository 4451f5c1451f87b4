"""`videocache eval`'s prompt suites (a tiny fixture in VBench_full_info.json's format) and its offline
prompt accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from videocache.eval_vbench.metrics import prompt_accuracy
from videocache.eval_vbench.scoring.vbench_suite import (
    CUSTOM_INPUT_DIMENSIONS,
    TEMPORAL_FLICKERING_SAMPLES,
    build_suite,
    load_full_info,
)

FULL_INFO = [  # the format of vbench's VBench_full_info.json: prompt_en + dimension list
    {"prompt_en": "In a still frame, a stop sign", "dimension": ["temporal_flickering"]},
    {"prompt_en": "a person swimming in ocean", "dimension": ["subject_consistency", "dynamic_degree", "motion_smoothness"]},
    {"prompt_en": "a red bicycle", "dimension": ["color"]},
    {"prompt_en": "a bus", "dimension": ["object_class", "temporal_flickering"]},
]


@pytest.fixture
def full_info(tmp_path):
    path = tmp_path / "VBench_full_info.json"
    path.write_text(json.dumps(FULL_INFO))
    return path


def test_standard_suite_samples_25_for_temporal_flickering(full_info):
    suite = build_suite("standard", 5, full_info)
    assert suite.mode == "vbench_standard" and suite.kind == "standard" and len(suite.dimensions) == 16
    samples = {p.prompt: p.samples for p in suite.prompts}
    assert samples == {
        "In a still frame, a stop sign": TEMPORAL_FLICKERING_SAMPLES, "a person swimming in ocean": 5,
        "a red bicycle": 5, "a bus": TEMPORAL_FLICKERING_SAMPLES,
    }
    assert suite.videos == 25 + 5 + 5 + 25
    assert suite.video_name("a bus", 3) == "a bus-3.mp4"  # VBench's {prompt}-{index}.mp4


def test_dimension_suite_keeps_the_prompts_of_those_dimensions(full_info):
    suite = build_suite("color,dynamic_degree", 5, full_info)
    assert [(p.prompt, p.dimensions, p.samples) for p in suite.prompts] == [
        ("a person swimming in ocean", ("dynamic_degree",), 5), ("a red bicycle", ("color",), 5),
    ]
    assert build_suite("standard", 5, full_info, limit=1).prompts[0].prompt == "In a still frame, a stop sign"


def test_prompt_file_suite_is_custom_input(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\na red circle moving left on a black background\n\na cat\n")
    suite = build_suite(str(prompts), 3, None)
    assert suite.mode == "custom_input" and suite.dimensions == ("temporal_flickering",)
    assert [p.samples for p in suite.prompts] == [3, 3]
    with pytest.raises(ValueError, match="cannot score color on your own prompts"):
        build_suite(str(prompts), 3, None, ["color"])
    assert "color" not in CUSTOM_INPUT_DIMENSIONS and "temporal_flickering" in CUSTOM_INPUT_DIMENSIONS


@pytest.mark.parametrize(
    ("spec", "samples", "fragment"),
    [("flicker", 5, "unknown VBench dimension"), ("standard", 0, "--samples must be positive")],
)
def test_bad_suites_are_one_line_errors(full_info, spec, samples, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        build_suite(spec, samples, full_info)
    assert "\n" not in str(info.value)


def test_prompt_with_a_slash_cannot_name_a_video(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a/b\n")
    with pytest.raises(ValueError, match="cannot name a video file"):
        build_suite(str(prompts), 1, None)


def test_full_info_format_is_checked(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="not a VBench full-info file"):
        load_full_info(bad)


def test_shape_detector_on_rendered_clips():
    from videocache.pipelines.reference.data import all_captions, render_clip

    captions = all_captions()[::7]
    for seed, caption in enumerate(captions):
        clip = render_clip(caption, seed)
        assert prompt_accuracy.detect_shape(clip.video) == caption.shape, caption.text
        result = prompt_accuracy.check(caption.text, clip.video)
        assert (result.colour, result.shape, result.direction) == (True, True, True), caption.text
    assert {c.shape for c in captions} == {"circle", "square", "triangle"}


def test_prompt_accuracy_counts_and_ignores_other_prompts():
    from videocache.pipelines.reference.data import render_clip

    clip = render_clip("a red circle moving left on a black background", 0)
    wrong = prompt_accuracy.check("a blue square moving right on a black background", clip.video)
    assert (wrong.colour, wrong.shape, wrong.direction) == (False, False, False)
    assert prompt_accuracy.check("a cat playing piano", clip.video) is None
    right = prompt_accuracy.check("a red circle moving left on a black background", clip.video)
    summary = prompt_accuracy.summarize([right, wrong])
    assert summary["colour"] == summary["shape"] == summary["direction"] == 0.5 and summary["videos"] == 2
    assert prompt_accuracy.summarize([]) is None
    other = prompt_accuracy.check(
        "a blue square moving right on a black background",
        render_clip("a blue square moving right on a black background", 1).video,
    )
    assert other.seen == ("blue", "square", "right")
    assert prompt_accuracy.agreement({0: right, 1: wrong}, {0: right, 1: other}) == 0.5  # what the checker sees
    assert right.seen == ("red", "circle", "left")
    assert prompt_accuracy.detect_shape(np.zeros((3, 16, 16, 3), np.uint8)) is None
