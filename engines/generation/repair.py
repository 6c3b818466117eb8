"""Detector-guided repair: detect -> mask -> inpaint -> paste back -> re-score.

`repair(image, detector, inpainter, params)` takes an RGB uint8 HWC image, finds its artifact region
(the detector's heatmap >= `threshold`, or a mask the caller gives), grows it, regenerates that
region once per seed, pastes each candidate back into the original and ranks the candidates by the
same detector. Masks are bool [H, W], True = region to repair; heatmaps float32 [H, W] in [0, 1].

1. Region. `mask` if given, else `heatmap >= threshold`. It is grown by `grow` pixels: every pixel
   within Euclidean distance `grow` of the region (exactly a binary dilation with a disk of radius
   `grow`, computed with a distance transform so large radii stay fast). An empty region raises
   ValueError.
2. Inpainting. The diffusion works at the image's size rounded down to a multiple of the VAE factor
   (8); when that differs, the image goes in resized and each candidate is resized back (bicubic).
   The mask handed to the pipeline is the grown mask in latent cells: a cell (8x8 pixels) is in it
   when any of its pixels is in the grown mask, plus one cell of dilation for context, drawn back at
   pixel resolution so diffusers' nearest downsampling reproduces those cells exactly.
   - An inpainting pipeline (its `__call__` takes `mask_image`, e.g. SD-inpainting with a 9-channel
     UNet) is called directly.
   - A text-to-image pipeline is turned into diffusers' inpainting pipeline with
     `AutoPipelineForInpainting.from_pipe` (same modules, nothing copied or loaded). With the
     ordinary 4-channel UNet that pipeline does masked latent blending: the image's latent z0 is
     noised to the timestep set by `strength` with the seed's noise, denoised with the scheduler,
     and after every step the latent outside the latent mask is replaced by z0 re-noised (same
     noise) to the next timestep (z0 itself after the last step).
   Every candidate uses its own CPU generator seeded with its seed: same inputs, same pixels.
3. Paste-back. out = original * (1 - a) + candidate * a with a feathered alpha:
   a = clip(2 * gaussian(grown, sigma=feather) - 1, 0, 1), then set to exactly 0 outside the grown
   mask and exactly 1 where the distance to the outside is more than 3 * feather. So a rises from
   ~0 at the edge of the grown mask to 1 about 2 feather inside, and the pixels outside the grown
   mask are exactly the original's (`outside_max_change` == 0). feather 0 means a hard paste.
4. Scores. Each pasted candidate is re-scored with the same detector (whole image, the detector's
   default "resize" mode). Candidates are ranked best-first by the fraction of the grown region
   with score >= threshold, ties by the mean score inside it, then by seed order.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engines.generation.generate import Cancelled
from engines.models import LoadedModel

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
MIN_SIDE = 64

__all__ = ["Cancelled", "RepairCandidate", "RepairParams", "RepairResult", "feather_alpha", "grow_mask", "repair"]


@dataclass(frozen=True)
class RepairParams:
    """One repair request. `seeds`: one candidate per seed. `grow`/`feather` are in pixels."""

    threshold: float = 0.5
    grow: int = 8
    feather: float = 4.0
    seeds: tuple[int, ...] = (0, 1, 2)
    num_inference_steps: int = 20
    strength: float = 0.75
    guidance_scale: float = 7.5
    prompt: str = ""
    negative_prompt: str = ""

    def validate(self) -> None:
        """Raise ValueError with one sentence if any field is out of range."""
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"Threshold must be between 0 and 1, got {self.threshold}.")
        if not 0 <= int(self.grow) <= 512 or int(self.grow) != self.grow:
            raise ValueError(f"Grow must be a whole number of pixels between 0 and 512, got {self.grow}.")
        if not 0.0 <= float(self.feather) <= 128.0:
            raise ValueError(f"Feather must be between 0 and 128 pixels, got {self.feather}.")
        seeds = tuple(self.seeds)
        if not 1 <= len(seeds) <= 16:
            raise ValueError(f"Give between 1 and 16 seeds, got {len(seeds)}.")
        if any(not 0 <= int(s) <= 2**32 - 1 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError("Seeds must be distinct whole numbers between 0 and 2**32 - 1.")
        if not 1 <= int(self.num_inference_steps) <= 500:
            raise ValueError(f"Steps must be between 1 and 500, got {self.num_inference_steps}.")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"Strength must be in (0, 1], got {self.strength}.")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"Strength {self.strength} of {self.num_inference_steps} steps leaves no denoising step; "
                             "raise the strength or the steps.")
        if not 0.0 <= float(self.guidance_scale) <= 50.0:
            raise ValueError(f"Guidance scale must be between 0 and 50, got {self.guidance_scale}.")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("The prompt and negative prompt must be text.")

    @property
    def denoising_steps(self) -> int:
        """UNet steps each candidate actually runs: int(num_inference_steps * strength)."""
        return int(self.num_inference_steps * self.strength)


@dataclass(frozen=True)
class RepairCandidate:
    """One repaired image (RGB uint8 HWC, pasted back) and its scores over the grown region."""

    image: np.ndarray
    seed: int
    artifact_area_before: float  # fraction of the grown region with original score >= threshold
    artifact_area_after: float  # the same for this candidate
    region_score_after: float  # mean candidate score inside the grown region
    outside_max_change: int  # max |candidate - original| outside the grown region (0 by construction)
    heatmap: np.ndarray  # float32 [H, W] of the candidate

    @property
    def rank_key(self) -> tuple[float, float]:
        return (self.artifact_area_after, self.region_score_after)


@dataclass(frozen=True)
class RepairResult:
    """`mask`: the grown region (bool); `region`: it before growing; `alpha`: paste-back weights."""

    mask: np.ndarray
    region: np.ndarray
    alpha: np.ndarray
    original_heatmap: np.ndarray
    candidates: tuple[RepairCandidate, ...]
    params: RepairParams
    mask_given: bool
    duration_s: float

    @property
    def best(self) -> RepairCandidate:
        return self.candidates[0]


def repair(image: np.ndarray, detector, inpainter: LoadedModel, params: RepairParams,
           mask: np.ndarray | None = None, progress: ProgressFn | None = None,
           should_stop: StopFn | None = None) -> RepairResult:
    """Repair the artifact region of `image` (RGB uint8 HWC) with one candidate per seed.

    `detector`: an engines.detection.detect.ArtifactDetector. `inpainter`: a LoadedModel of a text-to-image or
    inpainting diffusers pipeline. `mask`: bool [H, W] to repair instead of the detected region.
    `progress(step, total)` counts denoising steps over all candidates; `should_stop()` raises
    Cancelled. Raises ValueError for bad input or an empty region.
    """
    import torch

    from engines.generation.generate import to_uint8

    params.validate()
    _check_image(image)
    h, w = image.shape[:2]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (h, w):
            raise ValueError(f"The mask must be bool [H, W] = {(h, w)}, got {mask.dtype} {mask.shape}.")
        if not mask.any():
            raise ValueError("The given mask is empty: mark at least one pixel to repair.")
    start = time.perf_counter()
    _stop(should_stop)
    original_heatmap = detector.predict([image])[0].scores
    region = mask.copy() if mask is not None else original_heatmap >= params.threshold
    if not region.any():
        raise ValueError(f"No artifact region at threshold {params.threshold:g}: lower the threshold or give a mask.")
    grown = grow_mask(region, params.grow)
    alpha = feather_alpha(grown, params.feather)

    pipe = _inpainting_pipeline(inpainter.model)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    work_h, work_w = (h // scale) * scale, (w // scale) * scale
    work_image = image if (work_h, work_w) == (h, w) else _resize_rgb(image, work_h, work_w)
    work_grown = grown if (work_h, work_w) == (h, w) else _resize_mask(grown, work_h, work_w)
    diffusion_mask = latent_cells(work_grown, scale, dilate=1)
    from PIL import Image

    pil_image = Image.fromarray(work_image)
    pil_mask = Image.fromarray(diffusion_mask.astype(np.uint8) * 255, mode="L")
    steps_each = params.denoising_steps
    total = steps_each * len(params.seeds)
    done = [0]

    def on_step_end(_pipe, _step, _timestep, callback_kwargs):
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        _stop(should_stop)
        return callback_kwargs

    before_area = float((original_heatmap[grown] >= params.threshold).mean())
    pasted = []
    for seed in params.seeds:
        _stop(should_stop)
        with torch.inference_mode():
            out = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt or None, image=pil_image,
                       mask_image=pil_mask, height=work_h, width=work_w, strength=float(params.strength),
                       num_inference_steps=int(params.num_inference_steps),
                       guidance_scale=float(params.guidance_scale),
                       generator=torch.Generator(device="cpu").manual_seed(int(seed)), output_type="np",
                       callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        candidate = to_uint8(out.images)[0]
        if candidate.shape[:2] != (h, w):
            candidate = _resize_rgb(candidate, h, w)
        pasted.append(paste_back(image, candidate, alpha, grown))
    heatmaps = [hm.scores for hm in detector.predict(pasted)]
    candidates = []
    for seed, img, scores in zip(params.seeds, pasted, heatmaps):
        outside = np.abs(img.astype(np.int16) - image.astype(np.int16))[~grown]
        candidates.append(RepairCandidate(
            image=img, seed=int(seed), artifact_area_before=before_area,
            artifact_area_after=float((scores[grown] >= params.threshold).mean()),
            region_score_after=float(scores[grown].mean()),
            outside_max_change=int(outside.max()) if outside.size else 0, heatmap=scores))
    ranked = tuple(c for _, c in sorted(enumerate(candidates), key=lambda ic: (ic[1].rank_key, ic[0])))
    return RepairResult(mask=grown, region=region, alpha=alpha, original_heatmap=original_heatmap,
                        candidates=ranked, params=params, mask_given=mask is not None,
                        duration_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Masks


def grow_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every pixel within Euclidean distance `radius` of the mask: binary dilation with a disk
    {x^2 + y^2 <= radius^2}, computed as a distance transform. radius 0 returns a copy."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if radius <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def feather_alpha(grown: np.ndarray, feather: float) -> np.ndarray:
    """Paste-back weights float32 [H, W] in [0, 1]: exactly 0 outside `grown`, exactly 1 more than
    3 * feather inside it, clip(2 * gaussian(grown, feather) - 1, 0, 1) in between."""
    from scipy import ndimage

    grown = np.asarray(grown, bool)
    if feather <= 0:
        return grown.astype(np.float32)
    blur = ndimage.gaussian_filter(grown.astype(np.float64), sigma=float(feather), mode="nearest")
    alpha = np.clip(2.0 * blur - 1.0, 0.0, 1.0)
    alpha[~grown] = 0.0
    alpha[ndimage.distance_transform_edt(grown) > 3.0 * feather] = 1.0
    return alpha.astype(np.float32)


def paste_back(original: np.ndarray, candidate: np.ndarray, alpha: np.ndarray, grown: np.ndarray) -> np.ndarray:
    """original * (1 - a) + candidate * a, rounded; pixels outside `grown` are the original's, bit for bit."""
    a = alpha[..., None].astype(np.float64)
    blended = np.clip(np.rint(original * (1.0 - a) + candidate * a), 0, 255).astype(np.uint8)
    return np.where(grown[..., None], blended, original)


