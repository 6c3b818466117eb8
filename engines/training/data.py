"""The detector trainer's data pipeline: samples (in memory or streamed from files), the sampler that
draws them, the DataLoader that crops and augments them, and the batch-to-tensor step.

Used by `engines.training.detector` (whose module docstring describes sampling, crops and augmentation
as one step of training); the names are re-exported there. Images are RGB uint8 HWC and masks bool
[H, W] (True = artifact) at every boundary. Nothing here reads the session store.

Streaming: item k of the DataLoader is slot k % batch_size of step k // batch_size, a pure function of
(seed, step, slot), so worker processes, prefetching and resuming never change a batch. Building the
sampler reads every training mask once and keeps only its area and up to 1,024 artifact points; the
images are read when a batch needs them.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np


SOURCES = ("human", "synthetic", "pseudo")
SAMPLINGS = ("balanced", "uniform")
IGNORE = 255
MAX_POSITIVE_POINTS = 1024


@dataclass(frozen=True)
class TrainSample:
    """One labelled image in memory: `image` RGB uint8 HWC, `mask` bool [H, W] (True = artifact),
    `source` one of "human", "synthetic", "pseudo", `name` for messages and metrics."""

    image: np.ndarray
    mask: np.ndarray
    source: str
    name: str = ""

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask)."""
        return self.image, self.mask

    def load_mask(self) -> np.ndarray:
        return self.mask


@dataclass(frozen=True)
class FileSample:
    """One labelled image on disk, read when a batch or an evaluation needs it.

    `image_path`: an image file (read as RGB uint8). `mask_paths`: files of the image's size whose union
    is the mask: a pixel is artifact where a file's grey value is >= 128 (in a file holding only 0 and 1,
    as mmsegmentation label maps do: where it is 1), or, with `mask_threshold`,
    where a 16-bit score map (score * 65535, as the studio caches detector outputs) is >= threshold *
    65535; an empty tuple is an artifact-free image. `digest` identifies the content for the resume
    fingerprint (e.g. the store's sha256s); None hashes the files. `source` and `name` as TrainSample.
    """

    image_path: str
    mask_paths: tuple[str, ...]
    source: str
    name: str = ""
    digest: str | None = None
    mask_threshold: float | None = None

    def size(self) -> tuple[int, int]:
        """(height, width) from the image header (no decoding)."""
        from PIL import Image

        with Image.open(self.image_path) as im:
            return im.height, im.width

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        with Image.open(self.image_path) as im:
            image = np.asarray(im.convert("RGB"))
        return image, self._mask(image.shape[:2])

    def load_mask(self) -> np.ndarray:
        return self._mask(self.size())

    def _mask(self, shape: tuple[int, int]) -> np.ndarray:
        from PIL import Image

        mask = np.zeros(shape, bool)
        for path in self.mask_paths:
            with Image.open(path) as im:
                if self.mask_threshold is not None:
                    values = np.asarray(im) >= self.mask_threshold * 65535
                else:
                    values = np.asarray(im if im.mode in ("1", "L") else im.convert("L"))
                    if values.dtype != bool:  # a 0/1 label map (mmseg) or a 0/255 mask
                        values = values == 1 if values.max(initial=0) <= 1 else values >= 128
            if values.shape != shape:
                raise ValueError(f"The mask file {Path(path).name} of image '{self.name or self.image_path}' is "
                                 f"{values.shape[1]}x{values.shape[0]}, the image is {shape[1]}x{shape[0]}.")
            mask |= values
        return mask


Sample = Union[TrainSample, FileSample]


