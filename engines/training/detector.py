"""Training the artifact detector and the region selector (one trainer: the selector is a detector
trained on human masks). `train_detector(config, train, val, out_dir, test=...)` -> `TrainResult`.

Images are RGB uint8 HWC and masks bool [H, W] (True = artifact) at every boundary. The caller (the
studio) builds the sample lists and this engine never reads the session store: a `TrainSample` holds
its arrays, a `FileSample` names image and mask files that are read only when a batch or an
evaluation needs them, so a training set does not have to fit in memory. Named recipes (the paper's,
the studio's balanced one) live in `engines.training.recipes`.

What one step does
------------------
1. **Sampling.** `batch_size` images are drawn with replacement, image i with probability

       p_i = share[source_i] * b_i / sum_{j in source_i} b_j

   - `share` is the source mix: `source_weights` normalised over the sources present in `train`
     (None: every image counts the same, i.e. shares proportional to the number of images). A source
     present in `train` but missing from a given `source_weights` is an error; weight 0 leaves it out.
   - `sampling="balanced"` (class-balanced, DiffDoctor-style): `b_i` is the area balance factor so
     images with small artifacts are not drowned by large ones: for an image with artifact area
     fraction a_i > 0,
         b_i = clip((a_ref / max(a_i, min_area)) ** balance_alpha, 1 / balance_clip, balance_clip)
     where a_ref is the median area fraction of the images with artifacts of the same source (an image
     of median area gets 1, a 16x smaller one gets 4 with alpha 0.5). Artifact-free images get b_i = 1.
     `negative_fraction` (optional) fixes the share of artifact-free images inside each source.
   - `sampling="uniform"` (the paper's recipe): b_i = 1 for every image (no balancing).
2. **Crop.** The image is seen the way `engines.detection.detect.ArtifactDetector` (mode "resize") sees it at
   inference: resized to input_size x input_size. That view is scaled by s ~ U(scale_range) and a
   crop x crop window is cut from it (one PIL resize of the matching source box, bilinear for the
   image and nearest for the mask). With probability `p_pos` (and if the image has artifacts) the
   window is drawn uniformly among the windows that contain a random artifact pixel (not centred on
   it, so the detector learns no centre prior); otherwise uniformly at random. A scaled view smaller
   than the crop is placed at a random offset and the rest is padding: label 255 (ignored by the loss),
   pixel value 0 after normalisation.
3. **Augment.** Horizontal flip (p 0.5, `hflip`), colour jitter of strength c: brightness, contrast
   and saturation factors each ~ U(1 - c, 1 + c) per image (c = 0: none). Normalised with the spec's
   mean/std.
4. **Loss.** Cross-entropy over {background, artifact} with class weights (1, w_art), ignore 255, mean
   over the labelled pixels of the (global) batch. `artifact_weight` None computes w_art =
   min(artifact_weight_cap, sqrt((1 - f) / f)), f the expected artifact pixel frequency under the
   sampler (sum_i p_i a_i; crop placement ignored), at least 1; 1.0 is plain cross-entropy. A model
   with an auxiliary FCN head (an ADE20K UperNet) adds `aux_weight` x the same loss on its output
   (mmsegmentation's 0.4 in the paper's recipe).
5. **Optimiser.** AdamW (`lr`, `betas`, `weight_decay`; torch's fused kernel on CPU/CUDA), no weight
   decay on biases and norm weights (1-D parameters), optional linear warm-up then poly decay
   (power 1) to 0 at `steps`, or constant.

Data pipeline
-------------
Samples stream through a torch `DataLoader` (`num_workers` worker processes; 0 = in the training
process): item k is slot k % batch_size of step k // batch_size, a pure function of (seed, step,
slot), so workers, prefetching and resuming never change a batch. Before training, one pass reads
every training mask once (area and up to 1,024 artifact points per image are kept, not the mask).

Evaluation, checkpoints, resume
-------------------------------
The headline metric is the **artifact-class IoU** (`artifact_iou` = TP / (TP + FP + FN) over the
whole set), with the 2-class mIoU (mean of artifact and background IoU, mmsegmentation's mIoU) beside
it. Artifacts cover a few percent of the pixels, so the background IoU is close to 1 whatever the
detector does: a detector that predicts nothing scores 2-class mIoU ~0.476 on such a set. The
synthetic-artifact paper's "mIoU (%)" values (0.22-28.5) can therefore only be the artifact-class IoU.

Every `eval_every` steps and at the last step the model is evaluated on `val` (held-out, human
labelled) exactly as the studio runs it: `ArtifactDetector.predict` (whole image resized to input_size,
probabilities resized back to native size), artifact mask = probability >= 0.5, metrics by
`engines.detection.detect.evaluate_masks`. `out_dir/last` is written at every evaluation and when stopped;
`out_dir/best` when the val artifact IoU improves (`selection_score`). When a `test` set is given it
is used once, after the last step: the best checkpoint (else `last`) is evaluated on it, the metrics
go to `out_dir/test_metrics.json`, the best checkpoint's provenance ("test") and
`TrainResult.test_metrics`. The test set never influences training or the choice of checkpoint.
A run stopped at any step and resumed (`resume=True`, same config and data) gives the same parameters as an
uninterrupted run; `resume=False` starts over in the same folder. How (checkpoint files, trainer state,
metrics.jsonl, per-step RNG) and what a resume refuses: `engines.training.resume`, the sibling this imports.

Several processes (data parallel)
---------------------------------
Given an `accelerate.Accelerator` (made by the caller under `accelerate launch`, with
`split_batches=True`), the model, the optimiser and the data loader are prepared by it: `batch_size`
stays the global batch, each process loads and runs its batch_size / processes slice, gradients are
all-reduced. The loss is normalised by the labelled-pixel weight of the whole global batch (one
scalar all-reduce) so the gradient equals the one-process gradient of the same batch; BatchNorm is
converted to SyncBatchNorm on CUDA (on CPU each process normalises its own slice: the only difference
from one process). Only the main process evaluates, writes checkpoints and metrics and calls `log`;
cancel is decided on the main process and broadcast.

Cancel: when `should_stop()` returns True (checked before every step) the trainer saves `last` and
returns a `TrainResult` with `stopped=True` (no exception): a cancelled run is a usable checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from engines.training.data import (IGNORE, MAX_POSITIVE_POINTS, SAMPLINGS, SOURCES, BalancedSampler,  # noqa: F401
                                FileSample, Sample, StepItems, TrainSample, check_samples, default_workers,
                                fingerprint, make_loader, to_tensors)
from engines.training.parallel import GlooSyncBatchNorm, World, sync_batchnorm  # noqa: F401
from engines.training.resume import (BEST, LAST, METRICS_FILE, OPTIMIZER_FILE, existing_last, optimizer_from_flat,
                                     param_groups_json, read_state, remove_path, save_checkpoint, step_rng, step_seed,
                                     truncate_metrics)

ARCHES = ("tiny", "upernet-convnext-tiny", "upernet-swin-tiny")
TEST_FILE = "test_metrics.json"
EVAL_THRESHOLD = 0.5
HEADLINE_METRIC = "artifact_iou"
METRIC_KEYS = ("artifact_iou", "miou", "background_iou", "precision", "recall", "f1")

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
LogFn = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (see the module docstring; `engines.training.recipes.resolve_recipe` builds named
    recipes). `arch`: "tiny" (toy UperNet for demos/tests), "upernet-convnext-tiny",
    "upernet-swin-tiny", or a folder of our detector format to fine-tune. `init`: for the two
    UperNets, a folder or hub id of an ADE20K UperNet (`from_pretrained(num_labels=2,
    ignore_mismatched_sizes=True)`); None = random init from `seed`. `recipe` is the name of the recipe
    the values came from ("custom" when built by hand); it is recorded, it changes nothing itself."""

    arch: str = "upernet-convnext-tiny"
    init: str | None = None
    recipe: str = "custom"
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
    sampling: str = "balanced"  # "balanced" or "uniform"
    source_weights: dict | None = None  # {"human": 1.0, "synthetic": 0.5, ...}; None = per image
    balance_alpha: float = 0.5
    min_area: float = 1e-3
    balance_clip: float = 4.0
    negative_fraction: float | None = None
    p_pos: float = 0.5
    artifact_weight: float | None = None  # None = from pixel frequencies, capped; 1.0 = plain cross-entropy
    artifact_weight_cap: float = 5.0
    aux_weight: float = 0.0  # auxiliary-head loss weight (models with an auxiliary head only)

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
            (isinstance(self.recipe, str) and bool(self.recipe.strip()), "recipe must be a non-empty name."),
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
            (self.sampling in SAMPLINGS, f"Unknown sampling '{self.sampling}'; use {' or '.join(SAMPLINGS)}."),
            (self.balance_alpha >= 0, f"balance_alpha must be >= 0, got {self.balance_alpha}."),
            (0 < self.min_area <= 1, f"min_area must be in (0, 1], got {self.min_area}."),
            (self.balance_clip >= 1, f"balance_clip must be >= 1, got {self.balance_clip}."),
            (self.negative_fraction is None or 0 <= self.negative_fraction < 1,
             f"negative_fraction must be None or in [0, 1), got {self.negative_fraction}."),
            (0.0 <= self.p_pos <= 1.0, f"p_pos must be in [0, 1], got {self.p_pos}."),
            (self.artifact_weight is None or self.artifact_weight > 0,
             f"artifact_weight must be None or positive, got {self.artifact_weight}."),
            (self.artifact_weight_cap >= 1, f"artifact_weight_cap must be >= 1, got {self.artifact_weight_cap}."),
            (0.0 <= self.aux_weight and math.isfinite(self.aux_weight), f"aux_weight must be >= 0, got {self.aux_weight}."),
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
    `last_dir` is then still a loadable checkpoint. `best_dir` is None before the first evaluation.
    `best_artifact_iou` is the val artifact IoU that chose `best` (step `best_step`), `best_miou` the
    2-class mIoU of that same checkpoint. `test_metrics` (headline artifact_iou, miou, ... of the chosen
    checkpoint on the test set) is None without a test set or when stopped. On a non-main process of a
    data-parallel run only `steps_done`, `stopped` and the folders are meaningful."""

    best_dir: Path | None
    last_dir: Path
    best_miou: float
    steps_done: int
    history: tuple[dict, ...]
    stopped: bool = False
    best_step: int = 0
    best_artifact_iou: float = float("nan")
    test_metrics: dict | None = None
    device: str = "cpu"


def selection_score(metrics) -> float:
    """The number that picks the best checkpoint on val: the artifact-class IoU (NaN -> -inf)."""
    value = float(metrics.artifact_iou)
    return value if math.isfinite(value) else float("-inf")


def metrics_row(metrics) -> dict:
    """{artifact_iou, miou, background_iou, precision, recall, f1, num_images} of an `engines.detection.detect.Metrics`."""
    return {**{k: float(getattr(metrics, k)) for k in METRIC_KEYS}, "num_images": len(metrics.images)}


# ----------------------------------------------------------------------------------------------
# Model, optimiser, one step

def build_model(config: TrainConfig):
    """(UperNetForSemanticSegmentation in train mode, DetectorSpec) for `config.arch` / `config.init`.
    Random parts are initialised from `config.seed` without touching the caller's global RNG."""
    import torch
    from transformers import UperNetForSemanticSegmentation

    from engines.detection.detectors import DETECTOR_FAMILIES, DetectorSpec, load_detector, tiny_upernet_config, upernet_config

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
    if not config.aux_weight and getattr(model, "auxiliary_head", None) is not None:
        model.auxiliary_head = None  # unused without an auxiliary loss (and unused parameters break DDP)
        model.config.use_auxiliary_head = False
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


