"""Masks and measurements of region corruption (numpy only): the pixel mask -> latent-cell mask and back,
mask IoU, the mean absolute pixel change inside / outside a mask, random blob masks, image preparation.

Images RGB uint8 HWC; masks bool[H, W] (True = region), latent-cell masks bool[H/8, W/8]. Imports no
sibling module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.images import as_rgb

MASK_MODES = ("area", "nearest", "any")


@dataclass(frozen=True)
class ChangeStats:
    """Mean absolute pixel change (0-255) inside / outside a mask; confinement = inside / outside."""

    inside: float
    outside: float
    confinement: float


def latent_mask(mask: np.ndarray, mode: str = "area", factor: int = 8) -> np.ndarray:
    """Pixel mask bool[H, W] -> latent-grid mask bool[H/factor, W/factor].

    "area": area-average each factor x factor cell; corrupted when the covered fraction is >= 0.5.
    "nearest": the pixel at the cell centre (row factor*i + factor//2, same for columns).
    "any": corrupted when any pixel of the cell is.
    """
    mask = check_mask(mask)
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
    original, corrupted, mask = as_rgb(original), as_rgb(corrupted), check_mask(mask)
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


def check_mask(mask) -> np.ndarray:
    """`mask` itself when it is a bool array [H, W]; otherwise a one-sentence ValueError."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        what = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"The mask must be a bool array of shape (H, W), got a {what}.")
    return mask


def _resize_float(values: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC),
                      dtype=np.float64)

