"""Export a session's labels as a dataset, and import masks made elsewhere back into a session.

A *region* is one `LabelRegion` of `store.label_state(image_id).regions`: the current labels, what
the person sees in the Label tab (undone edits and draft masks are not exported). Regions whose mask
is empty carry no pixels and are skipped. Labelled images are exported with or without regions (an
image marked done without regions is a negative example); never-labelled images are left out unless
`unlabelled_as_background` (they are then all-background train examples).

Splits: every format splits the images by family with `studio.datasets.splits.plan_split` (the one split
training and `evaluate --session` use): an image and every image derived from it (corrupted,
repaired) share one split; val and test hold human labels only; synthetic or pseudo images derived
from a held-out image are left out. Every export writes ``splits.csv`` (file, image_id, family_id,
split, role); the formats also carry the split themselves as noted below.

Images are copied byte for byte from the store (PNG, RGB). Each image's file stem is
`safe_name(image)`: its original name's stem reduced to ``[A-Za-z0-9._-]`` plus ``-<image id>``, so
names are unique and never leave the export folder. Boxes are ``(x0, y0, x1, y1)`` inclusive pixel
indices (like `LabelRegion.bbox`) except in COCO, which uses ``[x, y, width, height]``.

Formats (`EXPORT_FORMATS`):

- ``png``: ``images/<name>.png``, ``masks/<name>.png`` (union of the image's regions, L, 0/255) and
  ``regions.csv`` (file, region_key, class, caption, author, x0, y0, x1, y1, area).
- ``coco``: ``images/<name>.png`` and ``annotations.json`` (COCO instances, each image with its "split"; categories 1..N in
  taxonomy order plus "unclassified" only when a region has no class or one outside the taxonomy;
  one annotation per region with a compressed RLE segmentation and "caption"/"author" fields).
- ``hf``: a Hugging Face imagefolder: ``train/<name>.png``, ``train/masks/<name>.png`` (union masks)
  and ``train/metadata.jsonl`` (file_name, mask_file_name, split, family_id, classes, captions, bboxes, ...).
  ``datasets.load_dataset("imagefolder", data_dir=out)`` gives columns image, mask, split, classes, ...;
  select the family split with ``ds["train"].filter(lambda r: r["split"] == "val")``. (One folder, not
  one per split: datasets infers each split's column types from its first rows and refuses a split
  whose images all lack regions, whose list columns are then untyped.) The masks live under ``train/``
  because datasets refuses metadata paths with ``..``; rows come from metadata.jsonl only, so the mask
  PNGs are not read as extra images.
- ``synartifact``: ``images/<name>.png`` and ``annotations/<name>.json`` in SynArtifact's layout.
  SynArtifact annotates rectangles, so each mask is reduced to its bounding box (rect_start is
  (x0, y0), rect_end is (x1, y1), both inclusive); each document carries its "split".
- ``mmseg``: ``img_dir/{train,val,test}/<name>.png``, ``ann_dir/{train,val,test}/<name>.png`` (L, 0 =
  background, 1 = artifact) and ``upernet_artifact_config.py`` (an mmsegmentation 1.x UperNet config:
  the paper's recipe, validation on val, testing on test).
- ``vlm``: SynArtifact's question-answer pairs as conversation JSONL for external VLM trainers:
  ``images/<name>.png`` and ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (the family split above, the
  one train-classifier uses; val and test only when they hold images). Per image: the template question
  with the reference-format JSON answer of its classified regions, and one yes/no question per class.
  Each line has TRL's ``messages`` + ``images`` and LLaVA's ``conversations`` (``<image>`` marks the
  picture) + ``image``, plus ``task`` ("answer" or "yesno") and ``split``.

`import_masks` reads ``png`` (a folder of binary mask PNGs, or a png export) and ``coco``
(annotations.json with RLE or polygon segmentations) back as regions, matched to the session's
images by content (an exported image beside the masks) or by file stem.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from engines.images import MAX_PIXELS
from studio.safeio import MAX_BATCH_PIXELS, shown
from studio.datasets.splits import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, EXCLUDED, SplitPlan, plan_split, validate_fractions
from studio.store.store import MASK_AUTHORS, ImageRecord, LabelRegion, NewMask, Store

EXPORT_FORMATS = ("png", "coco", "hf", "synartifact", "mmseg", "vlm")
IMPORT_FORMATS = ("png", "coco")
UNCLASSIFIED = "unclassified"
CONFIG_NAME = "upernet_artifact_config.py"
CSV_COLUMNS = ("file", "region_key", "class", "caption", "author", "x0", "y0", "x1", "y1", "area")
SPLIT_COLUMNS = ("file", "image_id", "family_id", "split", "role")
SPLITS_FILE = "splits.csv"

MAX_STEM_LENGTH = 80
MAX_COCO_BYTES = 500_000_000
"""Largest annotations.json import-masks reads."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_ID_SUFFIX = re.compile(r"(.+)-\d+")


