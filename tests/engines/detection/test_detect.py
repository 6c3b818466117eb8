"""engines.detection.detect: heatmaps at native size, sliding windows, regions, overlays, metrics, trajectory maps.

The detector is the untrained config-built demo UperNet (tests/conftest.py `untrained_detector_dir`:
tiny, input 256, logits spread so heatmaps span [0, 1]); metrics are checked against hand-computed numbers and an independent mmseg-style mIoU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.detection.detect import (ArtifactDetector, Cancelled, ImageScore, colormap_lut, evaluate_masks, find_regions,
                            heatmap_to_png16, mask_edges, png16_to_heatmap, render_overlay, score_image,
                            trajectory_heatmap)
from engines.detection.detectors import load_detector

torch.set_num_threads(2)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image (so resizing it is well behaved), RGB uint8."""
    from PIL import Image

    small = noise(max(2, h // 16), max(2, w // 16), seed)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def detector(tmp_path_factory, untrained_detector_dir) -> ArtifactDetector:
    loaded = load_detector(str(untrained_detector_dir), data_dir=tmp_path_factory.mktemp("det-data"))
    assert loaded.extra.input_size == 256
    return ArtifactDetector(loaded)


# ------------------------------------------------------------------ predict
@pytest.mark.parametrize("mode", ["resize", "sliding"])
@pytest.mark.parametrize("size", [(37, 101), (300, 451)])
def test_predict_native_size_float32_in_unit_range(detector, untrained_detector_dir, mode, size):
    h, w = size
    heat = detector.predict([smooth(h, w, 0)], mode=mode)[0]
    assert heat.scores.shape == (h, w) and heat.scores.dtype == np.float32
    assert heat.scores.min() >= 0.0 and heat.scores.max() <= 1.0
    assert heat.scores.std() > 0.01  # a real map, not a constant
    assert heat.detector_id == str(untrained_detector_dir) and heat.is_demo is False


def test_resize_batch_equals_per_image_calls(detector):
    images = [smooth(h, w, i) for i, (h, w) in enumerate([(37, 101), (256, 256), (64, 40), (300, 451), (129, 77)])]
    batched = detector.predict(images, batch_size=5)
    in_pairs = detector.predict(images, batch_size=2)
    single = [detector.predict([im])[0] for im in images]
    for b, p, s, im in zip(batched, in_pairs, single, images):
        assert b.scores.shape == im.shape[:2]
        np.testing.assert_allclose(b.scores, s.scores, atol=1e-5)
        np.testing.assert_allclose(p.scores, s.scores, atol=1e-5)


def test_resize_mode_follows_the_documented_contract(detector):
    """Resize to 256 (PIL bilinear), ImageNet-normalise, softmax channel 1, resize back (PIL bilinear)."""
    import torch.nn.functional as F
    from PIL import Image

    image = smooth(90, 150, 4)
    x = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR), np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    with torch.no_grad():
        logits = detector.model(pixel_values=torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).logits
        logits = F.interpolate(logits, size=(256, 256), mode="bilinear", align_corners=False)
        prob = torch.softmax(logits, dim=1)[0, 1].numpy()
    expected = np.clip(np.asarray(Image.fromarray(prob).resize((150, 90), Image.BILINEAR), np.float32), 0, 1)
    np.testing.assert_allclose(detector.predict([image])[0].scores, expected, atol=1e-5)


def test_sliding_on_an_image_of_the_input_size_equals_resize(detector):
    image = noise(256, 256, 1)
    a = detector.predict([image], mode="resize")[0].scores
    b = detector.predict([image], mode="sliding")[0].scores
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sliding_covers_every_pixel_and_averages_overlaps(detector):
    image = smooth(600, 300, 2)
    got = detector.predict([image], mode="sliding", overlap=0.25, batch_size=3)[0].scores
    assert got.shape == (600, 300)
    # stride = 256 * 0.75 = 192; last window flush with the border: rows 0, 192, 344; columns 0, 44
    acc = np.zeros((600, 300), np.float64)
    cnt = np.zeros((600, 300), np.int64)
    for y in (0, 192, 344):
        for x in (0, 44):
            crop = np.ascontiguousarray(image[y:y + 256, x:x + 256])
            acc[y:y + 256, x:x + 256] += detector.predict([crop], mode="resize")[0].scores
            cnt[y:y + 256, x:x + 256] += 1
    assert cnt.min() >= 1
    # float32 maps batched 3 at a time vs one at a time: convolutions sum in another order (measured 1.5e-6
    # apart); a misplaced or unweighted window is off by > 1e-2
    np.testing.assert_allclose(got, acc / cnt, atol=2e-5)
    # a corner only one window covers is that window's map (up to the same summation-order tolerance)
    first = detector.predict([np.ascontiguousarray(image[:256, :256])])[0].scores
    np.testing.assert_allclose(got[:192, :44], first[:192, :44], atol=2e-5)
    # the last rows come from the flush bottom windows, not zeros
    assert got[-5:].mean() > 0.01 and got[-5:].std() > 0.001


def test_sliding_on_a_small_image_upscales_it(detector):
    image = smooth(60, 40, 5)
    got = detector.predict([image], mode="sliding")[0].scores
    assert got.shape == (60, 40) and 0.0 <= got.min() and got.max() <= 1.0 and got.std() > 0.01


@pytest.mark.parametrize("mode", ["resize", "sliding"])
def test_progress_counts_images_and_stop_cancels(detector, mode):
    images = [smooth(64, 64, i) for i in range(5)]
    calls: list[tuple[int, int]] = []
    detector.predict(images, mode=mode, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert all(t == 5 for _, t in calls) and done == sorted(done) and len(set(done)) == len(done)
    assert done[-1] == 5
    if mode == "resize":
        assert calls == [(2, 5), (4, 5), (5, 5)]
    else:
        assert calls == [(i, 5) for i in range(1, 6)]

    seen: list[int] = []
    with pytest.raises(Cancelled):
        detector.predict(images, mode=mode, batch_size=2, progress=lambda d, t: seen.append(d),
                         should_stop=lambda: len(seen) >= 1)
    assert len(seen) == 1
    with pytest.raises(Cancelled):
        detector.predict(images, mode=mode, should_stop=lambda: True)


@pytest.mark.parametrize("kwargs, word", [({"mode": "tiles"}, "mode"), ({"overlap": 0.95}, "Overlap"),
                                          ({"overlap": -0.1}, "Overlap"), ({"batch_size": 0}, "Batch size")])
def test_predict_rejects_bad_options(detector, kwargs, word):
    with pytest.raises(ValueError, match=word):
        detector.predict([noise(32, 32, 0)], **kwargs)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32)])
