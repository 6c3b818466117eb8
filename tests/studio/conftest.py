"""Fixtures shared by the bad-input corpora (CLI and UI handlers), made at test time."""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from snapshots import snapshot
from PIL import Image

from studio.store.records import NewImage, NewMask
from studio.store.store import Store

NOISE = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def data_snapshot():
    """snapshot(data_dir) -> (database dump, file tree): compare before and after a failed command."""
    return snapshot


def png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height but that holds almost no data (a 'bomb' header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, demo_dir):
    """(base data dir, fixture folder): a store with sessions "s" (2 images, one labelled) and "empty",
    the demo pipeline and detector already built, and every bad file the cases need."""
    from engines.detection.detectors import demo_detector_dir, ensure_demo_detector

    root = tmp_path_factory.mktemp("corpus")
    base, fx = root / "base", root / "fx"
    fx.mkdir()
    shutil.copytree(demo_dir, base / "models" / "demo-sd")
    ensure_demo_detector(base)
    with Store(base) as store:
        s = store.create_session("s")
        ids = [r.id for r in store.add_images(s.id, [NewImage(rgb=NOISE, source="uploaded", original_name="a.png"),
                                                     NewImage(rgb=NOISE[::-1].copy(), source="uploaded",
                                                              original_name="b.png")])]
        mask = np.zeros((48, 64), bool)
        mask[5:20, 10:30] = True
        store.edit_regions(ids[0], add=[NewMask(mask=mask, author="human")])
        store.create_session("empty")
    # images
    Image.fromarray(NOISE).save(fx / "good.png")
    (fx / "garbage.png").write_bytes(random.Random(1).randbytes(300))
    (fx / "empty.png").write_bytes(b"")
    big = np.random.default_rng(1).integers(0, 256, size=(300, 300, 3), dtype=np.uint8)
    Image.fromarray(big).save(fx / "whole.png")
    (fx / "trunc.png").write_bytes((fx / "whole.png").read_bytes()[:5000])
    png_with_header(fx / "bomb.png", 20000, 20000)
    for name, path in (("one-bad", "garbage.png"), ("one-trunc", "trunc.png"), ("one-bomb", "bomb.png")):
        (fx / name).mkdir()
        shutil.copy(fx / path, fx / name / path)
    (fx / "no-images").mkdir()
    (fx / "no-images" / "readme.txt").write_text("nothing")
    (fx / "wide").mkdir()
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(fx / "wide" / "wide.png")
    (fx / "a-file").write_text("I am a file")
    (fx / "nonempty").mkdir()
    (fx / "nonempty" / "keep.txt").write_text("keep")
    # masks and COCO
    (fx / "grey-masks").mkdir()
    Image.fromarray(np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)).save(fx / "grey-masks" / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "segmentation": {"size": [40000, 40000], "counts": [1_600_000_000]}}]}
    (fx / "rle-bomb.json").write_text(json.dumps(coco))
    coco["images"][0].update(width=64, height=48)
    coco["annotations"][0]["segmentation"] = {"size": [48, 60], "counts": [48 * 60]}
    (fx / "rle-mismatch.json").write_text(json.dumps(coco))
    coco["annotations"][0].update(segmentation={"size": [48, 64], "counts": [48 * 64]}, category_id=7)
    (fx / "bad-category.json").write_text(json.dumps(coco))
    coco["annotations"][0]["category_id"] = 1
    coco["images"][0].update(width=50000, height=50000)
    (fx / "huge-entry.json").write_text(json.dumps(coco))
    coco["images"][0].update(width=64, height=48)
    coco["annotations"][0]["segmentation"] = {"size": [48, 64], "counts": "}}}}"}
    (fx / "bad-rle-string.json").write_text(json.dumps(coco))
    (fx / "not-json.json").write_text("{ this is not json")
    # models
    detector = fx / "trunc-detector"
    shutil.copytree(demo_detector_dir(base), detector)
    weights = detector / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    (fx / "random.bin").write_bytes(random.Random(2).randbytes(512))
    from engines.classification.classify import DEMO_DIR as DEMO_CLASSIFIER

    head = fx / "trunc-classifier"
    shutil.copytree(DEMO_CLASSIFIER, head, ignore=shutil.ignore_patterns("*.py", "*.md"))
    (head / "model.safetensors").write_bytes((head / "model.safetensors").read_bytes()[:200])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    import pickle

    (fx / "evil.pkl").write_bytes(pickle.dumps(Evil(), protocol=2))
    (fx / "lora").mkdir()
    (fx / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    (fx / "garbage.tfrecord").write_bytes(random.Random(3).randbytes(64))
    (fx / "prompts-empty.txt").write_text("\n\n")
    (fx / "broken.toml").write_text("x = [")
    (fx / "unknown-key.toml").write_text("[data]\nfoo = 1\n")
    (fx / "bad-arch.toml").write_text('[model]\narchitecture = "resnet-9000"\n')
    (fx / "prompts-latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return base, fx