@dataclass(frozen=True)
class ExportSummary:
    """What `export_session` wrote: `images` and `regions` exported, `files` written under `out_dir`;
    `splits` images per split; images left out: never labelled, or derived from (or unlabelled in the
    family of) a held-out image."""
    fmt: str
    out_dir: str
    images: int
    regions: int
    files: int
    splits: dict = field(default_factory=dict)
    skipped_unlabelled: int = 0
    skipped_held_out: int = 0


@dataclass(frozen=True)
class ImportSummary:
    """What `import_masks` did. `matched`: mask files (png) or COCO images matched to a session image
    of the same size; `regions`: regions added; `unmatched`: file names that match no image;
    `size_mismatches`: (file name, mask (H, W), image (H, W)) for matches skipped for their size."""
    matched: int
    regions: int
    unmatched: list[str]
    size_mismatches: list[tuple[str, tuple[int, int], tuple[int, int]]]


# ---------------------------------------------------------------- names
def _clean_stem(original_name: str | None) -> str:
    """The stem of a file name (any folders dropped) reduced to [A-Za-z0-9._-], no leading dots."""
    base = PurePosixPath((original_name or "").replace("\\", "/")).name
    stem = PurePosixPath(base).stem if base not in ("", ".", "..") else ""
    return _UNSAFE.sub("_", stem).lstrip(".")[:MAX_STEM_LENGTH] or "image"


def safe_name(image: ImageRecord) -> str:
    """The export file stem of an image: ``<cleaned original stem>-<image id>`` ("image" if unnamed)."""
    return f"{_clean_stem(image.original_name)}-{image.id}"


# ---------------------------------------------------------------- export
def export_session(store: Store, session_id: int | str, fmt: str, out_dir: str | Path, taxonomy: list[dict], *,
                   val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION,
                   seed: int = 0, overwrite: bool = False, unlabelled_as_background: bool = False) -> ExportSummary:
    """Write the session's labelled images and current regions to `out_dir` in format `fmt` (see the module doc).

    `taxonomy` is the session's classes [{"name", ...}] (COCO categories come from it). `val_fraction`,
    `test_fraction` and `seed` define the family split (`studio.datasets.splits.plan_split`, the same as
    training's with the same values). Everything is written to a staging folder beside `out_dir` and
    moved into place at the end. A non-empty `out_dir` is refused unless `overwrite`, which replaces
    only the entries this format writes (e.g. ``images/``, ``annotations.json``) and leaves other files alone.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}.")
    class_names = _taxonomy_names(taxonomy)
    validate_fractions(val_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"The export folder {out} is a file; choose a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"The export folder {out} is not empty; choose a new or empty folder, or overwrite it.")
    all_images = store.list_images(session_id)
    if not all_images:
        raise ValueError(f"Session {session_id!r} has no images to export.")
    plan = plan_split(store, session_id, val_fraction=float(val_fraction), test_fraction=float(test_fraction),
                      seed=int(seed))
    images, skipped_unlabelled, skipped_held_out = [], 0, 0
    for image in all_images:
        split, role = plan.split_of[image.id], plan.role_of[image.id]
        if split == EXCLUDED:
            skipped_held_out += 1
        elif role == "unlabelled" and not unlabelled_as_background:
            skipped_unlabelled += 1
        else:
            images.append(image)
    if not images:
        raise ValueError(f"Session {session_id!r} has no labelled images to export (label some, or export "
                         "never-labelled ones as background with unlabelled_as_background).")
    for image in images:
        if not Path(image.path).is_file():
            raise ValueError(f"The file of image {image.id} is missing from the store: {image.path}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become the export folder's
    try:
        writer = {"png": _write_png, "coco": _write_coco, "hf": _write_hf,
                  "synartifact": _write_synartifact, "mmseg": _write_mmseg, "vlm": _write_vlm}[fmt]
        regions = writer(store, images, staging, class_names=class_names, out=out, plan=plan, taxonomy=taxonomy)
        _write_splits(images, plan, staging)
        files = sum(1 for p in staging.rglob("*") if p.is_file())
        _install(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    counts = {s: sum(plan.split_of[im.id] == s for im in images) for s in ("train", "val", "test")}
    return ExportSummary(fmt=fmt, out_dir=str(out), images=len(images), regions=regions, files=files, splits=counts,
                         skipped_unlabelled=skipped_unlabelled, skipped_held_out=skipped_held_out)


def _write_splits(images: list[ImageRecord], plan: SplitPlan, root: Path) -> None:
    with open(root / SPLITS_FILE, "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(SPLIT_COLUMNS)
        for image in images:
            rows.writerow([f"{safe_name(image)}.png", image.id, plan.family_of[image.id], plan.split_of[image.id],
                           plan.role_of[image.id]])


def _taxonomy_names(taxonomy: Any) -> list[str]:
    names = [c.get("name") if isinstance(c, dict) else None for c in taxonomy] \
        if isinstance(taxonomy, (list, tuple)) else [None]
    if any(not isinstance(n, str) or not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError("taxonomy must be a list of classes, each a dict with a unique, non-empty 'name'.")
    return [n.strip() for n in names]


def _install(staging: Path, out: Path) -> None:
    """Move the staged export into `out`: the whole folder if `out` is new or empty, else entry by entry."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(entry, target)


