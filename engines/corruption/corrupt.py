"""Synthetic pixel-level artifact labels by region corruption (Menn, Liang, Marculescu).

Invert a clean image part of the way, corrupt the latent inside a region, resample to t = 0: the
region becomes a free pixel-level label. `RegionCorruptor(loaded)` wraps a Stable-Diffusion-style
text-to-image pipeline (one text encoder, epsilon or v prediction); `invert` is the expensive,
cached step, `corrupt` / `preview` are the cheap calls made many times per image.

The schedule. The DDIM schedule of the pipeline's scheduler config, `DDIMScheduler.set_timesteps(N)`:
sampling timesteps T[0] > ... > T[N-1]; the state after the last step is the clean latent, whose
alpha is the scheduler's `final_alpha_cumprod`. The state before sampling step i has timestep T[i];
a DDIM step (eta 0) from T[i] goes to T[i+1] (to the clean state after T[N-1]); this is exactly
`DDIMScheduler.step` for "leading" spacing (SD 1.x/2.x; other spacings get this consistent list
schedule), without clipping x0 (SD configs turn clip_sample off). Inversion runs the same steps
backwards.

1. Inversion of z0 = vae.encode(image).latent_dist.mean * scaling_factor (the mean, not a sample,
   so the same pixels always give the same z0; the ReNoise reference samples), with the prompt's
   embedding (the image's caption if known, else ""). By default the inversion uses the conditional
   prediction only (`inversion_guidance_scale` 1.0, as the reference's guidance_scale 0.0; above 1,
   classifier-free guidance with `negative_prompt`). The k lowest-noise steps are inverted, giving
   z_t at t = T[N-k] ("corrupt at step N-k": N=50, k=10 -> step 40 of the sampling loop); k is
   `inversion_steps` for the proposed method and `baseline_steps` (20) for the resampled baselines.
   Every inverted step feeds the UNet the step's TARGET timestep (the noisier one), as diffusers'
   DDIMInverseScheduler and ReNoise do; the clean z0 has no timestep of its own.
   - "ddim": plain DDIM inversion, z' = inverse_step(z, eps(z, t')).
   - "renoise" (Garibi et al. 2024): the official implementation's step for SD + DDIM, described and
     implemented in engines/corruption/renoise.py: renoise iterations re-estimate eps at the next latent; for
     timesteps below 250 the average covers the first DDIM estimate and the renoise ones
     (`average_first_step_range` (0, 5)), above it `average_step_range` (8, 10); noise
     regularisation (patch KL to eps(z0), weight lambda_kl 0.065, and autocorrelation over 5 random
     rolls, weight lambda_ac 20, 4 rounds) is applied in the reference's order. The rolls use a
     fixed seed (0), so an inversion is a pure function of its cache key.
   `preset` names the ReNoise settings and is recorded with every result: "renoise-sd" (default:
   the reference's SD configuration, src/config.py + examples/inversion_example_sd.py, 1 renoise
   iteration, regularisation on), "renoise-fast" (the same with regularisation off: interactive
   previews) or "custom" (any values; the named presets refuse settings that differ from them).
2. Region corruption (paper eq. 3-5). The pixel mask bool[H, W] becomes a latent mask m bool[h, w]
   (h = H/8, w = W/8) by `mask_mode` (see `latent_mask`): "area" (default; a cell is corrupted when
   at least half of its 8x8 pixels are), "nearest" (the pixel at the cell centre), "any" (any pixel
   in the cell). Outside m the latent is the inverted z_t, inside m it is
   sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) drawn over the whole latent from a CPU
   `torch.Generator` seeded with `seed` (`seeded_noise`), then DDIM resampling from t to 0 over the
   remaining steps (sampling steps N-k .. N-1, eta 0) with the same prompt and `guidance_scale`
   (classifier-free guidance with `negative_prompt` when above 1), decoded by the VAE. The label is
   what was corrupted: by default (`label` "corrupted") the stored mask is m at pixel resolution
   (each cell -> its 8x8 pixels); `label` "requested" stores the pixel mask as drawn. Every result
   reports `region_iou`, the IoU of the requested mask and the corrupted area. `paste_back` (off,
   as in the paper) puts the original pixels back outside the label.
3. Baselines (`method`). The paper corrupts every baseline at step N-20 and resamples it over 20
   steps (its proposed method: 10), so "rotate", "blur", "gaussian" and "downscale" invert
   `baseline_steps` (default 20) steps with the same ReNoise settings, change z_t inside m and
   resample from there. All four work on the inverted latent z_t at step N-20 (one reading for all
   of them: "corrupt at step N-20" names a state of the sampling loop, i.e. a latent; image-space
   rotation or blur would need a second inversion and would not act "at step N-20"). The paper's
   full text is not in this project's offline references; this reading follows its protocol as
   summarised in issue 15 ("the paper corrupts and resamples every baseline over 20 steps") and
   issue 5 ("blur, rotate 90 degrees, latent replaced by N(0,1) noise, latent 8x downscale, each
   followed by resampling").
   "gaussian"  z_t inside m replaced by eps alone (no sqrt(abar) z0 term);
   "rotate"    z_t inside m taken from z_t's patch in m's bounding box rotated by 90 degrees
               (counter-clockwise; a non-square patch is resized back to the box, nearest);
   "downscale" z_t downscaled 8x ("area") and upscaled back (bilinear), taken inside m;
   "blur"      z_t Gaussian-blurred per channel (`blur_sigma` in latent cells, 1 cell = 8 px;
               replicate borders, kernel radius int(3 sigma + 0.5)), taken inside m;
   "direct"    the paper's direct corruption (Sec. 6.2, Table 4): pure N(0, 1) substituted in the
               image latent z0 inside m, NO resampling, decoded in one VAE pass (0 UNet calls);
   "direct-noised"  the studio's earlier variant: z0 with the eq. 3-5 noised latent (at T[N-k])
               inside m, decoded without resampling.
4. Inversion cache. An inversion is keyed by sha256 over (image shape + pixels, model key, prompt,
   N, the inverted steps, inversion method, every ReNoise setting, inversion guidance and its
   negative prompt, dtype); the model key hashes the model id, the scheduler config and a strided
   sample of every UNet, VAE and text-encoder weight tensor, taken when the corruptor is made (make
   a new corruptor after changing weights in place). Entries live in an LRU in memory (25, as
   ReNoise's demo) and, with `cache_dir`, on disk as `<cache_dir>/<key>.safetensors` (z0, z_t;
   written to a temporary sibling and renamed; an unreadable or mismatching file is recomputed;
   never size-limited). The uncorrupted resample of an inversion (z_t resampled with the request's
   guidance and negative prompt, decoded) is cached beside it, in memory and as
   `<key>.resample-<rkey>.safetensors`. Another mask, seed or baseline sharing a cached inversion
   costs only the resampling: its steps x (2 if guidance_scale > 1) UNet evaluations per seed.
5. Measurements. `measure` gives the mean absolute pixel change (0-255, over pixels and channels)
   inside and outside a mask and confinement = inside / outside (higher = the change stays in the
   region; outside == 0 gives inf, or 1.0 when nothing changed at all). Every result is measured
   inside/outside its label twice: against the INPUT image (`inside_change`, `outside_change`,
   `confinement`: this includes the VAE and inversion error, which is not the corruption's doing)
   and against the UNCORRUPTED RESAMPLE of the same inversion (`*_vs_resample`: only what the
   corruption changed; for "direct" methods the reference is decode(z0)). `reconstruction_error`
   inverts and resamples with no corruption.

UNet evaluations (`unet_calls`) count latents passed through the UNet: one per latent per forward,
so a classifier-free-guided step counts 2 and a batch of 3 seeds counts 3 per step.
Conventions: images RGB uint8 HWC with H, W multiples of 8 (`prepare_image` crops/resizes others);
masks bool[H, W], True = region to corrupt. Everything runs under `torch.inference_mode()` except
the noise regularisation. Not thread-safe: one corruptor per device, calls serialised.
Nothing happens at import time; torch is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engines.generation.generate import Cancelled, to_uint8
from engines.images import as_rgb, image_digest
from engines.models import LoadedModel
from engines.corruption.renoise import PRESETS as RENOISE_PRESETS
from engines.corruption.renoise import RENOISE_FIELDS, RENOISE_SD, inverse_step, regularise_noise, regularised, renoise_step

__all__ = [
    "BASELINES", "CACHE_FORMAT", "Cancelled", "ChangeStats", "CorruptParams", "CorruptionResult",
    "DIRECT_METHODS", "INVERSION_METHODS", "Inversion", "LABEL_MODES", "MASK_MODES", "METHODS", "PRESETS",
    "RESAMPLED_BASELINES", "RegionCorruptor", "blur_latent", "corrupted_latent", "image_digest",
    "label_mask", "latent_mask", "mask_iou", "measure", "prepare_image", "random_blob_mask", "regularise_noise",
    "seeded_noise",
]

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

INVERSION_METHODS = ("renoise", "ddim")
RESAMPLED_BASELINES = ("blur", "rotate", "gaussian", "downscale")
DIRECT_METHODS = ("direct", "direct-noised")
BASELINES = RESAMPLED_BASELINES + DIRECT_METHODS
METHODS = INVERSION_METHODS + BASELINES
MASK_MODES = ("area", "nearest", "any")
LABEL_MODES = ("corrupted", "requested")
PRESETS = (*RENOISE_PRESETS, "custom")
MAX_SEED = 2**32 - 1
MAX_SEEDS = 16
CACHE_FORMAT = "artifact-studio-inversion-v2"
DEFAULT_MEMORY_ENTRIES = 25
REG_SEED = 0  # fixed seed of the regularisation's random rolls
PAPER_BASELINE_STEPS = 20  # the paper corrupts its baselines at step N-20 and resamples 20 steps


@dataclass(frozen=True)
class CorruptParams:
    """One corruption request. Defaults: the paper's setting (ReNoise with the reference's SD
    configuration, corruption at step 40 of 50; baselines at step 30 of 50).

    Build another ReNoise preset with `CorruptParams.from_preset("renoise-fast", ...)`; the ReNoise
    fields must equal the named preset's values (`preset` "custom" takes any).
    """

    num_inference_steps: int = 50  # N, DDIM steps of the full schedule
    inversion_steps: int = 10  # k of the proposed method ("renoise", "ddim"): corruption at step N - k
    method: str = "renoise"  # one of METHODS
    seed: int = 0  # eps of eq. 3-5 (and of "gaussian" / "direct")
    guidance_scale: float = 1.0  # resampling; > 1 uses classifier-free guidance with negative_prompt
    prompt: str = ""  # the image's caption if known
    negative_prompt: str = ""
    preset: str = "renoise-sd"  # one of PRESETS; recorded with every result
    renoise_iterations: int = RENOISE_SD["renoise_iterations"]
    max_renoise_first_step: int = RENOISE_SD["max_renoise_first_step"]
    first_step_max_timestep: int = RENOISE_SD["first_step_max_timestep"]
    average_first_step_range: tuple[int, int] = RENOISE_SD["average_first_step_range"]
    average_step_range: tuple[int, int] = RENOISE_SD["average_step_range"]
    average_latent_estimations: bool = RENOISE_SD["average_latent_estimations"]
    lambda_ac: float = RENOISE_SD["lambda_ac"]
    lambda_kl: float = RENOISE_SD["lambda_kl"]
    num_reg_steps: int = RENOISE_SD["num_reg_steps"]
    num_reg_rolls: int = RENOISE_SD["num_reg_rolls"]
    inversion_guidance_scale: float = 1.0  # 1.0: conditional prediction only
    baseline_steps: int = PAPER_BASELINE_STEPS  # inverted + resampled steps of the resampled baselines
    mask_mode: str = "area"  # one of MASK_MODES
    label: str = "corrupted"  # one of LABEL_MODES: the stored mask
    paste_back: bool = False
    blur_sigma: float = 2.0  # latent cells (1 cell = 8 px), "blur" baseline only

    def __post_init__(self):
        for name in ("average_first_step_range", "average_step_range"):  # JSON gives lists back
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "CorruptParams":
        """Params with a preset's ReNoise settings ("custom" starts from renoise-sd's) and `overrides`."""
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset '{preset}'; use one of {', '.join(PRESETS)}.")
        return cls(**{**RENOISE_PRESETS.get(preset, RENOISE_SD), "preset": preset, **overrides})

    @property
    def inversion_method(self) -> str:
        """"ddim" for the ddim method, "renoise" for everything else (baselines invert with ReNoise)."""
        return "ddim" if self.method == "ddim" else "renoise"

    @property
    def corruption_steps(self) -> int:
        """Steps inverted and resampled: `baseline_steps` for the resampled baselines, else `inversion_steps`."""
        return int(self.baseline_steps if self.method in RESAMPLED_BASELINES else self.inversion_steps)

    @property
    def regularised(self) -> bool:
        return self.inversion_method == "renoise" and regularised(self)

    def renoise_settings(self) -> dict:
        return {name: getattr(self, name) for name in RENOISE_FIELDS}

    def validate(self) -> None:
        """Raise ValueError with one sentence if any field is out of range."""
        n, k = int(self.num_inference_steps), int(self.inversion_steps)
        if not (2 <= n <= 1000):
            raise ValueError(f"num_inference_steps must be between 2 and 1000, got {self.num_inference_steps}.")
        if not (1 <= k < n):
            raise ValueError(f"inversion_steps must be at least 1 and less than num_inference_steps ({n}), got {k}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method '{self.method}'; use one of {', '.join(METHODS)}.")
        if self.method in RESAMPLED_BASELINES and not (1 <= int(self.baseline_steps) < n):
            raise ValueError(f"baseline_steps must be at least 1 and less than num_inference_steps ({n}), "
                             f"got {self.baseline_steps}.")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"Unknown mask_mode '{self.mask_mode}'; use one of {', '.join(MASK_MODES)}.")
        if self.label not in LABEL_MODES:
            raise ValueError(f"Unknown label '{self.label}'; use one of {', '.join(LABEL_MODES)}.")
        if not (0 <= int(self.seed) <= MAX_SEED):
            raise ValueError(f"Seed {self.seed} is out of range; use 0 to {MAX_SEED}.")
        for name in ("guidance_scale", "inversion_guidance_scale"):
            value = float(getattr(self, name))
            if not (0.0 <= value <= 50.0):
                raise ValueError(f"{name} must be between 0 and 50, got {value}.")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("prompt and negative_prompt must be text.")
        self._validate_renoise()
        if not (0.0 < float(self.blur_sigma) <= 100.0):
            raise ValueError(f"blur_sigma must be above 0 and at most 100 latent cells, got {self.blur_sigma}.")

    def _validate_renoise(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset '{self.preset}'; use one of {', '.join(PRESETS)}.")
        if not (1 <= int(self.renoise_iterations) <= 50):
            raise ValueError(f"renoise_iterations must be between 1 and 50, got {self.renoise_iterations}.")
        if not (0 <= int(self.max_renoise_first_step) <= 50):
            raise ValueError(f"max_renoise_first_step must be between 0 and 50, got {self.max_renoise_first_step}.")
        if not (0 <= int(self.first_step_max_timestep) <= 1000):
            raise ValueError(f"first_step_max_timestep must be between 0 and 1000, got {self.first_step_max_timestep}.")
        for name in ("average_first_step_range", "average_step_range"):
            value = getattr(self, name)
            if (not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                             for v in value)
                    or not 0 <= value[0] <= value[1] <= 100):
                raise ValueError(f"{name} must be two whole numbers (start, end) with 0 <= start <= end <= 100, got {value!r}.")
        if self.lambda_ac < 0 or self.lambda_kl < 0:
            raise ValueError("lambda_ac and lambda_kl must be 0 or more.")
        if not (0 <= int(self.num_reg_steps) <= 50) or not (1 <= int(self.num_reg_rolls) <= 50):
            raise ValueError("num_reg_steps must be between 0 and 50 and num_reg_rolls between 1 and 50.")
        if self.preset != "custom":
            differing = [name for name, value in RENOISE_PRESETS[self.preset].items() if getattr(self, name) != value]
            if differing:
                raise ValueError(f"{', '.join(differing)} differ from preset '{self.preset}'; "
                                 "use preset 'custom' for your own ReNoise settings.")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class Inversion:
    """An inverted image: z0 and z_t (float32 [1, C, h, w] on the model's device) at `timestep`.

    `timesteps` are the sampling timesteps still to run from z_t (T[N-k:]); `alpha_t` is abar at
    `timestep`; `unet_calls` is what computing it cost; `source` is "computed", "memory" or "disk".
    """

    key: str
    z0: Any
    zt: Any
    timestep: int
    step_index: int  # N - k
    timesteps: tuple[int, ...]
    alpha_t: float
    image_size: tuple[int, int]  # (H, W) of the pixels
    method: str
    unet_calls: int
    source: str = "computed"


@dataclass(frozen=True)
class ChangeStats:
    """Mean absolute pixel change (0-255) inside / outside a mask; confinement = inside / outside."""

    inside: float
    outside: float
    confinement: float


@dataclass(frozen=True, eq=False)
class CorruptionResult:
    """A corrupted image (RGB uint8 HWC, input size) and its free label `mask` (bool[H, W]).

    `mask` is the stored label: the corrupted latent cells at pixel resolution (`params.label`
    "corrupted", default) or `requested_mask` ("requested"); `region_iou` = IoU(requested_mask,
    corrupted area). `uncorrupted` is the uncorrupted resample of the same inversion (decode(z0)
    for "direct" methods). Changes are measured inside/outside `mask`: `inside_change`,
    `outside_change`, `confinement` against the input image; `*_vs_resample` against `uncorrupted`.
    `unet_calls` are the evaluations this result cost (its resampling, plus any inversion and
    uncorrupted resample computed for it; in a preview those are counted on the first result
    only, so results sum to the call's total). `cache_hit` says the inversion came from the cache.
    """

    image: np.ndarray
    mask: np.ndarray
    requested_mask: np.ndarray
    latent_mask: np.ndarray
    params: CorruptParams
    region_iou: float
    inside_change: float
    outside_change: float
    confinement: float
    inside_change_vs_resample: float
    outside_change_vs_resample: float
    confinement_vs_resample: float
    uncorrupted: np.ndarray
    unet_calls: int
    cache_hit: bool
    seconds: float

    def metrics(self) -> dict:
        """The figures of a manifest line / stored pair, each named after what it is measured against."""
        return {"region_iou": self.region_iou, "inside_change_vs_input": self.inside_change,
                "outside_change_vs_input": self.outside_change, "confinement_vs_input": self.confinement,
                "inside_change_vs_resample": self.inside_change_vs_resample,
                "outside_change_vs_resample": self.outside_change_vs_resample,
                "confinement_vs_resample": self.confinement_vs_resample}


# ----------------------------------------------------------------------------------------------
# Masks, images, measurements (numpy only)

def latent_mask(mask: np.ndarray, mode: str = "area", factor: int = 8) -> np.ndarray:
    """Pixel mask bool[H, W] -> latent-grid mask bool[H/factor, W/factor].

    "area": area-average each factor x factor cell; corrupted when the covered fraction is >= 0.5.
    "nearest": the pixel at the cell centre (row factor*i + factor//2, same for columns).
    "any": corrupted when any pixel of the cell is.
    """
    mask = _check_mask(mask)
    height, width = mask.shape
    if height % factor or width % factor:
        raise ValueError(f"The mask is {width}x{height}; its sides must be multiples of {factor}.")
    if mode not in MASK_MODES:
        raise ValueError(f"Unknown mask_mode '{mode}'; use one of {', '.join(MASK_MODES)}.")
    if mode == "nearest":
        return np.ascontiguousarray(mask[factor // 2::factor, factor // 2::factor])
    cells = mask.reshape(height // factor, factor, width // factor, factor)
    if mode == "any":
        return cells.any(axis=(1, 3))
    return cells.mean(axis=(1, 3), dtype=np.float64) >= 0.5


def label_mask(cells: np.ndarray, factor: int = 8) -> np.ndarray:
    """Latent-grid mask bool[h, w] -> the pixels it covers, bool[h*factor, w*factor] (cell -> factor x factor)."""
    cells = np.asarray(cells, dtype=bool)
    return np.ascontiguousarray(np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two bool masks of one shape (1.0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum()) / union


def measure(original: np.ndarray, corrupted: np.ndarray, mask: np.ndarray) -> ChangeStats:
    """Mean absolute change (0-255 scale, over pixels and channels) inside and outside `mask`.

    confinement = inside / outside; when nothing changed outside it is inf (or 1.0 if nothing
    changed anywhere). A side with no pixels counts as 0 change.
    """
    original, corrupted, mask = as_rgb(original), as_rgb(corrupted), _check_mask(mask)
    if original.shape != corrupted.shape or original.shape[:2] != mask.shape:
        raise ValueError(f"Shapes differ: original {original.shape}, corrupted {corrupted.shape}, mask {mask.shape}.")
    diff = np.abs(original.astype(np.int16) - corrupted.astype(np.int16)).mean(axis=2, dtype=np.float64)
    inside = float(diff[mask].mean()) if mask.any() else 0.0
    outside = float(diff[~mask].mean()) if (~mask).any() else 0.0
    if outside > 0:
        confinement = inside / outside
    else:
        confinement = math.inf if inside > 0 else 1.0
    return ChangeStats(inside=inside, outside=outside, confinement=confinement)


def random_blob_mask(height: int, width: int, seed: int, coverage: tuple[float, float] = (0.02, 0.15)) -> np.ndarray:
    """Random smooth blobs covering a fraction of the image drawn uniformly from `coverage`.

    One to three anisotropic Gaussian bumps plus a little smooth noise, thresholded at the
    quantile that gives the drawn coverage (exact up to ties). Same arguments, same mask.
    """
    lo, hi = float(coverage[0]), float(coverage[1])
    if not (0.0 < lo <= hi < 1.0):
        raise ValueError(f"coverage must satisfy 0 < low <= high < 1, got {coverage}.")
    if height < 1 or width < 1:
        raise ValueError(f"The mask size must be positive, got {width}x{height}.")
    rng = np.random.default_rng(int(seed))
    target = rng.uniform(lo, hi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy, xx = yy / max(height, width), xx / max(height, width)
    field = np.zeros((height, width))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.15, 0.85) * height / max(height, width), rng.uniform(0.15, 0.85) * width / max(height, width)
        sy, sx = rng.uniform(0.05, 0.2, size=2)
        field += rng.uniform(0.6, 1.0) * np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
    coarse = rng.standard_normal((max(2, height // 16), max(2, width // 16)))
    field += 0.1 * _resize_float(coarse, height, width)
    threshold = np.quantile(field, 1.0 - target)
    mask = field > threshold
    if not mask.any():
        mask[np.unravel_index(int(np.argmax(field)), field.shape)] = True
    return mask


def prepare_image(rgb: np.ndarray, multiple: int = 8, max_side: int | None = None) -> np.ndarray:
    """Return a copy whose sides are multiples of `multiple`: optionally resized (Lanczos) so the
    longer side is at most `max_side`, then centre-cropped by at most multiple-1 pixels per side.

    Draw masks on the returned image: `RegionCorruptor` rejects sides that are not multiples of 8.
    """
    rgb = as_rgb(rgb)
    if multiple < 1:
        raise ValueError(f"multiple must be 1 or more, got {multiple}.")
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        from PIL import Image

        scale = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS))
    height, width = (rgb.shape[0] // multiple) * multiple, (rgb.shape[1] // multiple) * multiple
    if height == 0 or width == 0:
        raise ValueError(f"The image ({rgb.shape[1]}x{rgb.shape[0]}) is smaller than {multiple} pixels on a side.")
    top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def _check_mask(mask) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        what = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"The mask must be a bool array of shape (H, W), got a {what}.")
    return mask


def _resize_float(values: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC),
                      dtype=np.float64)


def _psnr(mse: float) -> float:
    return math.inf if mse <= 0 else 10.0 * math.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------------------------
# Latent corruption (torch)

def seeded_noise(shape: Sequence[int], seed: int, device="cpu"):
    """eps ~ N(0, I) float32 of `shape` from a CPU torch.Generator seeded with `seed`, moved to `device`."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def blur_latent(latents, sigma: float):
    """Per-channel Gaussian blur of latents [B, C, h, w], sigma in latent cells: a normalised kernel
    of radius int(3 sigma + 0.5), replicate borders (scipy.ndimage.gaussian_filter with
    mode="nearest", truncate=3.0, over the two spatial axes)."""
    import torch
    import torch.nn.functional as F

    sigma = float(sigma)
    radius = max(1, int(3.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 / (sigma * sigma) * x**2)
    kernel = (kernel / kernel.sum()).to(device=latents.device, dtype=latents.dtype)
    channels = latents.shape[1]
    out = F.pad(latents, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def corrupted_latent(inversion: Inversion, latent_mask: np.ndarray, params: CorruptParams):
    """The latent at `inversion.timestep` right before resampling (for direct methods: the latent decoded).

    Outside `latent_mask` it is exactly the inverted z_t (z0 for direct methods); inside, per
    `params.method` (see the module docstring).
    """
    import torch
    import torch.nn.functional as F

    z0, zt = inversion.z0, inversion.zt
    cells = np.asarray(latent_mask, dtype=bool)
    if cells.shape != tuple(zt.shape[-2:]):
        raise ValueError(f"The latent mask is {cells.shape}, the latent grid is {tuple(zt.shape[-2:])}.")
    m = torch.from_numpy(cells).to(zt.device)[None, None]
    method = params.method
    if method == "direct":  # the paper's direct corruption: pure N(0, 1) in the image latent
        return torch.where(m, seeded_noise(z0.shape, params.seed, z0.device), z0)
    if method in ("renoise", "ddim", "direct-noised", "gaussian"):
        eps = seeded_noise(zt.shape, params.seed, zt.device)
        if method == "gaussian":
            return torch.where(m, eps, zt)
        a = float(inversion.alpha_t)
        noised = math.sqrt(a) * z0 + math.sqrt(1.0 - a) * eps
        return torch.where(m, noised, z0 if method == "direct-noised" else zt)
    if method == "rotate":
        rows, cols = np.nonzero(cells)
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        patch = zt[..., y0:y1, x0:x1]
        turned = torch.rot90(patch, 1, dims=(-2, -1))
        if turned.shape[-2:] != patch.shape[-2:]:
            turned = F.interpolate(turned, size=tuple(patch.shape[-2:]), mode="nearest")
        rotated = zt.clone()
        rotated[..., y0:y1, x0:x1] = turned
        return torch.where(m, rotated, zt)
    if method == "downscale":
        h, w = zt.shape[-2:]
        small = F.interpolate(zt, size=(max(1, h // 8), max(1, w // 8)), mode="area")
        return torch.where(m, F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), zt)
    if method == "blur":
        return torch.where(m, blur_latent(zt, params.blur_sigma), zt)
    raise ValueError(f"Unknown method '{method}'; use one of {', '.join(METHODS)}.")


# ----------------------------------------------------------------------------------------------
# The corruptor

class _Steps:
    """progress(step, total) and should_stop() around the loops."""

    def __init__(self, total: int, progress: ProgressFn | None, should_stop: StopFn | None):
        self.total, self.done, self.progress, self.should_stop = total, 0, progress, should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("Corruption was stopped.")

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()


class RegionCorruptor:
    """Invert once per image, corrupt many regions and seeds (see the module docstring).

    Counters: `unet_calls` (all UNet evaluations), `inversions_computed`, `cache_hits`
    (= `memory_hits` + `disk_hits`, inversions only); `cache_problems` lists unreadable cache files
    and failed writes.
    """

    def __init__(self, loaded: LoadedModel, cache_dir: str | os.PathLike | None = None,
                 memory_entries: int = DEFAULT_MEMORY_ENTRIES):
        import torch
        from diffusers import DDIMScheduler

        pipe = loaded.model
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise ValueError(f"Region corruption needs a Stable-Diffusion-style pipeline; {type(pipe).__name__} has no {part}.")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(f"Region corruption supports one-text-encoder pipelines (SD 1.x/2.x); {type(pipe).__name__} is not supported.")
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"Region corruption supports epsilon or v prediction, not '{prediction}'.")
        if int(memory_entries) < 0:
            raise ValueError(f"memory_entries must be 0 or more, got {memory_entries}.")
        self.loaded = loaded
        self.pipe = pipe
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.prediction_type = prediction
        self.factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self.final_alpha = float(self.scheduler.final_alpha_cumprod)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_entries = int(memory_entries)
        self.model_key = _model_key(loaded, pipe)
        self.unet_calls = 0
        self.inversions_computed = 0
        self.memory_hits = 0
        self.disk_hits = 0
        self.cache_problems: list[str] = []
        self._memory: OrderedDict[str, Inversion] = OrderedDict()
        self._resampled: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()  # uncorrupted resamples

    @property
    def cache_hits(self) -> int:
        return self.memory_hits + self.disk_hits

    # -- public calls
    def invert(self, image, params: CorruptParams, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> Inversion:
        """Inversion of `image` (RGB uint8 HWC, sides multiples of 8) as `params` say; cached."""
        params.validate()
        rgb = self._check_image(image)
        key = self.cache_key(rgb, params)
        cached = self._lookup(key, rgb.shape[:2])
        steps = _Steps(0 if cached else params.corruption_steps, progress, should_stop)
        steps.check()
        return cached or self._invert(rgb, params, key, steps)

    def corrupt(self, image, mask: np.ndarray, params: CorruptParams, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None) -> CorruptionResult:
        """Corrupt the region `mask` of `image`; returns the new image and its label."""
        return self.preview(image, mask, params, [params.seed], progress, should_stop)[0]

    def preview(self, image, mask: np.ndarray, params: CorruptParams, seeds: Sequence[int],
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> list[CorruptionResult]:
        """One inversion, several seeds: the resampling of all seeds runs as one batch (the uncorrupted
        z_t is resampled once per inversion and resampling settings, in a batch of its own)."""
        import torch

        start = time.perf_counter()
        params.validate()
        seeds = [int(s) for s in seeds]
        if not (1 <= len(seeds) <= MAX_SEEDS) or any(not (0 <= s <= MAX_SEED) for s in seeds):
            raise ValueError(f"Give 1 to {MAX_SEEDS} seeds, each between 0 and {MAX_SEED}.")
        rgb = self._check_image(image)
        mask = _check_mask(mask)
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"The mask is {mask.shape[1]}x{mask.shape[0]} but the image is {rgb.shape[1]}x{rgb.shape[0]}; they must match.")
        if not mask.any():
            raise ValueError("The mask is empty; mark at least one pixel of the region to corrupt.")
        cells = latent_mask(mask, params.mask_mode, self.factor)
        if not cells.any():
            raise ValueError(f"The mask covers no latent cell in mask_mode '{params.mask_mode}'; "
                             "draw a larger region or use mask_mode 'any'.")
        corrupted_area = label_mask(cells, self.factor)
        label = corrupted_area if params.label == "corrupted" else mask
        k = params.corruption_steps
        before = self.unet_calls
        with torch.inference_mode():
            if params.method in DIRECT_METHODS:
                steps = _Steps(0, progress, should_stop)
                steps.check()
                inversion, cache_hit = self._direct_inversion(rgb, params), False
                latents = torch.cat([corrupted_latent(inversion, cells, replace(params, seed=s)) for s in seeds])
                images = self._decode(latents)
                (clean,) = self._decode(inversion.z0)
            else:
                key = self.cache_key(rgb, params)
                cached = self._lookup(key, rgb.shape[:2])
                known = self._resampled_get(key, params, rgb.shape[:2])
                steps = _Steps((0 if cached else k) + k + (0 if known else k), progress, should_stop)
                steps.check()
                inversion, cache_hit = cached or self._invert(rgb, params, key, steps), cached is not None
                latents = torch.cat([corrupted_latent(inversion, cells, replace(params, seed=s)) for s in seeds])
                images = self._decode(self._resample(latents, inversion, params, steps))
                clean = (known or self._uncorrupted(key, inversion, params, steps))[1]
        spent = self.unet_calls - before
        per_seed = 0 if params.method in DIRECT_METHODS else k * (2 if params.guidance_scale > 1 else 1)
        seconds = time.perf_counter() - start
        region_iou = mask_iou(mask, corrupted_area)
        results = []
        for i, (seed, out) in enumerate(zip(seeds, images)):
            if params.paste_back:
                out = np.ascontiguousarray(np.where(label[:, :, None], out, rgb))
            vs_input, vs_resample = measure(rgb, out, label), measure(clean, out, label)
            results.append(CorruptionResult(
                image=out, mask=label.copy(), requested_mask=mask.copy(), latent_mask=cells.copy(),
                params=replace(params, seed=seed), region_iou=region_iou,
                inside_change=vs_input.inside, outside_change=vs_input.outside, confinement=vs_input.confinement,
                inside_change_vs_resample=vs_resample.inside, outside_change_vs_resample=vs_resample.outside,
                confinement_vs_resample=vs_resample.confinement, uncorrupted=clean,
                unet_calls=spent - per_seed * (len(seeds) - 1) if i == 0 else per_seed,
                cache_hit=cache_hit, seconds=seconds))
        return results

    def reconstruction_error(self, image, params: CorruptParams, progress: ProgressFn | None = None,
                             should_stop: StopFn | None = None) -> dict:
        """Invert and resample with NO corruption (the cached uncorrupted resample); errors against the input.

        Keys: mae, psnr (output vs input, 0-255); vae_mae, vae_psnr (decode(z0) vs input: the floor
        set by the VAE alone); inversion_mae, inversion_psnr (output vs decode(z0): what inversion and
        resampling add on top of the VAE); latent_mae, latent_max (resampled latent vs z0);
        unet_calls (this call).
        """
        import torch

        params.validate()
        rgb = self._check_image(image)
        before = self.unet_calls
        k = params.corruption_steps
        with torch.inference_mode():
            key = self.cache_key(rgb, params)
            cached = self._lookup(key, rgb.shape[:2])
            known = self._resampled_get(key, params, rgb.shape[:2])
            steps = _Steps((0 if cached else k) + (0 if known else k), progress, should_stop)
            steps.check()
            inversion = cached or self._invert(rgb, params, key, steps)
            latent, out = known or self._uncorrupted(key, inversion, params, steps)
            (floor,) = self._decode(inversion.z0)
        diff = (latent.to(inversion.z0.device) - inversion.z0).abs()
        out, floor, target = out.astype(np.float64), floor.astype(np.float64), rgb.astype(np.float64)
        return {"mae": float(np.abs(out - target).mean()), "psnr": _psnr(float(np.mean((out - target) ** 2))),
                "vae_mae": float(np.abs(floor - target).mean()), "vae_psnr": _psnr(float(np.mean((floor - target) ** 2))),
                "inversion_mae": float(np.abs(out - floor).mean()),
                "inversion_psnr": _psnr(float(np.mean((out - floor) ** 2))),
                "latent_mae": float(diff.mean()), "latent_max": float(diff.max()),
                "unet_calls": self.unet_calls - before}

    def resample_latent(self, latents, inversion: Inversion, params: CorruptParams, progress: ProgressFn | None = None,
                        should_stop: StopFn | None = None):
        """DDIM (eta 0) from `inversion.timestep` to the clean latent; `latents` [B, C, h, w]."""
        import torch

        params.validate()
        steps = _Steps(len(inversion.timesteps), progress, should_stop)
        with torch.inference_mode():
            return self._resample(latents.to(self.device, torch.float32), inversion, params, steps)

    def cache_key(self, rgb: np.ndarray, params: CorruptParams) -> str:
        """sha256 over everything the inversion of `rgb` depends on (see the module docstring)."""
        fields: dict[str, Any] = {
            "format": CACHE_FORMAT, "image": image_digest(rgb), "model": self.model_key,
            "prompt": params.prompt, "steps": int(params.num_inference_steps), "k": params.corruption_steps,
            "method": params.inversion_method, "guidance": float(params.inversion_guidance_scale),
            "dtype": str(self.dtype),
        }
        if params.inversion_guidance_scale > 1:
            fields["negative_prompt"] = params.negative_prompt
        if params.inversion_method == "renoise":
            fields["renoise"] = {name: list(v) if isinstance(v, tuple) else v for name, v in params.renoise_settings().items()}
            fields["reg_seed"] = REG_SEED
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def resample_key(self, params: CorruptParams) -> str:
        """What the uncorrupted resample adds to its inversion's key: resampling guidance and prompts."""
        fields = {"guidance": float(params.guidance_scale), "prompt": params.prompt,
                  "negative_prompt": params.negative_prompt if params.guidance_scale > 1 else ""}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    # -- the schedule
    def _schedule(self, n: int) -> list[int]:
        self.scheduler.set_timesteps(n)
        return [int(t) for t in self.scheduler.timesteps]

    def _alpha(self, timestep: int | None) -> float:
        """abar at a timestep; None is the clean state after the last sampling step."""
        return self.final_alpha if timestep is None else float(self.alphas_cumprod[timestep])

    # -- model calls
    def _embeddings(self, prompt: str, negative_prompt: str, guided: bool):
        """Prompt embedding [1, L, D]; with guidance [2, L, D] = (negative, prompt)."""
        import torch

        cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, guided, negative_prompt if guided else None)
        return torch.cat([uncond, cond]) if guided else cond

    def _eps(self, latents, timestep: int, embeddings, guidance: float):
        """Noise prediction for a batch of latents (float32), with classifier-free guidance when > 1."""
        import torch

        guided = guidance > 1
        batch = latents.shape[0]
        model_in = torch.cat([latents, latents]) if guided else latents
        if guided:
            uncond, cond = embeddings.chunk(2)
            emb = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
        else:
            emb = embeddings.expand(batch, -1, -1)
        t = torch.tensor(timestep, device=self.device)
        out = self.pipe.unet(model_in.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        self.unet_calls += model_in.shape[0]
        if self.prediction_type == "v_prediction":
            a = self._alpha(timestep)
            out = math.sqrt(a) * out + math.sqrt(1 - a) * model_in.float()
        if guided:
            uncond_eps, cond_eps = out.chunk(2)
            return uncond_eps + guidance * (cond_eps - uncond_eps)
        return out

    def _encode(self, rgb: np.ndarray):
        import torch

        x = torch.tensor(rgb, device=self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        vae = self.pipe.vae
        return vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * float(vae.config.scaling_factor)

    def _decode(self, latents) -> list[np.ndarray]:
        vae = self.pipe.vae
        images = vae.decode((latents / float(vae.config.scaling_factor)).to(vae.dtype)).sample.float()
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return to_uint8(images)

    # -- inversion and resampling
    def _invert(self, rgb: np.ndarray, params: CorruptParams, key: str, steps: _Steps) -> Inversion:
        import functools

        import torch

        before = self.unet_calls
        n, k = int(params.num_inference_steps), params.corruption_steps
        timesteps = self._schedule(n)
        guidance = float(params.inversion_guidance_scale)
        with torch.inference_mode():
            z0 = self._encode(rgb)
            emb = self._embeddings(params.prompt, params.negative_prompt, guidance > 1)
            generator = torch.Generator(device="cpu").manual_seed(REG_SEED) if params.regularised else None
            z = z0
            for j in range(k):
                index = n - 1 - j  # sampling step being inverted: from T[index + 1] (or clean) to T[index]
                t = timesteps[index]  # the TARGET timestep: every UNet call of this step sees t
                a_cur = self._alpha(timesteps[index + 1] if index + 1 < n else None)
                a_next = self._alpha(t)
                eps_fn = functools.partial(self._eps, timestep=t, embeddings=emb, guidance=guidance)
                if params.inversion_method == "renoise":
                    z = renoise_step(eps_fn, z, z0, t, a_cur, a_next, params, generator)
                else:
                    z = inverse_step(z, eps_fn(z), a_cur, a_next)
                steps.advance()
        t = timesteps[n - k]
        inversion = Inversion(key=key, z0=z0, zt=z, timestep=t, step_index=n - k, timesteps=tuple(timesteps[n - k:]),
                              alpha_t=self._alpha(t), image_size=(rgb.shape[0], rgb.shape[1]),
                              method=params.inversion_method, unet_calls=self.unet_calls - before)
        self.inversions_computed += 1
        self._remember(inversion)
        self._disk_put(inversion)
        return inversion

    def _resample(self, latents, inversion: Inversion, params: CorruptParams, steps: _Steps):
        import torch

        guidance = float(params.guidance_scale)
        emb = self._embeddings(params.prompt, params.negative_prompt, guidance > 1)
        z = latents
        timesteps = inversion.timesteps
        for i, t in enumerate(timesteps):
            eps = self._eps(z, t, emb, guidance)
            a_prev = self._alpha(timesteps[i + 1] if i + 1 < len(timesteps) else None)
            z = _sample_step(z, eps, self._alpha(t), a_prev)
            steps.advance()
        return z.to(torch.float32)

    def _uncorrupted(self, key: str, inversion: Inversion, params: CorruptParams, steps: _Steps):
        """Resample z_t with no corruption (alone, so the result never depends on what it was batched
        with), decode it and cache both: (latent [1, C, h, w], image uint8 [H, W, 3])."""
        latent = self._resample(inversion.zt, inversion, params, steps)
        (image,) = self._decode(latent)
        self._resampled_put(key, params, latent, image)
        return latent, image

    def _direct_inversion(self, rgb: np.ndarray, params: CorruptParams) -> Inversion:
        """z0 and abar_t only (no UNet): what the direct methods need."""
        n, k = int(params.num_inference_steps), params.corruption_steps
        timesteps = self._schedule(n)
        z0 = self._encode(rgb)
        t = timesteps[n - k]
        return Inversion(key="", z0=z0, zt=z0, timestep=t, step_index=n - k, timesteps=tuple(timesteps[n - k:]),
                         alpha_t=self._alpha(t), image_size=(rgb.shape[0], rgb.shape[1]), method="none", unet_calls=0)

    # -- checks and the cache
    def _check_image(self, image) -> np.ndarray:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        if height % self.factor or width % self.factor:
            raise ValueError(f"The image is {width}x{height}; both sides must be multiples of {self.factor} "
                             f"(prepare_image(rgb, multiple={self.factor}) crops it to fit).")
        return rgb

    def _lookup(self, key: str, size: tuple[int, int]) -> Inversion | None:
        found = self._memory.get(key)
        if found is not None:
            self._memory.move_to_end(key)
            self.memory_hits += 1
            return replace(found, source="memory")
        found = self._disk_get(key, size)
        if found is not None:
            self.disk_hits += 1
            self._remember(found)
        return found

    def _remember(self, inversion: Inversion) -> None:
        _bounded_put(self._memory, inversion.key, inversion, self.memory_entries)

    def _latent_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        return (1, int(self.pipe.vae.config.latent_channels), size[0] // self.factor, size[1] // self.factor)

    def _disk_get(self, key: str, size: tuple[int, int]) -> Inversion | None:
        path = self.cache_path(key)
        loaded = self._read_entry(path, key)
        if loaded is None:
            return None
        meta, tensors = loaded
        try:
            info = json.loads(meta.get("info", "{}"))
        except ValueError:
            info = None
        expected = self._latent_shape(size)
        z0, zt = tensors.get("z0"), tensors.get("zt")
        problem = None
        if z0 is None or zt is None or tuple(z0.shape) != expected or tuple(zt.shape) != expected:
            problem = "latents are missing or have the wrong shape"
        elif not (bool(z0.isfinite().all()) and bool(zt.isfinite().all())):
            problem = "latents are not finite"
        elif not isinstance(info, dict) or not {"timestep", "step_index", "timesteps", "alpha_t", "method", "unet_calls"} <= set(info):
            problem = "description is incomplete"
        if problem:
            self.cache_problems.append(f"{path.name}: {problem}; recomputed.")
            return None
        return Inversion(key=key, z0=z0.to(self.device, z0.dtype), zt=zt.to(self.device, zt.dtype),
                         timestep=int(info["timestep"]), step_index=int(info["step_index"]),
                         timesteps=tuple(int(t) for t in info["timesteps"]), alpha_t=float(info["alpha_t"]),
                         image_size=(int(size[0]), int(size[1])), method=str(info["method"]),
                         unet_calls=int(info["unet_calls"]), source="disk")

    def _disk_put(self, inversion: Inversion) -> None:
        info = {"timestep": inversion.timestep, "step_index": inversion.step_index, "timesteps": list(inversion.timesteps),
                "alpha_t": inversion.alpha_t, "method": inversion.method, "unet_calls": inversion.unet_calls}
        self._write_entry(self.cache_path(inversion.key), inversion.key,
                          {"z0": inversion.z0.detach().float().cpu().contiguous(),
                           "zt": inversion.zt.detach().float().cpu().contiguous()},
                          {"info": json.dumps(info)})

    def _resampled_path(self, key: str, params: CorruptParams) -> tuple[str, Path | None]:
        name = f"{key}.resample-{self.resample_key(params)}"
        return name, None if self.cache_dir is None else self.cache_dir / f"{name}.safetensors"

    def _resampled_get(self, key: str, params: CorruptParams, size: tuple[int, int]):
        """(latent [1, C, h, w], image uint8 [H, W, 3]) of the uncorrupted resample, or None."""
        name, path = self._resampled_path(key, params)
        found = self._resampled.get(name)
        if found is not None:
            self._resampled.move_to_end(name)
            return found
        loaded = self._read_entry(path, name)
        if loaded is None:
            return None
        latent, image = loaded[1].get("latent"), loaded[1].get("image")
        if (latent is None or image is None or tuple(latent.shape) != self._latent_shape(size)
                or tuple(image.shape) != (size[0], size[1], 3) or str(image.dtype) != "torch.uint8"):
            self.cache_problems.append(f"{path.name}: the resample is missing or has the wrong shape; recomputed.")
            return None
        found = (latent.to(self.device, latent.dtype), np.ascontiguousarray(image.numpy()))
        _bounded_put(self._resampled, name, found, self.memory_entries)
        return found

    def _resampled_put(self, key: str, params: CorruptParams, latent, image: np.ndarray) -> None:
        import torch

        name, path = self._resampled_path(key, params)
        _bounded_put(self._resampled, name, (latent, image), self.memory_entries)
        self._write_entry(path, name, {"latent": latent.detach().float().cpu().contiguous(),
                                       "image": torch.from_numpy(np.ascontiguousarray(image))}, {})

    def _read_entry(self, path: Path | None, key: str):
        """(metadata, tensors) of a cache file written for `key`, or None (problems are recorded)."""
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self.cache_problems.append(f"{path.name}: unreadable ({_first_line(exc)}); recomputed.")
            return None
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            self.cache_problems.append(f"{path.name}: metadata does not match this key; recomputed.")
            return None
        return meta, tensors

    def _write_entry(self, path: Path | None, key: str, tensors: dict, meta: dict) -> None:
        """Write to a temporary sibling, then rename; a full or read-only disk costs a recompute later."""
        if path is None:
            return
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format": CACHE_FORMAT, "key": key, "model_id": self.loaded.model_id, **meta}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            self.cache_problems.append(f"{path.name}: not written ({_first_line(exc)}).")
        finally:
            if tmp.exists():
                tmp.unlink()


def _bounded_put(memory: OrderedDict, key: str, value, limit: int) -> None:
    """Put `value` last in an LRU dict holding at most `limit` entries (0: keep nothing)."""
    if limit == 0:
        return
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


def _sample_step(z, eps, a_t: float, a_prev: float):
    """DDIM step (eta 0) from abar a_t to a_prev: DDIMScheduler.step with epsilon prediction, no clipping."""
    x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def _model_key(loaded: LoadedModel, pipe) -> str:
    """sha256 of the model id, the scheduler config and a strided sample of every weight tensor of the
    UNet, VAE and text encoder (16 values per tensor, so fine-tunes and fused LoRAs change it)."""
    import torch

    digest = hashlib.sha256(f"{loaded.model_id}|{type(pipe).__name__}|".encode())
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder"):
            named = list(getattr(pipe, part).named_parameters())
            digest.update(f"{part}|{[(n, tuple(p.shape)) for n, p in named]}|".encode())
            if named:
                samples = [p.detach().reshape(-1)[:: max(1, p.numel() // 16)][:16].to(torch.float32) for _, p in named]
                digest.update(np.ascontiguousarray(torch.cat(samples).cpu().numpy()).tobytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