def latent_cells(mask: np.ndarray, scale: int, dilate: int = 1) -> np.ndarray:
    """bool [H, W] (H, W multiples of `scale`) -> the same size, True on every scale x scale cell that
    holds a mask pixel, grown by `dilate` cells (8-connected)."""
    from scipy import ndimage

    h, w = mask.shape
    cells = mask.reshape(h // scale, scale, w // scale, scale).any(axis=(1, 3))
    if dilate > 0:
        cells = ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool), iterations=dilate)
    return np.repeat(np.repeat(cells, scale, axis=0), scale, axis=1)


# ----------------------------------------------------------------------------------------------
# Helpers


def _inpainting_pipeline(pipe):
    """The pipeline itself when it inpaints (takes `mask_image`), else diffusers' inpainting pipeline
    over the same modules (masked latent blending for a 4-channel UNet)."""
    if "mask_image" in inspect.signature(type(pipe).__call__).parameters:
        return pipe
    from diffusers import AutoPipelineForInpainting

    try:
        inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{type(pipe).__name__} has no inpainting counterpart in diffusers; "
                         f"load an inpainting pipeline to repair with ({exc}).") from None
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def _check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("The image must be RGB uint8 H x W x 3.")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"The image must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got "
                         f"{image.shape[1]}x{image.shape[0]}.")


def _resize_rgb(image: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def _stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("Repair was stopped.")
