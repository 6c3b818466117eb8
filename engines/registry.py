"""The one loading registry: a model kind maps to a loader taking a spec ("demo", a path or hub id).

Each loader returns an `engines.models.LoadedModel`. This module sits above the engines it names
(models, detectors, segment, classify), so every import points one way: they never import it.
"""
from __future__ import annotations

from typing import Callable

from engines.classification.classify import load_classifier_model
from engines.detection.detectors import load_detector
from engines.models import LoadedModel, load_text2image
from engines.segmentation.segment import load_segmenter_model

LOADERS: dict[str, Callable[..., LoadedModel]] = {
    "text2image": load_text2image,
    "detector": load_detector,
    "segmenter": load_segmenter_model,
    "classifier": load_classifier_model,
}
"""Model kind -> loader(spec, *, data_dir, device, ...)."""


def load(kind: str, spec: str | None, **kwargs) -> LoadedModel:
    """Load a model of a registered kind; unknown kinds raise ValueError naming the known ones."""
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise ValueError(f"Unknown model kind '{kind}'; known kinds: {', '.join(sorted(LOADERS))}.") from None
    return loader(spec, **kwargs)
