"""What a tuning run is judged on, reusable by other engines: the training / evaluation prompt split
(`split_prompts`), the tuning loss on artifact probabilities (`artifact_loss`), paired evaluation images
(`generate_eval_images`), and a detector's artifact area over them (`score_area`, `evaluate_area`,
`paired_change`). See the `tune` module docstring for the method.

Images are RGB uint8 HWC; heatmaps float32 [H, W]; probabilities an N x H x W tensor. Imports no sibling module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engines.progress import StopFn

LOSS_MODES = ("weighted", "mean", "soft")
EVAL_THRESHOLD = 0.5
EVAL_SETS = ("held-out", "split", "training")  # where the evaluation prompts came from


@dataclass(frozen=True)
class PromptSplit:
    """Training prompts and the prompts a run is evaluated on. `source` (one of EVAL_SETS): "held-out"
    (given separately), "split" (a seeded share of the prompt list held out) or "training" (no held-out
    set: the training prompts themselves, eval_fraction 0)."""

    train: tuple[str, ...]
    evaluate: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class AreaScore:
    """One detector's figures over a list of images (prompt-major: image i * len(seeds) + j is prompt i with
    seed j). `areas[k]`: fraction of image k's pixels with score >= `threshold`; `scores[k]`: its mean score;
    `maps`: the float32 [H, W] heatmaps (not part of `to_json`)."""

    detector: str
    threshold: float
    areas: tuple[float, ...]
    scores: tuple[float, ...]
    maps: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)

    @property
    def artifact_area(self) -> float:
        return float(np.mean(self.areas)) if self.areas else 0.0

    @property
    def mean_score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0

    def to_json(self) -> dict:
        return {"artifact_area": self.artifact_area, "mean_score": self.mean_score, "images": len(self.areas),
                "detector": self.detector}


def prompt_key(prompt: str) -> str:
    """How prompts are compared for overlap: case-folded, runs of white space as one space, trimmed."""
    return " ".join(str(prompt).split()).casefold()


def split_prompts(prompts: Sequence[str], held_out: Sequence[str] | None = None, *, fraction: float = 0.25,
                  seed: int = 0) -> PromptSplit:
    """Training and evaluation prompts (see the `tune` module docstring). With `held_out` (non-empty): training =
    `prompts`, evaluation = the distinct `held_out`; a held-out prompt that is also a training prompt is
    refused. Without: `fraction` of the distinct prompts (chosen by `seed`) are held out, and every copy of a
    held-out prompt leaves the training list; `fraction` 0 evaluates on the training prompts. Order is kept.
    Raises ValueError for empty prompts, an overlap, or too few distinct prompts to split."""
    train = [str(p).strip() for p in prompts]
    if not train or any(not p for p in train):
        raise ValueError("Give at least one prompt, and no empty prompts.")
    if held_out:
        evaluate = _distinct([str(p).strip() for p in held_out])
        if any(not p for p in evaluate):
            raise ValueError("Evaluation prompts must not be empty.")
        train_keys = {prompt_key(p) for p in train}
        shared = [p for p in evaluate if prompt_key(p) in train_keys]
        if shared:
            raise ValueError(f"{len(shared)} evaluation prompt(s) are also training prompts (first: '{shared[0]}'); "
                             "held-out prompts must not be trained on.")
        return PromptSplit(tuple(train), tuple(evaluate), "held-out")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"Evaluation fraction must be in [0, 1) (0: evaluate on the training prompts), got {fraction}.")
    distinct = _distinct(train)
    if float(fraction) == 0.0:
        return PromptSplit(tuple(train), tuple(distinct), "training")
    if len(distinct) < 2:
        raise ValueError(f"Holding out a share of the prompts needs at least 2 distinct prompts, got {len(distinct)}; "
                         "give separate evaluation prompts, or an evaluation fraction of 0 to evaluate on the "
                         "training prompts.")
    count = min(len(distinct) - 1, max(1, int(np.floor(float(fraction) * len(distinct) + 0.5))))
    chosen = set(np.random.default_rng(int(seed)).permutation(len(distinct))[:count].tolist())
    held = {prompt_key(distinct[i]) for i in chosen}
    return PromptSplit(tuple(p for p in train if prompt_key(p) not in held),
                       tuple(p for i, p in enumerate(distinct) if i in chosen), "split")


def _distinct(prompts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for p in prompts:
        if prompt_key(p) not in seen:
            seen.add(prompt_key(p))
            out.append(p)
    return out


def artifact_loss(probs, mode: str = "weighted", threshold: float = 0.1):
    """The tuning loss (module docstring, step 4) of artifact probabilities `probs` (N x H x W tensor in
    [0, 1], differentiable): the per-image loss averaged over the N images, a scalar tensor."""
    import torch

    if mode not in LOSS_MODES:
        raise ValueError(f"Unknown loss mode '{mode}'; use {', '.join(LOSS_MODES)}.")
    flat = probs.reshape(probs.shape[0], -1)
    if mode == "mean":
        per_image = flat.mean(dim=1)
    elif mode == "weighted":
        flagged = (flat.detach() > float(threshold)).to(flat.dtype)
        per_image = (flat * flagged).sum(dim=1) / (flagged.sum(dim=1) + 1e-5)
    else:
        weight = flat.detach()
        per_image = (flat * (weight / (weight.mean(dim=1, keepdim=True) + 1e-6))).mean(dim=1)
    return torch.as_tensor(per_image).mean()


def generate_eval_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int,
                         guidance_scale: float, width: int, height: int,
                         should_stop: StopFn | None = None) -> list[np.ndarray] | None:
    """Generate prompts x seeds (prompt-major) with the pipeline as it is now, each with a CPU generator seeded
    by its seed, so two calls around a change of the model give paired images. RGB uint8 HWC; None if stopped."""
    import torch

    from engines.generation.generate import to_uint8

    images = []
    for prompt in prompts:
        for seed in seeds:
            if should_stop is not None and should_stop():
                return None
            with torch.inference_mode():
                out = pipe(prompt=prompt, num_inference_steps=int(num_inference_steps),
                           guidance_scale=float(guidance_scale), width=int(width), height=int(height),
                           generator=torch.Generator(device="cpu").manual_seed(int(seed)), output_type="np")
            images.extend(to_uint8(out.images))
    return images


def score_area(detector, images: Sequence[np.ndarray], threshold: float = EVAL_THRESHOLD) -> AreaScore:
    """Score RGB uint8 images with an ArtifactDetector (its `predict`, resize mode): per-image artifact area
    (fraction of pixels with score >= threshold) and mean score."""
    maps = [h.scores for h in detector.predict(list(images))]
    return AreaScore(detector=str(detector.detector_id), threshold=float(threshold),
                     areas=tuple(float((m >= threshold).mean()) for m in maps),
                     scores=tuple(float(m.mean()) for m in maps), maps=tuple(maps))


def evaluate_area(pipe, detector, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int,
                  guidance_scale: float, width: int, height: int, threshold: float = EVAL_THRESHOLD,
                  should_stop: StopFn | None = None) -> tuple[list[np.ndarray], AreaScore] | None:
    """`generate_eval_images` then `score_area`: (images, score), or None when stopped."""
    images = generate_eval_images(pipe, prompts, seeds, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, width=width, height=height, should_stop=should_stop)
    return None if images is None else (images, score_area(detector, images, threshold))


def paired_change(before: AreaScore, after: AreaScore) -> dict:
    """After minus before over paired images (same prompt and seed): {"artifact_area", "mean_score", "lower",
    "higher", "same"}, the last three counting images whose artifact area went down, up or stayed."""
    if len(before.areas) != len(after.areas):
        raise ValueError(f"Paired scores need the same images, got {len(before.areas)} before and "
                         f"{len(after.areas)} after.")
    delta = np.asarray(after.areas) - np.asarray(before.areas)
    return {"artifact_area": after.artifact_area - before.artifact_area,
            "mean_score": after.mean_score - before.mean_score,
            "lower": int((delta < 0).sum()), "higher": int((delta > 0).sum()), "same": int((delta == 0).sum())}