def _image_regions(store: Store, image: ImageRecord) -> list[tuple[LabelRegion, np.ndarray]]:
    """The image's current non-empty regions with their masks (bool[H, W])."""
    out = []
    for region in store.label_state(image.id).regions:
        mask = store.load_mask(region.mask_id)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"Region {region.key} of image {image.id} has a mask of shape {mask.shape}, "
                             f"not the image's {(image.height, image.width)}.")
        if mask.any():
            out.append((region, mask))
    return out


def _each_image(store: Store, images: list[ImageRecord]) -> Iterator[tuple[ImageRecord, str, list, np.ndarray]]:
    """(image, file stem, [(region, mask)], union mask) per image, loading one image's masks at a time."""
    for image in images:
        regions = _image_regions(store, image)
        union = np.zeros((image.height, image.width), dtype=bool)
        for _, mask in regions:
            union |= mask
        yield image, safe_name(image), regions, union


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _copy_image(image: ImageRecord, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image.path, dest)


def _save_l(array: np.ndarray, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(dest)  # 2-D uint8 -> mode L


def _write_png(store: Store, images: list[ImageRecord], root: Path, **_: Any) -> int:
    count = 0
    with open(root / "regions.csv", "w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(CSV_COLUMNS)
        for image, name, regions, union in _each_image(store, images):
            _copy_image(image, root / "images" / f"{name}.png")
            _save_l(union * np.uint8(255), root / "masks" / f"{name}.png")
            for region, mask in regions:
                rows.writerow([f"{name}.png", region.key, region.class_name or "", region.caption or "",
                               region.author, *_bbox(mask), int(mask.sum())])
                count += 1
    return count


def _write_coco(store: Store, images: list[ImageRecord], root: Path, *, class_names: list[str], plan: SplitPlan,
                **_: Any) -> int:
    from pycocotools import mask as mask_utils

    categories = [{"id": i, "name": n, "supercategory": "artifact"} for i, n in enumerate(class_names, start=1)]
    category_of = {c["name"]: c["id"] for c in categories}
    coco_images, annotations = [], []
    for image, name, regions, _ in _each_image(store, images):
        _copy_image(image, root / "images" / f"{name}.png")
        coco_images.append({"id": image.id, "file_name": f"{name}.png", "width": image.width,
                            "height": image.height, "original_name": image.original_name,
                            "split": plan.split_of[image.id], "family_id": plan.family_of[image.id]})
        for region, mask in regions:
            if region.class_name not in category_of:
                if UNCLASSIFIED not in category_of:
                    category_of[UNCLASSIFIED] = len(categories) + 1
                    categories.append({"id": category_of[UNCLASSIFIED], "name": UNCLASSIFIED,
                                       "supercategory": "artifact"})
                category_id = category_of[UNCLASSIFIED]
            else:
                category_id = category_of[region.class_name]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = _bbox(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image.id, "category_id": category_id,
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask.sum()), "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "iscrowd": 0,
                "caption": region.caption, "author": region.author, "region_key": region.key})
    data = {"info": {"description": "Artifact regions exported by Artifact Studio", "version": "1.0"},
            "licenses": [], "images": coco_images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return len(annotations)


def _write_hf(store: Store, images: list[ImageRecord], root: Path, *, plan: SplitPlan, **_: Any) -> int:
    count = 0
    train = root / "train"
    train.mkdir()
    with open(train / "metadata.jsonl", "w", encoding="utf-8") as f:
        for image, name, regions, union in _each_image(store, images):
            _copy_image(image, train / f"{name}.png")
            _save_l(union * np.uint8(255), train / "masks" / f"{name}.png")
            row = {"file_name": f"{name}.png", "mask_file_name": f"masks/{name}.png", "image_id": image.id,
                   "split": plan.split_of[image.id], "family_id": plan.family_of[image.id],
                   "width": image.width, "height": image.height,
                   "region_keys": [r.key for r, _ in regions], "classes": [r.class_name for r, _ in regions],
                   "captions": [r.caption for r, _ in regions], "authors": [r.author for r, _ in regions],
                   "bboxes": [list(_bbox(m)) for _, m in regions], "areas": [int(m.sum()) for _, m in regions]}
            f.write(json.dumps(row) + "\n")
            count += len(regions)
    return count


def _write_synartifact(store: Store, images: list[ImageRecord], root: Path, *, plan: SplitPlan, **_: Any) -> int:
    count = 0
    (root / "annotations").mkdir()
    for image, name, regions, _ in _each_image(store, images):
        _copy_image(image, root / "images" / f"{name}.png")
        boxes = []
        for region, mask in regions:
            x0, y0, x1, y1 = _bbox(mask)
            boxes.append({"rect_start": [x0, y0], "rect_end": [x1, y1], "class": region.class_name,
                          "artifacts_caption": region.caption})
        doc = {"image": f"{name}.png", "width": image.width, "height": image.height, "split": plan.split_of[image.id],
               "Artifacts annotation": boxes}
        (root / "annotations" / f"{name}.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        count += len(boxes)
    return count


def _write_vlm(store: Store, images: list[ImageRecord], root: Path, *, taxonomy: list[dict], plan: SplitPlan,
               **_: Any) -> int:
    from engines.classification.classify import build_question, render_answer, yesno_question

    classes = [{"name": c["name"], "definition": c.get("definition", "")} for c in taxonomy]
    names = [c["name"] for c in classes]
    count = 0
    files = {"train": open(root / "train.jsonl", "w", encoding="utf-8")}
    try:
        for image, name, regions, _ in _each_image(store, images):
            split = plan.split_of[image.id]
            if split not in files:
                files[split] = open(root / f"{split}.jsonl", "w", encoding="utf-8")
            _copy_image(image, root / "images" / f"{name}.png")
            found = [(r.class_name, r.caption) for r, _ in regions]
            present = {c for c, _ in found}
            pairs = [("answer", build_question(classes), render_answer(classes, found))]
            pairs += [("yesno", yesno_question(classes, k), "yes" if n in present else "no") for k, n in enumerate(names)]
            for k, (task, question, answer) in enumerate(pairs):
                files[split].write(json.dumps({
                    "id": f"{name}-{k}", "task": task, "split": split, "image": f"images/{name}.png",
                    "images": [f"images/{name}.png"],
                    "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                    "conversations": [{"from": "human", "value": "<image>\n" + question},
                                      {"from": "gpt", "value": answer}]}) + "\n")
            count += len(regions)
    finally:
        for f in files.values():
            f.close()
    return count


def _write_mmseg(store: Store, images: list[ImageRecord], root: Path, *, out: Path, plan: SplitPlan, **_: Any) -> int:
    count = 0
    present = {plan.split_of[im.id] for im in images}
    for split in ("train", "val", "test"):
        if split == "train" or split in present:
            (root / "img_dir" / split).mkdir(parents=True)
            (root / "ann_dir" / split).mkdir(parents=True)
    for image, name, regions, union in _each_image(store, images):
        split = plan.split_of[image.id]
        _copy_image(image, root / "img_dir" / split / f"{name}.png")
        _save_l(union, root / "ann_dir" / split / f"{name}.png")
        count += len(regions)
    (root / CONFIG_NAME).write_text(mmseg_config(out, has_val="val" in present, has_test="test" in present),
                                    encoding="utf-8")
    return count


# ---------------------------------------------------------------- mmsegmentation config
_CONFIG = '''\
# UperNet artifact detector for mmsegmentation 1.x, written by Artifact Studio's mmseg export.
# Two classes: 0 = background, 1 = artifact (the ann_dir PNGs hold 0/1).
# Train from an mmsegmentation checkout:  python tools/train.py <this file>
#
# Backbone: Swin-T below (built into mmsegmentation). For ConvNeXt-T (needs mmpretrain) use instead:
#   custom_imports = dict(imports=['mmpretrain.models'], allow_failed_imports=False)
#   backbone = dict(type='mmpretrain.ConvNeXt', arch='tiny', out_indices=[0, 1, 2, 3],
#                   drop_path_rate=0.4, layer_scale_init_value=1.0, gap_before_final_norm=False)
# (decode_head in_channels stay [96, 192, 384, 768]). Start from ADE20K-trained UperNet weights when
# you have them: set load_from to the checkpoint (the 150-class heads are re-initialised).
# norm_cfg is plain BN for one GPU; use dict(type='SyncBN', requires_grad=True) with several.
default_scope = 'mmseg'
dataset_type = 'BaseSegDataset'
data_root = __DATA_ROOT__
metainfo = dict(classes=('background', 'artifact'), palette=[[0, 0, 0], [255, 0, 0]])
crop_size = (512, 512)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='SwinTransformer', pretrain_img_size=224, embed_dims=96, patch_size=4, window_size=7,
        mlp_ratio=4, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], strides=(4, 2, 2, 2),
        out_indices=(0, 1, 2, 3), qkv_bias=True, qk_scale=None, patch_norm=True, drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=0.3, use_abs_pos_embed=False, act_cfg=dict(type='GELU'),
        norm_cfg=dict(type='LN', requires_grad=True)),
    decode_head=dict(
        type='UPerHead', in_channels=[96, 192, 384, 768], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
        channels=512, dropout_ratio=0.1, num_classes=2, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead', in_channels=384, in_index=2, channels=256, num_convs=1, concat_input=False,
        dropout_ratio=0.1, num_classes=2, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        img_suffix='.png', seg_map_suffix='.png', pipeline=train_pipeline))
__VAL__
# The paper recipe: AdamW, lr 6e-5, betas (0.9, 0.999), weight decay 0.01, 10k iterations, linear warm-up then poly decay.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-05, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.0),
        'relative_position_bias_table': dict(decay_mult=0.0),
        'norm': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-06, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=10000, by_epoch=False),
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
work_dir = './work_dirs/upernet_artifact'
'''

_VAL = '''\
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        img_suffix='.png', seg_map_suffix='.png', pipeline=test_pipeline))
__TEST__
# mmseg's IoUMetric prints per-class IoU and mIoU: the headline is the artifact row (IoU.artifact);
# mIoU averages in the background class (~0.95 whatever the model does). Best checkpoint: on val only.
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
train_cfg = dict(type='IterBasedTrainLoop', max_iters=10000, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')'''

_TEST = '''\
test_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/test', seg_map_path='ann_dir/test'),
        img_suffix='.png', seg_map_suffix='.png', pipeline=test_pipeline))'''

_NO_TEST = '''\
# The export has no test split (too few human-labelled families): tools/test.py evaluates on val,
# the split that chose the checkpoint, so its numbers are optimistic.
test_dataloader = val_dataloader'''

_NO_VAL = '''\
# The export has fewer than two human-labelled families, so there is no validation split: validation is off.
val_dataloader = val_evaluator = val_cfg = None
test_dataloader = test_evaluator = test_cfg = None
train_cfg = dict(type='IterBasedTrainLoop', max_iters=10000)'''


def mmseg_config(data_root: str | Path, has_val: bool = True, has_test: bool = False) -> str:
    """The text of an mmsegmentation 1.x UperNet config reading an mmseg export at `data_root`."""
    val = _VAL.replace("__TEST__", _TEST if has_test else _NO_TEST) if has_val else _NO_VAL
    return _CONFIG.replace("__DATA_ROOT__", repr(str(data_root))).replace("__VAL__", val)


# ---------------------------------------------------------------- import
def import_masks(store: Store, session_id: int | str, fmt: str, path: str | Path, *,
                 author: str = "human") -> ImportSummary:
    """Add masks made elsewhere as regions of the session's images; returns what matched.

    ``png``: `path` is a folder of binary mask PNGs (0/255 or 0/1; or a png export, whose ``masks/``
    is used); each non-empty mask becomes one region without class. ``coco``: `path` is an
    annotations.json (or its folder); each annotation becomes one region with the category name as
    class ("unclassified" = none) and the annotation's "caption"; RLE and polygon segmentations are
    decoded with pycocotools. A file is matched to a session image by content when the image file is
    beside it (``images/<name>``, as exported), else by its stem: an exported ``<stem>-<image id>``,
    the image's original name stem, or ``<original stem>-<digits>``. Masks of another size are
    reported in `size_mismatches` and skipped, never stretched. Every file is checked before
    anything is written: declared sizes (PNG headers, COCO width/height and RLE `size`) against
    MAX_PIXELS per mask and MAX_BATCH_PIXELS per import *before* any mask is decoded. Then all images
    get their edit ("import <fmt>", undoable) in one transaction: a failure (a full disk...) adds nothing.
    """
    if fmt not in IMPORT_FORMATS:
        raise ValueError(f"Unknown import format {fmt!r}; choose one of: {', '.join(IMPORT_FORMATS)}.")
    if author not in MASK_AUTHORS:
        raise ValueError(f"author {author!r} is not one of {list(MASK_AUTHORS)}.")
    images = store.list_images(session_id)
    if not images:
        raise ValueError(f"Session {session_id!r} has no images to import masks into.")
    matcher = _Matcher(images)
    plan: dict[int, list[NewMask]] = {}
    if fmt == "png":
        matched, unmatched, mismatches = _plan_png(Path(path), matcher, plan, author)
    else:
        matched, unmatched, mismatches = _plan_coco(Path(path), matcher, plan, author)
    regions = 0
    with store.transaction():  # all images' edits, or none
        for image_id, masks in plan.items():
            store.edit_regions(image_id, add=masks, action=f"import {fmt}")
            regions += len(masks)
    return ImportSummary(matched=matched, regions=regions, unmatched=unmatched, size_mismatches=mismatches)


class _Matcher:
    """Finds the session image a file belongs to: by the sha256 of its image file, else by name."""

    def __init__(self, images: list[ImageRecord]):
        self.by_sha: dict[str, list[ImageRecord]] = defaultdict(list)
        self.by_export = {safe_name(im): im for im in images}
        self.by_stem: dict[str, dict[int, ImageRecord]] = defaultdict(dict)
        for im in images:
            self.by_sha[im.sha256].append(im)
            if im.original_name:
                raw = PurePosixPath(PurePosixPath(im.original_name.replace("\\", "/")).name).stem
                for key in {raw, _clean_stem(im.original_name)}:
                    self.by_stem[key][im.id] = im

    def match(self, stem: str, image_file: Path | None, what: str) -> ImageRecord | None:
        allowed = None
        if image_file is not None and image_file.is_file():
            same = self.by_sha.get(hashlib.sha256(image_file.read_bytes()).hexdigest(), [])
            if len(same) == 1:
                return same[0]
            allowed = {im.id for im in same} or None
        exact = self.by_export.get(stem)
        if exact is not None and (allowed is None or exact.id in allowed):
            return exact
        named = self.by_stem.get(stem)
        if not named and _ID_SUFFIX.fullmatch(stem):
            named = self.by_stem.get(_ID_SUFFIX.fullmatch(stem).group(1))
        named = [im for im in (named or {}).values() if allowed is None or im.id in allowed]
        if len(named) > 1:
            raise ValueError(f"{what} matches {len(named)} images of the session (ids "
                             f"{', '.join(str(im.id) for im in named)}); name it <stem>-<image id> to choose one.")
        return named[0] if named else None


def _mask_size(path: Path) -> tuple[int, int]:
    """(height, width) of a mask file from its header, checked against MAX_PIXELS (nothing decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise ValueError(f"Mask file {shown(path.name)} is larger than {MAX_PIXELS // 1_000_000} megapixels.") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"Mask file {shown(path.name)} is not a readable image ({_reason(exc)}).") from None
    if width * height > MAX_PIXELS:
        raise ValueError(f"Mask file {shown(path.name)} is {width}x{height}, larger than "
                         f"{MAX_PIXELS // 1_000_000} megapixels.")
    return height, width


def _read_binary_mask(path: Path) -> np.ndarray:
    """A mask PNG as bool[H, W]: mode "1", or grey values all in {0, 255} or all in {0, 1}."""
    _mask_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode == "1":
                    return np.array(im, dtype=bool)
                values = np.array(im if im.mode == "L" else im.convert("L"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"Mask file {shown(path.name)} is not a readable image ({_reason(exc)}).") from None
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    if set(present.tolist()) <= {0, 1}:
        return values == 1
    if set(present.tolist()) <= {0, 255}:
        return values == 255
    raise ValueError(f"Mask file {shown(path.name)} is not a binary mask: its values must be only 0 and 255 "
                     f"(or 0 and 1), found {len(present)} different values.")


def _reason(exc: BaseException) -> str:
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip().rstrip(".")
    return shown(text[:160]) or type(exc).__name__


def _check_batch(pixels: int) -> None:
    if pixels > MAX_BATCH_PIXELS:
        raise ValueError(f"The masks to import add up to {pixels // 1_000_000} megapixels, more than the "
                         f"{MAX_BATCH_PIXELS // 1_000_000} one import takes; import them in smaller groups.")


def _plan_png(path: Path, matcher: _Matcher, plan: dict, author: str) -> tuple[int, list, list]:
    if not path.is_dir():
        raise ValueError(f"{shown(path)} is not a folder; png import reads a folder of mask PNGs.")

    def pngs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")

    mask_dir = path / "masks" if (path / "masks").is_dir() and not pngs(path) else path
    files = pngs(mask_dir)
    if not files:
        raise ValueError(f"No mask PNGs found in {shown(mask_dir)}.")
    image_dir = mask_dir.parent / "images"
    matched, unmatched, mismatches, todo, pixels = 0, [], [], [], 0
    for file in files:  # headers and matching first: nothing decoded yet
        size = _mask_size(file)
        image = matcher.match(file.stem, image_dir / file.name, f"Mask file {shown(file.name)}")
        if image is None:
            unmatched.append(shown(file.name))
        elif size != (image.height, image.width):
            mismatches.append((shown(file.name), size, (image.height, image.width)))
        else:
            todo.append((file, image))
            pixels += size[0] * size[1]
    _check_batch(pixels)
    for file, image in todo:
        mask = _read_binary_mask(file)
        if mask.shape != (image.height, image.width):  # the header lied
            raise ValueError(f"Mask file {shown(file.name)} decodes to {mask.shape[1]}x{mask.shape[0]}, "
                             f"not the {image.width}x{image.height} its header declares.")
        matched += 1
        if mask.any():
            plan.setdefault(image.id, []).append(NewMask(mask=mask, author=author))
    return matched, unmatched, mismatches


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rle_string_counts(counts: str, what: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString) in Python, so a malformed string
    is refused here instead of reaching pycocotools' C decoder."""
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError(f"{what}: the RLE counts string is truncated.")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{what}: the RLE counts string has an invalid character {counts[p]!r}.")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            raise ValueError(f"{what}: the RLE counts string decodes to a negative run.")
        out.append(x)
    return out


def _check_segmentation(seg: Any, size: tuple[int, int] | None, what: str) -> tuple[tuple[int, int] | None, tuple]:
    """Validate a COCO segmentation (RLE with string or list counts, or polygons) without decoding it:
    nothing proportional to the declared size is allocated. Returns (RLE size or None, decodable)."""
    if isinstance(seg, dict):
        shape = seg.get("size")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and v > 0 for v in shape)):
            raise ValueError(f"{what}: an RLE segmentation needs 'size' [height, width].")
        if shape[0] * shape[1] > MAX_PIXELS:
            raise ValueError(f"{what}: its RLE size {shape[1]}x{shape[0]} is larger than "
                             f"{MAX_PIXELS // 1_000_000} megapixels.")
        if size is not None and tuple(shape) != size:
            raise ValueError(f"{what}: its RLE size {tuple(shape)} differs from its image's size {size}.")
        counts = seg.get("counts")
        if isinstance(counts, str):
            counts = _rle_string_counts(counts, what)
        if not (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts)
                and sum(counts) == shape[0] * shape[1]):
            raise ValueError(f"{what}: the RLE counts must be non-negative runs adding up to height * width.")
        return (shape[0], shape[1]), ("rle", counts)
    polygons_ok = isinstance(seg, list) and seg and all(
        isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in poly)
        for poly in seg)
    if not polygons_ok:
        raise ValueError(f"{what}: segmentation must be an RLE dict or a list of polygons [x1, y1, x2, y2, ...] "
                         f"with at least 3 points.")
    if size is None:
        raise ValueError(f"{what}: a polygon segmentation needs its image's width and height.")
    return None, ("polygons", [[float(v) for v in poly] for poly in seg])


