"""`artifact-studio` commands that read and write labelled data: detect, evaluate, import-richhf,
export, import-masks.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from studio.cli.common import EXIT_USER_ERROR, StderrProgress, open_services, session_arg, store_into


def cmd_detect(args) -> int:
    """Every option and --out is checked first; heatmaps are computed, files written to --out, and the
    session's run stored last: if anything fails, the files written are removed and nothing is stored."""
    from engines.detection.detect import COLORMAPS, Cancelled, find_regions, render_overlay
    from engines.images import find_images, load_image
    from studio.safeio import Created, atomic_output, check_out_dir

    if args.images and not args.out:
        raise ValueError("--images needs --out DIR to write heatmaps and overlays to.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}.")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}.")
    if args.colormap not in COLORMAPS:
        raise ValueError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {args.colormap}.")
    out = check_out_dir(args.out, "--out") if args.out else None
    files = []
    if args.images:
        files = find_images([args.images])
        if not files:
            raise ValueError(f"No image files in {args.images}.")
    services = open_services(args, uses=args.detector)
    try:
        detector = services.detector(args.detector)
        records = []
        if args.session:
            session = services.store.get_session(args.session)
            records = services.store.list_images(session.id)
            if not records:
                raise ValueError(f"Session '{session.name}' has no images.")
            names = [Path(r.original_name or f"image-{r.id}").stem + f"-{r.id}" for r in records]
            images = [services.store.load_rgb(r.id) for r in records]
        else:
            images = [load_image(f) for f in files]
            names = unique_names(files)
        bar = StderrProgress("detecting")
        try:
            with services.gpu_lock:
                heatmaps = [h.scores for h in detector.predict(images, mode=args.mode, progress=bar)]
        except Cancelled as exc:
            raise ValueError(str(exc)) from None
        finally:
            bar.close()
        if records:  # report what is stored: 16-bit heatmaps
            heatmaps = [(np.round(np.clip(s, 0, 1) * 65535).astype(np.uint16).astype(np.float32) / 65535.0)
                        .astype(np.float32) for s in heatmaps]
        report = []
        for name, rgb, scores in zip(names, images, heatmaps):
            regions, _ = find_regions(scores, args.threshold)
            report.append({"name": name, "width": rgb.shape[1], "height": rgb.shape[0],
                           "artifact_percent": round(100.0 * float((scores >= args.threshold).mean()), 4),
                           "max_score": round(float(scores.max()), 6),
                           "regions": [dict(asdict_region(r)) for r in regions]})
        overlays = [render_overlay(rgb, scores, colormap=args.colormap, alpha=args.alpha) if out else None
                    for rgb, scores in zip(images, heatmaps)]
        with Created() as created:
            if out:
                from PIL import Image

                created.mkdir(out)
                for name, scores, overlay in zip(names, heatmaps, overlays):
                    for suffix, array in (("heatmap", np.round(scores * 255).astype(np.uint8)), ("overlay", overlay)):
                        with atomic_output(created.file(out / f"{name}_{suffix}.png")) as tmp:
                            Image.fromarray(array).save(tmp, format="PNG")
                regions_json = json.dumps({"detector": detector.detector_id, "demo": detector.loaded.is_demo,
                                           "threshold": args.threshold, "images": report}, indent=2)
                from studio.safeio import atomic_write_bytes

                atomic_write_bytes(created.file(out / "regions.json"), regions_json.encode())
            if records:
                services.store_detection(detector, [r.id for r in records], heatmaps, args.mode)
        if args.json:
            print(json.dumps({"detector": detector.detector_id, "demo": detector.loaded.is_demo,
                              "threshold": args.threshold, "images": report}, indent=2))
        else:
            for row in report:
                print(f"{row['name']}: {row['artifact_percent']:.2f}% artifact, {len(row['regions'])} region(s), "
                      f"max score {row['max_score']:.3f}")
        if detector.loaded.note:
            print(f"note: {detector.loaded.note}", file=sys.stderr)
        return 0
    finally:
        services.close()


def asdict_region(region) -> dict:
    from dataclasses import asdict

    row = asdict(region)
    row["bbox"] = list(region.bbox)
    row["area_percent"] = round(region.area_percent, 4)
    return row


def unique_names(files) -> list[str]:
    """Output names from file stems; stems shared by several files get their suffix appended."""
    from collections import Counter

    counts = Counter(f.stem for f in files)
    return [f.stem if counts[f.stem] == 1 else f"{f.stem}-{f.suffix.lstrip('.').lower()}" for f in files]


def by_stem(files, what: str) -> dict:
    """{stem: path}; two files with one stem would be ambiguous, so they are refused."""
    out: dict = {}
    for f in files:
        if f.stem in out:
            raise ValueError(f"Two {what} files share the name '{f.stem}' ({out[f.stem].name}, {f.name}); "
                             "rename one so they can be matched.")
        out[f.stem] = f
    return out