def test_predict_rejects_non_rgb_uint8(detector, bad):
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.predict([noise(8, 8, 0), bad])


# ------------------------------------------------------------------ regions
def region_scores() -> np.ndarray:
    s = np.zeros((10, 12), np.float32)
    s[1:4, 1:4] = 0.6          # blob A: 3x3, rows 1-3, cols 1-3
    s[2, 2] = 0.9
    s[5, 7] = 0.8              # blob B: a diagonal pair (8-connected) plus one pixel beside it
    s[6, 8] = 0.7
    s[6, 9] = 0.95
    s[9, 0] = 0.55             # a lone pixel
    s[0, 11] = 0.49            # just below the threshold
    return s


def test_find_regions_exact_areas_bboxes_scores_and_order():
    s = region_scores()
    regions, labels = find_regions(s, threshold=0.5)
    assert labels.dtype == np.int32 and labels.shape == s.shape
    assert [r.area for r in regions] == [3, 9, 1]  # sorted by max score: 0.95, 0.9, 0.55
    b, a, lone = regions
    assert b.bbox == (7, 5, 9, 6) and a.bbox == (1, 1, 3, 3) and lone.bbox == (0, 9, 0, 9)
    assert b.max_score == pytest.approx(0.95) and b.mean_score == pytest.approx((0.8 + 0.7 + 0.95) / 3)
    assert a.max_score == pytest.approx(0.9) and a.mean_score == pytest.approx((8 * 0.6 + 0.9) / 9)
    assert lone.mean_score == pytest.approx(0.55)
    assert a.area_percent == pytest.approx(100 * 9 / 120)
    for r in regions:
        assert np.count_nonzero(labels == r.label) == r.area
    assert labels[0, 11] == 0 and labels[5, 7] == labels[6, 8] == labels[6, 9] == b.label
    assert len({r.label for r in regions}) == 3


