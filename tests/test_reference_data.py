import numpy as np
import pytest

from videocache.pipelines.reference.data import (
    BACKGROUND_COLOURS,
    NUM_HELD_OUT,
    SHAPE_COLOURS,
    Caption,
    all_captions,
    render_clip,
    split_captions,
)


def test_grammar_and_vocabulary():
    caps = all_captions()
    assert len(caps) == len(SHAPE_COLOURS) * 3 * 4 * len(BACKGROUND_COLOURS) - 3 * 3 * 4  # 3 shared colours
    assert all(c.colour != c.background for c in caps)
    assert Caption.parse("a red circle moving left on a black background").text == (
        "a red circle moving left on a black background"
    )


@pytest.mark.parametrize(
    "bad",
    ["a red circle moving left", "a purple circle moving left on a black background",
     "a red circle moving left on a red background", "a red circle going left on a black background"],
)
def test_bad_captions_rejected(bad):
    with pytest.raises(ValueError):
        Caption.parse(bad)


def test_split_is_deterministic_and_disjoint():
    train, held = split_captions()
    train2, held2 = split_captions()
    assert held == held2 and train == train2
    assert len(held) == NUM_HELD_OUT and not set(train) & set(held)
    # every attribute value is still seen in training
    for attr in ("colour", "shape", "direction", "background"):
        assert {getattr(c, attr) for c in held} <= {getattr(c, attr) for c in train}


def test_render_is_deterministic_and_moves_as_captioned():
    a = render_clip("a blue square moving up on a gray background", seed=7)
    b = render_clip("a blue square moving up on a gray background", seed=7)
    assert np.array_equal(a.video, b.video) and np.array_equal(a.mask, b.mask)
    assert a.video.shape == (17, 64, 64, 3) and a.video.dtype == np.uint8
    assert a.trajectory[-1, 1] < a.trajectory[0, 1] - 15  # up = decreasing y
    assert np.allclose(a.trajectory[:, 0], a.trajectory[0, 0])
    # the mask covers the shape: its pixels have the shape's colour
    inside = a.video[a.mask].astype(float).mean(axis=0)
    assert np.abs(inside - SHAPE_COLOURS["blue"]).max() < 25
    assert a.mask.any(axis=(1, 2)).all()
