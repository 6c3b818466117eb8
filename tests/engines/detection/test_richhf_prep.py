"""RichHF preprocessing of the paper (annotators from the value grid, 2-of-3 votes) and the synthetic data."""
from __future__ import annotations

import numpy as np
import pytest

from engines.detection.richhf_prep import (infer_annotators, judge_map, label_from_map, on_grid, synthesise_richhf,
                                     vote_mask)


def mean_map(masks: list[np.ndarray], rounding=np.rint) -> np.ndarray:
    """What an aggregated RichHF map is when it is the mean of binary annotator maps."""
    return rounding(np.mean(masks, axis=0) * 255.0).astype(np.uint8)


def annotator_masks(n: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """n overlapping, not identical rectangles (every vote count 0..n occurs)."""
    masks = []
    for i in range(n):
        m = np.zeros((size, size), bool)
        m[4 + i:20 + i, 4 + 2 * i:20 + 2 * i] = True
        masks.append(m)
    return masks


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("rounding", [np.rint, np.floor])
def test_annotator_count_is_read_from_the_value_grid(n, rounding):
    raw = mean_map(annotator_masks(n), rounding)
    assert infer_annotators(raw) == n


def test_three_annotators_give_the_85_grid_and_two_of_three_is_raw_170():
    raw = mean_map(annotator_masks(3))
    assert set(np.unique(raw)) == {0, 85, 170, 255}
    votes = np.sum(annotator_masks(3), axis=0)
    np.testing.assert_array_equal(vote_mask(raw, 3), votes >= 2)
    assert not vote_mask(np.array([[85]], np.uint8), 3).any()
    assert vote_mask(np.array([[170, 255]], np.uint8), 3).all()


def test_votes_scale_with_the_annotator_count():
    # 6 annotators: "2 of 3" means at least 4 of 6 votes.
    raw = np.array([[round(255 * k / 6) for k in range(7)]], np.uint8)
    assert vote_mask(raw, 6).tolist() == [[False, False, False, False, True, True, True]]


def test_special_maps_empty_binary_and_off_grid():
    assert infer_annotators(np.zeros((8, 8), np.uint8)) == 0
    assert infer_annotators(np.array([[0, 255]], np.uint8)) == 1
    assert infer_annotators(np.array([[0, 85]], np.uint8)) == 3  # a subset of the 3-grid
    assert infer_annotators(np.array([[0, 40, 97, 255]], np.uint8)) is None  # smoothed / resized
    assert on_grid(np.array([127, 128]), 2) and not on_grid(np.array([100]), 2)
    with pytest.raises(ValueError, match="uint8"):
        infer_annotators(np.zeros((4, 4), np.float32))


def test_judge_keeps_three_annotators_and_empty_maps_only():
    three = judge_map(mean_map(annotator_masks(3)))
    assert three.keep and three.annotators == 3
    for n in (1, 2):
        verdict = judge_map(mean_map(annotator_masks(n)))
        assert not verdict.keep and verdict.annotators == n and "annotator" in verdict.reason
    empty = judge_map(np.zeros((8, 8), np.uint8))
    assert empty.keep and empty.reason == "empty map"
    assert not judge_map(np.zeros((8, 8), np.uint8), keep_empty=False).keep
    off = judge_map(np.array([[0, 40, 97, 255]], np.uint8))
    assert not off.keep and off.reason == "off-grid values"
    assert not label_from_map(np.zeros((4, 4), np.uint8), empty).any()


def test_synthetic_richhf_is_readable_deterministic_and_has_the_promised_grids(tmp_path):
    from engines.detection.richhf import read_richhf

    counts = synthesise_richhf(tmp_path / "a", train=30, val=4, test=6, clean=3, size=48, seed=3)
    synthesise_richhf(tmp_path / "b", train=30, val=4, test=6, clean=3, size=48, seed=3)
    for name in ("train.tfrecord", "dev.tfrecord", "test.tfrecord", "captions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    records = list(read_richhf(tmp_path / "a" / "train.tfrecord"))
    assert len(records) == counts.records["train"] == 30
    judged = {}
    for rec in records:
        assert (tmp_path / "a" / "images" / rec.filename).is_file()
        assert rec.artifact_map.shape == (48, 48)
        n = infer_annotators(rec.artifact_map)
        judged[n] = judged.get(n, 0) + 1
        if n == 3:  # three annotators never agree on every pixel of a jittered outline
            assert set(np.unique(rec.artifact_map)) & {85, 170}
    expected = {int(k.split(":")[1]) if k.split(":")[1] != "empty" else 0: v
                for k, v in counts.annotators.items() if k.startswith("train:")}
    assert judged == expected
    assert expected.get(1, 0) + expected.get(2, 0) > 0 and expected.get(3, 0) > 0
    assert len(list((tmp_path / "a" / "clean").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="multiple of 8"):
        synthesise_richhf(tmp_path / "c", size=50)
