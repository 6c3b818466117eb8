"""Export a session's labels as a dataset (importing masks made elsewhere is studio.datasets.import_masks).

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

The file naming here (`safe_name`, `clean_stem`) and `UNCLASSIFIED` are what studio.datasets.import_masks
reads back. Imports studio.datasets.splits, studio.store.records and studio.store.store.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
from PIL import Image

from studio.datasets.splits import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, EXCLUDED, SplitPlan, plan_split, validate_fractions
from studio.store.records import ImageRecord, LabelRegion
from studio.store.store import Store

EXPORT_FORMATS = ("png", "coco", "hf", "synartifact", "mmseg", "vlm")
UNCLASSIFIED = "unclassified"
CONFIG_NAME = "upernet_artifact_config.py"
CSV_COLUMNS = ("file", "region_key", "class", "caption", "author", "x0", "y0", "x1", "y1", "area")
SPLIT_COLUMNS = ("file", "image_id", "family_id", "split", "role")
SPLITS_FILE = "splits.csv"

MAX_STEM_LENGTH = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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


# ---------------------------------------------------------------- names
def clean_stem(original_name: str | None) -> str:
    """The stem of a file name (any folders dropped) reduced to [A-Za-z0-9._-], no leading dots."""
    base = PurePosixPath((original_name or "").replace("\\", "/")).name
    stem = PurePosixPath(base).stem if base not in ("", ".", "..") else ""
    return _UNSAFE.sub("_", stem).lstrip(".")[:MAX_STEM_LENGTH] or "image"


def safe_name(image: ImageRecord) -> str:
    """The export file stem of an image: ``<cleaned original stem>-<image id>`` ("image" if unnamed)."""
    return f"{clean_stem(image.original_name)}-{image.id}"


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
    from engines.classification.prompts import build_question, render_answer, yesno_question

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
