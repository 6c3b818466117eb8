"""The shipped demo models mean something (not just shapes):

- the demo text-to-image model, asked for a photo by name, generates that photo (closer to it than to
  another bundled photo, at several seeds);
- the demo detector, on a photo it never saw (held out), corrupted by the studio's own pipeline, is
  hotter inside the corrupted region than outside and finds it;
- detector-guided repair with the demo models lowers the detected artifact area.

Everything at the demo's 128 px, on CPU, one torch thread; the corruption uses the paper's settings.
"""
from __future__ import annotations

import numpy as np
import pytest

from engines.generation.generate import GenerateParams

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def centre_view(name: str) -> np.ndarray:
    """The centred square of a bundled scikit-image photo at 128 px (what the demo model was trained on)."""
    import skimage.data
    from PIL import Image

    img = getattr(skimage.data, name)()[..., :3]
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.asarray(Image.fromarray(img[top:top + side, left:left + side]).resize((SIZE, SIZE), Image.LANCZOS))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def blob_mask(seed: int) -> np.ndarray:
    from engines.corruption.metrics import random_blob_mask

    return random_blob_mask(SIZE, SIZE, seed=seed, coverage=(0.1, 0.15))


# ------------------------------------------------------------------ text to image
@pytest.mark.parametrize("prompt, own, other", [("a photo of an astronaut", "astronaut", "chelsea"),
                                                ("a photo of a cat", "chelsea", "astronaut"),
                                                ("a cup of coffee", "coffee", "rocket")])
@pytest.mark.slow
def test_a_prompt_naming_a_photo_generates_that_photo(text2image, prompt, own, other):
    """At every seed the image is closer (pixel MSE) to the named photo than to another bundled photo;
    on average much closer, and structurally more similar (SSIM). Measured (10 steps, seeds 0-3): MSE
    ratios 0.42-0.86 (astronaut vs cat), 0.06-0.19 (cat vs astronaut), 0.19-0.45 (coffee vs rocket)."""
    result = text2image.generate(GenerateParams(prompt, seed=0, num_inference_steps=10, num_images=4))
    assert (result.width, result.height) == (SIZE, SIZE)  # the demo's default size is its training size
    mine, theirs = centre_view(own), centre_view(other)
    ratios = [mse(image.rgb, mine) / mse(image.rgb, theirs) for image in result.images]
    assert max(ratios) < 1.0, ratios
    assert np.mean(ratios) < 0.75, ratios
    assert np.mean([ssim(image.rgb, mine) - ssim(image.rgb, theirs) for image in result.images]) > 0.05


# ------------------------------------------------------------------ detector and repair on a held-out photo
@pytest.fixture(scope="module")
def corruptor(text2image):
    from engines.corruption.corrupt import RegionCorruptor

    return RegionCorruptor(text2image.loaded)


@pytest.fixture(scope="module")
def corrupted(corruptor):
    """A held-out photo (coffee: the demo detector never saw it) with a blob corrupted by the studio's direct
    corruption (the paper's Table 4 baseline, what the demo detector was trained on) over the demo model."""
    from engines.corruption.corrupt import CorruptParams

    view = centre_view("coffee")
    result = corruptor.corrupt(view, blob_mask(3), CorruptParams(method="direct", seed=1))
    return view, result.image, result.mask


@pytest.fixture(scope="module")
def detector(demo_data_dir):
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector

    loaded = load_detector("demo", data_dir=demo_data_dir)
    assert loaded.is_demo and loaded.extra.trained
    return ArtifactDetector(loaded)


def test_demo_detector_was_never_trained_on_the_held_out_photo(demo_data_dir):
    import json

    from engines.detection.detectors import ensure_demo_detector

    provenance = json.loads((ensure_demo_detector(demo_data_dir) / "detector.json").read_text())["provenance"]
    assert "coffee" in provenance["data"]["photos_heldout"]
    assert "coffee" not in provenance["data"]["photos_train"]


def test_demo_detector_is_hotter_inside_the_corrupted_region(detector, corrupted):
    clean, image, mask = corrupted
    scores = detector.predict([image])[0].scores
    assert scores[mask].mean() > scores[~mask].mean() + 0.3
    found = scores >= 0.5
    assert (found & mask).sum() / (found | mask).sum() > 0.3  # it finds the region, not just somewhere warm
    assert (detector.predict([clean])[0].scores >= 0.5).mean() < 0.05  # the clean photo is mostly clean


def test_repair_with_the_demo_models_lowers_the_artifact_area(detector, corrupted, text2image):
    from engines.generation.repair import RepairParams, repair

    _, image, _ = corrupted
    result = repair(image, detector, text2image.loaded, RepairParams(seeds=(0, 1), num_inference_steps=10))
    best = result.best
    assert best.artifact_area_before > 0.3
    assert best.artifact_area_after < 0.5 * best.artifact_area_before
    assert best.outside_max_change == 0


@pytest.mark.slow
def test_the_demo_model_paints_a_memorised_photo_back_at_the_papers_settings(corruptor):
    """Why the demo detector trains on direct corruptions: on a photo the demo model memorised, the paper's
    main method (ReNoise, step 40 of 50, resampled) leaves almost no trace; the direct corruption does."""
    from engines.corruption.corrupt import CorruptParams

    view, mask = centre_view("coffee"), blob_mask(3)
    main = corruptor.corrupt(view, mask, CorruptParams(seed=1))
    direct = corruptor.corrupt(view, mask, CorruptParams(method="direct", seed=1))
    assert main.inside_change_vs_resample < 5  # of 255: restored from memory
    assert direct.inside_change_vs_resample > 30
