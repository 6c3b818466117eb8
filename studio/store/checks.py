"""Shared checks and encoders of the store: user-given names, optional fields, JSON parameters, and a
`NewMask` validated and encoded as PNG bytes (mask bool[H, W] -> 1-bit PNG, raw uint8[H, W] -> grey PNG).

Imports studio.store.records and studio.store.schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from typing import Any

import numpy as np
from PIL import Image

from studio.store.records import NewMask, StoreError
from studio.store.schema import MASK_AUTHORS

MAX_NAME_LENGTH = 100


def to_json(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}.")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable "
                         f"(str/int/finite float/bool/list/dict): {exc}.") from None


def check_optional(what: str, value: Any, kind: type) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise ValueError(f"{what} must be {kind.__name__} or None, got {value!r}.")


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f")  # fillers that render as nothing


def _invisible(c: str) -> bool:
    """True for a character that shows nothing by itself: spaces, format/control characters (zero-width
    space and joiners, BOM, tags), variation selectors and blank letters such as the Hangul filler."""
    code = ord(c)
    return (c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Cn", "Co")
            or c in _BLANK_CHARACTERS or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)


def check_name(name: Any, what: str) -> str:
    """A user-given name (session, class) stripped of surrounding blanks, or StoreError naming the problem:
    not text, invalid UTF-8 bytes, control or bidirectional-override characters, nothing visible, too long."""
    if not isinstance(name, str):
        raise StoreError(f"{what} must be text, got {type(name).__name__}.")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise StoreError(f"{what} contains bytes that are not valid UTF-8; retype it.")
    if any(c in _BIDI_CONTROLS for c in name):
        bad = next(c for c in name if c in _BIDI_CONTROLS)
        raise StoreError(f"{what} cannot contain bidirectional control characters such as U+{ord(bad):04X} "
                         f"({unicodedata.name(bad, 'BIDI CONTROL')}), which make text display in a misleading order.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name.strip()):
        raise StoreError(f"{what} cannot contain control characters such as newlines or tabs.")
    start, end = 0, len(name)
    while start < end and _invisible(name[start]):
        start += 1
    while end > start and _invisible(name[end - 1]):
        end -= 1
    name = name[start:end]
    if not name:
        raise StoreError(f"{what} must contain at least one visible character.")
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}.")
    return name


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_mask(new: Any, what: str) -> tuple:
    """Validate a NewMask and encode it: (new, png bytes, sha256, raw png bytes or None, params JSON)."""
    if not isinstance(new, NewMask):
        raise ValueError(f"{what}: expected a NewMask, got {type(new).__name__}.")
    mask = new.mask
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        got = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"{what} must be a bool numpy array of shape (H, W), got {got}.")
    if new.author not in MASK_AUTHORS:
        raise ValueError(f"{what}: author {new.author!r} is not one of {list(MASK_AUTHORS)}.")
    if new.status not in ("final", "draft"):
        raise ValueError(f"{what}: status {new.status!r} is not 'final' or 'draft'.")
    check_optional(f"{what}: class_name", new.class_name, str)
    check_optional(f"{what}: caption", new.caption, str)
    raw = new.raw
    if raw is not None and (not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.shape != mask.shape):
        raise ValueError(f"{what}: raw must be a uint8 array with the same shape as the mask.")
    params_json = to_json(new.params, f"{what}: params")
    data = png_bytes(Image.fromarray(mask.astype(np.uint8) * 255).convert("1", dither=Image.Dither.NONE))
    raw_data = None if raw is None else png_bytes(Image.fromarray(raw))
    return new, data, hashlib.sha256(data).hexdigest(), raw_data, params_json
