"""What one browser page of the Inspect tab is looking at (`View`: image RGB uint8 HWC, heatmap float32[H, W]
in [0, 1], the last repair). Shared by studio/web/tabs/inspect.py and the classifier panel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.web.tabs.common import Shared

VIEW_KEY = "inspect-view"


@dataclass
class View:
    """What one browser page is looking at: the image, its pixels and the heatmap on screen."""

    image_id: int | None = None
    rgb: np.ndarray | None = None
    heatmap_id: int | None = None
    scores: np.ndarray | None = None
    repair: object | None = None  # the last RepairResult ...
    repair_image_id: int | None = None  # ... of this image
    repair_rgb: np.ndarray | None = None


def view_of(shared: Shared, request) -> View:
    return shared.per_browser.get(request, VIEW_KEY, View)
