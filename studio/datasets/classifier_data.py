"""Classifier training data from a session: labelled regions as samples, split by image family.

`classifier_samples` turns the session's current Label regions into `ClassifierSample`s:
- level "region" (default): one sample per region whose class is in the taxonomy (its bbox, its class,
  its caption), plus `negatives` clean boxes per labelled image (random boxes of the size of its regions,
  or of a quarter of the image, that touch no region: classes ()).
- level "image": one sample per labelled image: the whole image with the set of its regions' classes
  (an image marked done without regions is a clean example).
Regions without a class, or with a class outside the taxonomy, are counted in the summary and not used.

Which image goes where is decided by `studio.datasets.splits.plan_split`, the one family split that detector
training, export and `evaluate --session` use (the same val_fraction, test_fraction and seed give the
same families everywhere): an image and everything derived from it (parent chains, byte-identical
copies) share one split, so a corrupted child never sits in train while its parent is evaluated. val and
test hold human-labelled images only; train holds every labelled image of the train families (human,
synthetic, pseudo); "excluded" images (non-human members of held-out families) are used nowhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from studio.datasets.splits import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, EXCLUDED, SplitPlan, plan_split

LEVELS = ("region", "image")


@dataclass(frozen=True)
class ClassifierData:
    """ClassifierSample lists per split, a summary, and the split plan they come from. A sample's
    `family` is "family-<root image id>" (`SplitPlan.family_of`)."""
    train: list
    val: list
    test: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    split: SplitPlan | None = None


def classifier_samples(store, session_id: int, taxonomy: list[dict], *, level: str = "region",
                       val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION,
                       seed: int = 0, negatives: int = 1) -> ClassifierData:
    """Samples of the session's labelled images per split (module docstring). `seed` is the family split's
    seed (training's --split-seed); it also seeds the clean negative boxes."""
    from engines.training.classifier import ClassifierSample

    if level not in LEVELS:
        raise ValueError(f"Unknown level '{level}'; use region or image.")
    names = {c["name"] for c in taxonomy}
    plan = plan_split(store, session_id, val_fraction=float(val_fraction), test_fraction=float(test_fraction),
                      seed=int(seed))
    records = [r for r in store.list_images(session_id) if plan.role_of[r.id] != "unlabelled"]
    if not records:
        raise ValueError("The session has no labelled images; label some regions with a class in the Label tab first.")
    families = {r.id: f"family-{plan.family_of[r.id]}" for r in records}
    rng = np.random.default_rng(int(seed))
    sets: dict[str, list] = {"train": [], "val": [], "test": []}
    skipped = excluded = 0
    for rec in records:
        if plan.split_of[rec.id] == EXCLUDED:
            excluded += 1
            continue
        target = sets[plan.split_of[rec.id]]
        regions = store.label_state(rec.id).regions
        usable = [r for r in regions if r.class_name in names and r.bbox is not None]
        skipped += len(regions) - len(usable)
        image = store.load_rgb(rec.id)
        name = rec.original_name or f"image-{rec.id}"
        if level == "image":
            if len(usable) < len(regions):
                continue  # an image with an unknown artifact cannot be a clean or complete example
            target.append(ClassifierSample(image=image, bbox=None, classes=tuple(dict.fromkeys(r.class_name for r in usable)),
                                           captions=tuple(next((x.caption or "" for x in usable if x.class_name == c), "")
                                                          for c in dict.fromkeys(r.class_name for r in usable)),
                                           family=families[rec.id], name=name))
            continue
        for r in usable:
            target.append(ClassifierSample(image=image, bbox=tuple(r.bbox), classes=(r.class_name,),
                                           captions=(r.caption or "",), family=families[rec.id], name=f"{name}#{r.key}"))
        union = np.zeros((rec.height, rec.width), bool)
        for r in regions:
            union |= store.load_mask(r.mask_id)
        for box in _clean_boxes(union, [r.bbox for r in regions if r.bbox], int(negatives), rng):
            target.append(ClassifierSample(image=image, bbox=box, classes=(), family=families[rec.id],
                                           name=f"{name}#clean"))
    if not sets["train"]:
        raise ValueError("No training samples: every labelled image is held out or has no region with a class of the "
                         "session's taxonomy; label more images.")
    held = {s: len({families[r.id] for r in records if plan.split_of[r.id] == s}) for s in ("val", "test")}
    summary = {"level": level, "train": len(sets["train"]), "val": len(sets["val"]), "test": len(sets["test"]),
               "families": len(set(families.values())), "val_families": held["val"], "test_families": held["test"],
               "excluded_images": excluded, "regions_without_usable_class": skipped,
               "val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "seed": int(seed),
               "split": plan.summary()}
    return ClassifierData(train=sets["train"], val=sets["val"], test=sets["test"], summary=summary, split=plan)


def _clean_boxes(union: np.ndarray, boxes, count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Up to `count` random boxes that touch no artifact pixel (sized like the regions, else h/4 x w/4)."""
    h, w = union.shape
    sizes = [(y1 - y0 + 1, x1 - x0 + 1) for x0, y0, x1, y1 in boxes] or [(max(8, h // 4), max(8, w // 4))]
    out = []
    for _ in range(count * 20):
        if len(out) >= count:
            break
        bh, bw = sizes[int(rng.integers(len(sizes)))]
        bh, bw = min(bh, h), min(bw, w)
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        if not union[y0:y0 + bh, x0:x0 + bw].any():
            out.append((x0, y0, x0 + bw - 1, y0 + bh - 1))
    return out
