"""engines.training.detector: a tiny UperNet learns an obvious synthetic artifact, resumes exactly,
cancels into a loadable checkpoint, and samples small artifacts more often.

The task: 48x48 blocky random-texture images; the artifact is a magenta disc (radius 4-9 px) pasted at
a random place, its mask the label; 1 in 8 training images has no artifact. Validation images have
other seeds and native sizes 40-63 px (evaluated at native size). The test config raises the learning
rate to 2e-3 so the toy model learns in ~200 steps; the engine's default stays 6e-5.
Runs use one torch thread (the cores are shared; two threads under contention are 10x slower).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engines.detection.detect import ArtifactDetector, evaluate_masks, score_image
from engines.detection.detectors import load_detector
from engines.training.detector import (BalancedSampler, TrainConfig, TrainSample, build_model, evaluate_detector,
                                    train_detector)

MAGENTA = (235, 40, 220)


pytestmark = pytest.mark.usefixtures("one_thread")


def texture(rng, size: int) -> np.ndarray:
    blocks = rng.integers(40, 200, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    img = np.kron(blocks, np.ones((8, 8, 1)))[:size, :size] + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def disc_sample(rng, size: int, name: str, source: str = "synthetic", empty: bool = False,
                radius: tuple[float, float] = (4, 9)) -> TrainSample:
    img = texture(rng, size)
    mask = np.zeros((size, size), bool)
    if not empty:
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r, size - r, 2)
        yy, xx = np.mgrid[:size, :size]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[mask] = MAGENTA
    return TrainSample(img, mask, source, name)


@pytest.fixture(scope="module")
def task():
    rng = np.random.default_rng(0)
    train = [disc_sample(rng, 48, f"t{i}", "human" if i % 3 == 0 else "synthetic", empty=i % 8 == 7) for i in range(32)]
    val = []
    for i in range(8):
        r = np.random.default_rng(100 + i)
        val.append(disc_sample(r, int(r.integers(40, 64)), f"v{i}", "human"))
    return train, val


def tiny_config(**kw) -> TrainConfig:
    base = dict(arch="tiny", steps=200, batch_size=4, crop=48, lr=2e-3, eval_every=50, scale_range=(0.75, 1.25),
                seed=0, source_weights={"human": 1.0, "synthetic": 1.0})
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    train, val = task
    out = tmp_path_factory.mktemp("trained")
    rows, ticks = [], []
    result = train_detector(tiny_config(), train, val, out, log=rows.append, progress=lambda s, n: ticks.append((s, n)))
    return result, out, rows, ticks


# ------------------------------------------------------------------ learning

@pytest.mark.slow
def test_trained_detector_beats_the_untrained_one_on_held_out_images(task, trained):
    train, val = task
    result, out, rows, _ = trained
    model, spec = build_model(tiny_config())  # the same seed: the run's step-0 model
    untrained = evaluate_detector(model, spec, val)
    best_row = max((r for r in rows if "miou" in r), key=lambda r: r["miou"])
    print(f"\nheld-out artifact IoU: untrained {untrained.artifact_iou:.3f} (mIoU {untrained.miou:.3f}); "
          f"trained best {best_row['artifact_iou']:.3f} (mIoU {best_row['miou']:.3f}, step {best_row['step']})")
    assert untrained.artifact_iou < 0.2
    assert best_row["artifact_iou"] >= 0.6
    assert best_row["artifact_iou"] >= untrained.artifact_iou + 0.4
    assert result.best_miou == pytest.approx(best_row["miou"]) and result.best_step == best_row["step"]
    assert result.steps_done == 200 and not result.stopped

    # `best` loads through the studio's path and scores the same at native size
    detector = ArtifactDetector(load_detector(str(result.best_dir), data_dir=out))
    assert detector.spec.input_size == 48 and detector.spec.trained
    maps = detector.predict([s.image for s in val])
    assert [m.scores.shape for m in maps] == [s.mask.shape for s in val]
    again = evaluate_masks([score_image(m.scores >= 0.5, s.mask) for m, s in zip(maps, val)])
    assert again.miou == pytest.approx(result.best_miou, abs=1e-9)


def test_provenance_metrics_rows_and_progress(task, trained):
    train, val = task
    result, out, rows, ticks = trained
    meta = json.loads((result.best_dir / "detector.json").read_text())
    prov = meta["provenance"]
    assert prov["source_weights"] == {"human": 1.0, "synthetic": 1.0}
    assert prov["source_shares"] == pytest.approx({"human": 0.5, "synthetic": 0.5})
    assert prov["source_counts"] == {"human": 11, "synthetic": 21}
    assert prov["config"]["lr"] == 2e-3 and prov["config"]["steps"] == 200 and prov["config"]["batch_size"] == 4
    assert prov["steps"] == result.best_step and prov["best_miou"] == pytest.approx(result.best_miou)
    assert prov["train_images"] == 32 and prov["val_images"] == 8
    # default class weight: sqrt of the inverse artifact frequency, capped at 5
    freq = prov["artifact_frequency"]
    assert 0.02 < freq < 0.2
    assert prov["class_weights"] == pytest.approx([1.0, min(5.0, math.sqrt((1 - freq) / freq))])
    last = json.loads((result.last_dir / "detector.json").read_text())["provenance"]
    assert last["steps"] == 200 and last["best_miou"] == pytest.approx(result.best_miou)
    assert meta["spec"]["family"] == "upernet-tiny" and meta["spec"]["activation"] == "softmax"

    file_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert file_rows == rows == list(result.history)
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert all({"step", "loss", "lr", "seconds"} <= set(r) and r["loss"] > 0 for r in rows)
    evals = [r for r in rows if "miou" in r]
    assert [r["step"] for r in evals] == [50, 100, 150, 200]
    assert all(0.0 <= r["artifact_iou"] <= 1.0 and r["miou"] >= r["artifact_iou"] for r in evals)
    assert rows[0]["lr"] == pytest.approx(2e-3) and rows[-1]["lr"] == pytest.approx(2e-3 / 200)  # poly decay
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert ticks[0] == (1, 200) and ticks[-1] == (200, 200) and len(ticks) == 200


def test_fine_tune_from_a_saved_detector_folder(task, trained, tmp_path):
    train, val = task
    result, *_ = trained
    cfg = tiny_config(arch=str(result.best_dir), steps=4, eval_every=4, lr=1e-5)
    tuned = train_detector(cfg, train, val, tmp_path)
    assert tuned.steps_done == 4
    assert tuned.best_miou == pytest.approx(result.best_miou, abs=0.05)  # starts from the trained weights
    assert json.loads((tuned.last_dir / "detector.json").read_text())["provenance"]["config"]["arch"] == str(result.best_dir)


# ------------------------------------------------------------------ resume and cancel

def stop_after(n: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > n
    return should_stop


@pytest.mark.slow
def test_resume_after_stop_equals_an_uninterrupted_run(task, tmp_path):
    train, val = task
    cfg = tiny_config(steps=60, eval_every=20, log_every=7, seed=3)
    rng_before = torch.get_rng_state()
    full = train_detector(cfg, train, val, tmp_path / "full")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is untouched

    first = train_detector(cfg, train, val, tmp_path / "split", should_stop=stop_after(30))
    assert first.stopped and first.steps_done == 30
    state = json.loads((tmp_path / "split/last/trainer_state.json").read_text())
    assert state["step"] == 30 and state["loss_count"] == 30 - 28  # a partial log window is carried over
    second = train_detector(cfg, train, val, tmp_path / "split")
    assert not second.stopped and second.steps_done == 60

    a = load_file(str(full.last_dir / "model.safetensors"))
    b = load_file(str(second.last_dir / "model.safetensors"))
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"\nresume vs uninterrupted: max |param difference| = {diff:.3g} over {len(a)} tensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact, including BN buffers
    oa = load_file(str(full.last_dir / "optimizer.safetensors"))
    ob = load_file(str(second.last_dir / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(second.history) == strip(full.history)
    assert [r["step"] for r in full.history] == [7, 14, 20, 21, 28, 35, 40, 42, 49, 56, 60]
    assert second.best_miou == full.best_miou and second.best_step == full.best_step

    # already complete: nothing to do; a changed config is refused; resume=False starts over
    again = train_detector(cfg, train, val, tmp_path / "split")
    assert again.steps_done == 60 and again.history == second.history
    with pytest.raises(ValueError, match="different config \\(lr changed\\)"):
        train_detector(tiny_config(steps=60, eval_every=20, log_every=7, seed=3, lr=1e-3), train, val, tmp_path / "split")
    with pytest.raises(ValueError, match="different images or masks"):
        train_detector(cfg, train[:-1], val, tmp_path / "split")
    fresh = train_detector(tiny_config(steps=2, eval_every=2, seed=3), train, val, tmp_path / "split", resume=False)
    assert fresh.steps_done == 2 and [r["step"] for r in fresh.history] == [1, 2]


def test_cancel_leaves_a_loadable_checkpoint(task, tmp_path):
    train, val = task
    result = train_detector(tiny_config(steps=50, eval_every=100), train, val, tmp_path, should_stop=stop_after(5))
    assert result.stopped and result.steps_done == 5 and result.best_dir is None and math.isnan(result.best_miou)
    loaded = load_detector(str(tmp_path / "last"), data_dir=tmp_path)
    assert loaded.extra.trained and loaded.extra.input_size == 48
    prov = json.loads((tmp_path / "last/detector.json").read_text())["provenance"]
    assert prov["steps"] == 5 and prov["miou"] is None
    maps = ArtifactDetector(loaded).predict([val[0].image])
    assert maps[0].scores.shape == val[0].mask.shape and np.isfinite(maps[0].scores).all()

    at_once = train_detector(tiny_config(steps=50), train, val, tmp_path / "zero", should_stop=lambda: True)
    assert at_once.stopped and at_once.steps_done == 0
    assert not load_detector(str(tmp_path / "zero/last"), data_dir=tmp_path).extra.trained


# ------------------------------------------------------------------ sampling

def test_balanced_sampler_draws_small_artifacts_more_often_and_follows_the_mix():
    rng = np.random.default_rng(1)
    big = [disc_sample(rng, 64, f"big{i}", "synthetic", radius=(18, 20)) for i in range(6)]
    small = [disc_sample(rng, 64, f"small{i}", "synthetic", radius=(2, 2.5)) for i in range(2)]
    human = [disc_sample(rng, 64, f"h{i}", "human", radius=(5, 8)) for i in range(4)]
    train = big + small + human
    cfg = tiny_config(crop=32, input_size=64, batch_size=4, source_weights={"human": 1.0, "synthetic": 3.0},
                      scale_range=(1.0, 1.0), p_pos=1.0)
    sampler = BalancedSampler(train, cfg)
    draws = np.concatenate([sampler.indices(step) for step in range(1000)])
    counts = np.bincount(draws, minlength=len(train))
    uniform_small = len(draws) * 0.75 / len(big + small)  # what a per-image uniform draw inside the synthetic share gives
    per_small, per_big = counts[6:8].mean(), counts[:6].mean()
    print(f"\ndraws per image: small artifact {per_small:.0f}, large artifact {per_big:.0f}, uniform {uniform_small:.0f}")
    assert per_small > 2 * uniform_small and per_small > 3.5 * per_big
    # b = (median area / area) ** 0.5 is ~8 for the small discs, clipped to balance_clip = 4
    assert sampler.probabilities[6] / sampler.probabilities[:6].mean() == pytest.approx(4.0, rel=0.05)
    assert counts[:8].sum() / len(draws) == pytest.approx(0.75, abs=0.02)  # the source mix 3:1
    assert sampler.probabilities[6:8] == pytest.approx([sampler.probabilities[6]] * 2, rel=0.5)
    uniform = BalancedSampler(train, tiny_config(crop=32, input_size=64, balance_alpha=0.0, source_weights=None))
    assert uniform.probabilities == pytest.approx(np.full(len(train), 1 / len(train)))
    # p_pos = 1: every crop of an image with an artifact contains artifact pixels, even for 5-px discs
    for step in range(30):
        images, labels, jitter = sampler.batch(step)
        assert images.shape == (4, 32, 32, 3) and labels.shape == (4, 32, 32) and jitter.shape == (4, 3)
        assert all((lab == 1).any() for lab in labels)
    np.testing.assert_array_equal(sampler.batch(7)[1], sampler.batch(7)[1])  # a pure function of (seed, step)
    # a fixed share of artifact-free images
    empties = [disc_sample(rng, 64, f"e{i}", "synthetic", empty=True) for i in range(10)]
    neg = BalancedSampler(big + empties, tiny_config(crop=32, source_weights=None, negative_fraction=0.2))
    assert neg.probabilities[len(big):].sum() == pytest.approx(0.2)


def test_loader_workers_and_file_samples_give_the_same_batches_and_training(task, tmp_path):
    """Streaming: a DataLoader with worker processes over FileSamples (PNG files) yields exactly the
    in-memory sampler's batches, and a short training run on the files equals one on the arrays."""
    from PIL import Image

    from engines.training.detector import FileSample, make_loader, to_tensors

    train, val = task
    files = []
    for s in train:
        Image.fromarray(s.image).save(tmp_path / f"{s.name}.png")
        Image.fromarray(s.mask.astype(np.uint8) * 255).save(tmp_path / f"{s.name}-mask.png")
        files.append(FileSample(str(tmp_path / f"{s.name}.png"), (str(tmp_path / f"{s.name}-mask.png"),), s.source,
                                s.name))
    cfg = tiny_config(color_jitter=0.4)
    memory, streamed = BalancedSampler(train, cfg), BalancedSampler(files, cfg)
    np.testing.assert_array_equal(memory.probabilities, streamed.probabilities)
    for step, (images, labels, jitter) in enumerate(make_loader(streamed, 0, 3, num_workers=2)):
        ref = memory.batch(step)
        assert images.dtype == torch.uint8 and images.shape == (4, 48, 48, 3)
        np.testing.assert_array_equal(images.numpy(), ref[0])
        np.testing.assert_array_equal(labels.numpy(), ref[1])
        np.testing.assert_array_equal(jitter.numpy(), ref[2])
    resumed = next(iter(make_loader(streamed, 2, 3, num_workers=0)))  # a loader started at step 2 (resume)
    np.testing.assert_array_equal(resumed[0].numpy(), memory.batch(2)[0])
    _, spec = build_model(cfg)
    x, y = to_tensors(*memory.batch(2), spec)
    assert x.shape == (4, 3, 48, 48) and y.dtype == torch.int64

    short = tiny_config(steps=6, eval_every=3, seed=2)
    a = train_detector(short, train, val, tmp_path / "mem", num_workers=0)
    b = train_detector(short, files, val, tmp_path / "files", num_workers=1)
    wa, wb = (load_file(str(r.last_dir / "model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def test_one_step_is_a_plain_adamw_step_with_the_configured_lr_and_loss(task, tmp_path):
    """The trainer's update equals a bare PyTorch step: weighted cross-entropy (ignore 255), AdamW with
    the config's lr, betas and weight decay (none on 1-D parameters). Pins the lr the trainer uses."""
    import torch.nn.functional as F

    train, val = task
    cfg = tiny_config(steps=1, eval_every=1, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.05, artifact_weight=2.5,
                      color_jitter=0.0)
    result = train_detector(cfg, train, val, tmp_path, num_workers=0)
    model, spec = build_model(cfg)
    sampler = BalancedSampler(train, cfg)
    from engines.training.detector import to_tensors

    x, y = to_tensors(*sampler.batch(0), spec)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.8, 0.95))
    loss = F.cross_entropy(model(pixel_values=x).logits, y, weight=torch.tensor([1.0, 2.5]), ignore_index=255)
    opt.zero_grad()
    loss.backward()
    opt.step()
    saved = load_file(str(result.last_dir / "model.safetensors"))
    ours = dict(model.state_dict())
    diff = max(float((saved[k] - ours[k]).abs().max()) for k in saved if saved[k].is_floating_point())
    assert diff < 1e-6, diff
    assert result.history[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    moved = max(float((saved[k] - v).abs().max()) for k, v in build_model(cfg)[0].state_dict().items()
                if v.is_floating_point() and k.endswith("weight"))
    assert moved == pytest.approx(3e-3, rel=0.05)  # Adam's first step moves by ~lr


def test_best_checkpoint_is_chosen_by_val_artifact_iou(task, trained):
    from engines.detection.detect import Metrics
    from engines.training.detector import selection_score

    result, out, rows, _ = trained
    evals = [r for r in rows if "artifact_iou" in r]
    best = max(evals, key=lambda r: r["artifact_iou"])
    assert result.best_step == best["step"] and result.best_artifact_iou == pytest.approx(best["artifact_iou"])
    assert result.best_miou == pytest.approx(best["miou"])
    prov = json.loads((result.best_dir / "detector.json").read_text())["provenance"]
    assert prov["selected_on"] == "val artifact_iou" and prov["headline_metric"] == "artifact_iou"
    assert prov["val"]["artifact_iou"] == pytest.approx(best["artifact_iou"])
    # where the two metrics disagree, the artifact IoU decides (the 2-class mIoU rewards background)
    finds_more = Metrics(artifact_iou=0.30, background_iou=0.50, miou=0.40, mean_image_iou=0, precision=0, recall=0,
                         f1=0, images=())
    finds_nothing = Metrics(artifact_iou=0.0, background_iou=0.952, miou=0.476, mean_image_iou=0, precision=0,
                            recall=0, f1=0, images=())
    assert selection_score(finds_more) > selection_score(finds_nothing)
    assert selection_score(Metrics(float("nan"), 1.0, 1.0, 1.0, 0, 0, 0, ())) == float("-inf")


@pytest.mark.slow
def test_test_set_is_used_once_on_the_chosen_checkpoint(task, tmp_path):
    """val chooses, test reports: the recorded val numbers are the val set's, the test numbers the test
    set's, measured once with the best checkpoint, and nothing about test enters the metric rows."""
    train, val = task
    rng = np.random.default_rng(7)
    test = [disc_sample(rng, int(rng.integers(40, 64)), f"x{i}", "human", radius=(6, 12)) for i in range(5)]
    result = train_detector(tiny_config(steps=60, eval_every=20), train, val, tmp_path, test=test, num_workers=0)
    loaded = load_detector(str(result.best_dir), data_dir=tmp_path)
    on_val = evaluate_detector(loaded.model, loaded.extra, val)
    on_test = evaluate_detector(loaded.model, loaded.extra, test)
    assert on_val.artifact_iou == pytest.approx(result.best_artifact_iou, abs=1e-9)
    assert result.test_metrics["artifact_iou"] == pytest.approx(on_test.artifact_iou, abs=1e-9)
    assert result.test_metrics["miou"] == pytest.approx(on_test.miou, abs=1e-9)
    assert result.test_metrics["num_images"] == 5 and result.test_metrics["checkpoint"] == "best"
    assert on_val.artifact_iou != pytest.approx(on_test.artifact_iou, abs=1e-6)  # the two sets differ
    assert all(not any(k.startswith("test") for k in row) for row in result.history)
    saved = json.loads((tmp_path / "test_metrics.json").read_text())
    assert saved["artifact_iou"] == pytest.approx(on_test.artifact_iou)
    prov = json.loads((result.best_dir / "detector.json").read_text())["provenance"]
    assert prov["test"]["artifact_iou"] == pytest.approx(on_test.artifact_iou) and prov["test_images"] == 5
    stopped = train_detector(tiny_config(steps=60, eval_every=20), train, val, tmp_path / "s", test=test,
                             should_stop=stop_after(3), num_workers=0)
    assert stopped.stopped and stopped.test_metrics is None  # a cancelled run has no final report


def test_colour_jitter_is_brightness_then_contrast_then_saturation_then_clamp():
    from engines.detection.detectors import DetectorSpec
    from engines.training.detector import to_tensors

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    labels = np.zeros((2, 9, 7), np.uint8)
    labels[1, :2] = 255
    jitter = np.array([[1.3, 0.7, 1.2], [0.8, 1.25, 0.6]], np.float32)
    spec = DetectorSpec(family="x")
    x, y = to_tensors(images, labels, jitter, spec)
    ref = images.astype(np.float64) / 255 * jitter[:, 0, None, None, None]
    m = ref.mean(axis=(1, 2, 3), keepdims=True)
    ref = (ref - m) * jitter[:, 1, None, None, None] + m
    gray = ref @ np.array([0.299, 0.587, 0.114])
    ref = (ref - gray[..., None]) * jitter[:, 2, None, None, None] + gray[..., None]
    ref = (np.clip(ref, 0, 1) - np.array(spec.mean)) / np.array(spec.std)
    ref[1, :2] = 0.0  # padding
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), ref, atol=2e-5)


