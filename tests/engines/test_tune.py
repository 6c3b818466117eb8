"""engines.tune: detector-guided LoRA tuning lowers the demo detector's artifact score, trains only
the LoRA, leaves the caller's pipeline as it was, saves a LoRA that diffusers loads and that
reproduces the tuned output, cancels into a loadable LoRA, and `apply_lora` switches on and off.

The demo pipeline and the untrained config-built demo UperNet (tests/conftest.py): the "artifacts" are
whatever that detector happens to fire on, which is all the test needs. 64x64, 4 steps, K = 1,
no CFG, 30 steps at lr 3e-3 (the engine's default stays 1e-4); rank 4 with alpha 8 so that the
saved rank/alpha metadata matters when the LoRA is loaded again. One torch thread (shared cores).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.detect import ArtifactDetector
from engines.detectors import load_detector
from engines.generate import to_uint8
from engines.models import load_text2image
from engines.tune import TuneConfig, apply_lora, tune_lora

PROMPTS = ["a cat on a sofa", "a red house"]
CONFIG = TuneConfig(steps=30, rank=4, alpha=8, lr=3e-3, num_inference_steps=4, backprop_steps=1,
                    guidance_scale=1.0, width=64, height=64, eval_seeds=(0, 1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def detector(demo_data_dir, untrained_detector_dir):
    """The untrained config-built UperNet (tests/conftest.py): it fires on arbitrary images, which is all
    these mechanics tests need; the trained demo detector is tested in test_demo_models.py."""
    return ArtifactDetector(load_detector(str(untrained_detector_dir), data_dir=demo_data_dir))


def fresh_pipeline(data_dir):
    return load_text2image("demo", data_dir=data_dir)


def sample(pipe, prompt: str = PROMPTS[0], seed: int = 0, config: TuneConfig = CONFIG) -> np.ndarray:
    with torch.inference_mode():
        out = pipe(prompt=prompt, num_inference_steps=config.num_inference_steps,
                   guidance_scale=config.guidance_scale, width=config.width, height=config.height,
                   generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np")
    return to_uint8(out.images)[0]


@pytest.fixture(scope="module")
def tuned(demo_data_dir, detector, tmp_path_factory):
    """One tuning run, with what the tests need recorded around it."""
    loaded = fresh_pipeline(demo_data_dir)
    unet = loaded.model.unet
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    pixels_before = sample(loaded.model)
    grads: list[dict] = []

    def log(row):  # called after optimiser.step: the step's gradients are still on the parameters
        lora = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
        base = [n for n, p in unet.named_parameters() if "lora_" not in n and p.grad is not None]
        grads.append({"lora_with_grad": sum(g is not None and bool(g.abs().sum() > 0) for g in lora),
                      "lora": len(lora), "base_with_grad": base, "row": row})

    out = tmp_path_factory.mktemp("tune")
    result = tune_lora(CONFIG, loaded, detector, PROMPTS, out, log=log)
    return {"loaded": loaded, "result": result, "base_state": base_state, "flags": flags,
            "pixels_before": pixels_before, "grads": grads, "out": out}


def test_tuning_lowers_the_detectors_artifact_score(tuned):
    result = tuned["result"]
    before, after = result.before, result.after
    print(f"\nartifact score before {before['mean_score']:.4f} after {after['mean_score']:.4f}; "
          f"area before {before['artifact_area']:.4f} after {after['artifact_area']:.4f}; "
          f"outside change {result.outside_change:.2f}")
    assert before["images"] == after["images"] == len(PROMPTS) * len(CONFIG.eval_seeds)
    assert after["mean_score"] < before["mean_score"] - 0.005
    assert after["artifact_area"] < before["artifact_area"]
    assert not result.stopped and result.steps_done == CONFIG.steps == len(result.history)
    assert [row["step"] for row in result.history] == list(range(1, CONFIG.steps + 1))
    assert all(set(row) == {"step", "loss", "lr", "artifact_score"} for row in result.history)
    assert all(row["lr"] == CONFIG.lr and np.isfinite(row["loss"]) for row in result.history)
    assert 0.0 <= result.outside_change < 255.0
    saved = (tuned["out"] / "tune.json").read_text()
    assert '"steps_done": 30' in saved and '"mean_score"' in saved
    assert result.to_json()["lora_dir"] == str(tuned["out"] / "lora")


def test_only_lora_parameters_train_and_the_callers_pipeline_is_restored(tuned):
    grads = tuned["grads"]
    assert len(grads) == CONFIG.steps
    assert all(g["lora"] > 0 and g["base_with_grad"] == [] for g in grads)
    assert all(g["lora_with_grad"] > 0 for g in grads)
    pipe = tuned["loaded"].model
    state = pipe.unet.state_dict()
    assert set(state) == set(tuned["base_state"])  # no LoRA layers left behind
    assert all(torch.equal(state[k], v) for k, v in tuned["base_state"].items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == tuned["flags"]
    assert not getattr(pipe.unet, "peft_config", None)
    np.testing.assert_array_equal(sample(pipe), tuned["pixels_before"])


def test_saved_lora_loads_into_a_fresh_pipeline_and_reproduces_the_tuned_output(tuned, demo_data_dir):
    result = tuned["result"]
    lora_dir = Path(result.lora_dir)
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = fresh_pipeline(demo_data_dir).model
    plain = sample(pipe, PROMPTS[1], CONFIG.eval_seeds[1])
    pipe.load_lora_weights(str(lora_dir))
    with_lora = sample(pipe, PROMPTS[1], CONFIG.eval_seeds[1])
    assert np.abs(with_lora.astype(int) - plain).max() > 5
    # after images are prompt-major: prompt 1, eval seed index 1
    reference = result.after_images[1 * len(CONFIG.eval_seeds) + 1]
    assert np.abs(with_lora.astype(int) - reference).max() <= 1
    np.testing.assert_array_equal(result.before_images[3], plain)


def test_apply_lora_on_then_off_gives_the_original_pixels(tuned, demo_data_dir):
    pipe = fresh_pipeline(demo_data_dir).model
    original = sample(pipe)
    apply_lora(pipe, tuned["result"].lora_dir)
    on = sample(pipe)
    apply_lora(pipe, tuned["result"].lora_dir, scale=0.0)  # replacing works; scale 0 is the base model
    zero = sample(pipe)
    apply_lora(pipe, None)
    off = sample(pipe)
    assert np.abs(on.astype(int) - original).max() > 5
    np.testing.assert_array_equal(off, original)
    assert np.abs(zero.astype(int) - original).max() <= 1
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        apply_lora(pipe, tuned["out"] / "missing")


def test_should_stop_saves_a_loadable_lora(demo_data_dir, detector, tmp_path):
    loaded = fresh_pipeline(demo_data_dir)
    rows: list[dict] = []
    config = dataclasses.replace(CONFIG, steps=10, eval_seeds=(0,))
    result = tune_lora(config, loaded, detector, PROMPTS[:1], tmp_path, log=rows.append,
                       should_stop=lambda: len(rows) >= 3)
    assert result.stopped and result.steps_done == 3 and len(result.history) == 3
    assert result.after == {} and result.outside_change is None and result.before["images"] == 1
    fresh = fresh_pipeline(demo_data_dir).model
    base = sample(fresh, config=config)
    apply_lora(fresh, result.lora_dir)
    assert np.abs(sample(fresh, config=config).astype(int) - base).max() > 0
    assert not getattr(loaded.model.unet, "peft_config", None)
    # a stop that arrives after the last step, during the after-evaluation, still keeps every step
    rows.clear()
    config = dataclasses.replace(config, steps=2)
    result = tune_lora(config, loaded, detector, PROMPTS[:1], tmp_path / "late", log=rows.append,
                       should_stop=lambda: len(rows) >= 2)
    assert result.stopped and result.steps_done == 2 and result.after == {}
    assert (Path(result.lora_dir) / "pytorch_lora_weights.safetensors").is_file()


def test_regulariser_on_clean_images_is_logged(demo_data_dir, detector, tmp_path):
    loaded = fresh_pipeline(demo_data_dir)
    rng = np.random.default_rng(0)
    clean = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)]
    config = dataclasses.replace(CONFIG, steps=2, eval_seeds=(0,), regulariser_weight=0.5)
    result = tune_lora(config, loaded, detector, PROMPTS[:1], tmp_path, clean_images=clean)
    assert all(row["regulariser"] > 0 and np.isfinite(row["regulariser"]) for row in result.history)


@pytest.mark.parametrize("changes,words", [
    ({"steps": 0}, "Tuning steps"),
    ({"rank": 0}, "LoRA rank"),
    ({"backprop_steps": 5, "num_inference_steps": 4}, "Backprop steps"),
    ({"loss_mode": "max"}, "Unknown loss mode"),
    ({"width": 60}, "Width"),
    ({"eval_seeds": ()}, "Evaluation seeds"),
    ({"eval_prompts": 0}, "Evaluation prompts"),
])
def test_bad_config_is_one_clear_sentence(changes, words):
    with pytest.raises(ValueError, match=words) as info:
        dataclasses.replace(CONFIG, **changes).validate()
    message = str(info.value)
    assert message.endswith(".") and message.count(". ") == 0


def test_bad_inputs_are_refused_before_any_work(demo_data_dir, detector, tuned, tmp_path):
    loaded = fresh_pipeline(demo_data_dir)
    with pytest.raises(ValueError, match="Tuning steps"):
        tune_lora(dataclasses.replace(CONFIG, steps=0), loaded, detector, PROMPTS, tmp_path)
    with pytest.raises(ValueError, match="at least one prompt"):
        tune_lora(CONFIG, loaded, detector, [], tmp_path)
    with pytest.raises(ValueError, match="needs clean images"):
        tune_lora(dataclasses.replace(CONFIG, regulariser_weight=1.0), loaded, detector, PROMPTS, tmp_path)
    apply_lora(loaded.model, tuned["result"].lora_dir)
    with pytest.raises(ValueError, match="already has a LoRA loaded"):
        tune_lora(CONFIG, loaded, detector, PROMPTS, tmp_path)
