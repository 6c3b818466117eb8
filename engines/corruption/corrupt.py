"""Synthetic pixel-level artifact labels by region corruption (Menn, Liang, Marculescu).

Invert a clean image part of the way, corrupt the latent inside a region, resample to t = 0: the
region becomes a free pixel-level label. `RegionCorruptor(loaded)` wraps a Stable-Diffusion-style
text-to-image pipeline (one text encoder, epsilon or v prediction); `invert` is the expensive,
cached step, `corrupt` / `preview` are the cheap calls made many times per image. This module owns
the request (`CorruptParams`), the corruption and its baselines, and the result; siblings:
inversion.py (the schedule, DDIM / ReNoise inversion, resampling, the inversion cache:
`LatentInverter`, which `RegionCorruptor` extends), metrics.py (masks and measurements),
renoise.py (one ReNoise step).

1. Inversion (engines/corruption/inversion.py describes the schedule, both methods and the cache).
   The k lowest-noise steps of the DDIM schedule are inverted, giving z_t at t = T[N-k] ("corrupt
   at step N-k": N=50, k=10 -> step 40 of the sampling loop); k is `inversion_steps` for the
   proposed method and `baseline_steps` (20) for the resampled baselines. "ddim" is plain DDIM
   inversion, "renoise" (default) the ReNoise reference's step. `preset` names the ReNoise settings
   and is recorded with every result: "renoise-sd" (default: the reference's SD configuration),
   "renoise-fast" (regularisation off: interactive previews) or "custom" (any values; the named
   presets refuse settings that differ from them).
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
4. Inversion cache (engines/corruption/inversion.py). Inversions are cached in memory and, with
   `cache_dir`, on disk, keyed by everything they depend on; the uncorrupted resample of an
   inversion is cached beside it. Another mask, seed or baseline sharing a cached inversion costs
   only the resampling: its steps x (2 if guidance_scale > 1) UNet evaluations per seed.
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

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from engines.images import as_rgb
from engines.corruption.inversion import Inversion, LatentInverter, ProgressFn, StopFn, Steps
from engines.corruption.metrics import MASK_MODES, check_mask, label_mask, latent_mask, mask_iou, measure
from engines.corruption.renoise import PRESETS as RENOISE_PRESETS
from engines.corruption.renoise import RENOISE_FIELDS, RENOISE_SD, regularised

__all__ = [
    "BASELINES", "CorruptParams", "CorruptionResult", "DIRECT_METHODS", "INVERSION_METHODS", "LABEL_MODES",
    "METHODS", "PRESETS", "RESAMPLED_BASELINES", "RegionCorruptor", "blur_latent", "corrupted_latent",
    "seeded_noise",
]

INVERSION_METHODS = ("renoise", "ddim")
RESAMPLED_BASELINES = ("blur", "rotate", "gaussian", "downscale")
DIRECT_METHODS = ("direct", "direct-noised")
BASELINES = RESAMPLED_BASELINES + DIRECT_METHODS
METHODS = INVERSION_METHODS + BASELINES
LABEL_MODES = ("corrupted", "requested")
PRESETS = (*RENOISE_PRESETS, "custom")
MAX_SEED = 2**32 - 1
MAX_SEEDS = 16
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

class RegionCorruptor(LatentInverter):
    """Invert once per image, corrupt many regions and seeds (see the module docstring).

    Made as `RegionCorruptor(loaded, cache_dir=None, memory_entries=25)`; the pipeline, the
    inversion and the cache come from `LatentInverter` (engines/corruption/inversion.py).
    Counters: `unet_calls` (all UNet evaluations), `inversions_computed`, `cache_hits`
    (= `memory_hits` + `disk_hits`, inversions only); `cache_problems` lists unreadable cache files
    and failed writes.
    """

    # -- public calls
    def invert(self, image, params: CorruptParams, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> Inversion:
        """Inversion of `image` (RGB uint8 HWC, sides multiples of 8) as `params` say; cached."""
        params.validate()
        rgb = self._check_image(image)
        key = self.cache_key(rgb, params)
        cached = self.lookup(key, rgb.shape[:2])
        steps = Steps(0 if cached else params.corruption_steps, progress, should_stop)
        steps.check()
        return cached or self.compute_inversion(rgb, params, key, steps)

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
        mask = check_mask(mask)
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
                steps = Steps(0, progress, should_stop)
                steps.check()
                inversion, cache_hit = self.direct_inversion(rgb, params), False
                latents = torch.cat([corrupted_latent(inversion, cells, replace(params, seed=s)) for s in seeds])
                images = self.decode(latents)
                (clean,) = self.decode(inversion.z0)
            else:
                key = self.cache_key(rgb, params)
                cached = self.lookup(key, rgb.shape[:2])
                known = self.resampled_get(key, params, rgb.shape[:2])
                steps = Steps((0 if cached else k) + k + (0 if known else k), progress, should_stop)
                steps.check()
                inversion, cache_hit = cached or self.compute_inversion(rgb, params, key, steps), cached is not None
                latents = torch.cat([corrupted_latent(inversion, cells, replace(params, seed=s)) for s in seeds])
                images = self.decode(self.resample(latents, inversion, params, steps))
                clean = (known or self.uncorrupted(key, inversion, params, steps))[1]
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
            cached = self.lookup(key, rgb.shape[:2])
            known = self.resampled_get(key, params, rgb.shape[:2])
            steps = Steps((0 if cached else k) + (0 if known else k), progress, should_stop)
            steps.check()
            inversion = cached or self.compute_inversion(rgb, params, key, steps)
            latent, out = known or self.uncorrupted(key, inversion, params, steps)
            (floor,) = self.decode(inversion.z0)
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
        steps = Steps(len(inversion.timesteps), progress, should_stop)
        with torch.inference_mode():
            return self.resample(latents.to(self.device, torch.float32), inversion, params, steps)

    # -- checks
    def _check_image(self, image) -> np.ndarray:
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        if height % self.factor or width % self.factor:
            raise ValueError(f"The image is {width}x{height}; both sides must be multiples of {self.factor} "
                             f"(prepare_image(rgb, multiple={self.factor}) crops it to fit).")
        return rgb
