"""engines.generation.generate on the tiny demo pipeline: seeds, shapes, progress, cancel, validation, rounding."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines.generation.generate import MAX_SEED, Cancelled, GenerateParams, GenerationResult, to_uint8


def params(**overrides) -> GenerateParams:
    base = dict(prompt="a cat", seed=7, num_inference_steps=2, width=64, height=64)
    return GenerateParams(**{**base, **overrides})


class UnetCalls:
    """Counts forward calls of the pipeline's UNet through a real forward hook."""

    def __init__(self, unet):
        self.count = 0
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.count += 1

    def remove(self):
        self._handle.remove()


def test_same_params_and_seed_give_identical_pixels(text2image):
    first = text2image.generate(params())
    second = text2image.generate(params())
    a, b = first.images[0].rgb, second.images[0].rgb
    assert np.array_equal(a, b)
    assert a.std() > 5  # a real decoded image, not a constant fill


def test_different_seed_or_prompt_gives_different_pixels(text2image):
    base = text2image.generate(params()).images[0].rgb
    other_seed = text2image.generate(params(seed=8)).images[0].rgb
    other_prompt = text2image.generate(params(prompt="a dog")).images[0].rgb
    other_negative = text2image.generate(params(negative_prompt="blurry")).images[0].rgb
    for other in (other_seed, other_prompt, other_negative):
        assert not np.array_equal(base, other)
    assert np.abs(base.astype(int) - other_seed.astype(int)).mean() > 1


def test_output_shape_dtype_and_result_fields(text2image):
    result = text2image.generate(params(width=64, height=128))
    assert isinstance(result, GenerationResult)
    (image,) = result.images
    assert image.rgb.shape == (128, 64, 3) and image.rgb.dtype == np.uint8 and image.rgb.flags["C_CONTIGUOUS"]
    assert (result.width, result.height) == (64, 128)
    assert result.model_id == "demo" and result.is_demo is True and result.duration_s > 0
    assert result.params == params(width=64, height=128)
    assert (image.seed, image.index) == (7, 0)


def test_default_size_comes_from_the_pipeline(text2image):
    assert text2image.default_size == (128, 128)  # sample_size 16 * VAE factor 8: the demo was trained at 128 px


def test_num_images_uses_consecutive_seeds(text2image):
    result = text2image.generate(params(seed=11, num_images=2))
    assert [(im.seed, im.index) for im in result.images] == [(11, 0), (12, 1)]
    first, second = (im.rgb for im in result.images)
    assert first.shape == second.shape == (64, 64, 3)
    assert not np.array_equal(first, second)
    # each image can be regenerated alone from its own seed (batched float math may differ by one level)
    for image in result.images:
        alone = text2image.generate(params(seed=image.seed)).images[0].rgb
        diff = np.abs(alone.astype(int) - image.rgb.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.1


def test_progress_reports_every_step_in_order(text2image):
    calls = []
    text2image.generate(params(num_inference_steps=4), progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_stop_after_step_two_cancels(text2image):
    calls = []
    counter = UnetCalls(text2image.pipe.unet)
    try:
        with pytest.raises(Cancelled):
            text2image.generate(params(num_inference_steps=4), progress=lambda s, t: calls.append((s, t)),
                                should_stop=lambda: len(calls) >= 2)
    finally:
        counter.remove()
    assert calls == [(1, 4), (2, 4)]
    assert counter.count == 2  # one (classifier-free-guidance batched) UNet call per step, none after the stop


def test_stop_before_start_runs_no_unet_step(text2image):
    counter = UnetCalls(text2image.pipe.unet)
    calls = []
    try:
        with pytest.raises(Cancelled):
            text2image.generate(params(), progress=lambda s, t: calls.append(s), should_stop=lambda: True)
    finally:
        counter.remove()
    assert counter.count == 0 and calls == []


def test_cancel_leaves_the_pipeline_reusable(text2image):
    before = text2image.generate(params(seed=21)).images[0].rgb
    with pytest.raises(Cancelled):
        text2image.generate(params(seed=21, num_inference_steps=3), should_stop=lambda: True,
                            progress=lambda s, t: None)
    with pytest.raises(Cancelled):
        steps = []
        text2image.generate(params(seed=21, num_inference_steps=3), progress=lambda s, t: steps.append(s),
                            should_stop=lambda: bool(steps))
    after = text2image.generate(params(seed=21)).images[0].rgb
    assert np.array_equal(before, after)


@pytest.mark.parametrize("field,value,words", [
    ("width", 65, "multiple of 8"),
    ("width", 2056, "2048"),
    ("width", 56, "64"),
    ("height", 100, "multiple of 8"),
    ("num_inference_steps", 0, "Steps"),
    ("num_inference_steps", 501, "Steps"),
    ("seed", -1, "Seed"),
    ("seed", MAX_SEED + 1, "Seed"),
    ("num_images", 17, "count"),
    ("num_images", 0, "count"),
    ("guidance_scale", 100.0, "Guidance"),
    ("guidance_scale", -0.5, "Guidance"),
    ("guidance_scale", float("nan"), "Guidance"),
    ("prompt", None, "prompt"),
])
def test_validate_rejects_out_of_range_values(text2image, field, value, words):
    bad = dataclasses.replace(params(), **{field: value})
    with pytest.raises(ValueError) as exc:
        bad.validate()
    message = str(exc.value)
    assert words in message and "\n" not in message
    if field != "prompt":
        assert str(value) in message  # says what it got
    counter = UnetCalls(text2image.pipe.unet)
    try:
        with pytest.raises(ValueError):
            text2image.generate(bad)
    finally:
        counter.remove()
    assert counter.count == 0


@pytest.mark.parametrize("field,value", [("width", 2048), ("width", 64), ("seed", 0), ("seed", MAX_SEED),
                                         ("num_images", 16), ("guidance_scale", 0.0), ("guidance_scale", 50.0),
                                         ("num_inference_steps", 1), ("num_inference_steps", 500)])
def test_validate_accepts_the_bounds(field, value):
    dataclasses.replace(params(), **{field: value}).validate()


def test_params_are_frozen_and_serialisable():
    p = params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3  # type: ignore[misc]
    assert p.to_json() == {"prompt": "a cat", "negative_prompt": "", "seed": 7, "num_inference_steps": 2,
                           "guidance_scale": 7.5, "width": 64, "height": 64, "num_images": 1, "record_trajectory": False}


def test_to_uint8_rounds_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    levels = np.linspace(0.0, 1.0, 4097, dtype=np.float32)
    halves = ((np.arange(255) + 0.5) / 255).astype(np.float32)  # exactly between two uint8 levels
    rng = np.random.default_rng(0).random(3 * 64 * 64 * 3, dtype=np.float32)
    for flat in (levels, halves, rng):
        batch = np.resize(flat, (3, 64, 64, 3)).astype(np.float32)
        ours = to_uint8(batch)
        theirs = [np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(batch)]
        assert len(ours) == 3
        for a, b in zip(ours, theirs):
            assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
            assert np.array_equal(a, b)


def test_to_uint8_clips_out_of_range_values():
    out = to_uint8(np.array([[[[-0.2, 0.5, 1.3]]]], dtype=np.float32))
    assert out[0].tolist() == [[[0, 128, 255]]]