def cmd_evaluate(args) -> int:
    from engines.detection.detect import evaluate_masks, score_image
    from engines.images import find_images, load_image

    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}.")
    if args.session:
        return _evaluate_session(args)
    if not args.masks:
        raise ValueError("--masks DIR is required (or --session with --detector).")
    truth = by_stem(find_images([args.masks]), "mask")
    if not truth:
        raise ValueError(f"No mask files in {args.masks}.")
    if args.detector:
        if not args.images:
            raise ValueError("--detector needs --images DIR with the images to run on.")
        files = [f for f in find_images([args.images]) if f.stem in truth]
        if not files:
            raise ValueError(f"No image in {args.images} has a mask with the same file name in {args.masks}.")
        services = open_services(args, uses=args.detector)
        try:
            detector = services.detector(args.detector)
            note = detector.loaded.note
            bar = StderrProgress("detecting")
            try:
                preds = {f.stem: h.scores for f, h in zip(files, detector.predict([load_image(f) for f in files],
                                                                                  mode=args.mode, progress=bar))}
            finally:
                bar.close()
        finally:
            services.close()
    else:
        note = ""
        preds = {stem: read_prediction(p) for stem, p in by_stem(find_images([args.predictions]), "prediction").items()
                 if stem in truth}
        if not preds:
            raise ValueError(f"No prediction in {args.predictions} has a mask with the same file name in {args.masks}.")
    missing = sorted(set(truth) - set(preds))
    scores = [score_image(preds[name] >= args.threshold, read_mask(truth[name]), name) for name in sorted(preds)]
    _print_metrics(args, evaluate_masks(scores), {"unmatched_masks": missing},
                   f"images: {len(scores)} (masks without prediction: {len(missing)})  threshold: {args.threshold}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _print_metrics(args, metrics, extra: dict, header: str) -> None:
    """Text or JSON report; the headline is the artifact-class IoU (README: Metrics)."""
    if args.json:
        report = {**metrics.to_json(), "headline_metric": "artifact_iou", "threshold": args.threshold, **extra}
        print(json.dumps(_nan_to_none(report), indent=2, allow_nan=False))
        return
    print(header)
    for key in ("artifact_iou", "background_iou", "miou", "mean_image_iou", "precision", "recall", "f1"):
        print(f"{key:>15}: {getattr(metrics, key):.4f}")
    print("headline: artifact_iou (artifact-class IoU); miou is the 2-class mean, ~0.48 for a detector that "
          "finds nothing")


def _evaluate_session(args) -> int:
    """--session: the detector on the session's held-out split (studio.datasets.splits, the split training used:
    the checkpoint's recorded fractions and seed unless given)."""
    from engines.detection.detect import evaluate_masks, score_image
    from studio.datasets.splits import plan_split
    from studio.datasets.training_data import held_out_samples

    if not args.detector:
        raise ValueError("--session evaluates a --detector (predictions folders need --masks).")
    if args.masks or args.images:
        raise ValueError("--session takes its images and masks from the session; leave out --images/--masks.")
    recorded = _recorded_split(args.detector)
    fractions = {"val_fraction": args.val_fraction if args.val_fraction is not None else recorded.get("val_fraction", 0.2),
                 "test_fraction": args.test_fraction if args.test_fraction is not None else
                 recorded.get("test_fraction", 0.2),
                 "split_seed": args.split_seed if args.split_seed is not None else recorded.get("seed", 0)}
    services = open_services(args, uses=args.detector)
    try:
        session = services.store.get_session(args.session)
        plan = plan_split(services.store, session.id, val_fraction=float(fractions["val_fraction"]),
                          test_fraction=float(fractions["test_fraction"]), seed=int(fractions["split_seed"]))
        samples = held_out_samples(services.store, plan, args.split)
        if not samples:
            raise ValueError(f"Session '{session.name}' has no {args.split} images under this split (val_fraction "
                             f"{fractions['val_fraction']}, test_fraction {fractions['test_fraction']}); label more "
                             "images by hand.")
        detector = services.detector(args.detector)
        note = detector.loaded.note
        scores = []
        for start in range(0, len(samples), 8):
            chunk = [s.load() for s in samples[start:start + 8]]
            maps = detector.predict([image for image, _ in chunk], mode=args.mode)
            scores += [score_image(h.scores >= args.threshold, mask, s.name)
                       for h, (_, mask), s in zip(maps, chunk, samples[start:start + 8])]
    finally:
        services.close()
    _print_metrics(args, evaluate_masks(scores), {"session": session.name, "split": args.split, **fractions},
                   f"session {session.name}, {args.split} split (by family, human labels only): {len(scores)} images  "
                   f"threshold: {args.threshold}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _recorded_split(detector: str) -> dict:
    """The split a checkpoint folder was trained with (its detector.json provenance "split"), else {}."""
    meta = Path(detector).expanduser() / "detector.json"
    if not meta.is_file():
        return {}
    try:
        return dict(json.loads(meta.read_text()).get("provenance", {}).get("split") or {})
    except (OSError, ValueError):
        return {}


def _nan_to_none(value):
    """Strict JSON: NaN metrics (a class absent from the whole set) become null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def read_mask(path) -> np.ndarray:
    """A ground-truth mask file -> bool[H, W]: any non-black pixel of its grey version is artifact."""
    from engines.images import load_image

    return load_image(path).max(axis=2) >= 128


def read_prediction(path) -> np.ndarray:
    """A prediction file -> float32 [H, W] in [0, 1]: 16-bit PNGs / 65535, 8-bit images / 255."""
    from PIL import Image

    from engines.images import image_size, load_image

    image_size(path)  # a missing, non-image or over-large file is one sentence naming it
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return (np.asarray(im, dtype=np.float32) / 65535.0).clip(0, 1)
    except (OSError, SyntaxError, ValueError):
        pass  # load_image below names the damage
    return load_image(path).max(axis=2).astype(np.float32) / 255.0


def cmd_import_richhf(args) -> int:
    from engines.images import load_image
    from engines.detection.richhf import CorruptRecord, binarize_artifact_map, match_images, read_richhf
    from studio.store.records import NewImage, NewMask

    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}.")
    records, corrupt = [], []
    for rec in read_richhf(args.tfrecord):
        (corrupt if isinstance(rec, CorruptRecord) else records).append(rec)
    if not records:
        raise ValueError(f"No RichHF record could be read from {args.tfrecord} ({len(corrupt)} damaged); "
                         "nothing was imported.")
    for bad in corrupt:
        print(f"artifact-studio: skipped record {bad.index}: {bad.reason}", file=sys.stderr)
    found, unmatched = match_images([r.filename for r in records], args.images)
    items = []
    for rec in records:
        if rec.filename not in found:
            continue
        rgb = load_image(found[rec.filename])
        h, w = rgb.shape[:2]
        raw = _resize_map(rec.artifact_map, h, w)
        items.append(NewImage(
            rgb=rgb, source="uploaded", original_name=rec.filename, caption=rec.caption,
            params={"dataset": "RichHF-18k", "record": rec.index, "aesthetics_score": rec.aesthetics_score,
                    "artifact_score": rec.artifact_score, "misalignment_score": rec.misalignment_score,
                    "overall_score": rec.overall_score,
                    "prompt_misalignment_label": list(rec.prompt_misalignment_label)},
            masks=(NewMask(mask=binarize_artifact_map(raw, args.threshold), author="human", raw=raw,
                           class_name=None, caption=None,
                           params={"dataset": "RichHF-18k", "threshold": args.threshold,
                                   "map_size": list(rec.artifact_map.shape[::-1])}),)))
    print(f"records: {len(records) + len(corrupt)} read, {len(corrupt)} corrupt, {len(items)} matched, "
          f"{len(unmatched)} without an image", file=sys.stderr)
    for name in unmatched[:20]:
        print(f"artifact-studio: no image for {name}", file=sys.stderr)
    if not items:
        raise ValueError(f"No RichHF record matched an image in {args.images}; nothing was imported.")
    services = open_services(args)
    try:
        session = session_arg(services, args)
        for rec in store_into(services, args, session, services.store.add_images, items):
            print(rec.path)
        return 0
    finally:
        services.close()


def _resize_map(raw: np.ndarray, h: int, w: int) -> np.ndarray:
    """RichHF maps are 512x512 over the whole image; resize (bilinear) to the image's native size."""
    from PIL import Image

    if raw.shape == (h, w):
        return raw
    return np.asarray(Image.fromarray(raw).resize((w, h), Image.BILINEAR))


def cmd_export(args) -> int:
    from studio.datasets.export import export_session
    from studio.safeio import check_out_dir

    check_out_dir(args.out, "--out")
    services = open_services(args)
    try:
        session = services.store.get_session(args.session)
        summary = export_session(services.store, session.id, args.format, args.out, services.taxonomy(session.id),
                                 val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                                 overwrite=args.overwrite, unlabelled_as_background=args.unlabelled_as_background)
        print(f"exported {summary.images} image(s) and {summary.regions} region(s) as {summary.fmt} to {summary.out_dir}")
        splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items())
        print(f"split by family: {splits}; left out: {summary.skipped_unlabelled} unlabelled, "
              f"{summary.skipped_held_out} derived from held-out images (see splits.csv)")
        return 0
    finally:
        services.close()


def cmd_import_masks(args) -> int:
    from studio.datasets.import_masks import import_masks

    services = open_services(args)
    try:
        session = services.store.get_session(args.session)
        summary = import_masks(services.store, session.id, args.format, args.path)
        for name in summary.unmatched:
            print(f"artifact-studio: no image in the session matches {name}", file=sys.stderr)
        for name, mask_size, image_size in summary.size_mismatches:
            print(f"artifact-studio: skipped {name}: mask is {mask_size[1]}x{mask_size[0]}, image is "
                  f"{image_size[1]}x{image_size[0]} (not stretched)", file=sys.stderr)
        print(f"imported {summary.regions} region(s) onto {summary.matched} image(s)")
        return 0 if summary.matched else EXIT_USER_ERROR
    finally:
        services.close()
