"""Training data for the detector and region selector, gathered from a session.

Sources (recorded per sample and in the checkpoint's provenance):
- "human": images labelled in the Label tab (or imported): the union of the current regions; an image
  marked done with no region is a clean negative.
- "synthetic": images made by region corruption (source `corrupted`) with their `synthetic` mask.
- "pseudo": unlabelled images labelled by a chosen detector's thresholded output (optional).
The held-out split is taken from the human-labelled images only (deterministic by seed).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrainingData:
    train: list
    val: list
    summary: dict


def detector_samples(services, session_id: int | None, params: dict, *, region_selector: bool = False) -> TrainingData:
    """TrainSample lists for engines.train_detector from a session (see the module docstring).

    params: val_fraction (0.2), seed (0), pseudo_detector (spec or None), pseudo_threshold (0.5),
    sources (which of human/synthetic/pseudo to use; the region selector uses human only).
    """
    from engines.train_detector import TrainSample

    if session_id is None:
        raise ValueError("A training job needs a session with labelled images.")
    store = services.store
    wanted = {"human"} if region_selector else set(params.get("sources", ["human", "synthetic", "pseudo"]))
    human, synthetic, unlabelled = [], [], []
    for rec in store.list_images(session_id):
        if not store.is_labelled(rec.id):
            unlabelled.append(rec)
            continue
        state = store.label_state(rec.id)
        mask = np.zeros((rec.height, rec.width), bool)
        for region in state.regions:
            mask |= store.load_mask(region.mask_id)
        authors = {r.author for r in state.regions}
        kind = "synthetic" if rec.source == "corrupted" and authors == {"synthetic"} else "human"
        sample = TrainSample(image=store.load_rgb(rec.id), mask=mask, source=kind,
                             name=rec.original_name or f"image-{rec.id}")
        (synthetic if kind == "synthetic" else human).append(sample)
    rng = random.Random(int(params.get("seed", 0)))
    order = list(range(len(human)))
    rng.shuffle(order)
    n_val = 0 if len(human) < 2 else max(1, int(round(len(human) * float(params.get("val_fraction", 0.2)))))
    val = [human[i] for i in sorted(order[:n_val])]
    train = [human[i] for i in sorted(order[n_val:])] if "human" in wanted else []
    if "synthetic" in wanted:
        train += synthetic
    pseudo = []
    spec = params.get("pseudo_detector")
    if "pseudo" in wanted and spec and unlabelled:
        detector = services.detector(spec)
        threshold = float(params.get("pseudo_threshold", 0.5))
        images = [store.load_rgb(r.id) for r in unlabelled]
        for rec, rgb, heat in zip(unlabelled, images, detector.predict(images)):
            pseudo.append(TrainSample(image=rgb, mask=heat.scores >= threshold, source="pseudo",
                                      name=rec.original_name or f"image-{rec.id}"))
        train += pseudo
    if not train:
        raise ValueError("No training images: label some images in the Label tab (or add synthetic pairs from "
                         "the Corrupt tab) first.")
    if not val:
        raise ValueError("No held-out images: label at least 2 images by hand so one can be held out for evaluation.")
    summary = {"human_train": len(train) - len(synthetic if "synthetic" in wanted else []) - len(pseudo),
               "synthetic": len(synthetic) if "synthetic" in wanted else 0, "pseudo": len(pseudo),
               "val_human": len(val), "pseudo_detector": spec, "region_selector": region_selector}
    return TrainingData(train=train, val=val, summary=summary)
