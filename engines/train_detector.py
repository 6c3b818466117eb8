"""Training the artifact detector and the region selector (one trainer: the selector is a detector
trained on human masks). `train_detector(config, train, val, out_dir)` -> `TrainResult`.

Images are RGB uint8 HWC and masks bool [H, W] (True = artifact) at every boundary; the caller (the
studio) builds the `TrainSample` lists, this engine never reads the session store.

What one step does
------------------
1. **Sampling (class-balanced, DiffDoctor-style).** `batch_size` images are drawn with replacement,
   image i with probability

       p_i = share[source_i] * b_i / sum_{j in source_i} b_j

   - `share` is the source mix: `source_weights` normalised over the sources present in `train`
     (None: every image counts the same, i.e. shares proportional to the number of images). A source
     present in `train` but missing from a given `source_weights` is an error; weight 0 leaves it out.
   - `b_i` is the area balance factor so images with small artifacts are not drowned by large ones:
     for an image with artifact area fraction a_i > 0,
         b_i = clip((a_ref / max(a_i, min_area)) ** balance_alpha, 1 / balance_clip, balance_clip)
     where a_ref is the median area fraction of the images with artifacts of the same source (an image
     of median area gets 1, a 16x smaller one gets 4 with alpha 0.5). Artifact-free images get b_i = 1.
   - `negative_fraction` (optional) fixes the share of artifact-free images inside each source
     (DiffDoctor balances positive and negative samples so the detector does not learn "every hand is
     an artifact"); None leaves it at what the factors above give.
2. **Crop.** The image is seen the way `engines.detect.ArtifactDetector` (mode "resize") sees it at
   inference: resized to input_size x input_size. That view is scaled by s ~ U(scale_range) and a
   crop x crop window is cut from it (one PIL resize of the matching source box, bilinear for the
   image and nearest for the mask). With probability `p_pos` (and if the image has artifacts) the
   window is drawn uniformly among the windows that contain a random artifact pixel (not centred on
   it, so the detector learns no centre prior); otherwise uniformly at random. A scaled view smaller
   than the crop is placed at a random offset and the rest is padding: label 255 (ignored by the loss),
   pixel value 0 after normalisation.
3. **Augment.** Horizontal flip (p 0.5, `hflip`), colour jitter of strength c: brightness, contrast
   and saturation factors each ~ U(1 - c, 1 + c) per image. Normalised with the spec's mean/std.
4. **Loss.** Cross-entropy over {background, artifact} with class weights (1, w_art), ignore 255.
   `artifact_weight` None computes w_art = min(artifact_weight_cap, sqrt((1 - f) / f)), f the
   expected artifact pixel frequency under the sampler (sum_i p_i a_i; crop placement ignored),
   at least 1.
5. **Optimiser.** AdamW (lr 6e-5, betas (0.9, 0.999), weight decay 0.01: the UperNet recipe of
   mmsegmentation / the synthetic-artifact paper; torch's fused kernel on CPU/CUDA), no weight decay
   on biases and norm weights (1-D parameters), optional linear warm-up then poly decay (power 1) to
   0 at `steps`.

Evaluation, checkpoints, resume
-------------------------------
Every `eval_every` steps and at the last step the model is evaluated on `val` (held-out, human
labelled) exactly as the studio runs it: `ArtifactDetector.predict` (whole image resized to input_size,
probabilities resized back to native size), artifact mask = probability >= 0.5, metrics by
`engines.detect.evaluate_masks`. `out_dir/last` is written at every evaluation and when stopped;
`out_dir/best` when the held-out mIoU improves. Both are our detector format (`save_detector`:
model.safetensors + detector.json, loadable by `load_detector(folder)`); `last` also holds the trainer
state: `optimizer.safetensors` (AdamW tensors) and `trainer_state.json` (step, best mIoU, loss window,
elapsed seconds, config, data fingerprint). Folders are swapped in by rename, so a killed run leaves
a whole checkpoint. Metric rows go to `log(row)` and `out_dir/metrics.jsonl`.

All randomness is a function of (seed, step): the sampler and the augmentation use
`numpy.random.default_rng([seed, step, k])`, and the model's own randomness (drop-path in Swin) runs
under `torch.random.fork_rng` seeded from (seed, step), so the caller's global RNG is untouched and no
RNG state needs saving: a run stopped at any step and resumed (`resume=True`, same config and data)
gives the same parameters as an uninterrupted run (bit-exact on CPU; on CUDA up to cuDNN's
nondeterministic kernels unless the caller enables torch's deterministic mode). Resuming with a
different config (other than `steps`, `eval_every`, `log_every`) or different data raises ValueError;
`resume=False` starts over in the same folder.

Cancel: when `should_stop()` returns True (checked before every step) the trainer saves `last` and
returns a `TrainResult` with `stopped=True` (no exception): a cancelled run is a usable checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SOURCES = ("human", "synthetic", "pseudo")
ARCHES = ("tiny", "upernet-convnext-tiny", "upernet-swin-tiny")
IGNORE = 255
LAST, BEST = "last", "best"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RESUMABLE_CHANGES = ("steps", "eval_every", "log_every")
MAX_POSITIVE_POINTS = 1024
EVAL_THRESHOLD = 0.5

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
LogFn = Callable[[dict], None]


@dataclass(frozen=True)
class TrainSample:
    """One labelled image: `image` RGB uint8 HWC, `mask` bool [H, W] (True = artifact),
    `source` one of "human", "synthetic", "pseudo", `name` for messages and metrics."""

    image: np.ndarray
    mask: np.ndarray
    source: str
    name: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `arch`: "tiny" (toy UperNet for demos/tests), "upernet-convnext-tiny",
    "upernet-swin-tiny", or a folder of our detector format to fine-tune. `init`: for the two
    UperNets, a folder or hub id of an ADE20K UperNet (`from_pretrained(num_labels=2,
    ignore_mismatched_sizes=True)`); None = random init from `seed`."""

    arch: str = "upernet-convnext-tiny"
    init: str | None = None
    steps: int = 1000
    batch_size: int = 8
    crop: int = 512
    input_size: int | None = None  # the saved DetectorSpec's input size; None = crop
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    lr_schedule: str = "poly"  # "poly" (power 1 to 0 at `steps`) or "constant"
    warmup_steps: int = 0
    hflip: bool = True
    scale_range: tuple[float, float] = (0.5, 2.0)
    color_jitter: float = 0.2
    eval_every: int = 200
    log_every: int = 1
    seed: int = 0
    source_weights: dict | None = None  # {"human": 1.0, "synthetic": 0.5, ...}; None = per image
    balance_alpha: float = 0.5
    min_area: float = 1e-3
    balance_clip: float = 4.0
    negative_fraction: float | None = None
    p_pos: float = 0.5
    artifact_weight: float | None = None  # None = from pixel frequencies, capped
    artifact_weight_cap: float = 5.0

    @property
    def size(self) -> int:
        """The detector input size (input_size, or crop when None)."""
        return int(self.input_size if self.input_size is not None else self.crop)

    def validate(self) -> None:
        """Raise ValueError with one sentence for the first field out of range."""
        if self.arch not in ARCHES:
            folder = Path(str(self.arch)).expanduser()
            if not (folder / "detector.json").is_file():
                raise ValueError(f"Unknown arch '{self.arch}'; use {', '.join(ARCHES)} or a detector folder "
                                 "(with detector.json) to fine-tune.")
            if self.init:
                raise ValueError("init applies to upernet-convnext-tiny / upernet-swin-tiny, not to a detector folder.")
        if self.arch == "tiny" and self.init:
            raise ValueError("The tiny arch has no pretrained weights; leave init empty.")
        if int(self.batch_size) < 2:
            raise ValueError(f"Batch size must be at least 2 (UperNet's BatchNorm cannot train on one image per "
                             f"batch), got {self.batch_size}.")
        checks = [
            (int(self.steps) >= 1, f"Steps must be at least 1, got {self.steps}."),
            (32 <= int(self.crop) <= 4096, f"Crop must be between 32 and 4096 pixels, got {self.crop}."),
            (int(self.crop) <= self.size <= 4096,
             f"Input size must be between the crop ({self.crop}) and 4096, got {self.input_size}."),
            (self.lr > 0 and math.isfinite(self.lr), f"Learning rate must be positive, got {self.lr}."),
            (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"Betas must be two numbers in [0, 1), got {self.betas}."),
            (self.weight_decay >= 0, f"Weight decay must be >= 0, got {self.weight_decay}."),
            (self.lr_schedule in ("poly", "constant"), f"Unknown lr_schedule '{self.lr_schedule}'; use poly or constant."),
            (0 <= int(self.warmup_steps) < int(self.steps) or int(self.warmup_steps) == 0,
             f"Warm-up steps must be >= 0 and fewer than the steps, got {self.warmup_steps}."),
            (isinstance(self.hflip, bool), "hflip must be True or False."),
            (len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1] <= 4,
             f"Scale range must be (low, high) with 0 < low <= high <= 4, got {self.scale_range}."),
            (0.0 <= self.color_jitter < 1.0, f"Colour jitter must be in [0, 1), got {self.color_jitter}."),
            (int(self.eval_every) >= 1, f"eval_every must be at least 1, got {self.eval_every}."),
            (int(self.log_every) >= 1, f"log_every must be at least 1, got {self.log_every}."),
            (0 <= int(self.seed) < 2**32, f"Seed must be between 0 and 2**32 - 1, got {self.seed}."),
            (self.balance_alpha >= 0, f"balance_alpha must be >= 0, got {self.balance_alpha}."),
            (0 < self.min_area <= 1, f"min_area must be in (0, 1], got {self.min_area}."),
            (self.balance_clip >= 1, f"balance_clip must be >= 1, got {self.balance_clip}."),
            (self.negative_fraction is None or 0 <= self.negative_fraction < 1,
             f"negative_fraction must be None or in [0, 1), got {self.negative_fraction}."),
            (0.0 <= self.p_pos <= 1.0, f"p_pos must be in [0, 1], got {self.p_pos}."),
            (self.artifact_weight is None or self.artifact_weight > 0,
             f"artifact_weight must be None or positive, got {self.artifact_weight}."),
            (self.artifact_weight_cap >= 1, f"artifact_weight_cap must be >= 1, got {self.artifact_weight_cap}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.source_weights is not None:
            if not isinstance(self.source_weights, dict) or not self.source_weights:
                raise ValueError("source_weights must be a non-empty dict like {'human': 1.0, 'synthetic': 0.5}.")
            for key, value in self.source_weights.items():
                if key not in SOURCES:
                    raise ValueError(f"Unknown source '{key}' in source_weights; sources are {', '.join(SOURCES)}.")
                if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                    raise ValueError(f"The weight of source '{key}' must be a number >= 0, got {value!r}.")
            if not any(v > 0 for v in self.source_weights.values()):
                raise ValueError("At least one source weight must be positive.")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class TrainResult:
    """Where the checkpoints are and how it went. `history` holds every metric row of the run (also
    the rows of earlier, resumed sessions). `stopped` is True when should_stop() ended the run early;
    `last_dir` is then still a loadable checkpoint. `best_dir` is None before the first evaluation."""

    best_dir: Path | None
    last_dir: Path
    best_miou: float
    steps_done: int
    history: tuple[dict, ...]
    stopped: bool = False
    best_step: int = 0


# ----------------------------------------------------------------------------------------------
# Sampling and batches

class BalancedSampler:
    """Class-balanced image sampling and crop placement (see the module docstring).

    `probabilities[i]` is the chance that one draw picks train[i]; `indices(step)` gives the batch's
    image indices for a step (a pure function of seed and step); `batch(step)` the uint8 crops.
    """

    def __init__(self, train: Sequence[TrainSample], config: TrainConfig):
        self.config = config
        self.samples = list(train)
        self.area = np.array([float(np.count_nonzero(s.mask)) / s.mask.size for s in self.samples])
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
            if config.negative_fraction is not None and pos.any() and (~pos).any():
                b = np.where(pos, b / b[pos].sum() * (1 - config.negative_fraction),
                             b / b[~pos].sum() * config.negative_fraction)
            probs[idx] = self.source_shares[src] * b / b.sum()
        self.probabilities = probs / probs.sum()
        self.positive_points = [_spread_points(s.mask) for s in self.samples]

    def _balance(self, area: np.ndarray) -> np.ndarray:
        cfg = self.config
        b = np.ones_like(area)
        pos = area > 0
        if cfg.balance_alpha > 0 and pos.any():
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

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images uint8 [N, crop, crop, 3], labels uint8 [N, crop, crop] in {0, 1, 255},
        jitter float32 [N, 3] brightness/contrast/saturation factors) for this step."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step, 1])
        crop, size = cfg.crop, cfg.size
        images = np.zeros((cfg.batch_size, crop, crop, 3), np.uint8)
        labels = np.full((cfg.batch_size, crop, crop), IGNORE, np.uint8)
        for k, i in enumerate(self.indices(step)):
            sample = self.samples[i]
            lo, hi = cfg.scale_range
            scaled = max(1, int(round(size * rng.uniform(lo, hi))))
            points = self.positive_points[i]
            point = points[rng.integers(len(points))] if len(points) and rng.random() < cfg.p_pos else None
            flip = cfg.hflip and bool(rng.random() < 0.5)
            im, lab, (oy, ox) = _crop(sample, scaled, crop, point, flip, rng)
            images[k, oy:oy + im.shape[0], ox:ox + im.shape[1]] = im
            labels[k, oy:oy + lab.shape[0], ox:ox + lab.shape[1]] = lab
        c = cfg.color_jitter
        jitter = rng.uniform(1 - c, 1 + c, size=(cfg.batch_size, 3)).astype(np.float32)
        return images, labels, jitter


