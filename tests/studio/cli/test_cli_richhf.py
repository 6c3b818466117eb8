"""`artifact-studio import-richhf`: real-format TFRecords -> images with human masks, all or nothing."""
from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest
from PIL import Image

import app
from engines.detection.richhf import make_example, write_tfrecord
from studio.store.store import Store


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def record(name: str, art: np.ndarray) -> bytes:
    return make_example(filename=name, aesthetics_score=0.5, artifact_score=0.25, misalignment_score=0.75,
                        overall_score=0.6, artifact_map=png(art), misalignment_map=png(np.zeros_like(art)),
                        prompt_misalignment_label="0 1 1")


@pytest.fixture
def dataset(tmp_path):
    images = tmp_path / "pickapic"
    images.mkdir()
    art = np.zeros((64, 64), np.uint8)
    art[:32, :32] = 170  # 2 of 3 annotators
    art[32:, 32:] = 85   # 1 of 3 annotators
    Image.fromarray(np.full((128, 96, 3), 120, np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(images / "b.jpg")
    tf = tmp_path / "dev.tfrecord"
    write_tfrecord(tf, [record("a.png", art), record("b.jpg", art), record("missing.png", art)])
    return tf, images, art


def counts(data_dir):
    con = sqlite3.connect(data_dir / "studio.db")
    try:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("images", "masks")}
    finally:
        con.close()


def test_import_richhf_matches_binarises_and_keeps_raw(dataset, tmp_path, capsys):
    tf, images, art = dataset
    data = tmp_path / "data"
    code = app.main(["import-richhf", "--data-dir", str(data), "--session", "rich", "--create-session",
                     "--tfrecord", str(tf), "--images", str(images)])
    out, err = capsys.readouterr()
    assert code == 0
    assert len(out.strip().splitlines()) == 2
    assert "no image for missing.png" in err
    store = Store(data)
    recs = store.list_images("rich")
    assert [r.original_name for r in recs] == ["a.png", "b.jpg"]
    assert recs[0].params["artifact_score"] == pytest.approx(0.25)
    assert recs[0].params["prompt_misalignment_label"] == [0, 1, 1]
    masks = store.list_masks(recs[1].id)  # b.jpg is 64x64: the map is used as is
    assert len(masks) == 1 and masks[0].author == "human" and masks[0].raw_path
    mask = store.load_mask(masks[0].id)
    assert np.array_equal(mask, art >= 170)  # "at least 2 of 3 annotators"
    raw = np.asarray(Image.open(masks[0].raw_path))
    assert np.array_equal(raw, art)
    big = store.load_mask(store.list_masks(recs[0].id)[0].id)
    assert big.shape == (128, 96)  # map resized to the image's native size
    store.close()


def test_import_richhf_corrupt_record_is_skipped_and_reported(dataset, tmp_path, capsys):
    tf, images, _ = dataset
    raw = bytearray(tf.read_bytes())
    raw[20] ^= 0xFF  # inside the first record's data: bad data CRC
    tf.write_bytes(bytes(raw))
    data = tmp_path / "data"
    assert app.main(["import-richhf", "--data-dir", str(data), "--session", "rich", "--create-session",
                     "--tfrecord", str(tf), "--images", str(images)]) == 0
    err = capsys.readouterr().err
    assert "skipped record 0" in err
    assert counts(data) == {"images": 1, "masks": 1}


def test_import_richhf_nothing_matched_changes_nothing(dataset, tmp_path, capsys):
    tf, _, _ = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    data = tmp_path / "data"
    Store(data).close()
    before = counts(data)
    assert app.main(["import-richhf", "--data-dir", str(data), "--session", "rich", "--create-session",
                     "--tfrecord", str(tf), "--images", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("artifact-studio: No RichHF record matched")
    assert counts(data) == before
    assert Store(data).list_sessions() == []


def test_import_richhf_keeps_a_caption_when_the_record_has_one(tmp_path, capsys):
    from engines.detection.richhf import read_richhf

    images = tmp_path / "pickapic"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images / "c.png")
    Image.fromarray(np.full((64, 64, 3), 60, np.uint8)).save(images / "d.png")
    art = np.zeros((64, 64), np.uint8)
    tf = tmp_path / "dev.tfrecord"
    with_caption = make_example(filename="c.png", aesthetics_score=0.5, artifact_score=0.25, misalignment_score=0.75,
                                overall_score=0.6, artifact_map=png(art), misalignment_map=png(art),
                                prompt_misalignment_label="0 1", caption="a lighthouse at dusk")
    write_tfrecord(tf, [with_caption, record("d.png", art)])
    assert [r.caption for r in read_richhf(tf)] == ["a lighthouse at dusk", None]
    data = tmp_path / "data"
    assert app.main(["import-richhf", "--data-dir", str(data), "--session", "rich", "--create-session",
                     "--tfrecord", str(tf), "--images", str(images)]) == 0
    capsys.readouterr()
    with Store(data) as store:
        assert [(r.original_name, r.caption) for r in store.list_images("rich")] == \
            [("c.png", "a lighthouse at dusk"), ("d.png", None)]
