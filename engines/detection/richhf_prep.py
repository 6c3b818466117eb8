"""RichHF-18k preprocessing as in the synthetic-artifact paper, and RichHF-format data we synthesise.

Annotator count from the value grid
-----------------------------------
RichHF-18k stores ONE aggregated artifact map per record. When the map is the mean of n annotators'
binary maps, every pixel is a multiple of 255/n: n=3 gives {0, 85, 170, 255}, n=2 gives {0, 127|128,
255}, n=1 gives {0, 255}. `infer_annotators(raw)` returns the smallest n in 1..MAX_ANNOTATORS whose
grid holds every value of the map (each value within GRID_TOLERANCE = 1 of a grid point, so both
rounding and truncation of k*255/n are accepted):

- all pixels 0           -> 0: an empty map ("no artifact"); the count cannot be told. Such maps are
                            kept by default (the label is empty whatever the count).
- only {0, 255}          -> 1. A 3-annotator map whose annotators agree on EVERY pixel looks the same;
                            hand-drawn regions practically never agree on every pixel, so a non-empty
                            binary map is read as one annotator (documented, and counted in the report).
- {0, 85, 170, 255} etc. -> 3 (also when only some of these values occur, e.g. {0, 85}).
- {0, 128, 255}          -> 2.
- values on no grid up to MAX_ANNOTATORS -> None ("off-grid": a smoothed or resized map); excluded,
                            since no vote count can be read from it.

The paper's rule: keep maps made by at least three annotators and binarise with "at least 2 of 3":
`vote_mask(raw, n)` marks pixels with round(raw * n / 255) >= ceil(2n / 3) votes (raw >= 170 for n=3).

Synthetic RichHF-format data
----------------------------
`synthesise_richhf` writes a small dataset in RichHF-18k's own format (train/dev/test.tfrecord with
the real field names, images matched by filename, a captions.jsonl) plus a folder of clean source
images, so the whole paper protocol runs offline: simple shapes on gradients; an "artifact" is an
ellipse, centred on a circle when the picture has one (artifact-prone objects, as hands and faces are
in real images, so a region selector has something to learn), in which the picture is scrambled (blocks shifted, a 2-px checker mixed in); three
annotators each outline it with a jittered ellipse and the stored map is their mean (values 0, 85,
170, 255). A fraction of the records are drawn by one or two annotators (values {0, 255} or
{0, 128, 255}); some records have no artifact (an all-zero map). Everything is a function of `seed`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_ANNOTATORS = 12
GRID_TOLERANCE = 1.0
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (214, 48, 49), "blue": (9, 132, 227), "green": (0, 184, 148), "yellow": (253, 203, 110),
           "purple": (108, 92, 231), "orange": (225, 112, 85), "grey": (99, 110, 114), "pink": (232, 67, 147)}


# ----------------------------------------------------------------------------------------------
# Annotators and votes

def on_grid(values: np.ndarray, n: int, tolerance: float = GRID_TOLERANCE) -> bool:
    """True when every value (0-255) lies within `tolerance` of a multiple of 255 / n."""
    v = np.asarray(values, dtype=np.float64)
    step = 255.0 / n
    return bool(np.all(np.abs(v - np.round(v / step) * step) <= tolerance))


def infer_annotators(raw: np.ndarray, max_n: int = MAX_ANNOTATORS) -> int | None:
    """Annotator count of an aggregated map (uint8 [H, W]); 0 for an all-zero map, None when off-grid.
    See the module docstring for the rule and its one ambiguity ({0, 255} maps)."""
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise ValueError(f"the artifact map must be uint8 [H, W], got {raw.dtype} with shape {raw.shape}.")
    values = np.unique(raw)
    if values.size == 1 and values[0] == 0:
        return 0
    for n in range(1, int(max_n) + 1):
        if on_grid(values, n):
            return n
    return None


def vote_mask(raw: np.ndarray, annotators: int, votes: int = 2, of: int = 3) -> np.ndarray:
    """bool [H, W]: pixels marked by at least votes/of of the `annotators` (2 of 3 -> raw >= 170).

    The vote count of a pixel is round(raw * annotators / 255); the needed count is
    ceil(votes * annotators / of) (2 of 3 annotators; for 6 annotators, 4)."""
    if annotators < 1:
        raise ValueError(f"annotators must be at least 1, got {annotators}.")
    if not 1 <= votes <= of:
        raise ValueError(f"votes must be between 1 and {of}, got {votes}.")
    counts = np.rint(np.asarray(raw, dtype=np.float64) * annotators / 255.0)
    needed = math.ceil(votes * annotators / of - 1e-9)
    return counts >= needed


@dataclass(frozen=True)
class MapVerdict:
    """What the paper's preprocessing does with one map: `keep`, the inferred `annotators` (0 = empty
    map, None = off-grid) and `reason` (one of "3+ annotators", "empty map", "1 annotator",
    "2 annotators", "off-grid values")."""

    keep: bool
    annotators: int | None
    reason: str


def judge_map(raw: np.ndarray, min_annotators: int = 3, keep_empty: bool = True) -> MapVerdict:
    """Keep a map made by at least `min_annotators` (inferred from its value grid), and empty maps when
    `keep_empty`; exclude the rest with the reason."""
    n = infer_annotators(raw)
    if n == 0:
        return MapVerdict(keep_empty, 0, "empty map")
    if n is None:
        return MapVerdict(False, None, "off-grid values")
    if n < min_annotators:
        return MapVerdict(False, n, f"{n} annotator{'s' if n > 1 else ''}")
    return MapVerdict(True, n, f"{min_annotators}+ annotators")


def label_from_map(raw: np.ndarray, verdict: MapVerdict, votes: int = 2, of: int = 3) -> np.ndarray:
    """The binary label of a kept map: votes of its inferred annotators (an empty map gives no pixel)."""
    if verdict.annotators == 0:
        return np.zeros(np.asarray(raw).shape, bool)
    return vote_mask(raw, int(verdict.annotators), votes, of)


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 over the shapes, dtypes and bytes of the arrays (identifies an image or a mask)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.data)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Synthetic RichHF-format data

@dataclass(frozen=True)
class SyntheticCounts:
    """What `synthesise_richhf` wrote: records per split, by annotator count, and clean images."""

    records: dict
    annotators: dict
    clean: int


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, list]:
    """An RGB uint8 picture of 2-3 shapes on a gradient, its caption and its shapes [(kind, cy, cx, r)]."""
    names = list(COLOURS)
    c0, c1 = (np.array(COLOURS[names[i]], np.float64) for i in rng.choice(len(names), 2, replace=False))
    t = np.linspace(0.0, 1.0, size)[:, None, None] * np.ones((1, size, 1))
    img = (1 - t) * c0 * 0.5 + t * c1 * 0.5 + 60.0
    yy, xx = np.mgrid[0:size, 0:size]
    parts, shapes = [], []
    for _ in range(int(rng.integers(2, 4))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = names[int(rng.integers(len(names)))]
        r = rng.uniform(size / 10, size / 4)
        cy, cx = rng.uniform(r, size - r, 2)
        if shape == "circle":
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        elif shape == "square":
            inside = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        else:
            inside = (yy <= cy + r * 0.8) & (yy - (cy - r) >= 2.0 * np.abs(xx - cx))
        img[inside] = COLOURS[colour]
        parts.append(f"a {colour} {shape}")
        shapes.append((shape, float(cy), float(cx), float(r)))
    img += rng.normal(0.0, 4.0, img.shape)
    caption = ", ".join(parts[:-1]) + f" and {parts[-1]} on a gradient background"
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), caption, shapes


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - cy) / max(ry, 1.0)) ** 2 + ((xx - cx) / max(rx, 1.0)) ** 2 <= 1.0


def _scramble(img: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The synthetic artifact: inside `region`, 4-px blocks shifted and a 2-px checker mixed in."""
    size = img.shape[0]
    shifted = np.roll(img, (int(rng.integers(3, 7)), int(rng.integers(3, 7))), axis=(0, 1)).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    checker = (((yy // 2) + (xx // 2)) % 2).astype(np.float64)[:, :, None]
    tint = rng.uniform(0, 255, 3)
    mixed = 0.55 * shifted + 0.45 * (checker * tint + (1 - checker) * (255 - tint))
    out = img.astype(np.float64)
    out[region] = mixed[region]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _annotated_map(region: tuple[float, float, float, float], size: int, annotators: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Mean of `annotators` jittered ellipse outlines of `region`, as RichHF stores it (uint8)."""
    cy, cx, ry, rx = region
    votes = np.zeros((size, size), np.float64)
    for _ in range(annotators):
        j = size / 64.0
        votes += _ellipse(size, cy + rng.uniform(-2, 2) * j, cx + rng.uniform(-2, 2) * j,
                          ry * rng.uniform(0.8, 1.25), rx * rng.uniform(0.8, 1.25))
    return np.rint(votes * 255.0 / annotators).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synthesise_richhf(folder: str | Path, *, train: int = 60, val: int = 12, test: int = 16, clean: int = 12,
                      size: int = 64, fewer_annotators: float = 0.25, empty: float = 0.15,
                      seed: int = 0) -> SyntheticCounts:
    """Write RichHF-format data under `folder`: train.tfrecord, dev.tfrecord, test.tfrecord,
    images/<filename>.png (the "Pick-a-Pic" images), clean/<name>.png (artifact-free source images),
    captions.jsonl ({"filename", "caption"} for both). See the module docstring for the content.

    `fewer_annotators` is the fraction of records drawn by 1 or 2 annotators (in every split),
    `empty` the fraction with no artifact. Deterministic in `seed`; existing files are overwritten.
    """
    from engines.detection.richhf import make_example, write_tfrecord

    if size < 32 or size % 8:
        raise ValueError(f"size must be a multiple of 8 and at least 32, got {size}.")
    if not (0 <= fewer_annotators < 1 and 0 <= empty < 1 and fewer_annotators + empty < 1):
        raise ValueError("fewer_annotators and empty must be fractions in [0, 1) with a sum below 1.")
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "clean").mkdir(parents=True, exist_ok=True)
    captions, by_annotators, records = [], {}, {}
    for split_index, (split, count, file) in enumerate((("train", train, "train.tfrecord"),
                                                         ("dev", val, "dev.tfrecord"),
                                                         ("test", test, "test.tfrecord"))):
        payloads = []
        for i in range(int(count)):
            rng = np.random.default_rng([seed, split_index, i])
            img, caption, shapes = _scene(rng, size)
            u = rng.random()
            annotators = 3 if u >= fewer_annotators else int(rng.integers(1, 3))
            if u >= 1.0 - empty:
                raw = np.zeros((size, size), np.uint8)
                annotators = 3
            else:
                ry, rx = rng.uniform(size / 10, size / 5, 2)
                circles = [sh for sh in shapes if sh[0] == "circle"]
                if circles:  # artifacts are prone to circles, as real ones are to hands and faces
                    _, cy, cx, _ = circles[int(rng.integers(len(circles)))]
                else:
                    cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
                img = _scramble(img, _ellipse(size, cy, cx, ry, rx), rng)
                raw = _annotated_map((cy, cx, ry, rx), size, annotators, rng)
            name = f"synth-{split}-{i:05d}.png"
            (root / "images" / name).write_bytes(_png(img))
            captions.append({"filename": name, "caption": caption})
            key = f"{split}:{annotators if raw.any() else 'empty'}"
            by_annotators[key] = by_annotators.get(key, 0) + 1
            payloads.append(make_example(
                filename=name, aesthetics_score=float(rng.uniform(1, 5)), artifact_score=float(rng.uniform(1, 5)),
                misalignment_score=float(rng.uniform(1, 5)), overall_score=float(rng.uniform(1, 5)),
                artifact_map=_png(raw), misalignment_map=_png(np.zeros((size, size), np.uint8)),
                prompt_misalignment_label=" ".join(["1"] * len(caption.split()))))
        write_tfrecord(root / file, payloads)
        records[split] = len(payloads)
    for i in range(int(clean)):
        rng = np.random.default_rng([seed, 9, i])
        img, caption, _ = _scene(rng, size)
        name = f"clean-{i:05d}.png"
        (root / "clean" / name).write_bytes(_png(img))
        captions.append({"filename": name, "caption": caption})
    (root / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    return SyntheticCounts(records=records, annotators=by_annotators, clean=int(clean))