class AuxCapture:
    """Keeps the auxiliary head's last output (a forward hook), for the auxiliary loss; `take()` returns
    it (upsampled by the caller) and forgets it. `active` is False when the model has no such head."""

    def __init__(self, model, weight: float):
        head = getattr(model, "auxiliary_head", None)
        self.active = bool(weight) and head is not None
        self.weight, self.output = float(weight), None
        if self.active:
            head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.output = output

    def take(self):
        out, self.output = self.output, None
        return out


def train_step(model, optimizer, pixel_values, labels, class_weights, aux: AuxCapture | None = None, world=None):
    """One optimisation step on a prepared batch: forward, weighted cross-entropy (ignore 255; plus the
    auxiliary head's loss when `aux` is active), backward, AdamW. Returns the loss as a 0-d tensor
    (not synchronised). With `world` (several processes) the loss is normalised by the labelled-pixel
    weight of the global batch, so the all-reduced gradient equals the one-process gradient."""
    import torch.nn.functional as F

    logits = model(pixel_values=pixel_values).logits
    aux_logits = aux.take() if aux is not None and aux.active else None
    if world is None:
        loss = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE)
        if aux_logits is not None:
            up = F.interpolate(aux_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + aux.weight * F.cross_entropy(up, labels, weight=class_weights, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    total = F.cross_entropy(logits, labels, weight=class_weights, ignore_index=IGNORE, reduction="sum")
    if aux_logits is not None:
        up = F.interpolate(aux_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        total = total + aux.weight * F.cross_entropy(up, labels, weight=class_weights, ignore_index=IGNORE,
                                                     reduction="sum")
    valid = labels != IGNORE
    weight_sum = world.sum(class_weights[labels.clamp(max=1)][valid].sum().detach())
    local = total / weight_sum
    optimizer.zero_grad(set_to_none=True)
    (local * world.size).backward()  # DDP averages gradients over the processes
    optimizer.step()
    return world.sum(local.detach())


def evaluate_detector(model, spec, val: Sequence[Sample], device: str = "cpu", batch_size: int = 8):
    """engines.detection.detect.Metrics of `model` on `val`: ArtifactDetector inference at native size,
    artifact = probability >= 0.5. Images are read `batch_size` at a time. The model is left in the
    mode it was in."""
    from engines.detection.detect import ArtifactDetector, evaluate_masks, score_image
    from engines.models import LoadedModel

    was_training = model.training
    model.eval()
    scores = []
    try:
        loaded = LoadedModel(model=model, kind="detector", model_id="training", path=None, is_demo=False,
                             device=device, extra=spec)
        detector = ArtifactDetector(loaded)
        for start in range(0, len(val), batch_size):
            chunk = [(s, *s.load()) for s in val[start:start + batch_size]]
            heatmaps = detector.predict([image for _, image, _ in chunk], batch_size=batch_size)
            scores += [score_image(h.scores >= EVAL_THRESHOLD, mask, s.name or f"image {start + k}")
                       for k, (h, (s, _, mask)) in enumerate(zip(heatmaps, chunk))]
    finally:
        model.train(was_training)
    return evaluate_masks(scores)


# ----------------------------------------------------------------------------------------------
# The training loop

def train_detector(config: TrainConfig, train: Sequence[Sample], val: Sequence[Sample],
                   out_dir: str | os.PathLike, progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                   log: LogFn | None = None, resume: bool = True, device: str = "cpu",
                   test: Sequence[Sample] | None = None, num_workers: int | None = None,
                   accelerator=None, extra_provenance: dict | None = None) -> TrainResult:
    """Train a detector (see the module docstring); checkpoints under out_dir/{last,best}.

    progress(step, steps) after every step; should_stop() before every step (True: save `last`,
    return with stopped=True); log(row) for every metric row (also appended to out_dir/metrics.jsonl):
    {step, loss (mean since the previous row), lr, seconds (training time, summed over resumed
    sessions)} plus the val metrics {artifact_iou (headline), miou, background_iou, precision, recall,
    f1} at evaluations. `test`: evaluated once at the end (module docstring). `device` is a torch device
    string ("cpu", "cuda", "cuda:1"; ignored with an `accelerator`, which decides). `num_workers`:
    DataLoader worker processes (None = `default_workers(device)`; results do not depend on it).
    `extra_provenance`: JSON-safe facts the caller wants in every checkpoint's provenance (e.g. the
    split the data came from).
    """
    import torch
    from safetensors.torch import load_file

    config.validate()
    check_samples(train, "training")
    check_samples(val, "validation")
    if test is not None and len(test) == 0:
        test = None
    if test is not None:
        check_samples(test, "test")
    world = World(accelerator)
    if accelerator is not None:
        device = str(accelerator.device)
        if world.size > 1 and not accelerator.split_batches:
            raise ValueError("Create the Accelerator with split_batches=True: batch_size is the global batch.")
        if config.batch_size % world.size or config.batch_size // world.size < 2:
            raise ValueError(f"The batch size ({config.batch_size}) must be a multiple of the {world.size} processes "
                             "with at least 2 images per process (BatchNorm).")
    workers = default_workers(device) if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
    out = Path(out_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    sampler = BalancedSampler(train, config)
    if sampler.artifact_frequency <= 0:
        raise ValueError("The training masks that can be sampled have no artifact pixels; label at least one artifact.")
    freq = sampler.artifact_frequency
    w_art = float(config.artifact_weight) if config.artifact_weight is not None else \
        float(min(config.artifact_weight_cap, max(1.0, math.sqrt((1 - freq) / freq))))
    data_id = fingerprint(train, val)
    last_dir = existing_last(out) if resume else None
    state = read_state(last_dir, config, data_id) if last_dir is not None else None

    if state is not None:
        from engines.detection.detectors import load_detector

        loaded = load_detector(str(last_dir), data_dir=last_dir)
        model, spec = loaded.model.train(), loaded.extra
        spec = replace(spec, trained=True)
    else:
        model, spec = build_model(config)
        world.wait()  # every process has read out/ before the main one clears it
        if world.is_main:
            for stale in (out / LAST, out / BEST, out / METRICS_FILE, out / TEST_FILE):
                remove_path(stale)
    model = model.to(device)
    if world.size > 1:
        model = sync_batchnorm(model, torch.device(device).type)
    raw_model = model
    aux = AuxCapture(raw_model, config.aux_weight)
    optimizer = make_optimizer(model, config)
    if state is not None:
        optimizer.load_state_dict(optimizer_from_flat(optimizer, load_file(str(last_dir / OPTIMIZER_FILE)),
                                                       state["param_groups"]))
    step = int(state["step"]) if state else 0
    best_score = float(state.get("best_artifact_iou", float("-inf"))) if state else float("-inf")
    best_miou = float(state["best_miou"]) if state else float("-inf")
    best_step = int(state.get("best_step", 0)) if state else 0
    loss_sum, loss_count = (float(state["loss_sum"]), int(state["loss_count"])) if state else (0.0, 0)
    elapsed0 = float(state["seconds"]) if state else 0.0
    history = truncate_metrics(out / METRICS_FILE, step) if world.is_main else []
    class_weights = torch.tensor([1.0, w_art], device=device)
    loader = make_loader(sampler, step, config.steps, workers, pin_memory=torch.device(device).type == "cuda")
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    provenance = {"trainer": "engines.training.detector", "config": config.to_json(), "recipe": config.recipe,
                  "source_weights": config.source_weights, "source_shares": sampler.source_shares,
                  "source_counts": sampler.source_counts, "train_images": len(train), "val_images": len(val),
                  "test_images": len(test) if test is not None else 0,
                  "class_weights": [1.0, w_art], "artifact_frequency": sampler.artifact_frequency,
                  "data_fingerprint": data_id, "eval_threshold": EVAL_THRESHOLD, "device": str(device),
                  "processes": world.size, "headline_metric": HEADLINE_METRIC, "selected_on": "val artifact_iou"}
    if config.init:
        provenance["init"] = config.init
    provenance.update(extra_provenance or {})
    t0 = time.perf_counter()

    def seconds() -> float:
        return elapsed0 + time.perf_counter() - t0

    def trainer_state() -> dict:
        return {"format": "artifact-studio-trainer/2", "step": step, "best_artifact_iou": best_score,
                "best_miou": best_miou, "best_step": best_step, "loss_sum": loss_sum, "loss_count": loss_count,
                "seconds": seconds(), "config": config.to_json(), "data_fingerprint": data_id,
                "rng": "derived from (seed, step); no saved RNG state needed",
                "param_groups": param_groups_json(optimizer)}

    def save_last(metrics: dict | None) -> None:
        info = {**provenance, "steps": step, "val": metrics, "miou": (metrics or {}).get("miou"),
                "best_artifact_iou": _num(best_score), "best_miou": _num(best_miou), "best_step": best_step,
                "trained": step > 0}
        save_checkpoint(out / LAST, raw_model, replace(spec, trained=step > 0), info, optimizer, trainer_state())

    saved_at = step if last_dir is not None and state is not None else -1
    stopped = False
    cuda_index = (torch.device(device).index or 0) if torch.device(device).type == "cuda" else None
    batches = iter(loader)
    try:
        while step < config.steps:
            if world.stop(should_stop):
                stopped = True
                break
            images, labels, jitter = next(batches)
            x, y = to_tensors(images, labels, jitter, spec, device)
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with step_rng(step_seed(config.seed, step), cuda_index):
                loss = float(train_step(model, optimizer, x, y, class_weights, aux, world if world.size > 1 else None))
            if not math.isfinite(loss):
                raise RuntimeError(f"Training diverged: the loss is {loss} at step {step + 1}; lower the learning "
                                   f"rate (was {config.lr}). The last checkpoint is in '{out / LAST}'.")
            step += 1
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            evaluate = step % config.eval_every == 0 or step == config.steps
            if evaluate or step % config.log_every == 0:
                row = {"step": step, "loss": loss_sum / loss_count, "lr": lr}
                loss_sum, loss_count = 0.0, 0
                if evaluate and world.is_main:
                    metrics = evaluate_detector(raw_model, spec, val, device, batch_size=config.batch_size)
                    values = metrics_row(metrics)
                    row.update({k: values[k] for k in METRIC_KEYS})
                    if selection_score(metrics) > best_score:
                        best_score, best_miou, best_step = selection_score(metrics), metrics.miou, step
                        save_checkpoint(out / BEST, raw_model, spec, {
                            **provenance, "steps": step, "val": values, "miou": metrics.miou,
                            "best_artifact_iou": best_score, "best_miou": metrics.miou, "best_step": step,
                            "trained": True})
                    row["seconds"] = round(seconds(), 3)
                    save_last(values)
                row.setdefault("seconds", round(seconds(), 3))
                if world.is_main:
                    history.append(row)
                    with open(out / METRICS_FILE, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    if log is not None:
                        log(row)
                if evaluate:
                    saved_at = step
                    world.wait()
            if progress is not None and world.is_main:
                progress(step, config.steps)
    finally:
        del batches  # ends the loader's worker processes
    test_metrics = None
    if world.is_main:
        if saved_at != step:
            save_last(None)
        if test is not None and not stopped:
            test_metrics = _evaluate_test(out, test, device, config.batch_size)
    world.wait()
    return TrainResult(best_dir=out / BEST if (out / BEST).is_dir() else None, last_dir=out / LAST,
                       best_miou=best_miou if math.isfinite(best_miou) else float("nan"), steps_done=step,
                       history=tuple(history), stopped=stopped, best_step=best_step,
                       best_artifact_iou=best_score if math.isfinite(best_score) else float("nan"),
                       test_metrics=test_metrics, device=str(device))


def _evaluate_test(out: Path, test: Sequence[Sample], device: str, batch_size: int) -> dict:
    """Evaluate the chosen checkpoint (best, else last) on the test set once; record it beside the
    checkpoint (test_metrics.json) and in its detector.json provenance."""
    from engines.detection.detectors import DETECTOR_CONFIG, load_detector

    folder = out / BEST if (out / BEST).is_dir() else out / LAST
    loaded = load_detector(str(folder), data_dir=folder, device=device)
    metrics = evaluate_detector(loaded.model, loaded.extra, test, device, batch_size=batch_size)
    report = {**metrics_row(metrics), "headline_metric": HEADLINE_METRIC, "checkpoint": folder.name,
              "images": [{"name": s.name, "iou": s.iou} for s in metrics.images]}
    report = {k: (_num(v) if isinstance(v, float) else v) for k, v in report.items()}
    (out / TEST_FILE).write_text(json.dumps(report, indent=2))
    meta_file = folder / DETECTOR_CONFIG
    meta = json.loads(meta_file.read_text())
    meta["provenance"]["test"] = {k: v for k, v in report.items() if k != "images"}
    tmp = meta_file.with_name(f".{meta_file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, meta_file)
    return report


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