class BalancedSampler:
    """Image sampling and crop placement (see the module docstring), for `sampling` "balanced" or "uniform".

    `probabilities[i]` is the chance that one draw picks train[i]; `indices(step)` gives the batch's
    image indices for a step (a pure function of seed and step); `item(step, slot)` one uint8 crop,
    `batch(step)` all of a step's. Building it reads every mask once (only areas and artifact points
    are kept).
    """

    def __init__(self, train: Sequence[Sample], config: Any):  # an engines.training.detector.TrainConfig
        self.config = config
        self.samples = list(train)
        area, points = [], []
        for s in self.samples:
            mask = s.load_mask()
            area.append(float(np.count_nonzero(mask)) / mask.size)
            points.append(_spread_points(mask))
        self.area = np.array(area)
        self.positive_points = points
        present = sorted({s.source for s in self.samples}, key=SOURCES.index)
        counts = {src: sum(s.source == src for s in self.samples) for src in present}
        if config.source_weights is None:
            raw = {src: float(counts[src]) for src in present}
        else:
            missing = [src for src in present if src not in config.source_weights]
            if missing:
                raise ValueError(f"source_weights has no weight for source '{missing[0]}' present in the training "
                                 "set; give every source a weight (0 leaves it out).")
            raw = {src: float(config.source_weights[src]) for src in present}
        total = sum(raw.values())
        if total <= 0:
            raise ValueError("Every source present in the training set has weight 0; nothing can be sampled.")
        self.source_counts = counts
        self.source_shares = {src: raw[src] / total for src in present}
        probs = np.zeros(len(self.samples))
        for src in present:
            idx = np.array([i for i, s in enumerate(self.samples) if s.source == src])
            b = self._balance(self.area[idx])
            pos = self.area[idx] > 0
            if config.sampling == "balanced" and config.negative_fraction is not None and pos.any() and (~pos).any():
                b = np.where(pos, b / b[pos].sum() * (1 - config.negative_fraction),
                             b / b[~pos].sum() * config.negative_fraction)
            probs[idx] = self.source_shares[src] * b / b.sum()
        self.probabilities = probs / probs.sum()

    def _balance(self, area: np.ndarray) -> np.ndarray:
        cfg = self.config
        b = np.ones_like(area)
        pos = area > 0
        if cfg.sampling == "balanced" and cfg.balance_alpha > 0 and pos.any():
            ref = float(np.median(area[pos]))
            factor = (ref / np.maximum(area[pos], cfg.min_area)) ** cfg.balance_alpha
            b[pos] = np.clip(factor, 1.0 / cfg.balance_clip, cfg.balance_clip)
        return b

    @property
    def artifact_frequency(self) -> float:
        """Expected artifact pixel fraction of a drawn image (crop placement ignored)."""
        return float(np.sum(self.probabilities * self.area))

    def indices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, step, 0])
        return rng.choice(len(self.samples), size=self.config.batch_size, p=self.probabilities)

    def item(self, step: int, slot: int, index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 [crop, crop, 3], labels uint8 [crop, crop] in {0, 1, 255}, jitter float32 [3]
        brightness/contrast/saturation factors) for slot `slot` of step `step` (`index`: the image,
        when the caller already knows indices(step)[slot])."""
        cfg = self.config
        i = int(self.indices(step)[slot]) if index is None else int(index)
        rng = np.random.default_rng([cfg.seed, step, 1, slot])
        crop, size = cfg.crop, cfg.size
        image = np.zeros((crop, crop, 3), np.uint8)
        labels = np.full((crop, crop), IGNORE, np.uint8)
        lo, hi = cfg.scale_range
        scaled = max(1, int(round(size * rng.uniform(lo, hi))))
        points = self.positive_points[i]
        point = points[rng.integers(len(points))] if len(points) and rng.random() < cfg.p_pos else None
        flip = cfg.hflip and bool(rng.random() < 0.5)
        im, lab, (oy, ox) = _crop(*self.samples[i].load(), scaled, crop, point, flip, rng)
        image[oy:oy + im.shape[0], ox:ox + im.shape[1]] = im
        labels[oy:oy + lab.shape[0], ox:ox + lab.shape[1]] = lab
        c = cfg.color_jitter
        jitter = rng.uniform(1 - c, 1 + c, size=3).astype(np.float32)
        return image, labels, jitter

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images uint8 [N, crop, crop, 3], labels uint8 [N, crop, crop], jitter float32 [N, 3]) of a step."""
        items = [self.item(step, k, i) for k, i in enumerate(self.indices(step))]
        return tuple(np.stack(parts) for parts in zip(*items))


