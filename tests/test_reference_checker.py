import numpy as np

from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import all_captions, render_clip


def test_checker_reads_ground_truth_clips():
    for i, cap in enumerate(all_captions()[::5]):
        result = check_video(render_clip(cap, seed=i).video)
        assert result.matches(cap) == (True, True), (cap.text, result)


def test_checker_on_static_and_empty_videos():
    clip = render_clip("a yellow triangle moving right on a black background", seed=3)
    static = np.repeat(clip.video[:1], 17, axis=0)
    assert check_video(static).direction is None
    assert check_video(static).colour == "yellow"
    empty = np.full((17, 64, 64, 3), 128, dtype=np.uint8)
    assert check_video(empty).colour is None


def test_checker_sees_wrong_colour_and_reversed_motion():
    clip = render_clip("a red circle moving left on a black background", seed=1)
    reversed_video = clip.video[::-1]
    assert check_video(reversed_video).direction == "right"
    recoloured = clip.video.copy()
    recoloured[clip.mask] = (40, 80, 225)
    assert check_video(recoloured).colour == "blue"