def _spread_points(mask: np.ndarray) -> np.ndarray:
    """Up to MAX_POSITIVE_POINTS artifact pixels (y, x), evenly spread over the mask's raster order."""
    flat = np.flatnonzero(mask)
    if len(flat) > MAX_POSITIVE_POINTS:
        flat = flat[np.linspace(0, len(flat) - 1, MAX_POSITIVE_POINTS).round().astype(np.int64)]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int64)


def _crop(sample: TrainSample, scaled: int, crop: int, point, flip: bool,
          rng) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Cut a crop x crop window from the image viewed at scaled x scaled, mirrored when `flip`.
    Returns the window's image and 0/1 labels and its offset inside the crop canvas (nonzero only
    when the view is smaller than the crop)."""
    from PIL import Image

    h, w = sample.mask.shape
    img = Image.fromarray(sample.image)
    msk = Image.fromarray(sample.mask.view(np.uint8))
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
    """uint8 batch (numpy or CPU tensors) -> (normalised float32 N x 3 x H x W with colour jitter
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


# ----------------------------------------------------------------------------------------------
# Model, optimiser, one step

def build_model(config: TrainConfig):
    """(UperNetForSemanticSegmentation in train mode, DetectorSpec) for `config.arch` / `config.init`.
    Random parts are initialised from `config.seed` without touching the caller's global RNG."""
    import torch
    from transformers import UperNetForSemanticSegmentation

    from engines.detectors import DETECTOR_FAMILIES, DetectorSpec, load_detector, tiny_upernet_config, upernet_config

    size = config.size
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(config.seed))
        if config.arch == "tiny":
            model = UperNetForSemanticSegmentation(tiny_upernet_config())
            spec = DetectorSpec(family="upernet-tiny", input_size=size)
        elif config.arch in ARCHES:
            backbone = config.arch.removeprefix("upernet-")
            if config.init:
                model, _, _ = DETECTOR_FAMILIES[config.arch](config.init)
            else:
                model = UperNetForSemanticSegmentation(upernet_config(backbone))
            spec = DetectorSpec(family=config.arch, input_size=size)
        else:
            loaded = load_detector(str(Path(config.arch).expanduser()), data_dir=Path(config.arch).expanduser())
            model, base = loaded.model, loaded.extra
            if base.activation != "softmax" or base.channel != 1 or model.config.num_labels != 2:
                raise ValueError(f"Detector folder '{config.arch}' is not a 2-class softmax UperNet; "
                                 "it cannot be fine-tuned here.")
            spec = replace(base, input_size=size)
    return model.train(), replace(spec, trained=True)