def _decode(checked: tuple, size: tuple[int, int]) -> np.ndarray:
    """bool[H, W] from a segmentation `_check_segmentation` accepted for an image of `size` (H, W)."""
    from pycocotools import mask as mask_utils

    kind, data = checked
    if kind == "rle":
        rle = mask_utils.frPyObjects({"size": list(size), "counts": data}, size[0], size[1])
        return mask_utils.decode(rle).astype(bool)
    rles = mask_utils.frPyObjects(data, size[0], size[1])
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _decode_segmentation(seg: Any, size: tuple[int, int] | None, what: str) -> np.ndarray:
    """A COCO segmentation as bool[H, W] (checked first, see `_check_segmentation`)."""
    shape, checked = _check_segmentation(seg, size, what)
    return _decode(checked, size if size is not None else shape)


def _plan_coco(path: Path, matcher: _Matcher, plan: dict, author: str) -> tuple[int, list, list]:
    ann_file = path / "annotations.json" if path.is_dir() else path
    if not ann_file.is_file():
        raise ValueError(f"{shown(ann_file)} does not exist; coco import reads an annotations.json or its folder.")
    name = shown(ann_file.name)
    if ann_file.stat().st_size > MAX_COCO_BYTES:
        raise ValueError(f"{name} is larger than {MAX_COCO_BYTES // 1_000_000} MB; split it into smaller files.")
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{name} is not readable JSON ({_reason(exc)}).") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ValueError(f"{name} is not a COCO file: it needs lists 'images', 'annotations' and 'categories'.")
    classes: dict[int, str | None] = {}
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str) \
                or cat["id"] in classes:
            raise ValueError(f"{name}: every category needs a unique integer 'id' and a string 'name', "
                             f"got {_short(cat)}.")
        classes[cat["id"]] = None if cat["name"] == UNCLASSIFIED else cat["name"]
    entries: dict[int, dict] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or not _is_int(entry.get("id")) or entry["id"] in entries \
                or not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise ValueError(f"{name}: every image needs a unique integer 'id' and a 'file_name', got {_short(entry)}.")
        width, height = entry.get("width"), entry.get("height")
        if (width is None) != (height is None) or (width is not None and not (
                _is_int(width) and _is_int(height) and width > 0 and height > 0)):
            raise ValueError(f"{name}: image {entry['file_name']!r} needs positive integer 'width' and 'height'.")
        if width is not None and width * height > MAX_PIXELS:
            raise ValueError(f"{name}: image {entry['file_name']!r} declares {width}x{height}, larger than "
                             f"{MAX_PIXELS // 1_000_000} megapixels.")
        entries[entry["id"]] = dict(entry)
    per_image: dict[int, list[tuple[tuple, str | None, str | None]]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):  # checked, not decoded
        what = f"{name}: annotation {_short(ann.get('id', i)) if isinstance(ann, dict) else i}"
        if not isinstance(ann, dict) or ann.get("image_id") not in entries:
            raise ValueError(f"{what} refers to no image of the file.")
        if ann.get("category_id") not in classes:
            raise ValueError(f"{what} has category_id {_short(ann.get('category_id'))}, which is not a category of the file.")
        caption = ann.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{what} has a caption that is not a string.")
        entry = entries[ann["image_id"]]
        size = None if entry.get("height") is None else (entry["height"], entry["width"])
        shape, checked = _check_segmentation(ann.get("segmentation"), size, what)
        if size is None:
            entry["height"], entry["width"] = shape
        per_image[ann["image_id"]].append((checked, classes[ann["category_id"]], caption))
    root = ann_file.parent.resolve()
    matched, unmatched, mismatches, todo = 0, [], [], []
    for image_id, entry in entries.items():
        file_name = entry["file_name"].replace("\\", "/")
        image_file = None
        for candidate in (root / "images" / file_name, root / file_name):
            try:
                inside = candidate.resolve().is_relative_to(root) and candidate.is_file()
            except (OSError, ValueError):
                inside = False
            if inside:
                image_file = candidate
                break
        image = matcher.match(PurePosixPath(file_name).stem, image_file, f"{name}: image {file_name!r}")
        if image is None:
            unmatched.append(entry["file_name"])
            continue
        size = None if entry.get("height") is None else (entry["height"], entry["width"])
        if size is not None and size != (image.height, image.width):
            mismatches.append((entry["file_name"], size, (image.height, image.width)))
            continue
        matched += 1
        todo.append((image, per_image.get(image_id, [])))
    _check_batch(sum(image.height * image.width * len(anns) for image, anns in todo))
    for image, anns in todo:  # sizes are known to match the session image: decoding is bounded
        for checked, class_name, caption in anns:
            mask = _decode(checked, (image.height, image.width))
            if mask.any():
                plan.setdefault(image.id, []).append(NewMask(mask=mask, author=author, class_name=class_name,
                                                             caption=caption))
    return matched, unmatched, mismatches


def _short(value: Any) -> str:
    """repr of a JSON value cut to 80 characters, for messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
