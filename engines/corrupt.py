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
   so the same pixels always give the same z0), with the prompt's embedding (the caption if known,
   else ""). By default the inversion uses the conditional prediction only
   (`inversion_guidance_scale` 1.0; above 1, classifier-free guidance with `negative_prompt`).
   Only the k = `inversion_steps` lowest-noise steps are inverted, giving z_t at t = T[N-k]
   ("corrupt at step N-k": N=50, k=10 -> step 40 of the sampling loop).
   - "ddim": plain DDIM inversion. Step j goes from the current latent z to the next timestep t' with
     eps = eps(z, t'): the prediction at the CURRENT latent with the step's target timestep (as
     diffusers' DDIMInverseScheduler and ReNoise do; the clean z0 has no timestep of its own).
   - "renoise" (Garibi et al. 2024): start from that DDIM estimate z'(0), then `renoise_iterations`
     times re-estimate eps at the NEXT latent, eps_r = eps(z'(r-1), t'), z'(r) = inverse step from z
     with eps_r; average eps over the last `average_last` of those renoise predictions (default all
     of them, i.e. all after the first DDIM one) and take the final inverse step with that average.
     Defaults follow ReNoise's SD 1.5 example: DDIM 50 steps, 1 renoise iteration. Optional noise
     regularisation as in pix2pix-zero / ReNoise (off by default): `num_reg_steps` gradient steps on
     eps (UNet frozen, gradients on eps only) with a pairwise patch autocorrelation loss over
     `num_reg_rolls` random rolls (weight `lambda_ac`, ReNoise uses 20) and a patch KL divergence
     to the prediction at the forward-noised z0 (weight `lambda_kl`, ReNoise uses 0.065; one extra
     UNet evaluation per step). Its random rolls and forward noise use a fixed seed (0), so an
     inversion is a pure function of its cache key. ReNoise's SDXL-Turbo-specific first-step rules
     and its noise correction are not implemented.
2. Region corruption (paper eq. 3-5). The pixel mask bool[H, W] becomes a latent mask m bool[h, w]
   (h = H/8, w = W/8) by `mask_mode` (see `latent_mask`): "area" (default; a cell is corrupted when
   at least half of its 8x8 pixels are), "nearest" (the pixel at the cell centre), "any" (any pixel
   in the cell). Outside m the latent is the inverted z_t, inside m it is
   sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) drawn over the whole latent from a CPU
   `torch.Generator` seeded with `seed` (`seeded_noise`), then DDIM resampling from t to 0 over the
   remaining k steps (sampling steps N-k .. N-1, eta 0) with the same prompt and `guidance_scale` (classifier-free guidance with
   `negative_prompt` when above 1), decoded by the VAE. `paste_back` (off, as in the paper) puts the
   original pixels back outside the pixel mask.
3. Baselines (`method`), all resampled from t like the main method unless stated; all use the
   ReNoise inversion with the given settings, so they share the main method's cache entry:
   "gaussian"  latent inside m replaced by eps alone (no sqrt(abar) z0 term);
   "rotate"    z_t inside m taken from z_t's patch in m's bounding box rotated by 90 degrees
               (counter-clockwise; a non-square patch is resized back to the box, nearest);
   "downscale" z_t downscaled 8x ("area") and upscaled back (bilinear), taken inside m;
   "blur"      the image inside the pixel mask is Gaussian-blurred (`blur_sigma` px), encoded and
               inverted like the original (a second, cached inversion of the blurred image), and
               its inverted z_t replaces the latent inside m. This is the image-space blur read of
               the paper's baseline; it costs one extra inversion per (image, mask);
   "direct"    no inversion and NO resampling: z0 with the eq. 3-5 noised latent inside m, decoded
               in one VAE pass (0 UNet calls): what the noise alone does without denoising.
4. Inversion cache. An inversion is keyed by sha256 over (image shape + pixels, model key, prompt,
   N, k, inversion method, ReNoise settings, inversion guidance and its negative prompt, dtype);
   the model key hashes the model id, the scheduler config and a strided sample of every UNet, VAE
   and text-encoder weight tensor, taken when the corruptor is made (make a new corruptor after
   changing weights in place). Entries live in an LRU in memory (25, as ReNoise's demo) and, with
   `cache_dir`, on disk as `<cache_dir>/<key>.safetensors` (z0, z_t; written to a temporary
   sibling and renamed; an unreadable or mismatching file is recomputed; never size-limited). Another mask, seed or baseline on a cached image costs only the resampling:
   k UNet evaluations x (2 if guidance_scale > 1), per seed.
5. Measurements: `measure` gives the mean absolute pixel change (0-255, over pixels and channels)
   inside and outside the pixel mask and confinement = inside / outside (higher = the change stays
   in the region; outside == 0 gives inf, or 1.0 when nothing changed at all).
   `reconstruction_error` inverts and resamples with no corruption.

UNet evaluations (`unet_calls`) count latents passed through the UNet: one per latent per forward,
so a classifier-free-guided step counts 2 and a batch of 3 seeds counts 3 per step.
Conventions: images RGB uint8 HWC with H, W multiples of 8 (`prepare_image` crops/resizes others);
masks bool[H, W], True = region to corrupt. Everything runs under `torch.inference_mode()` except
the optional noise regularisation. Not thread-safe: one corruptor per device, calls serialised.
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

from engines.generate import Cancelled, to_uint8
from engines.images import as_rgb, image_digest
from engines.models import LoadedModel

__all__ = [
    "BASELINES", "CACHE_FORMAT", "Cancelled", "ChangeStats", "CorruptParams", "CorruptionResult",
    "INVERSION_METHODS", "Inversion", "MASK_MODES", "METHODS", "RegionCorruptor", "blur_region",
    "corrupted_latent", "image_digest", "latent_mask", "measure", "prepare_image", "random_blob_mask",
    "regularise_noise", "seeded_noise",
]

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

INVERSION_METHODS = ("renoise", "ddim")
BASELINES = ("blur", "rotate", "gaussian", "downscale", "direct")
METHODS = INVERSION_METHODS + BASELINES
MASK_MODES = ("area", "nearest", "any")
MAX_SEED = 2**32 - 1
MAX_SEEDS = 16
CACHE_FORMAT = "artifact-studio-inversion-v1"
DEFAULT_MEMORY_ENTRIES = 25
REG_SEED = 0  # fixed seed of the regularisation's rolls and forward noise


@dataclass(frozen=True)
class CorruptParams:
    """One corruption request. Defaults: the paper's setting (ReNoise, 10 of 50 DDIM steps)."""

    num_inference_steps: int = 50  # N, DDIM steps of the full schedule
    inversion_steps: int = 10  # k, lowest-noise steps inverted; corruption happens at step N - k
    method: str = "renoise"  # one of METHODS
    seed: int = 0  # eps of eq. 3-5 (and of "gaussian" / "direct")
    guidance_scale: float = 1.0  # resampling; > 1 uses classifier-free guidance with negative_prompt
    prompt: str = ""  # the caption if known
    negative_prompt: str = ""
    renoise_iterations: int = 1  # ReNoise SD 1.5 example: 1
    average_last: int | None = None  # None: average all renoise iterations (all after the DDIM one)
    lambda_ac: float = 0.0  # ReNoise uses 20
    lambda_kl: float = 0.0  # ReNoise uses 0.065
    num_reg_steps: int = 4
    num_reg_rolls: int = 5
    inversion_guidance_scale: float = 1.0  # 1.0: conditional prediction only
    mask_mode: str = "area"  # one of MASK_MODES
    paste_back: bool = False
    blur_sigma: float = 5.0  # pixels, "blur" baseline only

    @property
    def inversion_method(self) -> str:
        """"ddim" for the ddim method, "renoise" for everything else (baselines share ReNoise's inversion)."""
        return "ddim" if self.method == "ddim" else "renoise"

    @property
    def regularised(self) -> bool:
        return self.inversion_method == "renoise" and self.num_reg_steps > 0 and (self.lambda_ac > 0 or self.lambda_kl > 0)

    def validate(self) -> None:
        """Raise ValueError with one sentence if any field is out of range."""
        n, k = int(self.num_inference_steps), int(self.inversion_steps)
        if not (2 <= n <= 1000):
            raise ValueError(f"num_inference_steps must be between 2 and 1000, got {self.num_inference_steps}.")
        if not (1 <= k < n):
            raise ValueError(f"inversion_steps must be at least 1 and less than num_inference_steps ({n}), got {k}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method '{self.method}'; use one of {', '.join(METHODS)}.")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"Unknown mask_mode '{self.mask_mode}'; use one of {', '.join(MASK_MODES)}.")
        if not (0 <= int(self.seed) <= MAX_SEED):
            raise ValueError(f"Seed {self.seed} is out of range; use 0 to {MAX_SEED}.")
        for name in ("guidance_scale", "inversion_guidance_scale"):
            value = float(getattr(self, name))
            if not (0.0 <= value <= 50.0):
                raise ValueError(f"{name} must be between 0 and 50, got {value}.")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("prompt and negative_prompt must be text.")
        if not (1 <= int(self.renoise_iterations) <= 50):
            raise ValueError(f"renoise_iterations must be between 1 and 50, got {self.renoise_iterations}.")
        if self.average_last is not None and not (1 <= int(self.average_last) <= int(self.renoise_iterations)):
            raise ValueError(f"average_last must be None or between 1 and renoise_iterations ({self.renoise_iterations}), "
                             f"got {self.average_last}.")
        if self.lambda_ac < 0 or self.lambda_kl < 0:
            raise ValueError("lambda_ac and lambda_kl must be 0 or more.")
        if not (0 <= int(self.num_reg_steps) <= 50) or not (1 <= int(self.num_reg_rolls) <= 50):
            raise ValueError("num_reg_steps must be between 0 and 50 and num_reg_rolls between 1 and 50.")
        if not (0.0 < float(self.blur_sigma) <= 100.0):
            raise ValueError(f"blur_sigma must be above 0 and at most 100 pixels, got {self.blur_sigma}.")

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

    `unet_calls` are the evaluations this result cost (its resampling, plus any inversion computed
    for it; in a preview the inversion is counted on the first result only, so results sum to the
    call's total). `cache_hit` says the image's inversion came from the cache.
    """

    image: np.ndarray
    mask: np.ndarray
    latent_mask: np.ndarray
    params: CorruptParams
    inside_change: float
    outside_change: float
    confinement: float
    unet_calls: int
    cache_hit: bool
    seconds: float


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


def blur_region(rgb: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """The image with its pixels inside `mask` replaced by a Gaussian blur (sigma px) of the image."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(rgb.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
    blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.where(mask[:, :, None], blurred, rgb))


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


def corrupted_latent(inversion: Inversion, latent_mask: np.ndarray, params: CorruptParams,
                     blurred: Inversion | None = None):
    """The latent at `inversion.timestep` right before resampling (for "direct": the latent decoded).

    Outside `latent_mask` it is exactly the inverted z_t (z0 for "direct"); inside, per `params.method`
    (see the module docstring). "blur" needs `blurred`, the inversion of the region-blurred image.
    """
    import torch
    import torch.nn.functional as F

    z0, zt = inversion.z0, inversion.zt
    cells = np.asarray(latent_mask, dtype=bool)
    if cells.shape != tuple(zt.shape[-2:]):
        raise ValueError(f"The latent mask is {cells.shape}, the latent grid is {tuple(zt.shape[-2:])}.")
    m = torch.from_numpy(cells).to(zt.device)[None, None]
    method = params.method
    if method in ("renoise", "ddim", "direct", "gaussian"):
        eps = seeded_noise(zt.shape, params.seed, zt.device)
        if method == "gaussian":
            return torch.where(m, eps, zt)
        a = float(inversion.alpha_t)
        noised = math.sqrt(a) * z0 + math.sqrt(1.0 - a) * eps
        return torch.where(m, noised, z0 if method == "direct" else zt)
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
        if blurred is None:
            raise ValueError("The blur baseline needs the inversion of the region-blurred image.")
        return torch.where(m, blurred.zt, zt)
    raise ValueError(f"Unknown method '{method}'; use one of {', '.join(METHODS)}.")


# ----------------------------------------------------------------------------------------------
# ReNoise noise regularisation (pix2pix-zero losses; gradients on eps only)

def _autocorrelation_loss(eps, generator):
    import torch
    import torch.nn.functional as F

    loss = eps.new_zeros(())
    for channel in range(eps.shape[1]):
        level = eps[:, channel:channel + 1]
        while True:
            roll = int(torch.randint(0, max(1, level.shape[-2] // 2), (1,), generator=generator))
            loss = loss + (level * torch.roll(level, shifts=roll, dims=-2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=roll, dims=-1)).mean() ** 2
            if min(level.shape[-2:]) <= 8:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def _patch_kl_loss(eps, reference, patch: int = 4):
    h, w = (eps.shape[-2] // patch) * patch, (eps.shape[-1] // patch) * patch
    if h == 0 or w == 0:
        return eps.new_zeros(())

    def stats(x):
        c = x.shape[1]
        cells = x[..., :h, :w].reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
        cells = cells.reshape(-1, c, patch * patch)
        return cells.mean(-1), cells.var(-1)

    mu0, var0 = stats(eps)
    mu1, var1 = stats(reference)
    tiny = 1e-6
    kl = ((var1 + tiny) / (var0 + tiny)).log() + (var0 + (mu0 - mu1) ** 2) / (var1 + tiny) - 1
    return kl.abs().sum()


def regularise_noise(eps, reference, params: CorruptParams, generator):
    """`num_reg_steps` gradient steps on eps: KL to `reference` (lambda_kl, gradient clipped to
    +-100) and autocorrelation over `num_reg_rolls` random rolls (lambda_ac). Returns a new tensor."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        e = eps.detach().clone()
        ref = reference.detach().clone() if reference is not None else None
        for _ in range(int(params.num_reg_steps)):
            if params.lambda_kl > 0 and ref is not None:
                var = e.detach().clone().requires_grad_(True)
                grad, = torch.autograd.grad(_patch_kl_loss(var, ref), var)
                e = e - params.lambda_kl * grad.clamp(-100, 100)
            if params.lambda_ac > 0:
                for _ in range(int(params.num_reg_rolls)):
                    var = e.detach().clone().requires_grad_(True)
                    grad, = torch.autograd.grad(_autocorrelation_loss(var, generator), var)
                    e = e - params.lambda_ac * grad / int(params.num_reg_rolls)
        return e.detach().clone()


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
    (= `memory_hits` + `disk_hits`); `cache_problems` lists unreadable cache files and failed writes.
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
        steps = _Steps(0 if cached else params.inversion_steps, progress, should_stop)
        steps.check()
        return cached or self._invert(rgb, params, key, steps)

    def corrupt(self, image, mask: np.ndarray, params: CorruptParams, progress: ProgressFn | None = None,
                should_stop: StopFn | None = None) -> CorruptionResult:
        """Corrupt the region `mask` of `image`; returns the new image and its label."""
        return self.preview(image, mask, params, [params.seed], progress, should_stop)[0]

    def preview(self, image, mask: np.ndarray, params: CorruptParams, seeds: Sequence[int],
                progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> list[CorruptionResult]:
        """One inversion, several seeds: the resampling of all seeds runs as one batch."""
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
        k = params.inversion_steps
        before = self.unet_calls
        with torch.inference_mode():
            if params.method == "direct":
                steps = _Steps(0, progress, should_stop)
                steps.check()
                inversion, cache_hit = self._direct_inversion(rgb, params), False
                blurred = None
            else:
                key = self.cache_key(rgb, params)
                cached = self._lookup(key, rgb.shape[:2])
                blurred_rgb = blur_region(rgb, mask, params.blur_sigma) if params.method == "blur" else None
                blurred_key = self.cache_key(blurred_rgb, params) if blurred_rgb is not None else None
                blurred = self._lookup(blurred_key, rgb.shape[:2]) if blurred_key else None
                total = (0 if cached else k) + (k if blurred_key and blurred is None else 0) + k
                steps = _Steps(total, progress, should_stop)
                steps.check()
                inversion, cache_hit = cached or self._invert(rgb, params, key, steps), cached is not None
                if blurred_key and blurred is None:
                    blurred = self._invert(blurred_rgb, params, blurred_key, steps)
            latents = torch.cat([corrupted_latent(inversion, cells, replace(params, seed=s), blurred) for s in seeds])
            if params.method != "direct":
                latents = self._resample(latents, inversion, params, steps)
            images = self._decode(latents)
        spent = self.unet_calls - before
        per_seed = 0 if params.method == "direct" else k * (2 if params.guidance_scale > 1 else 1)
        seconds = time.perf_counter() - start
        results = []
        for i, (seed, out) in enumerate(zip(seeds, images)):
            if params.paste_back:
                out = np.ascontiguousarray(np.where(mask[:, :, None], out, rgb))
            stats = measure(rgb, out, mask)
            results.append(CorruptionResult(
                image=out, mask=mask.copy(), latent_mask=cells.copy(), params=replace(params, seed=seed),
                inside_change=stats.inside, outside_change=stats.outside, confinement=stats.confinement,
                unet_calls=spent - per_seed * (len(seeds) - 1) if i == 0 else per_seed,
                cache_hit=cache_hit, seconds=seconds))
        return results

    def reconstruction_error(self, image, params: CorruptParams, progress: ProgressFn | None = None,
                             should_stop: StopFn | None = None) -> dict:
        """Invert and resample with NO corruption; errors of the result against the input.

        Keys: mae, psnr (output vs input, 0-255); vae_mae, vae_psnr (decode(z0) vs input: the floor
        set by the VAE alone); inversion_mae, inversion_psnr (output vs decode(z0): what inversion and
        resampling add on top of the VAE); latent_mae, latent_max (resampled latent vs z0);
        unet_calls (this call).
        """
        import torch

        params.validate()
        rgb = self._check_image(image)
        before = self.unet_calls
        with torch.inference_mode():
            key = self.cache_key(rgb, params)
            cached = self._lookup(key, rgb.shape[:2])
            steps = _Steps((0 if cached else params.inversion_steps) + params.inversion_steps, progress, should_stop)
            steps.check()
            inversion = cached or self._invert(rgb, params, key, steps)
            latent = self._resample(inversion.zt, inversion, params, steps)
            out, floor = self._decode(torch.cat([latent, inversion.z0]))
        diff = (latent - inversion.z0).abs()
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
            "prompt": params.prompt, "steps": int(params.num_inference_steps), "k": int(params.inversion_steps),
            "method": params.inversion_method, "guidance": float(params.inversion_guidance_scale),
            "dtype": str(self.dtype),
        }
        if params.inversion_guidance_scale > 1:
            fields["negative_prompt"] = params.negative_prompt
        if params.inversion_method == "renoise":
            fields["renoise"] = [int(params.renoise_iterations), params.average_last]
            if params.regularised:
                fields["reg"] = [float(params.lambda_ac), float(params.lambda_kl), int(params.num_reg_steps),
                                 int(params.num_reg_rolls), REG_SEED]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

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
        import torch

        before = self.unet_calls
        n, k = int(params.num_inference_steps), int(params.inversion_steps)
        timesteps = self._schedule(n)
        guidance = float(params.inversion_guidance_scale)
        with torch.inference_mode():
            z0 = self._encode(rgb)
            emb = self._embeddings(params.prompt, params.negative_prompt, guidance > 1)
            z = z0
            reg_generator = torch.Generator(device="cpu").manual_seed(REG_SEED) if params.regularised else None
            forward_noise = seeded_noise(z0.shape, REG_SEED, self.device) if params.regularised else None
            for j in range(k):
                index = n - 1 - j  # sampling step being inverted
                t_next = timesteps[index]
                a_cur = self._alpha(timesteps[index + 1] if index + 1 < n else None)
                a_next = self._alpha(t_next)
                eps = self._eps(z, t_next, emb, guidance)
                if params.inversion_method == "renoise":
                    z = self._renoise_step(z, z0, eps, t_next, a_cur, a_next, emb, guidance, params,
                                           reg_generator, forward_noise)
                else:
                    z = _inverse_step(z, eps, a_cur, a_next)
                steps.advance()
        t = timesteps[n - k]
        inversion = Inversion(key=key, z0=z0, zt=z, timestep=t, step_index=n - k, timesteps=tuple(timesteps[n - k:]),
                              alpha_t=self._alpha(t), image_size=(rgb.shape[0], rgb.shape[1]),
                              method=params.inversion_method, unet_calls=self.unet_calls - before)
        self.inversions_computed += 1
        self._remember(inversion)
        self._disk_put(inversion)
        return inversion

    def _renoise_step(self, z, z0, eps, t_next, a_cur, a_next, emb, guidance, params, generator, forward_noise):
        reference = None
        if params.regularised and params.lambda_kl > 0:
            noisy = math.sqrt(a_next) * z0 + math.sqrt(1 - a_next) * forward_noise
            reference = self._eps(noisy, t_next, emb, guidance)
        estimate = _inverse_step(z, eps, a_cur, a_next)  # the DDIM estimate z'(0)
        predictions = []
        for _ in range(int(params.renoise_iterations)):
            eps_r = self._eps(estimate, t_next, emb, guidance)
            predictions.append(eps_r)
            if params.regularised:
                eps_r = regularise_noise(eps_r, reference, params, generator)
            estimate = _inverse_step(z, eps_r, a_cur, a_next)
        window = predictions[-int(params.average_last):] if params.average_last else predictions
        mean = window[0] if len(window) == 1 else sum(window[1:], window[0].clone()) / len(window)
        if params.regularised:
            mean = regularise_noise(mean, reference, params, generator)
        return _inverse_step(z, mean, a_cur, a_next)

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

    def _direct_inversion(self, rgb: np.ndarray, params: CorruptParams) -> Inversion:
        """z0 and abar_t only (no UNet): what the "direct" baseline needs."""
        n, k = int(params.num_inference_steps), int(params.inversion_steps)
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
        if self.memory_entries == 0:
            return
        self._memory[inversion.key] = inversion
        self._memory.move_to_end(inversion.key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def _disk_get(self, key: str, size: tuple[int, int]) -> Inversion | None:
        path = self.cache_path(key)
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            info = json.loads(meta.get("info", "{}"))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self.cache_problems.append(f"{path.name}: unreadable ({_first_line(exc)}); recomputed.")
            return None
        expected = (1, int(self.pipe.vae.config.latent_channels), size[0] // self.factor, size[1] // self.factor)
        z0, zt = tensors.get("z0"), tensors.get("zt")
        problem = None
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            problem = "metadata does not match this key"
        elif z0 is None or zt is None or tuple(z0.shape) != expected or tuple(zt.shape) != expected:
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
        path = self.cache_path(inversion.key)
        if path is None:
            return
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        info = {"timestep": inversion.timestep, "step_index": inversion.step_index, "timesteps": list(inversion.timesteps),
                "alpha_t": inversion.alpha_t, "method": inversion.method, "unet_calls": inversion.unet_calls}
        meta = {"format": CACHE_FORMAT, "key": inversion.key, "model_id": self.loaded.model_id, "info": json.dumps(info)}
        tensors = {"z0": inversion.z0.detach().float().cpu().contiguous(),
                   "zt": inversion.zt.detach().float().cpu().contiguous()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk costs a recompute later, never a result
            self.cache_problems.append(f"{path.name}: not written ({_first_line(exc)}).")
        finally:
            if tmp.exists():
                tmp.unlink()


def _inverse_step(z, eps, a_cur: float, a_next: float):
    """DDIM step backwards (towards more noise): from abar a_cur to a_next with noise eps."""
    x0 = (z - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
    return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps


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
