"""Step 1 of the experiment runner: RichHF-18k preprocessing, the fixed test set, RichHF-100, validation
and source images (see studio/experiments/runner.py for the protocol and engines/detection/richhf_prep.py for the
annotator rule). Images and labels are stored as `.npy` arrays (temporary name, then rename) and listed
in `index.json` with their role (test, val, human, source) and content digests; `test_set.json` holds
the test ids and one digest over them.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from studio.experiments import adapter
from studio.experiments.plan import Stopped, Unit, save_array, write_json
from studio.experiments.config import PAPER_COUNTS, path_of

if TYPE_CHECKING:
    from studio.experiments.context import StepContext


def run_data(ctx: StepContext, unit: Unit) -> dict:
    """RichHF preprocessing, splits and source images (see the module docstrings)."""
    from engines.detection.richhf_prep import MapVerdict, array_digest, judge_map, label_from_map, synthesise_richhf
    from engines.detection.richhf import CorruptRecord, binarize_artifact_map, match_images, read_richhf

    d = ctx.config.section("data")
    out = ctx.folder(unit)
    arrays = out / "arrays"
    arrays.mkdir(exist_ok=True)
    if d["synthesise"]:
        s = d["synthetic"]
        root = out / "synthetic"
        if not (root / "captions.jsonl").is_file():
            synthesise_richhf(root, train=s["train"], val=s["val"], test=s["test"], clean=s["clean"], size=s["size"],
                              fewer_annotators=s["fewer_annotators"], empty=s["empty"], seed=s["seed"])
        files = {"train": root / "train.tfrecord", "val": root / "dev.tfrecord", "test": root / "test.tfrecord"}
        images_dir, clean_dir, captions_file = root / "images", root / "clean", root / "captions.jsonl"
    else:
        files = {"train": path_of(d["train_tfrecord"]), "test": path_of(d["test_tfrecord"])}
        if d["val_tfrecord"]:
            files["val"] = path_of(d["val_tfrecord"])
        images_dir = path_of(d["images"])
        clean_dir = path_of(d["clean_images"]) if d["clean_images"] else None
        captions_file = path_of(d["captions"]) if d["captions"] else None
    from studio.datasets.captions import read_captions

    captions = caption_index(read_captions(captions_file)) if captions_file else {}

    # Pass 1: judge every map; kept maps are held zlib-compressed (a few KB each), no image is read.
    counts: dict[str, dict] = {}
    eligible: dict[str, list[dict]] = {}
    for split, file in files.items():
        names = _record_names(file)
        found, unmatched = match_images(names, images_dir)
        c: Counter = Counter()
        rows = []
        for rec in read_richhf(file, should_stop=ctx.should_stop):
            if isinstance(rec, CorruptRecord):
                c["unreadable record"] += 1
                continue
            c["records"] += 1
            if d["annotator_rule"] == "grid":
                verdict = judge_map(rec.artifact_map, d["min_annotators"], d["keep_empty_maps"])
            else:
                verdict = MapVerdict(True, None, "kept (annotator_rule none)")
            c[verdict.reason] += 1
            if not verdict.keep:
                continue
            if rec.filename not in found:
                c["no image"] += 1
                continue
            rows.append({"split": split, "index": rec.index, "filename": rec.filename, "path": str(found[rec.filename]),
                         "annotators": verdict.annotators, "empty": not rec.artifact_map.any(),
                         "caption": rec.caption if rec.caption is not None else caption_of(captions, rec.filename),
                         "shape": rec.artifact_map.shape, "zmap": zlib.compress(rec.artifact_map.tobytes(), 1)})
        if ctx.should_stop():
            raise Stopped()
        c["eligible"] = len(rows)
        c["unmatched names"] = len(unmatched)
        counts[split] = dict(c)
        eligible[split] = rows

    def label_of(row: dict) -> np.ndarray:
        raw = np.frombuffer(zlib.decompress(row["zmap"]), np.uint8).reshape(row["shape"])
        if d["annotator_rule"] == "grid":
            return label_from_map(raw, MapVerdict(True, row["annotators"], ""), d["votes"], 3)
        return binarize_artifact_map(raw, d["threshold"])

    stored = {r["id"]: r for r in _read_partial(out)}

    def store(row: dict, role: str) -> dict:
        """Image (resized to its map's size) and label arrays of one record; cached across reruns."""
        rid = f"{row['split']}-{row['index']:06d}"
        if rid not in stored:
            label = label_of(row)
            image = _load_resized(Path(row["path"]), label.shape)
            save_array(arrays / f"{rid}.npy", image)
            save_array(arrays / f"{rid}.mask.npy", label)
            entry = {"id": rid, "filename": row["filename"], "image": f"arrays/{rid}.npy",
                     "mask": f"arrays/{rid}.mask.npy", "digest": array_digest(image), "mask_digest": array_digest(label),
                     "annotators": row["annotators"], "caption": row["caption"],
                     "height": int(image.shape[0]), "width": int(image.shape[1])}
            with open(out / "index.partial.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")
            stored[rid] = entry
        return {**stored[rid], "role": role}

    # Draws (seeded), then the pixels of the chosen records only.
    rng = np.random.default_rng(d["seed"])
    test = eligible["test"]
    if d["test_images"] and len(test) > d["test_images"]:
        test = [test[i] for i in sorted(rng.choice(len(test), d["test_images"], replace=False))]
    pool = eligible["train"]
    order = [int(i) for i in rng.permutation(len(pool))]
    total = len(test) + d["human_images"] + (len(eligible["val"]) if "val" in eligible else d["val_images"])
    progress = {"done": 0}

    def advance() -> None:
        progress["done"] += 1
        ctx.progress(unit, progress["done"], total)
        if ctx.should_stop():
            raise Stopped()

    index: list[dict] = []
    for row in test:
        index.append(store(row, "test"))
        advance()
    test_digests = {r["digest"] for r in index}
    duplicates: list[str] = []
    used: set[int] = set()

    def draw(count: int, role: str, rows: list[dict] | None = None) -> list[dict]:
        taken = []
        candidates = list(enumerate(rows)) if rows is not None else [(i, pool[i]) for i in order if i not in used]
        for i, row in candidates:
            if len(taken) == count:
                break
            if rows is None:
                used.add(i)
            entry = store(row, role)
            if entry["digest"] in test_digests:  # the same pixels as a test image under another name
                duplicates.append(entry["filename"])
                continue
            taken.append(entry)
            advance()
        return taken

    if "val" in eligible:
        val = draw(len(eligible["val"]), "val", eligible["val"])
    else:
        val = draw(d["val_images"], "val")
        if len(val) < d["val_images"]:
            raise ValueError(f"data.val_images: only {len(val)} training images are eligible for validation.")
    human = draw(d["human_images"], "human")
    if len(human) < d["human_images"]:
        raise ValueError(f"data.human_images: only {len(human)} training images are eligible (after the annotator "
                         f"rule and validation), fewer than the {d['human_images']} asked for.")
    if not val:
        raise ValueError("data.val_tfrecord: no validation record is eligible after the annotator rule.")
    if not test:
        raise ValueError("data.test_tfrecord: no test record is eligible after the annotator rule.")
    index += val + human
    unused = [pool[i] for i in order if i not in used]
    index += _sources(ctx, unit, clean_dir, captions, unused, test_digests, rng)
    write_json(out / "index.json", index)
    test_rows = [r for r in index if r["role"] == "test"]
    test_set = {"ids": [r["id"] for r in test_rows], "filenames": [r["filename"] for r in test_rows],
                "digest": hashlib.sha256("".join(f"{r['id']}:{r['digest']}:{r['mask_digest']};"
                                                 for r in sorted(test_rows, key=lambda r: r["id"])).encode()).hexdigest()}
    write_json(out / "test_set.json", test_set)
    roles = Counter(r["role"] for r in index)
    return {"counts": counts, "used": dict(roles), "paper": PAPER_COUNTS, "test_digest": test_set["digest"],
            "duplicates_of_test_excluded": duplicates, "source_origin": "clean folder" if clean_dir else "RichHF train"}


def _sources(ctx, unit, clean_dir, captions, unused, test_digests, rng) -> list[dict]:
    """Source images for the corruption and the pseudo labels: the clean folder, else RichHF training
    images whose map is empty (annotated artifact-free), else any training image not used otherwise.
    Each is resized/cropped for the corruption (sides multiples of 8, longer side <= corruption.max_side)."""
    from engines.detection.richhf_prep import array_digest
    from engines.images import find_images, load_image

    limit = ctx.config.get("corruption.sources")
    max_side = ctx.config.get("corruption.max_side")
    arrays = ctx.folder(unit) / "arrays"
    if clean_dir is not None:
        files = find_images([clean_dir])
        if limit and len(files) > limit:
            files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
        work = [(f"src-{i:06d}", f, f.name, None, caption_of(captions, f.name)) for i, f in enumerate(files)]
    else:
        candidates = [r for r in unused if r["empty"]] or unused
        work = [(f"src-{r['split']}-{r['index']:06d}", Path(r["path"]), r["filename"], r["shape"], r["caption"])
                for r in candidates]
    out = []
    for rid, path, filename, shape, caption in work:
        if limit and len(out) >= limit:
            break
        file = arrays / f"{rid}.npy"
        if file.is_file():
            image = np.load(file)
        else:
            rgb = load_image(path) if shape is None else _load_resized(path, shape)
            image = adapter.prepare_source(rgb, max_side)
            save_array(file, image)
        digest = array_digest(image)
        if digest in test_digests:
            continue
        out.append({"id": rid, "role": "source", "filename": filename, "image": f"arrays/{rid}.npy", "mask": None,
                    "digest": digest, "mask_digest": None, "annotators": None, "caption": caption,
                    "height": int(image.shape[0]), "width": int(image.shape[1])})
        if ctx.should_stop():
            raise Stopped()
    if not out:
        key = "data.clean_images" if clean_dir is not None else "corruption.sources"
        raise ValueError(f"{key}: no source image is left to corrupt (give data.clean_images or fewer human/val images).")
    return out


def _read_partial(out: Path) -> list[dict]:
    file = out / "index.partial.jsonl"
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if (out / row["image"]).is_file() and (out / row["mask"]).is_file():
            rows.append(row)
    return rows


def _record_names(file: Path) -> list[str]:
    from studio.experiments.config import record_filenames

    return record_filenames(file)


def _load_resized(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    from engines.images import load_image

    rgb = load_image(path)
    if rgb.shape[:2] == tuple(shape):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((shape[1], shape[0]), Image.LANCZOS))


def caption_index(captions: dict[str, str]) -> dict[str, str]:
    """{file name: caption, stem: caption} from a captions file ({name as written: caption})."""
    index: dict[str, str] = {}
    for name, caption in captions.items():
        base = Path(name).name
        index.setdefault(base, caption)
        index.setdefault(Path(base).stem, caption)
    return index


def caption_of(index: dict[str, str], filename: str) -> str:
    """The caption of an image file (by file name, else by stem); "" when it has none."""
    return index.get(filename, index.get(Path(filename).stem, ""))
