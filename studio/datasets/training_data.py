"""Training data for the detector and region selector, gathered from a session as streaming samples.

Which image goes where is decided by `studio.datasets.splits.plan_split` (by family: an image and everything
derived from it share one split; the same function the export and `evaluate --session` use):
- val and test: human-labelled images only (module docstring of studio.datasets.splits), never synthetic or
  pseudo; a fixed test folder (images + masks) can replace the session's test split.
- train: the train families' images by source — "human" (labelled in the Label tab or imported; the
  union of the current regions; an image marked done with no region is a clean negative),
  "synthetic" (corrupted images and synthetic masks), "pseudo" (detector-authored regions, and
  unlabelled images labelled by a chosen detector's thresholded output). Unlabelled images are never
  trained as background unless `unlabelled_as_background` is asked for (they are then "pseudo"
  samples with an empty mask).

Samples are `engines.training.detector.FileSample`s naming the store's files: nothing is held in memory;
the trainer's DataLoader reads them. Pseudo labels are computed batched, with progress, and cached per
(detector, image) under <data-dir>/cache/pseudo/<detector key>/<image sha256>.png (16-bit score maps,
so another threshold reuses them).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from studio.datasets.splits import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SplitPlan, plan_split

PSEUDO_BATCH = 16
TRAIN_SOURCES = ("human", "synthetic", "pseudo")


@dataclass(frozen=True)
class TrainingData:
    """Sample lists for engines.training.detector (FileSamples), the split they come from and a summary."""
    train: list
    val: list
    test: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    split: SplitPlan | None = None


def detector_samples(services, session_id: int | None, params: dict, *, region_selector: bool = False,
                     progress=None) -> TrainingData:
    """FileSample lists for engines.training.detector from a session (see the module docstring).

    params: val_fraction (0.2), test_fraction (0.2), split_seed (0), sources (which of human/synthetic/
    pseudo to train on; the region selector uses human only), pseudo_detector (spec or None),
    pseudo_threshold (0.5), unlabelled_as_background (False), test_images + test_masks (a fixed test
    folder; the session is then split into train and val only). progress(done, total) for pseudo-labelling.
    """
    from engines.training.detector import FileSample

    if session_id is None:
        raise ValueError("A training job needs a session with labelled images.")
    store = services.store
    wanted = {"human"} if region_selector else set(params.get("sources") or TRAIN_SOURCES)
    unknown = sorted(wanted - set(TRAIN_SOURCES))
    if unknown:
        raise ValueError(f"Unknown training source '{unknown[0]}'; use {', '.join(TRAIN_SOURCES)}.")
    fixed_test = read_test_folder(params["test_images"], params.get("test_masks")) \
        if params.get("test_images") else []
    test_fraction = 0.0 if fixed_test else float(params.get("test_fraction", DEFAULT_TEST_FRACTION))
    plan = plan_split(store, session_id, val_fraction=float(params.get("val_fraction", DEFAULT_VAL_FRACTION)),
                      test_fraction=test_fraction, seed=int(params.get("split_seed", 0)),
                      exclude_sha256=[s.digest for s in fixed_test])
    records = {rec.id: rec for rec in store.list_images(session_id)}
    sets: dict[str, list] = {"train": [], "val": [], "test": []}
    pseudo_wanted = []
    background = 0
    for image_id, split in sorted(plan.split_of.items()):
        role, rec = plan.role_of[image_id], records[image_id]
        name = rec.original_name or f"image-{rec.id}"
        if split in ("val", "test"):  # human by construction of the plan
            sets[split].append(_labelled_sample(store, rec, "human", name))  # = held_out_samples(...)
        elif split == "train" and role == "unlabelled":
            if "pseudo" in wanted and params.get("pseudo_detector"):
                pseudo_wanted.append(rec)
            elif params.get("unlabelled_as_background") and not region_selector:
                sets["train"].append(FileSample(rec.path, (), "pseudo", f"{name} (background)", digest=rec.sha256))
                background += 1
        elif split == "train" and role in wanted:
            sets["train"].append(_labelled_sample(store, rec, role, name))
    pseudo_stats = {}
    if pseudo_wanted:
        files, pseudo_stats = pseudo_label_files(services, params["pseudo_detector"], pseudo_wanted, progress=progress)
        threshold = float(params.get("pseudo_threshold", 0.5))
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"pseudo_threshold must be in (0, 1], got {threshold}.")
        for rec in pseudo_wanted:
            sets["train"].append(FileSample(rec.path, (str(files[rec.id]),), "pseudo", rec.original_name or
                                            f"image-{rec.id}", digest=f"{rec.sha256}:{pseudo_stats['key']}",
                                            mask_threshold=threshold))
    if fixed_test:
        sets["test"] = fixed_test
    if not sets["train"]:
        raise ValueError("No training images: label some images in the Label tab (or add synthetic pairs from "
                         "the Corrupt tab) first.")
    if not sets["val"]:
        raise ValueError("No held-out images: label at least 2 images by hand (in different families: not a "
                         "corrupted copy of each other) so one can be held out for evaluation.")
    by_source = {src: sum(s.source == src for s in sets["train"]) for src in TRAIN_SOURCES}
    summary = {"human_train": by_source["human"], "synthetic": by_source["synthetic"], "pseudo": by_source["pseudo"],
               "background_unlabelled": background, "val_human": len(sets["val"]), "test_human": len(sets["test"]),
               "test_source": "folder" if fixed_test else ("session split" if sets["test"] else "none"),
               "pseudo_detector": params.get("pseudo_detector"), "pseudo_cache": pseudo_stats or None,
               "region_selector": region_selector, "split": plan.summary()}
    return TrainingData(train=sets["train"], val=sets["val"], test=sets["test"], summary=summary, split=plan)


def held_out_samples(store, plan: SplitPlan, split: str) -> list:
    """FileSamples of the human-labelled images of `split` ("val" or "test") of a plan."""
    return [_labelled_sample(store, store.get_image(i), "human", store.get_image(i).original_name or f"image-{i}")
            for i in plan.ids(split, ["human"])]


def _labelled_sample(store, rec, source: str, name: str):
    """A FileSample of a labelled image: the union of its current regions' mask files."""
    from engines.training.detector import FileSample

    paths = {m.id: (m.path, m.sha256) for m in store.list_masks(rec.id)}
    regions = [paths[r.mask_id] for r in store.label_state(rec.id).regions]
    digest = hashlib.sha256("|".join([rec.sha256, *sorted(sha for _, sha in regions)]).encode()).hexdigest()
    return FileSample(rec.path, tuple(p for p, _ in regions), source, name, digest=digest)


