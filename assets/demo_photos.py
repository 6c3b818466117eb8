"""The captioned photos of assets/demo_photos.json: loading them and cutting square views.

Shared by the demo models' training scripts (assets/demo_t2i, assets/demo_detector) and the tests.
Images are RGB uint8 HxWx3. Every photo ships inside a declared dependency and loads offline.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PHOTOS_JSON = Path(__file__).resolve().parent / "demo_photos.json"
DEMO_SIZE = 128


def photo_catalogue() -> list[dict]:
    return json.loads(PHOTOS_JSON.read_text())["photos"]


def load_photo(entry: dict) -> np.ndarray:
    """RGB uint8 HxWx3 of a catalogue entry (scikit-image loader or matplotlib sample file)."""
    if entry["source"] == "skimage":
        import skimage.data

        img = getattr(skimage.data, entry["loader"])()
    elif entry["source"] == "matplotlib":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(entry["loader"]) as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    else:
        raise ValueError(f"Unknown photo source {entry['source']!r}.")
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def square_view(img: np.ndarray, size: int, side: int | None = None, top: int | None = None,
                left: int | None = None) -> np.ndarray:
    """A side x side square of `img` (default: the centred square of the shorter side), resized to size (Lanczos)."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w) if side is None else side
    top = (h - side) // 2 if top is None else top
    left = (w - side) // 2 if left is None else left
    crop = img[top:top + side, left:left + side]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


def canonical_views(size: int = DEMO_SIZE) -> dict[str, np.ndarray]:
    return {e["name"]: square_view(load_photo(e), size) for e in photo_catalogue()}


def random_views(img: np.ndarray, rng: np.random.Generator, count: int, size: int,
                 min_frac: float) -> list[np.ndarray]:
    h, w = img.shape[:2]
    short = min(h, w)
    views = []
    for _ in range(count):
        side = int(round(short * rng.uniform(min_frac, 1.0)))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        views.append(square_view(img, size, side, top, left))
    return views