class StepItems:
    """Map-style dataset for torch's DataLoader: item k is `sampler.item(first_step + k // B, k % B)`
    (B = batch_size), for the steps first_step .. steps - 1. A DataLoader with batch_size B and no
    shuffling yields exactly `sampler.batch(step)` per step, whatever its number of workers."""

    def __init__(self, sampler: BalancedSampler, first_step: int, steps: int):
        self.sampler, self.first_step, self.steps = sampler, int(first_step), int(steps)
        self.batch_size = sampler.config.batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.first_step) * self.batch_size

    def __getitem__(self, k: int):
        step, slot = self.first_step + k // self.batch_size, k % self.batch_size
        return self.sampler.item(step, slot)


def make_loader(sampler: BalancedSampler, first_step: int, steps: int, num_workers: int = 0, pin_memory: bool = False):
    """The DataLoader of StepItems (batch_size = config.batch_size, in order; uint8/float32 tensors)."""
    import torch

    generator = torch.Generator().manual_seed(int(sampler.config.seed))  # workers' base seed; not the global RNG
    return torch.utils.data.DataLoader(StepItems(sampler, first_step, steps), batch_size=sampler.config.batch_size,
                                       shuffle=False, num_workers=int(num_workers), pin_memory=pin_memory,
                                       prefetch_factor=2 if num_workers else None, drop_last=False,
                                       generator=generator)


def default_workers(device: str) -> int:
    """DataLoader workers when the caller does not say: none on a machine with <= 2 cores (the step
    needs them), else up to 4, leaving one core to the training process."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores - 1 if str(device).startswith("cuda") else cores // 2)


def _spread_points(mask: np.ndarray) -> np.ndarray:
    """Up to MAX_POSITIVE_POINTS artifact pixels (y, x), evenly spread over the mask's raster order."""
    flat = np.flatnonzero(mask)
    if len(flat) > MAX_POSITIVE_POINTS:
        flat = flat[np.linspace(0, len(flat) - 1, MAX_POSITIVE_POINTS).round().astype(np.int64)]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32)


