"""engines.generation.repair: detect -> grow -> inpaint -> feathered paste-back -> re-score, with the demo
pipeline and the untrained config-built demo UperNet (tests/conftest.py; its "artifacts" are whatever it fires on) at 64x64,
4 steps at strength 0.75 (3 denoising steps), no CFG. One torch thread (shared cores).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from engines.detection.detect import ArtifactDetector
from engines.detection.detectors import load_detector
from engines.generation.generate import Cancelled, GenerateParams, TextToImage
from engines.models import LoadedModel, load_text2image
from engines.generation.repair import RepairParams, feather_alpha, grow_mask, latent_cells, paste_back, repair

PARAMS = RepairParams(threshold=0.5, grow=4, feather=2.0, seeds=(0, 1, 2), num_inference_steps=4, strength=0.75,
                      guidance_scale=1.0, prompt="a cat")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def detector(demo_data_dir, untrained_detector_dir):
    """The untrained config-built UperNet (tests/conftest.py): it fires on arbitrary images, which is all
    these mechanics tests need; the trained demo detector is tested in test_demo_models.py."""
    return ArtifactDetector(load_detector(str(untrained_detector_dir), data_dir=demo_data_dir))


@pytest.fixture(scope="module")
def inpainter(demo_data_dir):
    return load_text2image("demo", data_dir=demo_data_dir)


@pytest.fixture(scope="module")
def image(inpainter):
    params = GenerateParams("a cat", seed=3, num_inference_steps=4, guidance_scale=1.0, width=64, height=64)
    return TextToImage(inpainter).generate(params).images[0].rgb


@pytest.fixture(scope="module")
def result(image, detector, inpainter):
    return repair(image, detector, inpainter, PARAMS)


def disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx ** 2 + yy ** 2 <= radius ** 2


def test_pixels_outside_the_grown_mask_are_exactly_the_original(result, image):
    mask = result.mask
    assert 0 < mask.sum() < mask.size
    for cand in result.candidates:
        assert cand.outside_max_change == 0
        np.testing.assert_array_equal(cand.image[~mask], image[~mask])
        assert np.abs(cand.image[mask].astype(int) - image[mask]).max() > 10  # the region was regenerated
        assert cand.image.dtype == np.uint8 and cand.image.shape == image.shape
        assert cand.heatmap.dtype == np.float32 and cand.heatmap.shape == image.shape[:2]


def test_detected_region_is_the_thresholded_heatmap_grown(result, image, detector):
    scores = detector.predict([image])[0].scores
    np.testing.assert_array_equal(result.original_heatmap, scores)
    np.testing.assert_array_equal(result.region, scores >= PARAMS.threshold)
    np.testing.assert_array_equal(result.mask, ndimage.binary_dilation(result.region, structure=disk(PARAMS.grow)))
    assert not result.mask_given
    expected = float((scores[result.mask] >= PARAMS.threshold).mean())
    assert all(c.artifact_area_before == pytest.approx(expected) for c in result.candidates)


def test_candidates_are_ranked_by_the_detectors_score_inside_the_region(result, detector):
    assert sorted(c.seed for c in result.candidates) == sorted(PARAMS.seeds)
    maps = [h.scores for h in detector.predict([c.image for c in result.candidates])]
    keys = []
    for cand, scores in zip(result.candidates, maps):
        area = float((scores[result.mask] >= PARAMS.threshold).mean())
        mean = float(scores[result.mask].mean())
        assert cand.artifact_area_after == pytest.approx(area)
        assert cand.region_score_after == pytest.approx(mean, abs=1e-6)
        keys.append((area, mean))
    print("\nrepair candidates (seed, area after, mean score):",
          [(c.seed, round(c.artifact_area_after, 4), round(c.region_score_after, 4)) for c in result.candidates],
          "area before", round(result.candidates[0].artifact_area_before, 4))
    assert keys == sorted(keys)
    assert len(set(keys)) > 1  # the seeds really differ, so the order is not vacuous
    assert result.best is result.candidates[0]


def test_grow_is_a_disk_dilation_by_the_right_radius():
    single = np.zeros((41, 41), bool)
    single[20, 20] = True
    grown = grow_mask(single, 8)
    assert grown.sum() == 197  # lattice points with x^2 + y^2 <= 64 (Gauss circle N(8))
    np.testing.assert_array_equal(grown, ndimage.binary_dilation(single, structure=disk(8)))
    square = np.zeros((40, 50), bool)
    square[10:15, 20:26] = True
    grown = grow_mask(square, 3)
    np.testing.assert_array_equal(grown, ndimage.binary_dilation(square, structure=disk(3)))
    rows, cols = np.nonzero(grown)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7, 17, 17, 28)
    assert not grown[7, 17] and grown[8, 18]  # corners are round: (3, 3) is farther than 3 px
    np.testing.assert_array_equal(grow_mask(square, 0), square)
    edge = np.zeros((20, 20), bool)
    edge[0, 0] = True
    assert grow_mask(edge, 2).sum() == 6  # clipped at the border: (0,0) (0,1) (0,2) (1,0) (1,1) (2,0)


def test_feather_is_zero_outside_one_deep_inside_and_smooth_between():
    grown = np.zeros((64, 64), bool)
    grown[8:56, 8:56] = True
    alpha = feather_alpha(grown, 4.0)
    assert alpha.dtype == np.float32 and (alpha[~grown] == 0).all()
    assert (alpha[21:43, 21:43] == 1).all()  # more than 12 px (3 * feather) inside
    row = alpha[32, 8:33]
    assert (np.diff(row) >= 0).all() and 0 < row[0] < 0.2 and row[-1] == 1
    np.testing.assert_array_equal(feather_alpha(grown, 0), grown.astype(np.float32))
    original = np.zeros((64, 64, 3), np.uint8)
    candidate = np.full((64, 64, 3), 200, np.uint8)
    out = paste_back(original, candidate, alpha, grown)
    assert (out[~grown] == 0).all() and (out[32, 32] == 200).all() and 0 < out[32, 9, 0] < 200


def test_latent_cells_cover_every_touched_cell_plus_one():
    mask = np.zeros((32, 32), bool)
    mask[9, 9] = True  # cell (1, 1)
    cells = latent_cells(mask, 8, dilate=1)
    assert cells[:24, :24].all() and not cells[24:, :].any() and not cells[:, 24:].any()
    assert latent_cells(mask, 8, dilate=0).sum() == 64


def test_same_seeds_give_the_same_pixels_and_other_seeds_differ(result, image, detector, inpainter):
    again = repair(image, detector, inpainter, dataclasses.replace(PARAMS, seeds=(2, 0)))
    by_seed = {c.seed: c.image for c in result.candidates}
    for cand in again.candidates:
        np.testing.assert_array_equal(cand.image, by_seed[cand.seed])
    assert np.abs(by_seed[0].astype(int) - by_seed[1]).max() > 10


def test_a_given_mask_is_used_instead_of_the_detectors(image, detector, inpainter):
    given = np.zeros(image.shape[:2], bool)
    given[4:20, 40:60] = True
    progress: list[tuple[int, int]] = []
    res = repair(image, detector, inpainter, dataclasses.replace(PARAMS, seeds=(0,)), mask=given,
                 progress=lambda done, total: progress.append((done, total)))
    assert res.mask_given
    np.testing.assert_array_equal(res.region, given)
    np.testing.assert_array_equal(res.mask, grow_mask(given, PARAMS.grow))
    cand = res.best
    np.testing.assert_array_equal(cand.image[~res.mask], image[~res.mask])
    assert cand.outside_max_change == 0
    assert progress == [(1, 3), (2, 3), (3, 3)]
    regenerated = TextToImage(inpainter).generate(
        GenerateParams("a cat", seed=3, num_inference_steps=4, guidance_scale=1.0, width=64, height=64))
    np.testing.assert_array_equal(regenerated.images[0].rgb, image)  # repairing left the pipeline as it was


def test_an_inpainting_pipeline_is_called_directly_with_the_same_result(result, image, detector, inpainter):
    from diffusers import AutoPipelineForInpainting

    pipe = AutoPipelineForInpainting.from_pipe(inpainter.model)
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(model=pipe, kind="inpaint", model_id="demo", path=None, is_demo=True, device="cpu")
    res = repair(image, detector, loaded, dataclasses.replace(PARAMS, seeds=(1,)))
    reference = next(c for c in result.candidates if c.seed == 1)
    np.testing.assert_array_equal(res.best.image, reference.image)


def test_odd_sizes_work_and_keep_the_outside(detector, inpainter):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (70, 67, 3), dtype=np.uint8)
    given = np.zeros((70, 67), bool)
    given[30:40, 20:35] = True
    res = repair(image, detector, inpainter, dataclasses.replace(PARAMS, seeds=(0,)), mask=given)
    assert res.best.image.shape == image.shape
    np.testing.assert_array_equal(res.best.image[~res.mask], image[~res.mask])


def test_empty_regions_and_bad_inputs_raise_one_sentence(image, detector, inpainter):
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert detector.predict([flat])[0].scores.max() < 1.0  # so nothing reaches threshold 1
    with pytest.raises(ValueError, match=r"No artifact region at threshold 1: lower the threshold or give a mask\."):
        repair(flat, detector, inpainter, dataclasses.replace(PARAMS, threshold=1.0))
    with pytest.raises(ValueError, match="given mask is empty"):
        repair(image, detector, inpainter, PARAMS, mask=np.zeros((64, 64), bool))
    with pytest.raises(ValueError, match="must be bool"):
        repair(image, detector, inpainter, PARAMS, mask=np.ones((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        repair(image.astype(np.float32), detector, inpainter, PARAMS)
    for changes, words in (({"strength": 0.0}, "Strength"), ({"seeds": ()}, "seeds"), ({"grow": -1}, "Grow"),
                           ({"num_inference_steps": 2, "strength": 0.3}, "no denoising step"),
                           ({"threshold": 1.5}, "Threshold")):
        with pytest.raises(ValueError, match=words):
            dataclasses.replace(PARAMS, **changes).validate()


def test_should_stop_cancels(image, detector, inpainter):
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        repair(image, detector, inpainter, PARAMS, should_stop=stop)
