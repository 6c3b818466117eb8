"""Regions of an image for the classifier: the bbox with context (`crop_with_context`), the bbox drawn in
red (`draw_box`), its place in words (`place_phrase`), bbox checks and the bilinear resize of crops.

Images are RGB uint8 HWC; a bbox is ``(x0, y0, x1, y1)`` of inclusive pixel indices. Imports no sibling module.
"""
from __future__ import annotations

import numpy as np

BBox = tuple[int, int, int, int]


def crop_with_context(image: np.ndarray, bbox: BBox, context: float = 0.5, min_side: int = 32) -> np.ndarray:
    """The bbox grown by `context` x its width/height on each side (at least `min_side` px), clamped."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = check_bbox(bbox, w, h)
    (left, right), (top, bottom) = _grow(x1 - x0 + 1, context, min_side), _grow(y1 - y0 + 1, context, min_side)
    return image[max(0, y0 - top):min(h, y1 + bottom + 1), max(0, x0 - left):min(w, x1 + right + 1)]


def _grow(size: int, context: float, min_side: int) -> tuple[int, int]:
    """Pixels to add before and after a span of `size`: context x size each, or up to `min_side` in total."""
    grow = int(round(size * context))
    if size + 2 * grow >= min_side:
        return grow, grow
    extra = min_side - size
    return extra // 2, extra - extra // 2


def draw_box(image: np.ndarray, bbox: BBox, width: int | None = None) -> np.ndarray:
    """A copy of the image with the bbox outlined in red (line width ~0.5% of the image, at least 2 px)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = check_bbox(bbox, w, h)
    t = width or max(2, round(0.005 * max(h, w)))
    out = image.copy()
    red = np.array([255, 0, 0], np.uint8)
    out[y0:min(y0 + t, y1 + 1), x0:x1 + 1] = red
    out[max(y1 - t + 1, y0):y1 + 1, x0:x1 + 1] = red
    out[y0:y1 + 1, x0:min(x0 + t, x1 + 1)] = red
    out[y0:y1 + 1, max(x1 - t + 1, x0):x1 + 1] = red
    return out


def place_phrase(bbox: BBox | None, width: int, height: int) -> str:
    """Where a bbox sits: "in the image" for None, else e.g. "at the upper left" / "in the centre"."""
    if bbox is None:
        return "in the image"
    cx = (bbox[0] + bbox[2]) / 2 / max(width - 1, 1)
    cy = (bbox[1] + bbox[3]) / 2 / max(height - 1, 1)
    vertical = "upper " if cy < 1 / 3 else "lower " if cy > 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if not vertical and not horizontal:
        return "in the centre"
    return f"at the {(vertical + horizontal).strip() or 'middle'}" if horizontal else f"in the {vertical.strip()} middle"


def check_bbox(bbox, w: int, h: int) -> BBox:
    try:
        x0, y0, x1, y1 = (int(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"A region must be a bbox (x0, y0, x1, y1) of whole pixel indices, got {bbox!r}.") from None
    if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
        raise ValueError(f"Region bbox {(x0, y0, x1, y1)} is outside the {w}x{h} image (inclusive indices, x0 <= x1).")
    return x0, y0, x1, y1


def resize_rgb(image: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (h, w):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))
