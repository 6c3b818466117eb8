"""The store's records: frozen dataclasses returned by and given to studio.store.store.Store (images RGB
uint8 HWC, masks bool[H,W]), and StoreError, its one-sentence user error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class StoreError(ValueError):
    """A user-facing problem (unknown session, duplicate name...). Message is one clear sentence."""


@dataclass(frozen=True)
class SessionInfo:
    id: int
    name: str
    created_at: str
    updated_at: str
    image_count: int


@dataclass(frozen=True)
class ImageRecord:
    """A stored image. ``path`` is the absolute path of its PNG; ``params`` is decoded JSON."""
    id: int
    session_id: int
    sha256: str
    path: str
    width: int
    height: int
    source: str
    parent_id: int | None
    generation_id: int | None
    model_id: str | None
    params: dict
    original_name: str | None
    created_at: str
    caption: str | None = None  # the text the image is inverted and resampled with (None: unknown)


@dataclass(frozen=True)
class NewImage:
    """An image to add: ``rgb`` is a uint8 numpy array of shape (H, W, 3).

    ``caption`` None takes the generation's prompt when one is given, else the parent's caption.
    """
    rgb: np.ndarray
    source: str
    parent_id: int | None = None
    model_id: str | None = None
    params: dict = field(default_factory=dict)
    original_name: str | None = None
    masks: tuple["NewMask", ...] = ()
    caption: str | None = None


@dataclass(frozen=True)
class NewMask:
    """A mask to add with its image or alone: ``mask`` is bool[H, W] (True = artifact).

    ``raw`` is an optional uint8 [H, W] map the mask was binarised from; ``status`` "final" or "draft".
    """
    mask: np.ndarray
    author: str
    class_name: str | None = None
    caption: str | None = None
    status: str = "final"
    raw: np.ndarray | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRecord:
    id: int
    session_id: int
    prompt: str
    negative_prompt: str | None
    seed: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    width: int | None
    height: int | None
    count: int
    model_id: str | None
    params: dict
    duration_s: float | None
    created_at: str


@dataclass(frozen=True)
class MaskRecord:
    """A stored mask (a 1-bit PNG). ``bbox`` is (x_min, y_min, x_max, y_max), inclusive pixel
    indices of the True pixels, or None for an empty mask; ``version`` is 1 for an image's first
    mask and counts up per image."""
    id: int
    image_id: int
    sha256: str
    path: str
    author: str
    class_name: str | None
    caption: str | None
    bbox: tuple[int, int, int, int] | None
    version: int
    created_at: str
    status: str = "final"
    raw_sha256: str | None = None
    raw_path: str | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HeatmapRecord:
    """A stored heatmap (16-bit grey PNG of score * 65535) and the detector run that made it."""
    id: int
    image_id: int
    run_id: int
    sha256: str
    path: str
    created_at: str
    detector_id: str
    family: str
    is_demo: bool
    run_params: dict


@dataclass(frozen=True)
class LabelRegion:
    """One labelled region of an image: its current mask version (`mask_id`), class and caption.

    `key` is stable across edits of the same region; `bbox` is (x0, y0, x1, y1) inclusive or None.
    """
    key: str
    mask_id: int
    class_name: str | None
    caption: str | None
    author: str
    bbox: tuple[int, int, int, int] | None = None

    def to_json(self) -> dict:
        return {"key": self.key, "mask_id": self.mask_id, "class_name": self.class_name,
                "caption": self.caption, "author": self.author,
                "bbox": None if self.bbox is None else list(self.bbox)}


@dataclass(frozen=True)
class LabelState:
    """The regions of an image at one point of its edit history; `seq` 0 = never edited."""
    image_id: int
    seq: int
    regions: tuple[LabelRegion, ...]
    can_undo: bool
    can_redo: bool
    action: str


@dataclass(frozen=True)
class JobRecord:
    """A training job: a supervised subprocess whose state lives in the `jobs` table."""
    id: int
    kind: str
    status: str
    params: dict
    log_path: str | None
    pid: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    session_id: int | None
    out_dir: str | None
    result: dict


# ---------------------------------------------------------------- migrations