def make_optimizer(model, config: TrainConfig):
    """AdamW; biases and norm weights (1-D parameters) get no weight decay. The fused kernel is used on
    CPU and CUDA (same update rule; on CPU ~6x faster than the default per-parameter loop for small models)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=tuple(config.betas),
                             fused=fused or None)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for 0-based step `step`: linear warm-up, then poly (power 1) decay to 0 or constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * (1.0 - step / config.steps)


def train_step(model, optimizer, pixel_values, labels, class_weights):
    """One optimisation step on a prepared batch: forward, weighted cross-entropy (ignore 255),
    backward, AdamW. Returns the loss as a 0-d tensor (not synchronised)."""
    import torch.nn.functional as F

    logits = model(pixel_values=pixel_values).logits
    loss = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def evaluate_detector(model, spec, val: Sequence[TrainSample], device: str = "cpu", batch_size: int = 8):
    """engines.detect.Metrics of `model` on `val`: ArtifactDetector inference at native size,
    artifact = probability >= 0.5. The model is left in the mode it was in."""
    from engines.detect import ArtifactDetector, evaluate_masks, score_image
    from engines.models import LoadedModel

    was_training = model.training
    model.eval()
    try:
        loaded = LoadedModel(model=model, kind="detector", model_id="training", path=None, is_demo=False,
                             device=device, extra=spec)
        heatmaps = ArtifactDetector(loaded).predict([s.image for s in val], batch_size=batch_size)
    finally:
        model.train(was_training)
    return evaluate_masks([score_image(h.scores >= EVAL_THRESHOLD, s.mask, s.name or f"val {i}")
                           for i, (h, s) in enumerate(zip(heatmaps, val))])


# ----------------------------------------------------------------------------------------------
# The training loop

def train_detector(config: TrainConfig, train: Sequence[TrainSample], val: Sequence[TrainSample],
                   out_dir: str | os.PathLike, progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   log: LogFn | None = None, resume: bool = True, device: str = "cpu") -> TrainResult:
    """Train a detector (see the module docstring); checkpoints under out_dir/{last,best}.

    progress(step, steps) after every step; should_stop() before every step (True: save `last`,
    return with stopped=True); log(row) for every metric row (also appended to out_dir/metrics.jsonl):
    {step, loss (mean since the previous row), lr, seconds (training time, summed over resumed
    sessions)} plus {miou, artifact_iou, background_iou, precision, recall, f1} at evaluations.
    `device` is a torch device string ("cpu", "cuda", "cuda:1"); CPU/float32 is the default.
    """
    import torch
    from safetensors.torch import load_file

    config.validate()
    _check_samples(train, "training")
    _check_samples(val, "validation")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = BalancedSampler(train, config)
    if sampler.artifact_frequency <= 0:
        raise ValueError("The training masks that can be sampled have no artifact pixels; label at least one artifact.")
    freq = sampler.artifact_frequency
    w_art = float(config.artifact_weight) if config.artifact_weight is not None else \
        float(min(config.artifact_weight_cap, max(1.0, math.sqrt((1 - freq) / freq))))
    fingerprint = _fingerprint(train, val)
    last_dir = _existing_last(out) if resume else None
    state = _read_state(last_dir, config, fingerprint) if last_dir is not None else None

    if state is not None:
        from engines.detectors import load_detector

        loaded = load_detector(str(last_dir), data_dir=last_dir)
        model, spec = loaded.model.train(), loaded.extra
        spec = replace(spec, trained=True)
    else:
        model, spec = build_model(config)
        for stale in (out / LAST, out / BEST, out / METRICS_FILE):
            _remove(stale)
    model = model.to(device)
    optimizer = make_optimizer(model, config)
    if state is not None:
        optimizer.load_state_dict(_optimizer_from_flat(optimizer, load_file(str(last_dir / OPTIMIZER_FILE)),
                                                       state["param_groups"]))
    step = int(state["step"]) if state else 0
    best_miou = float(state["best_miou"]) if state else float("-inf")
    best_step = int(state.get("best_step", 0)) if state else 0
    loss_sum, loss_count = (float(state["loss_sum"]), int(state["loss_count"])) if state else (0.0, 0)
    elapsed0 = float(state["seconds"]) if state else 0.0
    history = _truncate_metrics(out / METRICS_FILE, step)
    class_weights = torch.tensor([1.0, w_art], device=device)
    provenance = {"trainer": "engines.train_detector", "config": config.to_json(),
                  "source_weights": config.source_weights, "source_shares": sampler.source_shares,
                  "source_counts": sampler.source_counts, "train_images": len(train), "val_images": len(val),
                  "class_weights": [1.0, w_art], "artifact_frequency": sampler.artifact_frequency,
                  "data_fingerprint": fingerprint, "eval_threshold": EVAL_THRESHOLD}
    if config.init:
        provenance["init"] = config.init
    t0 = time.perf_counter()

    def seconds() -> float:
        return elapsed0 + time.perf_counter() - t0

    def trainer_state() -> dict:
        return {"format": "artifact-studio-trainer/1", "step": step, "best_miou": best_miou, "best_step": best_step,
                "loss_sum": loss_sum, "loss_count": loss_count, "seconds": seconds(), "config": config.to_json(),
                "data_fingerprint": fingerprint, "rng": "derived from (seed, step); no saved RNG state needed",
                "param_groups": _param_groups_json(optimizer)}

    def save_last(miou: float | None) -> None:
        info = {**provenance, "steps": step, "miou": miou, "best_miou": _num(best_miou), "best_step": best_step,
                "trained": step > 0}
        _save_checkpoint(out / LAST, model, replace(spec, trained=step > 0), info, optimizer, trainer_state())

    saved_at = step if last_dir is not None and state is not None else -1
    stopped = False
    cuda_index = (torch.device(device).index or 0) if torch.device(device).type == "cuda" else None
    with _Prefetcher(sampler, spec, device) as prefetch:
        while step < config.steps:
            if should_stop is not None and should_stop():
                stopped = True
                break
            x, y = prefetch.get(step, config.steps)
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _step_rng(_step_seed(config.seed, step), cuda_index):
                loss = float(train_step(model, optimizer, x, y, class_weights))
            if not math.isfinite(loss):
                raise RuntimeError(f"Training diverged: the loss is {loss} at step {step + 1}; lower the learning "
                                   f"rate (was {config.lr}). The last checkpoint is in '{out / LAST}'.")
            step += 1
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            evaluate = step % config.eval_every == 0 or step == config.steps
            if evaluate or step % config.log_every == 0:
                row = {"step": step, "loss": loss_sum / loss_count, "lr": lr}
                loss_sum, loss_count = 0.0, 0
                miou = None
                if evaluate:
                    metrics = evaluate_detector(model, spec, val, device, batch_size=config.batch_size)
                    miou = metrics.miou
                    row.update(miou=metrics.miou, artifact_iou=metrics.artifact_iou,
                               background_iou=metrics.background_iou, precision=metrics.precision,
                               recall=metrics.recall, f1=metrics.f1)
                    if _num(metrics.miou) is not None and metrics.miou > best_miou:
                        best_miou, best_step = metrics.miou, step
                        _save_checkpoint(out / BEST, model, spec, {**provenance, "steps": step, "miou": metrics.miou,
                                                                    "best_miou": metrics.miou, "best_step": step,
                                                                    "trained": True})
                row["seconds"] = round(seconds(), 3)
                if evaluate:
                    save_last(miou)
                    saved_at = step
                history.append(row)
                with open(out / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if log is not None:
                    log(row)
            if progress is not None:
                progress(step, config.steps)
    if saved_at != step:
        save_last(None)
    return TrainResult(best_dir=out / BEST if (out / BEST).is_dir() else None, last_dir=out / LAST,
                       best_miou=best_miou if math.isfinite(best_miou) else float("nan"), steps_done=step,
                       history=tuple(history), stopped=stopped, best_step=best_step)


class _Prefetcher:
    """Batches for the steps. On a GPU the next step's crops are prepared in one background thread
    (into pinned memory) while the GPU runs the current step; jitter and normalisation run on the GPU.
    On CPU they are made in the loop itself: the cores are busy with the step anyway, and a Python
    thread contends for the GIL with the step's Python code (measured on 2 busy cores: ~10% more CPU
    time for the same wall time).
    Batches are pure functions of (seed, step), so prefetching never changes results."""

    def __init__(self, sampler: BalancedSampler, spec, device: str):
        self.sampler, self.spec, self.device = sampler, spec, device
        self.threaded = not (device == "cpu" or device.startswith("cpu:"))
        self.pending: dict[int, object] = {}

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-batches") if self.threaded else None
        return self

    def __exit__(self, *exc):
        for future in self.pending.values():
            future.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        return False

    def _prepare(self, step: int):
        """In the worker thread: crops, then pinned uint8 tensors for a GPU or finished tensors on CPU."""
        import torch

        batch = self.sampler.batch(step)
        if self.device.startswith("cuda"):
            return [torch.from_numpy(a).pin_memory() for a in batch]
        return to_tensors(*batch, self.spec, "cpu")

    def get(self, step: int, steps: int):
        if not self.threaded:
            return to_tensors(*self.sampler.batch(step), self.spec, self.device)
        future = self.pending.pop(step, None)
        prepared = future.result() if future is not None else self._prepare(step)
        if step + 1 < steps and step + 1 not in self.pending:
            self.pending[step + 1] = self.pool.submit(self._prepare, step + 1)
        if self.device.startswith("cuda"):
            return to_tensors(*prepared, self.spec, self.device)
        return tuple(t.to(self.device) for t in prepared)


# ----------------------------------------------------------------------------------------------
# Checkpoints and state

def _save_checkpoint(folder: Path, model, spec, provenance: dict, optimizer=None, state: dict | None = None) -> None:
    """Write a detector (plus optional trainer state) into a staging folder, then swap it in by rename."""
    from safetensors.torch import save_file

    from engines.detectors import save_detector

    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    save_detector(model, spec, staging, provenance)
    if optimizer is not None:
        save_file(_optimizer_to_flat(optimizer), str(staging / OPTIMIZER_FILE))
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    _remove(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    _remove(old)


def _existing_last(out: Path) -> Path | None:
    """out/last, or out/.last.old when a run was killed between the two renames of a save."""
    for folder in (out / LAST, out / f".{LAST}.old"):
        if (folder / STATE_FILE).is_file() and (folder / OPTIMIZER_FILE).is_file():
            return folder
    return None


def _read_state(folder: Path, config: TrainConfig, fingerprint: str) -> dict | None:
    state = json.loads((folder / STATE_FILE).read_text())
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in config.to_json().items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"'{folder}' was trained with a different config ({', '.join(changed)} changed); resume with the "
                         "same config, or pass resume=False / a new folder to start over.")
    if state["data_fingerprint"] != fingerprint:
        raise ValueError(f"'{folder}' was trained on different images or masks; resume with the same data, or pass "
                         "resume=False / a new folder (or fine-tune with arch=that folder).")
    if int(state["step"]) > config.steps:
        raise ValueError(f"'{folder}' has already trained {state['step']} steps, more than the {config.steps} asked for.")
    return state


def _optimizer_to_flat(optimizer) -> dict:
    flat = {}
    for idx, values in optimizer.state_dict()["state"].items():
        for name, tensor in values.items():
            flat[f"{idx}.{name}"] = tensor.detach().cpu().contiguous()
    return flat


def _param_groups_json(optimizer) -> list:
    return json.loads(json.dumps(optimizer.state_dict()["param_groups"], default=list))


def _optimizer_from_flat(optimizer, flat: dict, param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in param_groups]
    return {"state": state, "param_groups": groups}


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Rows of metrics.jsonl up to `step` (rows of a killed session after its last checkpoint are dropped)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


def _fingerprint(train: Sequence[TrainSample], val: Sequence[TrainSample]) -> str:
    digest = hashlib.sha256()
    for part, samples in (("train", train), ("val", val)):
        digest.update(f"{part}:{len(samples)}".encode())
        for s in samples:
            digest.update(f"{s.source}|{s.name}|{s.image.shape}".encode())
            digest.update(np.ascontiguousarray(s.image).data)
            digest.update(np.packbits(s.mask).data)
    return digest.hexdigest()


def _check_samples(samples: Sequence[TrainSample], what: str) -> None:
    from engines.detect import check_rgb

    if not samples:
        raise ValueError(f"The {what} set is empty; it needs at least one labelled image.")
    for i, s in enumerate(samples):
        if not isinstance(s, TrainSample):
            raise ValueError(f"{what.capitalize()} item {i} is a {type(s).__name__}, not a TrainSample.")
        label = f"{what} image '{s.name or i}'"
        check_rgb(s.image, label)
        if not isinstance(s.mask, np.ndarray) or s.mask.dtype != bool or s.mask.shape != s.image.shape[:2]:
            raise ValueError(f"The mask of {label} must be bool {s.image.shape[0]} x {s.image.shape[1]}, got "
                             f"{getattr(s.mask, 'dtype', type(s.mask).__name__)} {getattr(s.mask, 'shape', None)}.")
        if s.source not in SOURCES:
            raise ValueError(f"The source of {label} is '{s.source}'; use one of {', '.join(SOURCES)}.")


def _step_rng(seed: int, cuda_index: int | None):
    """Context in which torch's CPU (and the training GPU's) RNG is seeded with `seed`; the caller's
    RNG states are restored afterwards."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]))
    torch.default_generator.manual_seed(seed)
    if cuda_index is not None:
        with torch.cuda.device(cuda_index):
            torch.cuda.manual_seed(seed)
    return stack


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 2]).generate_state(1, np.uint64)[0] >> 1)


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _remove(path: Path) -> None:
    from engines.models import remove_tree

    if path.is_dir():
        remove_tree(path)
    elif path.exists():
        path.unlink()
