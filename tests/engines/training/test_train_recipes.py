"""engines.training.recipes: the paper's recipe as published, the balanced one as before, and a
from-scratch learning rate that learns (the measured fact behind SCRATCH_LR, re-checked small)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engines.training.detector import BalancedSampler, TrainConfig, TrainSample, train_detector
from engines.training.recipes import PAPER_LR, SCRATCH_LR, describe, resolve_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


def square_sample(seed: int, name: str) -> TrainSample:
    """64-79 px blocky texture with one obvious bright square (the artifact), as in bench/lr_sweep.py."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(64, 80))
    blocks = rng.integers(30, 200, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    img = np.kron(blocks, np.ones((8, 8, 1)))[:size, :size] + rng.normal(0, 10, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    side = int(rng.integers(12, 28))
    y, x = (int(v) for v in rng.integers(0, size - side, 2))
    mask = np.zeros((size, size), bool)
    mask[y:y + side, x:x + side] = True
    img[mask] = rng.integers(210, 256, 3)
    return TrainSample(img, mask, "human", name)


def test_paper_recipe_is_the_published_one():
    # Menn, Liang, Marculescu: UperNet, AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, plain
    # cross-entropy; detector 10k iterations, region selector 1k at batch 8 (mmsegmentation schedule).
    cfg = resolve_recipe("paper", arch="upernet-convnext-tiny", init="some/ade20k-upernet")
    assert (cfg.lr, tuple(cfg.betas), cfg.weight_decay, cfg.lr_schedule) == (6e-5, (0.9, 0.999), 0.01, "poly")
    assert (cfg.steps, cfg.batch_size, cfg.crop) == (10_000, 8, 512)
    assert cfg.artifact_weight == 1.0 and cfg.sampling == "uniform" and cfg.p_pos == 0.0
    assert cfg.color_jitter == 0.0 and cfg.source_weights is None and cfg.aux_weight == 0.4
    assert cfg.hflip and tuple(cfg.scale_range) == (0.5, 2.0) and cfg.recipe == "paper"
    selector = resolve_recipe("paper", arch="upernet-convnext-tiny", init="x", region_selector=True)
    assert (selector.steps, selector.batch_size, selector.lr) == (1_000, 8, 6e-5)
    balanced = resolve_recipe("balanced", arch="upernet-swin-tiny", init="x")
    assert balanced.sampling == "balanced" and balanced.artifact_weight is None and balanced.p_pos == 0.5
    assert balanced.color_jitter == 0.2 and balanced.lr == PAPER_LR and balanced.aux_weight == 0.0
    assert TrainConfig().lr == PAPER_LR  # the engine's own default is the fine-tuning rate


def test_from_scratch_models_get_the_measured_rate_and_overrides_win(tmp_path):
    assert resolve_recipe("paper", arch="tiny").lr == SCRATCH_LR["tiny"] == 3e-3
    assert resolve_recipe("paper", arch="upernet-convnext-tiny").lr == SCRATCH_LR["upernet-convnext-tiny"]
    assert resolve_recipe("balanced", arch="upernet-swin-tiny", init="x").lr == PAPER_LR
    assert resolve_recipe("paper", arch="tiny", lr=1e-4, steps=None).lr == 1e-4  # None keeps the recipe's value
    assert resolve_recipe("paper", arch="tiny", steps=None).steps == 10_000
    with pytest.raises(ValueError, match="Unknown recipe 'fast'"):
        resolve_recipe("fast")
    with pytest.raises(ValueError, match="Unknown training option 'learning_rate'"):
        resolve_recipe("paper", learning_rate=1.0)
    with pytest.raises(ValueError, match="Colour jitter"):
        resolve_recipe("paper", arch="tiny", color_jitter=2.0)
    assert "lr" in describe(resolve_recipe("paper", arch="tiny")).split()[:40]


def test_paper_recipe_trains_with_plain_cross_entropy_uniform_sampling_and_no_jitter(tmp_path):
    train = [square_sample(i, f"t{i}") for i in range(6)]
    train[5] = TrainSample(train[5].image, np.zeros_like(train[5].mask), "human", "clean")
    cfg = resolve_recipe("paper", arch="tiny", steps=2, batch_size=4, crop=48, eval_every=2)
    sampler = BalancedSampler(train, cfg)
    np.testing.assert_allclose(sampler.probabilities, np.full(6, 1 / 6))  # no class balancing
    assert all(np.all(sampler.batch(step)[2] == 1.0) for step in range(5))  # no colour jitter
    result = train_detector(cfg, train, [square_sample(99, "v")], tmp_path, num_workers=0)
    prov = json.loads((result.last_dir / "detector.json").read_text())["provenance"]
    assert prov["class_weights"] == [1.0, 1.0] and prov["recipe"] == "paper"
    assert prov["config"]["lr"] == SCRATCH_LR["tiny"] and prov["config"]["sampling"] == "uniform"
    balanced = BalancedSampler(train, resolve_recipe("balanced", arch="tiny", crop=48))
    assert not np.allclose(balanced.probabilities, 1 / 6)


@pytest.mark.slow
def test_the_from_scratch_rate_learns_where_the_paper_rate_does_not(tmp_path):
    """The measurement behind SCRATCH_LR, small: 24 images with one obvious square, tiny arch from random
    init, 80 steps at crop 64. 6e-5 (the fine-tuning rate) stays near all-background; SCRATCH_LR learns."""
    train = [square_sample(i, f"t{i}") for i in range(24)]
    val = [square_sample(1000 + i, f"v{i}") for i in range(8)]
    scores = {}
    for name, lr in (("paper", PAPER_LR), ("scratch", None)):
        cfg = resolve_recipe("balanced", arch="tiny", lr=lr, steps=80, batch_size=4, crop=64, eval_every=80)
        scores[name] = train_detector(cfg, train, val, tmp_path / name, num_workers=0).history[-1]["artifact_iou"]
    print(f"\nheld-out artifact IoU after 80 steps: lr 6e-5 {scores['paper']:.3f}, "
          f"lr {SCRATCH_LR['tiny']:g} {scores['scratch']:.3f}")
    assert scores["paper"] < 0.35
    assert scores["scratch"] > 0.6 and scores["scratch"] > scores["paper"] + 0.3
