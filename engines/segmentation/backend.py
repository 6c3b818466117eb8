"""What a segmentation backend exchanges with `SamMasker` (engines/segmentation/segment.py).

A backend is a small class with `model_id` and `fingerprint` (its part of the cache key),
`encode(rgb) -> ImageEmbedding`, `check(arrays, input_size) -> problem | None` (is a cached embedding
usable?), `decode(embedding, points, labels, box, mask_input, multimask) -> list[MaskProposal]`, and
`approximate`, `note`, `logits_shape`. Images RGB uint8 HWC; masks bool[H, W] at the image's size.
Imports no sibling module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskProposal:
    """One candidate mask. `mask` is bool[H, W] at the image's native size (True = selected).

    `score` is the backend's quality estimate (SAM: predicted IoU; superpixels: a colour-contrast
    heuristic in [0, 1)). `logits` are SAM's low-resolution mask logits, float32 [1, 4E, 4E]
    (1x256x256 for the real 1024-px models), to pass back as `previous_logits`; None for the fallback.
    """

    mask: np.ndarray
    score: float
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class ImageEmbedding:
    """What a backend needs to answer clicks on one image without running its encoder again.

    `arrays` are the named embedding arrays (numpy, on CPU); `original_size` is the image's (H, W);
    `input_size` the (h, w) the encoder saw before padding.
    """

    arrays: dict[str, np.ndarray]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