def read_test_folder(images: str | os.PathLike, masks: str | os.PathLike | None):
    """A fixed test set: FileSamples (source "human", digest = the image file's sha256) for a folder of
    images and a folder of masks matched by file stem (white = artifact; 0/1 label maps work too).
    Raises ValueError (one sentence, nothing read further) unless every image has a mask of its size and
    every mask an image."""
    from PIL import Image

    from engines.images import find_images
    from engines.training.detector import FileSample

    if not masks:
        raise ValueError("A fixed test set needs both an image folder and a mask folder (--test-masks).")
    for label, folder in (("image", images), ("mask", masks)):
        if not Path(folder).is_dir():
            raise ValueError(f"The test {label} folder {folder} does not exist.")
    image_files = {p.stem: p for p in find_images([images])}
    mask_files = {p.stem: p for p in find_images([masks])}
    if not image_files:
        raise ValueError(f"The test image folder {images} has no images.")
    lonely = sorted(set(image_files) - set(mask_files))
    orphans = sorted(set(mask_files) - set(image_files))
    if lonely or orphans:
        raise ValueError(f"The test masks do not match the test images: {len(lonely)} image(s) without a mask of the "
                         f"same file name (e.g. {(lonely or ['-'])[0]}) and {len(orphans)} mask(s) without an image "
                         f"(e.g. {(orphans or ['-'])[0]}); nothing was changed.")
    samples = []
    for stem in sorted(image_files):
        with Image.open(image_files[stem]) as a, Image.open(mask_files[stem]) as b:
            if a.size != b.size:
                raise ValueError(f"The test mask {mask_files[stem].name} is {b.size[0]}x{b.size[1]} but its image is "
                                 f"{a.size[0]}x{a.size[1]}; nothing was changed.")
        digest = hashlib.sha256(image_files[stem].read_bytes()).hexdigest()
        samples.append(FileSample(str(image_files[stem]), (str(mask_files[stem]),), "human", stem, digest=digest))
    return samples


