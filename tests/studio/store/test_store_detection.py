"""studio.store.store, migration 2: detector runs, heatmaps, draft masks, raw label maps, and the v1 -> v2 upgrade."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import studio.store.store as store_module
import studio.store.schema as store_schema
from studio.store.records import NewImage, NewMask
from studio.store.store import Store, StoreError

TABLES = ("sessions", "images", "masks", "detector_runs", "heatmaps")


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def scores(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


def snapshot(data_dir: Path) -> tuple[dict, set]:
    conn = sqlite3.connect(data_dir / "studio.db")
    try:
        counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        conn.close()
    files = {p.relative_to(data_dir).as_posix() for p in (data_dir / "files").rglob("*")} \
        if (data_dir / "files").exists() else set()
    return counts, files


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data") as s:
        yield s


def two_images(store: Store, name: str = "s", seed: int = 0):
    session = store.create_session(name)
    recs = store.add_images(session.id, [NewImage(rgb=noise(12, 20, seed), source="uploaded"),
                                         NewImage(rgb=noise(9, 7, seed + 1), source="uploaded")])
    return session, recs


# ------------------------------------------------------------------ detector runs and heatmaps
def test_heatmap_round_trip_within_one_step(store):
    _, (a, b) = two_images(store)
    sa, sb = scores(12, 20, 1), scores(9, 7, 2)
    sa[0, 0], sa[0, 1] = 0.0, 1.0
    run_id, ids = store.add_detector_run("demo", "upernet", True, {"mode": "resize"}, heatmaps=[(a.id, sa), (b.id, sb)])
    assert len(ids) == 2 and len(set(ids)) == 2
    for hid, expected in zip(ids, (sa, sb)):
        got = store.load_heatmap(hid)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1 / 65535
    assert store.load_heatmap(ids[0])[0, 0] == 0.0 and store.load_heatmap(ids[0])[0, 1] == 1.0
    rec = store.list_heatmaps(a.id)[0]
    assert (rec.id, rec.image_id, rec.run_id, rec.detector_id, rec.family, rec.is_demo, rec.run_params) == \
        (ids[0], a.id, run_id, "demo", "upernet", True, {"mode": "resize"})
    with Image.open(rec.path) as im:  # a 16-bit grey PNG on disk
        assert im.mode.startswith("I") and np.asarray(im).max() == 65535
    with pytest.raises(StoreError, match="Unknown heatmap"):
        store.load_heatmap(9999)


def test_detector_run_with_a_wrong_shaped_heatmap_stores_nothing(store):
    _, (a, b) = two_images(store)
    before = snapshot(store.data_dir)
    with pytest.raises(ValueError, match="does not match image") as err:
        store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, scores(12, 20, 1)), (b.id, scores(7, 9, 2))])
    assert "\n" not in str(err.value)
    assert snapshot(store.data_dir) == before
    assert before[0]["detector_runs"] == 0 and before[0]["heatmaps"] == 0


@pytest.mark.parametrize("bad", [np.zeros((12, 20), np.uint8), np.zeros((12, 20, 1), np.float32),
                                 np.full((12, 20), np.nan, np.float32)])
def test_detector_run_rejects_bad_scores_before_writing(store, bad):
    _, (a, _b) = two_images(store)
    before = snapshot(store.data_dir)
    with pytest.raises(ValueError, match="Heatmap of image"):
        store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, bad)])
    assert snapshot(store.data_dir) == before


def test_detector_run_for_an_unknown_image_stores_nothing(store):
    _, (a, _b) = two_images(store)
    before = snapshot(store.data_dir)
    with pytest.raises(StoreError, match="Unknown image"):
        store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, scores(12, 20, 1)), (999, scores(2, 2, 0))])
    assert snapshot(store.data_dir) == before


def test_list_heatmaps_newest_first_and_by_detector(store):
    _, (a, b) = two_images(store)
    r1, (h1,) = store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, scores(12, 20, 1))])
    r2, (h2, hb) = store.add_detector_run("diffdoctor:/x.bin", "diffdoctor", False,
                                          heatmaps=[(a.id, scores(12, 20, 2)), (b.id, scores(9, 7, 3))])
    r3, (h3,) = store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, scores(12, 20, 4))])
    assert [h.id for h in store.list_heatmaps(a.id)] == [h3, h2, h1]
    assert [h.run_id for h in store.list_heatmaps(a.id)] == [r3, r2, r1]
    assert [h.id for h in store.list_heatmaps(a.id, "demo")] == [h3, h1]
    assert [(h.id, h.is_demo, h.family) for h in store.list_heatmaps(a.id, "diffdoctor:/x.bin")] == \
        [(h2, False, "diffdoctor")]
    assert [h.id for h in store.list_heatmaps(b.id)] == [hb]
    assert store.list_heatmaps(b.id, "demo") == []


def test_same_heatmap_twice_shares_one_file(store):
    _, (a, _b) = two_images(store)
    s = scores(12, 20, 1)
    _, (h1,) = store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, s)])
    _, (h2,) = store.add_detector_run("demo", "upernet", True, heatmaps=[(a.id, s)])
    p1, p2 = (r.path for r in store.list_heatmaps(a.id))
    assert h1 != h2 and p1 == p2 and Path(p1).is_file()


# ------------------------------------------------------------------ masks: status and raw maps
def test_add_mask_draft_with_raw_round_trip(store):
    _, (a, _b) = two_images(store)
    mask = np.zeros((12, 20), bool)
    mask[2:5, 3:9] = True
    raw = np.random.default_rng(0).integers(0, 256, size=(12, 20), dtype=np.uint8)
    mid = store.add_mask(a.id, mask, "detector", "hand", status="draft", raw=raw, params={"threshold": 0.5})
    rec = store.list_masks(a.id)[0]
    assert (rec.id, rec.status, rec.author, rec.class_name, rec.params, rec.bbox, rec.version) == \
        (mid, "draft", "detector", "hand", {"threshold": 0.5}, (3, 2, 8, 4), 1)
    assert rec.raw_path is not None and Path(rec.raw_path).is_file()
    with Image.open(rec.raw_path) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), raw)
    import hashlib

    assert rec.raw_sha256 == hashlib.sha256(Path(rec.raw_path).read_bytes()).hexdigest()
    assert Path(rec.raw_path).stem == rec.raw_sha256
    assert np.array_equal(store.load_mask(mid), mask)
    # default: final, no raw map
    mid2 = store.add_mask(a.id, mask, "human")
    rec2 = store.list_masks(a.id)[1]
    assert (rec2.id, rec2.status, rec2.raw_path, rec2.raw_sha256, rec2.params, rec2.version) == \
        (mid2, "final", None, None, {}, 2)


@pytest.mark.parametrize("kwargs, word", [({"status": "maybe"}, "status"),
                                          ({"raw": np.zeros((12, 20), np.float32)}, "raw"),
                                          ({"raw": np.zeros((20, 12), np.uint8)}, "raw")])
def test_add_mask_rejects_bad_status_and_raw(store, kwargs, word):
    _, (a, _b) = two_images(store)
    before = snapshot(store.data_dir)
    with pytest.raises(ValueError, match=word):
        store.add_mask(a.id, np.zeros((12, 20), bool), "human", **kwargs)
    assert snapshot(store.data_dir) == before


def test_new_image_with_masks_is_one_transaction(store):
    session = store.create_session("s")
    m = np.zeros((12, 20), bool)
    m[0, 0] = True
    raw = np.full((12, 20), 200, np.uint8)
    (rec,) = store.add_images(session.id, [NewImage(rgb=noise(12, 20, 0), source="uploaded", masks=(
        NewMask(mask=m, author="human", raw=raw, params={"dataset": "RichHF-18k"}),
        NewMask(mask=~m, author="synthetic", status="draft", class_name="hand")))])
    masks = store.list_masks(rec.id)
    assert [(x.author, x.status, x.version, x.params) for x in masks] == \
        [("human", "final", 1, {"dataset": "RichHF-18k"}), ("synthetic", "draft", 2, {})]
    assert np.array_equal(store.load_mask(masks[0].id), m) and np.array_equal(store.load_mask(masks[1].id), ~m)
    with Image.open(masks[0].raw_path) as im:
        assert np.array_equal(np.asarray(im), raw)


def test_a_bad_mask_in_the_second_image_leaves_nothing(store):
    session = store.create_session("s")
    before = snapshot(store.data_dir)
    good = NewImage(rgb=noise(12, 20, 0), source="uploaded",
                    masks=(NewMask(mask=np.ones((12, 20), bool), author="human", raw=np.ones((12, 20), np.uint8)),))
    bad = NewImage(rgb=noise(9, 7, 1), source="uploaded", masks=(NewMask(mask=np.ones((7, 9), bool), author="human"),))
    with pytest.raises(ValueError, match="does not match image"):
        store.add_images(session.id, [good, bad])
    assert snapshot(store.data_dir) == before
    assert store.list_images(session.id) == []


def test_a_mask_with_a_bad_author_is_refused_before_writing(store):
    session = store.create_session("s")
    before = snapshot(store.data_dir)
    with pytest.raises(ValueError, match="author"):
        store.add_images(session.id, [NewImage(rgb=noise(4, 4, 0), source="uploaded",
                                               masks=(NewMask(mask=np.ones((4, 4), bool), author="robot"),))])
    assert snapshot(store.data_dir) == before


def test_a_non_newmask_in_masks_is_a_value_error(store):
    session = store.create_session("s")
    with pytest.raises(ValueError, match="expected a NewMask"):
        store.add_images(session.id, [NewImage(rgb=noise(4, 4, 0), source="uploaded",
                                               masks=(np.ones((4, 4), bool),))])


# ------------------------------------------------------------------ delete_session and files
def test_delete_session_removes_unshared_heatmap_and_raw_files(store):
    # session "keep" and "drop" share one image (same pixels) and one identical heatmap
    shared_rgb = noise(12, 20, 0)
    shared_scores = scores(12, 20, 9)
    keep = store.create_session("keep")
    (k,) = store.add_images(keep.id, [NewImage(rgb=shared_rgb, source="uploaded")])
    store.add_detector_run("demo", "upernet", True, heatmaps=[(k.id, shared_scores)])
    drop = store.create_session("drop")
    d1, d2 = store.add_images(drop.id, [NewImage(rgb=shared_rgb, source="uploaded"),
                                        NewImage(rgb=noise(9, 7, 5), source="uploaded")])
    _, (hs, hu) = store.add_detector_run("demo", "upernet", True,
                                         heatmaps=[(d1.id, shared_scores), (d2.id, scores(9, 7, 3))])
    raw = np.random.default_rng(4).integers(0, 256, size=(9, 7), dtype=np.uint8)
    store.add_mask(d2.id, np.ones((9, 7), bool), "human", raw=raw)
    shared_heat = store.list_heatmaps(d1.id)[0].path
    unshared_heat = store.list_heatmaps(d2.id)[0].path
    unshared_raw = store.list_masks(d2.id)[0].raw_path
    unshared_img = d2.path
    assert shared_heat == store.list_heatmaps(k.id)[0].path

    store.delete_session(drop.id)
    counts, _ = snapshot(store.data_dir)
    assert counts["heatmaps"] == 1 and counts["masks"] == 0 and counts["images"] == 1
    for gone in (unshared_heat, unshared_raw, unshared_img):
        assert not Path(gone).exists(), gone
    assert Path(shared_heat).is_file() and Path(k.path).is_file()
    assert np.abs(store.load_heatmap(store.list_heatmaps(k.id)[0].id) - shared_scores).max() <= 1 / 65535


# ------------------------------------------------------------------ migration 1 -> 2
def test_a_v1_database_is_migrated_to_v2(tmp_path, monkeypatch):
    data = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", [store_schema._m1_initial])
        with Store(data) as old:
            assert old.schema_version() == 1
            session = old.create_session("legacy")
            (img,) = old.add_images(session.id, [NewImage(rgb=noise(6, 5, 0), source="uploaded",
                                                          original_name="a.png")])
            old.db.execute("INSERT INTO masks (image_id, sha256, path, author, bbox, version, created_at) "
                           "VALUES (?, ?, ?, 'human', '[0, 0, 1, 1]', 1, '2024-01-01T00:00:00+00:00')",
                           (img.id, img.sha256, "files/xx/legacy.png"))
            tables = set(old.db.table_names())
            assert "heatmaps" not in tables and "detector_runs" not in tables
            assert "status" not in {c.name for c in old.db["masks"].columns}
    latest = len(store_module.MIGRATIONS)
    with Store(data) as new:
        assert new.schema_version() == latest >= 2
        names = [r["name"] for r in new.db.query("SELECT name FROM migrations ORDER BY version")]
        assert names[:2] == ["_m1_initial", "_m2_detection"] and len(names) == latest
        assert {"heatmaps", "detector_runs"} <= set(new.db.table_names())
        (s,) = new.list_sessions()
        assert (s.name, s.image_count) == ("legacy", 1)
        (rec,) = new.list_images(s.id)
        assert (rec.id, rec.sha256, rec.original_name, rec.width, rec.height) == \
            (img.id, img.sha256, "a.png", 5, 6)
        assert np.array_equal(new.load_rgb(rec.id), noise(6, 5, 0))
        (mask,) = new.list_masks(rec.id)
        assert (mask.status, mask.raw_sha256, mask.raw_path, mask.params, mask.bbox) == \
            ("final", None, None, {}, (0, 0, 1, 1))
        columns = {c.name: c for c in new.db["masks"].columns}
        assert {"status", "raw_sha256", "raw_path", "params"} <= set(columns)
        # the v2 features work on the migrated database
        _, (hid,) = new.add_detector_run("demo", "upernet", True, heatmaps=[(rec.id, np.full((6, 5), 0.5, np.float32))])
        assert abs(float(new.load_heatmap(hid)[0, 0]) - 0.5) <= 1 / 65535
        new.add_mask(rec.id, np.ones((6, 5), bool), "detector", status="draft")
        assert [x.status for x in new.list_masks(rec.id)] == ["final", "draft"]
    with Store(data) as again:  # opening again applies nothing twice
        assert again.schema_version() == latest
        assert again.db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == latest


def test_the_masks_status_column_is_checked_by_sqlite(store):
    _, (a, _b) = two_images(store)
    store.add_mask(a.id, np.zeros((12, 20), bool), "human")
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("UPDATE masks SET status = 'maybe'")


# ------------------------------------------------------------------ Services: detect_images, save_generation
def test_services_detect_images_stores_the_detector_output(tmp_path):
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector
    from studio.services import Services

    services = Services.open(tmp_path / "data")
    try:
        session, (a, b) = two_images(services.store)
        from engines.detection.detect import Cancelled

        with pytest.raises(Cancelled):
            services.detect_images([a.id, b.id], "demo", should_stop=lambda: True)
        assert snapshot(services.data_dir)[0]["detector_runs"] == 0  # a stopped run stores nothing
        pairs = services.detect_images([a.id, b.id], "demo")
        assert [i for i, _ in pairs] == [a.id, b.id]
        reference = ArtifactDetector(load_detector("demo", data_dir=tmp_path / "data"))
        for (image_id, hid), rgb in zip(pairs, (noise(12, 20, 0), noise(9, 7, 1))):
            expected = reference.predict([rgb])[0].scores
            assert np.abs(services.store.load_heatmap(hid) - expected).max() <= 1 / 65535 + 1e-6
            (rec,) = services.store.list_heatmaps(image_id)
            assert (rec.detector_id, rec.family, rec.is_demo) == ("demo", "upernet", True)
            assert rec.run_params["mode"] == "resize" and rec.run_params["spec"]["input_size"] == reference.spec.input_size
            assert rec.run_params["spec"]["mean"] == [0.485, 0.456, 0.406]
    finally:
        services.close()


def test_services_save_generation_stores_trajectory_maps(tmp_path, trajectory_generation):
    from studio.services import TRAJECTORY, TRAJECTORY_NOTE, Services

    _, result = trajectory_generation
    services = Services.open(tmp_path / "data")
    try:
        session = services.store.create_session("gen")
        records = services.save_generation(session.id, result)
        assert len(records) == 2
        for rec, img in zip(records, result.images):
            (heat,) = services.store.list_heatmaps(rec.id, TRAJECTORY)
            assert (heat.family, heat.is_demo) == (TRAJECTORY, True)
            assert heat.run_params == {"model_id": "demo", "note": TRAJECTORY_NOTE}
            assert np.abs(services.store.load_heatmap(heat.id) - img.trajectory).max() <= 1 / 65535
            assert "record_trajectory" not in rec.params
        assert snapshot(services.data_dir)[0]["detector_runs"] == 1
        # the same result without maps (as record_trajectory=False gives) adds no detector run
        from dataclasses import replace

        plain = replace(result, images=tuple(replace(img, trajectory=None) for img in result.images))
        records = services.save_generation(session.id, plain)
        assert [services.store.list_heatmaps(rec.id) for rec in records] == [[], []]
        assert snapshot(services.data_dir)[0]["detector_runs"] == 1
    finally:
        services.close()