def test_padding_is_ignored_when_the_view_is_smaller_than_the_crop():
    rng = np.random.default_rng(2)
    sampler = BalancedSampler([disc_sample(rng, 64, "a"), disc_sample(rng, 80, "b")],
                              tiny_config(crop=64, input_size=64, scale_range=(0.5, 0.5), source_weights=None))
    images, labels, _ = sampler.batch(0)
    assert [(lab != 255).sum() for lab in labels] == [32 * 32] * 4


# ------------------------------------------------------------------ validation

def test_batch_size_one_is_refused_naming_batchnorm(task, tmp_path):
    train, val = task
    with pytest.raises(ValueError, match="BatchNorm"):
        train_detector(tiny_config(batch_size=1), train, val, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("change,message", [
    (dict(arch="resnet"), "Unknown arch 'resnet'"),
    (dict(init="some/hub-id"), "tiny arch has no pretrained weights"),
    (dict(crop=64, input_size=48), "Input size must be between the crop"),
    (dict(steps=0), "Steps must be at least 1"),
    (dict(source_weights={"human": 1.0, "web": 1.0}), "Unknown source 'web'"),
    (dict(source_weights={"human": 0.0}), "At least one source weight must be positive"),
    (dict(scale_range=(0.0, 1.0)), "Scale range"),
    (dict(p_pos=1.5), "p_pos"),
    (dict(lr_schedule="cosine"), "Unknown lr_schedule"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change).validate()


def test_bad_samples_are_refused_in_one_sentence(task, tmp_path):
    train, val = task
    bad_mask = TrainSample(train[0].image, train[0].mask[:-1], "human", "cut")
    cases = [
        ([bad_mask] + train, val, "The mask of training image 'cut' must be bool 48 x 48"),
        ([TrainSample(train[0].image, train[0].mask, "web", "w")], val, "use one of human, synthetic, pseudo"),
        (train, [], "validation set is empty"),
        ([TrainSample(train[0].image.astype(np.float32), train[0].mask, "human", "f")], val, "must be RGB uint8"),
    ]
    for tr, va, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            train_detector(tiny_config(), tr, va, tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no weight for source 'synthetic'"):
        train_detector(tiny_config(source_weights={"human": 1.0}), train, val, tmp_path)
    empty = [TrainSample(s.image, np.zeros_like(s.mask), s.source, s.name) for s in train]
    with pytest.raises(ValueError, match="no artifact pixels"):
        train_detector(tiny_config(), empty, val, tmp_path)