def detector_cache_key(services, spec: str) -> str:
    """A key that changes when the detector does: the spec plus, for a folder, its files' names, sizes
    and modification times."""
    parts = [spec.strip()]
    folder = Path(spec.strip()).expanduser()
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = path.stat()
            parts.append(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def pseudo_label_files(services, spec: str, records, *, progress=None, batch: int = PSEUDO_BATCH):
    """({image id: cached score-map PNG}, stats) for `records` under detector `spec`: images without a
    cached map are loaded `batch` at a time and run through the detector; progress(done, total)."""
    from PIL import Image

    key = detector_cache_key(services, spec)
    folder = Path(services.data_dir) / "cache" / "pseudo" / key
    folder.mkdir(parents=True, exist_ok=True)
    files = {rec.id: folder / f"{rec.sha256}.png" for rec in records}
    todo = [rec for rec in records if not files[rec.id].is_file()]
    detector = services.detector(spec) if todo else None
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        heatmaps = detector.predict([services.store.load_rgb(rec.id) for rec in chunk], batch_size=min(batch, 8))
        for rec, heat in zip(chunk, heatmaps):
            values = np.round(np.clip(heat.scores, 0, 1) * 65535).astype(np.uint16)
            tmp = files[rec.id].with_name(f".{files[rec.id].name}.{os.getpid()}.tmp")
            Image.fromarray(values).save(tmp, format="PNG")
            os.replace(tmp, files[rec.id])
        if progress is not None:
            progress(min(start + batch, len(todo)), len(todo))
    return files, {"key": key, "computed": len(todo), "cached": len(records) - len(todo), "folder": str(folder)}


DATA_OPTIONS = ("val_fraction", "test_fraction", "split_seed", "sources", "pseudo_detector", "pseudo_threshold",
                "unlabelled_as_background", "test_images", "test_masks")
RUN_OPTIONS = ("device", "processes", "workers")


def detector_job_params(recipe: str, *, region_selector: bool = False, arch: str = "tiny", init: str | None = None,
                        config: dict | None = None, data: dict | None = None, run: dict | None = None) -> dict:
    """The params of a detector / region-selector job, as the CLI and the Train tab build them: the recipe
    resolved with `config` overrides (TrainConfig fields; None = the recipe's value) into a full config,
    plus the data options (DATA_OPTIONS) and run options (device, processes, workers) that are not None.
    Raises ValueError for a bad recipe, option or test folder before any job exists."""
    from engines.training.recipes import resolve_recipe
    from studio.datasets.splits import validate_fractions

    resolved = resolve_recipe(recipe, arch=(arch or "tiny").strip(), init=(init or "").strip() or None,
                              region_selector=region_selector, **(config or {}))
    data = {k: v for k, v in (data or {}).items() if v is not None}
    unknown = sorted(set(data) - set(DATA_OPTIONS)) + sorted(set(run or {}) - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown training data option '{unknown[0]}'.")
    validate_fractions(float(data.get("val_fraction", DEFAULT_VAL_FRACTION)),
                       float(data.get("test_fraction", DEFAULT_TEST_FRACTION)))
    sources = data.get("sources")
    if sources is not None:
        bad = sorted(set(sources) - set(TRAIN_SOURCES))
        if bad or not sources:
            raise ValueError(f"Training sources must be some of {', '.join(TRAIN_SOURCES)}, got {sources!r}.")
    if data.get("test_images") or data.get("test_masks"):
        if not data.get("test_images"):
            raise ValueError("--test-masks needs --test-images (the images of the fixed test set).")
        read_test_folder(data["test_images"], data.get("test_masks"))  # refuse a bad folder now
        data["test_images"] = str(Path(data["test_images"]).expanduser().resolve())
        data["test_masks"] = str(Path(data["test_masks"]).expanduser().resolve())
    workers = (run or {}).get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a whole number >= 0, got {workers!r}.")
    return {"config": resolved.to_json(), **data, **{k: v for k, v in (run or {}).items() if v is not None}}
