"""The experiment runner's only calls into the engines: training, corruption, detection, metrics.

Kept thin and in one place so the runner follows the engines' APIs: recipes come from
`engines.training.recipes.resolve_recipe` (the paper's and the balanced one; nothing is spelled out here),
training and checkpoint choice from `engines.training.detector.train_detector` (best checkpoint on the
experiment's validation set), scores from `engines.training.detector.evaluate_detector` (the function the
trainer scores val and test with: `ArtifactDetector` inference at native size, artifact = probability
>= 0.5, `engines.detection.detect.evaluate_masks`), corruption from `engines.corruption.corrupt` (named ReNoise presets, the
paper's baseline protocol, the corrupted area as label). Images are RGB uint8 HWC, masks bool [H, W].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


# ---------------------------------------------------------------------------------------------- training

def train_config(*, arch: str, init: str, recipe: str, steps: int, batch_size: int, crop: int, lr: float,
                 eval_every: int, seed: int, selector: bool = False):
    """engines.training.detector.TrainConfig of the named recipe (`engines.training.recipes.resolve_recipe`:
    "paper" = plain cross-entropy, no class weights, uniform sampling, no jitter, AdamW 6e-5 for an
    ADE20K-initialised model, else the recipe's measured from-scratch rate) with the experiment's steps,
    batch, crop, evaluation interval and seed. `lr` 0 keeps the recipe's learning rate."""
    from engines.training.recipes import resolve_recipe

    return resolve_recipe(recipe, arch=arch, init=init or None, region_selector=selector,
                          lr=float(lr) if lr else None, steps=int(steps), batch_size=int(batch_size), crop=int(crop),
                          eval_every=int(eval_every), seed=int(seed), log_every=max(1, int(steps) // 50))


def config_from_json(values: dict):
    """The TrainConfig of `train_config(...).to_json()` (the form a unit's params keep), validated."""
    from engines.training.detector import TrainConfig

    config = TrainConfig(**{**values, "betas": tuple(values["betas"]), "scale_range": tuple(values["scale_range"])})
    config.validate()
    return config


def describe_config(config) -> str:
    """The recipe as printed at the start of a run (engines.training.recipes.describe)."""
    from engines.training.recipes import describe

    return describe(config)


def train(config, train_samples, val_samples, out_dir: Path, *, device: str, progress=None, should_stop=None,
          log=None, provenance: dict | None = None):
    """engines.training.detector.train_detector with resume (a rerun continues from `out_dir/last`). The best
    checkpoint is chosen on `val_samples` (val artifact IoU); the test set is never passed here: the
    evaluation step scores the chosen checkpoint on it (`evaluate`). `provenance` goes into every
    checkpoint's detector.json."""
    from engines.training.detector import train_detector

    return train_detector(config, train_samples, val_samples, out_dir, progress=progress, should_stop=should_stop,
                          log=log, resume=True, device=device, extra_provenance=provenance)


def sample(image: np.ndarray, mask: np.ndarray, source: str, name: str):
    """A training sample (engines.training.detector.TrainSample); arrays may be read-only memory maps."""
    from engines.training.detector import TrainSample

    return TrainSample(image=image, mask=mask, source=source, name=name)


def best_checkpoint(result_dir: Path) -> Path:
    """The checkpoint chosen on the validation set (`best`), else the last one."""
    from engines.training.resume import BEST, LAST

    best = Path(result_dir) / BEST
    return best if (best / "detector.json").is_file() else Path(result_dir) / LAST


# ---------------------------------------------------------------------------------------------- detection

def load_detector(folder: Path, device: str):
    """An engines.detection.detect.ArtifactDetector for one of our checkpoint folders."""
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector as load

    return ArtifactDetector(load(str(folder), data_dir=Path(folder), device=device))


def predict(detector, images, batch_size: int = 8) -> list[np.ndarray]:
    """Artifact probability maps float32 [H, W] in [0, 1] (whole image resized to the detector's input)."""
    return [h.scores for h in detector.predict(list(images), batch_size=batch_size)]


class Scorer:
    """Scores a checkpoint on samples exactly as engines.training.detector scores val and test
    (`evaluate_detector`); `folder` None is the detector that marks nothing. `score(samples)` returns the
    engines.detection.detect.ImageScore of each sample (call it chunk by chunk for progress and cancel);
    `metrics(scores)` the dataset metrics (engines.detection.detect.Metrics: artifact_iou headline, miou 2-class,
    mean_image_iou, precision, recall, f1)."""

    def __init__(self, folder: Path | None, device: str, batch_size: int = 8):
        self.device, self.batch_size, self.model, self.spec = device, int(batch_size), None, None
        if folder is not None:
            from engines.detection.detectors import load_detector as load

            loaded = load(str(folder), data_dir=Path(folder), device=device)
            self.model, self.spec = loaded.model, loaded.extra

    def score(self, samples) -> list:
        from engines.detection.detect import score_image
        from engines.training.detector import evaluate_detector

        if self.model is None:
            masks = [(s.load_mask(), s.name) for s in samples]
            return [score_image(np.zeros(mask.shape, bool), mask, name) for mask, name in masks]
        return list(evaluate_detector(self.model, self.spec, samples, self.device, batch_size=self.batch_size).images)

    @staticmethod
    def metrics(scores):
        from engines.detection.detect import evaluate_masks

        return evaluate_masks(scores)


# ---------------------------------------------------------------------------------------------- corruption

def load_pipeline(spec: str, data_dir: Path, device: str):
    """The text-to-image pipeline (engines.models.LoadedModel) the corruption runs on."""
    from engines.models import load_text2image

    dtype = "float16" if device.startswith("cuda") and spec != "demo" else "float32"
    return load_text2image(spec, data_dir=data_dir, device=device, dtype=dtype)


def corruptor(loaded, cache_dir: Path):
    from engines.corruption.corrupt import RegionCorruptor

    return RegionCorruptor(loaded, cache_dir=cache_dir)


def corrupt_params(*, method: str, inversion: str, preset: str, num_inference_steps: int, steps: int,
                   baseline_steps: int, guidance_scale: float, prompt: str, seed: int):
    """engines.corruption.corrupt.CorruptParams for one variant.

    method: "proposed" (the paper's method with `inversion`, k = `steps`), a resampled baseline (rotate,
    blur, gaussian, downscale: corrupted and resampled over `baseline_steps`, the paper's baseline
    protocol) or "direct" (pure N(0, 1) in the image latent, no resampling). `preset` names the ReNoise
    settings ("renoise-sd": the reference's SD configuration; "renoise-fast": no noise regularisation).
    The stored label is the corrupted area (the engine's default `label` "corrupted").
    """
    from engines.corruption.corrupt import CorruptParams

    fields: dict = {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
                    "prompt": prompt or "", "seed": int(seed), "inversion_steps": int(steps),
                    "baseline_steps": int(baseline_steps), "label": "corrupted"}
    if method == "proposed":
        fields["method"] = inversion
    else:
        fields["method"] = method  # rotate, blur, gaussian, downscale, direct
    params = CorruptParams.from_preset(preset, **fields)
    params.validate()
    return params


def corrupt(engine, image: np.ndarray, region: np.ndarray, params) -> tuple[np.ndarray, np.ndarray, dict]:
    """Corrupt `region` of `image`: (corrupted image, label = the area actually corrupted (the corrupted
    latent cells at pixel resolution), the engine's measurements)."""
    result = engine.corrupt(image, region, params)
    info = {key: _finite(value) for key, value in result.metrics().items()}
    info.update(unet_calls=int(result.unet_calls), cache_hit=bool(result.cache_hit))
    return result.image, np.ascontiguousarray(result.mask), info


def prepare_source(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Resize/crop a source image for the corruption (sides multiples of 8, longer side <= max_side)."""
    from engines.corruption.metrics import prepare_image

    return prepare_image(rgb, multiple=8, max_side=max_side)


def params_json(params) -> dict:
    return params.to_json()


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