def test_find_regions_threshold_is_inclusive_and_min_area_drops():
    s = region_scores()
    regions, labels = find_regions(s, threshold=0.49, min_area=2)
    assert [r.area for r in regions] == [3, 9]  # the two lone pixels (0.55 and 0.49) are dropped
    assert labels[9, 0] == 0 and labels[0, 11] == 0
    assert set(np.unique(labels)) == {0} | {r.label for r in regions}
    regions, labels = find_regions(s, threshold=0.95)
    assert [(r.area, r.bbox) for r in regions] == [(1, (9, 6, 9, 6))]
    regions, labels = find_regions(np.zeros((4, 4), np.float32), 0.5)
    assert regions == [] and not labels.any()


@pytest.mark.parametrize("threshold", [-0.01, 1.01])
def test_find_regions_threshold_out_of_range(threshold):
    with pytest.raises(ValueError, match="between 0 and 1"):
        find_regions(region_scores(), threshold)


# ------------------------------------------------------------------ overlays
def test_jet_lut_endpoints():
    lut = colormap_lut("jet")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    r, g, b = lut[0]
    assert r == 0 and g == 0 and b in (127, 128)        # dark blue
    r, g, b = lut[255]
    assert r in (127, 128) and g == 0 and b == 0        # dark red
    for name in ("turbo", "magma"):
        assert colormap_lut(name).shape == (256, 3)


def test_render_overlay_alpha_extremes_and_threshold():
    image = noise(6, 8, 0)
    scores = np.zeros((6, 8), np.float32)
    scores[:, 4:] = 1.0
    scores[0, 0] = 0.5
    assert np.array_equal(render_overlay(image, scores, alpha=0.0), image)
    full = render_overlay(image, scores, alpha=1.0)
    lut = colormap_lut("jet")
    assert np.array_equal(full[:, 4:], np.broadcast_to(lut[255], (6, 4, 3)))
    assert np.array_equal(full[1:, :4], np.broadcast_to(lut[0], (5, 4, 3)))
    assert np.array_equal(full[0, 0], lut[128])
    half = render_overlay(image, scores, alpha=0.5)
    colour = lut[np.clip(scores * 255 + 0.5, 0, 255).astype(np.uint8)].astype(np.uint16)
    expected = (image.astype(np.uint16) * 128 + colour * 128) >> 8
    assert np.array_equal(half, expected.astype(np.uint8))
    # with a threshold only pixels at or above it are coloured
    thr = render_overlay(image, scores, alpha=1.0, threshold=0.5)
    assert np.array_equal(thr[:, :4][1:], image[1:, :4]) and np.array_equal(thr[0, 1:4], image[0, 1:4])
    assert np.array_equal(thr[:, 4:], full[:, 4:]) and np.array_equal(thr[0, 0], lut[128])


def test_render_overlay_contours_are_white_borders():
    image = np.full((9, 9, 3), 10, np.uint8)
    scores = np.zeros((9, 9), np.float32)
    scores[2:7, 2:7] = 0.9
    out = render_overlay(image, scores, alpha=0.5, threshold=0.5, contours=True)
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert np.array_equal(mask_edges(scores >= 0.5), ring)
    assert (out[ring] == 255).all()
    inner = out[3:6, 3:6]
    assert (inner != 255).any() and not np.array_equal(inner, image[3:6, 3:6])
    assert np.array_equal(out[~(scores >= 0.5)], image[~(scores >= 0.5)])


