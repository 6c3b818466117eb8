"""Import masks made elsewhere back into a session as label regions (`import_masks`).

``png`` reads a folder of binary mask PNGs (or a png export) and ``coco`` an annotations.json with RLE or
polygon segmentations; files are matched to the session's images by content (an exported image beside the
masks) or by file stem, decoded to bool[H, W] masks and added with `Store.edit_regions`, all images in one
transaction. Imports studio.datasets.export for the export's file naming (`safe_name`, `clean_stem`,
`UNCLASSIFIED`).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from engines.images import MAX_PIXELS
from studio.datasets.export import UNCLASSIFIED, clean_stem, safe_name
from studio.safeio import MAX_BATCH_PIXELS, shown
from studio.store.records import ImageRecord, NewMask
from studio.store.schema import MASK_AUTHORS
from studio.store.store import Store

IMPORT_FORMATS = ("png", "coco")
MAX_COCO_BYTES = 500_000_000
"""Largest annotations.json import-masks reads."""
_ID_SUFFIX = re.compile(r"(.+)-\d+")


@dataclass(frozen=True)
class ImportSummary:
    """What `import_masks` did. `matched`: mask files (png) or COCO images matched to a session image
    of the same size; `regions`: regions added; `unmatched`: file names that match no image;
    `size_mismatches`: (file name, mask (H, W), image (H, W)) for matches skipped for their size."""
    matched: int
    regions: int
    unmatched: list[str]
    size_mismatches: list[tuple[str, tuple[int, int], tuple[int, int]]]


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
                for key in {raw, clean_stem(im.original_name)}:
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