def _crop(image: np.ndarray, mask: np.ndarray, scaled: int, crop: int, point, flip: bool,
          rng) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Cut a crop x crop window from the image viewed at scaled x scaled, mirrored when `flip`.
    Returns the window's image and 0/1 labels and its offset inside the crop canvas (nonzero only
    when the view is smaller than the crop)."""
    from PIL import Image

    h, w = mask.shape
    img = Image.fromarray(image)
    msk = Image.fromarray(mask.view(np.uint8))
    if scaled <= crop:  # the whole view fits: place it at a random offset, the rest is padding
        size, box = (scaled, scaled), None
        offset = tuple(int(v) for v in rng.integers(0, crop - scaled + 1, size=2))
    else:
        if point is None:
            y0, x0 = (int(v) for v in rng.integers(0, scaled - crop + 1, size=2))
        else:  # uniformly among the windows that contain the artifact pixel
            cy = min(scaled - 1, int((point[0] + 0.5) * scaled / h))
            cx = min(scaled - 1, int((point[1] + 0.5) * scaled / w))
            y0 = int(rng.integers(max(0, cy - crop + 1), min(scaled - crop, cy) + 1))
            x0 = int(rng.integers(max(0, cx - crop + 1), min(scaled - crop, cx) + 1))
        size, box, offset = (crop, crop), (x0 * w / scaled, y0 * h / scaled, (x0 + crop) * w / scaled,
                                           (y0 + crop) * h / scaled), (0, 0)
    im = img.resize(size, Image.BILINEAR, box=box)
    lab = msk.resize(size, Image.NEAREST, box=box)
    if flip:  # PIL mirrors in C; a reversed numpy view would copy 60x slower
        im, lab = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), lab.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        offset = (offset[0], crop - offset[1] - size[0])
    return np.asarray(im), np.asarray(lab), offset


def to_tensors(images, labels, jitter, spec, device: str = "cpu"):
    """uint8 batch (numpy or tensors) -> (normalised float32 N x 3 x H x W with colour jitter
    applied and padding zeroed, int64 labels N x H x W) on `device`.

    Brightness b, contrast c (around the image mean m) and saturation s (around the luma) compose to
    one affine map per image, x' = clamp(c*b*M_s x + (1-c)*b*m, 0, 1) with M_s = s*I + (1-s)*1*luma^T,
    applied as one batched matmul (the same result as applying the three in turn, then clamping).
    """
    import torch

    x = torch.as_tensor(images).to(device, non_blocking=True)
    y = torch.as_tensor(labels).to(device, non_blocking=True).long()
    j = torch.as_tensor(jitter).to(device, non_blocking=True).float()
    n, h, w, _ = x.shape
    x = x.permute(0, 3, 1, 2).contiguous().float().view(n, 3, h * w)  # 0..255
    b, c, sat = j[:, 0], j[:, 1], j[:, 2]
    luma = torch.tensor([0.299, 0.587, 0.114], device=x.device)
    sat_map = sat.view(n, 1, 1) * torch.eye(3, device=x.device) + (1 - sat).view(n, 1, 1) * luma.view(1, 1, 3)
    a = (c * b / 255.0).view(n, 1, 1) * sat_map  # N x 3 x 3
    shift = ((1 - c) * b * x.mean(dim=(1, 2)) / 255.0).view(n, 1, 1)
    x = torch.baddbmm(shift, a, x).clamp_(0.0, 1.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1)
    x = x.sub_(mean).div_(torch.tensor(spec.std, device=x.device).view(1, 3, 1))
    x = x.view(n, 3, h, w).masked_fill_((y == IGNORE).unsqueeze(1), 0.0)
    return x, y



def fingerprint(train: Sequence[Sample], val: Sequence[Sample]) -> str:
    """sha256 over both sets: source, name and content of every sample (a FileSample's `digest`, else
    its files' bytes), streamed one sample at a time."""
    digest = hashlib.sha256()
    for part, samples in (("train", train), ("val", val)):
        digest.update(f"{part}:{len(samples)}".encode())
        for s in samples:
            if isinstance(s, FileSample):
                digest.update(f"{s.source}|{s.name}|{s.mask_threshold}|file".encode())
                if s.digest is not None:
                    digest.update(s.digest.encode())
                else:
                    for path in (s.image_path, *s.mask_paths):
                        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
                continue
            digest.update(f"{s.source}|{s.name}|{s.image.shape}".encode())
            digest.update(np.ascontiguousarray(s.image).data)
            digest.update(np.packbits(s.mask).data)
    return digest.hexdigest()


def check_samples(samples: Sequence[Sample], what: str) -> None:
    from engines.detection.detect import check_rgb

    if not samples:
        raise ValueError(f"The {what} set is empty; it needs at least one labelled image.")
    for i, s in enumerate(samples):
        if not isinstance(s, (TrainSample, FileSample)):
            raise ValueError(f"{what.capitalize()} item {i} is a {type(s).__name__}, not a TrainSample or FileSample.")
        label = f"{what} image '{s.name or i}'"
        if s.source not in SOURCES:
            raise ValueError(f"The source of {label} is '{s.source}'; use one of {', '.join(SOURCES)}.")
        if isinstance(s, FileSample):
            missing = [p for p in (s.image_path, *s.mask_paths) if not Path(p).is_file()]
            if missing:
                raise ValueError(f"The file {missing[0]} of {label} does not exist.")
            continue
        check_rgb(s.image, label)
        if not isinstance(s.mask, np.ndarray) or s.mask.dtype != bool or s.mask.shape != s.image.shape[:2]:
            raise ValueError(f"The mask of {label} must be bool {s.image.shape[0]} x {s.image.shape[1]}, got "
                             f"{getattr(s.mask, 'dtype', type(s.mask).__name__)} {getattr(s.mask, 'shape', None)}.")