def test_render_overlay_rejects_bad_input():
    image = noise(6, 8, 0)
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(image, np.zeros((8, 6), np.float32))
    with pytest.raises(ValueError, match="Unknown colormap"):
        render_overlay(image, np.zeros((6, 8), np.float32), colormap="viridis")
    with pytest.raises(ValueError, match="Alpha"):
        render_overlay(image, np.zeros((6, 8), np.float32), alpha=1.5)


def test_png16_round_trip():
    scores = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    back = png16_to_heatmap(heatmap_to_png16(scores))
    assert back.dtype == np.float32 and np.abs(back - scores).max() <= 0.5 / 65535 + 1e-7


# ------------------------------------------------------------------ metrics
def two_image_case():
    pred_a = np.zeros((4, 4), bool)
    truth_a = np.zeros((4, 4), bool)
    pred_a[0, :] = True          # 4 predicted + 1 more = 5
    pred_a[1, 0] = True
    truth_a[0, 1:] = True        # 3 true in the predicted row + 1 missed = 4
    truth_a[3, 3] = True
    pred_b = np.zeros((4, 4), bool)   # both empty
    truth_b = np.zeros((4, 4), bool)
    return [(pred_a, truth_a, "a"), (pred_b, truth_b, "b")]


def mmseg_miou(pairs, num_classes: int = 2) -> tuple[np.ndarray, float]:
    """mmsegmentation's intersect_and_union accumulated over the set, then IoU per class and nanmean."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, truth, _ in pairs:
        p, g = pred.astype(np.int64).ravel(), truth.astype(np.int64).ravel()
        i = np.bincount(p[p == g], minlength=num_classes)
        ap = np.bincount(p, minlength=num_classes)
        al = np.bincount(g, minlength=num_classes)
        inter += i
        union += ap + al - i
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return iou, float(np.nanmean(iou))


def test_metrics_by_hand_and_against_mmseg():
    pairs = two_image_case()
    scores = [score_image(p, g, n) for p, g, n in pairs]
    assert [(s.tp, s.fp, s.fn, s.tn) for s in scores] == [(3, 2, 1, 10), (0, 0, 0, 16)]
    assert scores[0].iou == pytest.approx(0.5) and scores[1].iou == 1.0
    m = evaluate_masks(scores)
    assert m.artifact_iou == pytest.approx(3 / 6)
    assert m.background_iou == pytest.approx(26 / 29)
    assert m.miou == pytest.approx((3 / 6 + 26 / 29) / 2)
    assert m.mean_image_iou == pytest.approx((0.5 + 1.0) / 2)
    assert m.precision == pytest.approx(3 / 5) and m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    iou, miou = mmseg_miou(pairs)
    assert m.background_iou == pytest.approx(iou[0]) and m.artifact_iou == pytest.approx(iou[1])
    assert m.miou == pytest.approx(miou)
    j = m.to_json()
    assert j["num_images"] == 2 and [r["name"] for r in j["images"]] == ["a", "b"]
    assert j["images"][0] == {"name": "a", "iou": 0.5, "tp": 3, "fp": 2, "fn": 1, "tn": 10}


def test_metrics_match_mmseg_on_random_masks():
    rng = np.random.default_rng(1)
    pairs = [(rng.random((9, 13)) < 0.3, rng.random((9, 13)) < 0.2, str(i)) for i in range(4)]
    m = evaluate_masks([score_image(p, g, n) for p, g, n in pairs])
    iou, miou = mmseg_miou(pairs)
    assert (m.background_iou, m.artifact_iou) == pytest.approx(tuple(iou))
    assert m.miou == pytest.approx(miou)


def test_metrics_with_no_artifact_anywhere_ignore_the_absent_class():
    pairs = [(np.zeros((3, 3), bool), np.zeros((3, 3), bool), "x")]
    m = evaluate_masks([score_image(p, g, n) for p, g, n in pairs])
    assert np.isnan(m.artifact_iou) and m.background_iou == 1.0 and m.miou == 1.0
    assert m.mean_image_iou == 1.0 and (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    _, miou = mmseg_miou(pairs)
    assert m.miou == miou


def test_metrics_reject_empty_and_mismatched():
    with pytest.raises(ValueError, match="No images"):
        evaluate_masks([])
    with pytest.raises(ValueError, match="cat.png") as err:
        score_image(np.zeros((4, 5), bool), np.zeros((5, 4), bool), "cat.png")
    assert "\n" not in str(err.value)
    assert isinstance(ImageScore("x", 0, 0, 0, 4).iou, float)


# ------------------------------------------------------------------ trajectory
def ddim_scheduler():
    from diffusers import DDIMScheduler

    # the demo pipeline's scheduler config (engines.models.build_demo_pipeline)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


@pytest.mark.parametrize("steps", [5, 10])
def test_trajectory_recorder_recovers_ddim_x0_exactly(steps):
    from engines.generation.generate import _TrajectoryRecorder

    scheduler = ddim_scheduler()
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    recorder = _TrajectoryRecorder(scheduler)
    predicted = []
    for k, t in enumerate(scheduler.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=gen)  # a fake, fixed noise prediction per step (no UNet)
        out = scheduler.step(eps, t, latents)
        predicted.append(out.pred_original_sample.numpy())
        latents = out.prev_sample
        recorder.add(k, latents)
    # step 0's x0 needs the initial latents, which the recorder never sees; steps 1.. are recovered
    n = min(steps - 1, _TrajectoryRecorder.KEEP)
    assert len(recorder.x0) == n
    for j, x0 in enumerate(recorder.x0):
        np.testing.assert_allclose(x0, predicted[steps - n + j], atol=1e-4, rtol=1e-4)


def test_trajectory_heatmap_values():
    a = np.zeros((4, 2, 2), np.float32)
    b = a.copy()
    b[:, 0, 0] = 1.0          # only the top-left latent pixel changes
    m = trajectory_heatmap([a, b], 4, 4)
    assert m.shape == (4, 4) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    assert m[0, 0] == pytest.approx(1.0) and m[3, 3] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2"):
        trajectory_heatmap([a], 4, 4)


def test_generate_with_trajectory_keeps_pixels_and_gives_maps(trajectory_generation):
    plain, traced = trajectory_generation
    assert traced.params.record_trajectory and not plain.params.record_trajectory
    assert len(traced.images) == 2 and (traced.width, traced.height) == (64, 64)
    for p, t in zip(plain.images, traced.images):
        assert np.array_equal(p.rgb, t.rgb) and p.trajectory is None
        m = t.trajectory
        assert m is not None and m.shape == (64, 64) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0 and m.std() > 0.0
    assert not np.array_equal(traced.images[0].trajectory, traced.images[1].trajectory)


@pytest.mark.parametrize("h, w, size, expected", [(3000, 1, 256, 4000), (10000, 10000, 512, 676), (40, 70, 256, 2),
                                                  (600, 800, 256, 12), (256, 256, 256, 1)])
def test_sliding_window_count_matches_the_tiling(h, w, size, expected):
    import math

    from engines.detection.detect import _window_starts, sliding_window_count

    assert sliding_window_count(h, w, size) == expected
    scale = max(1.0, size / min(h, w))
    stride = int(size * 0.75)
    assert expected == len(_window_starts(math.ceil(h * scale), size, stride)) * \
        len(_window_starts(math.ceil(w * scale), size, stride))


def test_a_thin_image_in_sliding_mode_is_refused_before_tiling(detector, monkeypatch):
    """A 3000x1 image would become 256x768000 (4000 windows, ~3 GB): refused from its size alone."""
    import engines.detection.detect as detect

    monkeypatch.setattr(detect, "_resize_rgb_hw", lambda *a: pytest.fail("resized before the check"))
    with pytest.raises(ValueError, match=r"3000x1\) would need 4000 windows"):
        detector.predict([np.zeros((1, 3000, 3), np.uint8)], mode="sliding")
    monkeypatch.undo()
    assert detector.predict([np.zeros((1, 3000, 3), np.uint8)])[0].scores.shape == (1, 3000)  # resize mode is fine
