import hashlib
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.store.records import ImageRecord, NewImage
from studio.store.store import MIGRATIONS, Store, StoreError

TABLES = ("sessions", "images", "generations", "masks", "jobs", "migrations")


def rgb(seed: int, h: int = 8, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def snapshot(store: Store) -> tuple[dict, set]:
    counts = {t: store.db.table(t).count for t in TABLES}
    files = {p.relative_to(store.data_dir).as_posix() for p in store.data_dir.rglob("*")
             if p.is_relative_to(store.files_dir)}
    return counts, files


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


def test_migrations_are_idempotent_and_pragmas_set(tmp_path):
    first = Store(tmp_path)
    assert first.schema_version() == len(MIGRATIONS) >= 5
    first.create_session("kept")
    first.close()
    again = Store(tmp_path)
    assert again.schema_version() == len(MIGRATIONS)
    assert set(TABLES) <= set(again.db.table_names())
    assert again.db.table("migrations").count == len(MIGRATIONS)
    assert [s.name for s in again.list_sessions()] == ["kept"]
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    fks = {(fk.column, fk.other_table) for fk in again.db.table("images").foreign_keys}
    assert fks == {("session_id", "sessions"), ("parent_id", "images"), ("generation_id", "generations")}
    indexed = {tuple(ix.columns) for ix in again.db.table("images").indexes}
    assert {("session_id",), ("sha256",)} <= indexed
    assert again.db_path == tmp_path.resolve() / "studio.db"
    again.close()


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "studio.db")
    conn.execute("INSERT INTO migrations VALUES (99, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path)


def test_session_lifecycle(store):
    a = store.create_session("  Cats  ")
    assert (a.name, a.image_count) == ("Cats", 0)
    assert a.created_at.endswith("+00:00")
    assert store.get_session(a.id) == a == store.get_session(str(a.id)) == store.get_session("cats")
    b = store.create_session("Dogs")
    assert [s.name for s in store.list_sessions()] == ["Dogs", "Cats"]
    with pytest.raises(StoreError, match="already exists"):
        store.create_session("CATS")
    for bad in ("", "   ", "x" * 101, "123", "a\nb"):
        with pytest.raises(StoreError):
            store.create_session(bad)
    renamed = store.rename_session(a.id, "Kittens")
    assert renamed.name == "Kittens" and renamed.updated_at >= a.updated_at
    assert [s.name for s in store.list_sessions()] == ["Kittens", "Dogs"]
    assert store.rename_session(a.id, "kittens").name == "kittens"  # case-only rename of itself
    with pytest.raises(StoreError, match="already exists"):
        store.rename_session(a.id, "dogs")
    assert store.ensure_session("dogs").id == b.id
    assert store.ensure_session("Birds").name == "Birds"
    store.delete_session(b.id)
    with pytest.raises(StoreError, match="Unknown session 'Dogs'"):
        store.get_session("Dogs")
    with pytest.raises(StoreError, match="Unknown session '999'"):
        store.delete_session(999)
    assert sorted(s.name for s in store.list_sessions()) == ["Birds", "kittens"]


def test_add_images_content_addressed_and_round_trip(store):
    sid = store.create_session("s").id
    pixels = rgb(0)
    recs = store.add_images(sid, [NewImage(pixels, "uploaded", original_name="cat.png"),
                                  NewImage(pixels.copy(), "uploaded")])
    assert len(recs) == 2 and recs[0].sha256 == recs[1].sha256 and recs[0].id != recs[1].id
    sha = recs[0].sha256
    path = store.files_dir / sha[:2] / f"{sha}.png"
    assert recs[0].path == str(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert [p.name for p in store.files_dir.rglob("*.png")] == [f"{sha}.png"]
    assert (recs[0].width, recs[0].height, recs[0].original_name) == (12, 8, "cat.png")
    assert np.array_equal(store.load_rgb(recs[1].id), pixels)
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), pixels)
    assert store.get_session(sid).image_count == 2
    assert [r.id for r in store.list_images(sid)] == [recs[0].id, recs[1].id]
    row = store.db.execute("SELECT path FROM images WHERE id = ?", (recs[0].id,)).fetchone()
    assert row[0] == f"files/{sha[:2]}/{sha}.png"  # relative in the DB, absolute in records
    with pytest.raises(StoreError, match="Unknown image id 12345"):
        store.get_image(12345)


def test_provenance_and_generation(store):
    sid = store.create_session("gen").id
    params = {"strength": 0.5, "region": [1, 2, 3, 4], "nested": {"b": 1, "a": "x"}}
    generation = {"prompt": "a cat", "negative_prompt": "blurry", "seed": 1234,
                  "num_inference_steps": np.int64(20), "guidance_scale": 7.5, "width": 12, "height": 8,
                  "model_id": "demo/tiny-sd", "params": {"scheduler": "DDIM"}, "duration_s": 1.25}
    a, b = store.add_images(sid, [NewImage(rgb(1), "generated", model_id="demo/tiny-sd"),
                                  NewImage(rgb(2), "generated", model_id="demo/tiny-sd")], generation)
    assert a.generation_id == b.generation_id is not None
    gen = store.get_generation(a.generation_id)
    assert (gen.prompt, gen.seed, gen.num_inference_steps, gen.guidance_scale, gen.count) == ("a cat", 1234, 20, 7.5, 2)
    assert (gen.session_id, gen.model_id, gen.params, gen.duration_s) == (sid, "demo/tiny-sd", {"scheduler": "DDIM"}, 1.25)
    (child,) = store.add_images(sid, [NewImage(rgb(3), "corrupted", parent_id=a.id, model_id="m", params=params)])
    got = store.get_image(child.id)
    assert isinstance(got, ImageRecord)
    assert (got.parent_id, got.model_id, got.params, got.source, got.generation_id) == (a.id, "m", params, "corrupted", None)
    raw = store.db.execute("SELECT params FROM images WHERE id = ?", (child.id,)).fetchone()[0]
    assert raw == '{"nested": {"a": "x", "b": 1}, "region": [1, 2, 3, 4], "strength": 0.5}'
    with pytest.raises(StoreError, match="parent image id 777"):
        store.add_images(sid, [NewImage(rgb(4), "repaired", parent_id=777)])
    for bad in ({"seed": 1}, {"prompt": "x", "sampler": "ddim"}, {"prompt": "x", "seed": -1},
                {"prompt": "x", "width": 1.5}):
        with pytest.raises(ValueError):
            store.add_images(sid, [NewImage(rgb(5), "generated")], bad)
    assert store.db.table("generations").count == 1


@pytest.mark.parametrize("bad", [rgb(9).astype(np.float32), rgb(9)[..., :2], rgb(9)[..., 0], "not an array"])
def test_bad_item_leaves_everything_unchanged(store, bad):
    sid = store.create_session("s").id
    store.add_images(sid, [NewImage(rgb(0), "uploaded")])
    before = snapshot(store)
    with pytest.raises(ValueError, match="Image 1: rgb must be a uint8"):
        store.add_images(sid, [NewImage(rgb(1), "generated"), NewImage(bad, "generated")], {"prompt": "p"})
    with pytest.raises(ValueError, match="source 'made-up'"):
        store.add_images(sid, [NewImage(rgb(1), "generated"), NewImage(rgb(2), "made-up")])
    for params in ({"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]):
        with pytest.raises(ValueError, match="params must be"):
            store.add_images(sid, [NewImage(rgb(1), "generated", params=params)])
    with pytest.raises(ValueError, match="parent_id must be int"):
        store.add_images(sid, [NewImage(rgb(1), "generated", parent_id="1")])
    with pytest.raises(StoreError, match="Unknown session"):
        store.add_images(424242, [NewImage(rgb(1), "generated")])
    assert snapshot(store) == before


@pytest.mark.parametrize("fail_at", [2, 3])
def test_failure_after_first_insert_rolls_back_rows_and_files(store, monkeypatch, fail_at):
    sid = store.create_session("s").id
    shared = rgb(0)
    store.add_images(sid, [NewImage(shared, "uploaded")])
    before = snapshot(store)
    real = Store._insert_image_row
    calls = []

    def flaky(self, row):
        calls.append(row["sha256"])
        if len(calls) == fail_at:
            raise RuntimeError("disk on fire")
        return real(self, row)

    monkeypatch.setattr(Store, "_insert_image_row", flaky)
    items = [NewImage(rgb(1), "generated"), NewImage(shared, "generated"), NewImage(rgb(2), "generated")]
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.add_images(sid, items, {"prompt": "p", "seed": 1})
    assert len(calls) == fail_at
    assert snapshot(store) == before  # rows rolled back, new files and new shard dirs removed
    assert store.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1
    shared_sha = store.list_images(sid)[0].sha256
    assert (store.files_dir / shared_sha[:2] / f"{shared_sha}.png").is_file()  # pre-existing file kept
    monkeypatch.setattr(Store, "_insert_image_row", real)
    assert len(store.add_images(sid, items)) == 3  # store still usable, no transaction left open
    assert not store.db.conn.in_transaction


def test_delete_session_removes_rows_and_unshared_files(store):
    a, b = store.create_session("a").id, store.create_session("b").id
    shared, only_a = rgb(0), rgb(1)
    a1, a2 = store.add_images(a, [NewImage(shared, "uploaded"), NewImage(only_a, "generated")], {"prompt": "p"})
    store.add_mask(a2.id, np.ones((8, 12), bool), "human")
    (b1,) = store.add_images(b, [NewImage(shared, "uploaded")])
    store.add_images(b, [NewImage(rgb(7), "corrupted", parent_id=a2.id)])  # cross-session parent
    store.delete_session(a)
    assert store.db.table("images").count == 2
    assert store.db.table("generations").count == 0 and store.db.table("masks").count == 0
    assert {p.name for p in store.files_dir.rglob("*.png")} == {f"{b1.sha256}.png",
                                                                 f"{store.list_images(b)[1].sha256}.png"}
    assert not Path(a2.path).exists()
    assert store.list_images(b)[1].parent_id is None  # ON DELETE SET NULL
    assert np.array_equal(store.load_rgb(b1.id), shared)
    assert [s.name for s in store.list_sessions()] == ["b"]


def test_masks(store):
    sid = store.create_session("m").id
    (img,) = store.add_images(sid, [NewImage(rgb(0), "uploaded")])
    mask = np.zeros((8, 12), bool)
    mask[2:5, 3:9] = True
    mid = store.add_mask(img.id, mask, "sam-assisted", class_name="extra finger", caption="six fingers")
    mid2 = store.add_mask(img.id, np.zeros((8, 12), bool), "detector")
    m1, m2 = store.list_masks(img.id)
    assert (m1.id, m1.author, m1.class_name, m1.caption, m1.bbox, m1.version) == (
        mid, "sam-assisted", "extra finger", "six fingers", (3, 2, 8, 4), 1)
    assert (m2.id, m2.bbox, m2.version) == (mid2, None, 2)
    loaded = store.load_mask(mid)
    assert loaded.dtype == np.bool_ and np.array_equal(loaded, mask)
    with Image.open(m1.path) as im:
        assert im.mode == "1"
    assert m1.path == str(store.files_dir / m1.sha256[:2] / f"{m1.sha256}.png")
    before = snapshot(store)
    with pytest.raises(ValueError, match="does not match"):
        store.add_mask(img.id, np.zeros((12, 8), bool), "human")
    with pytest.raises(ValueError, match="bool numpy array"):
        store.add_mask(img.id, mask.astype(np.uint8), "human")
    with pytest.raises(ValueError, match="author"):
        store.add_mask(img.id, mask, "robot")
    assert snapshot(store) == before


def test_jobs_table_shape(store):
    cols = set(store.db.table("jobs").columns_dict)
    assert cols == {"id", "kind", "status", "params", "log_path", "pid", "created_at",
                    "started_at", "finished_at", "error", "session_id", "out_dir", "result"}
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("INSERT INTO jobs (kind, status, created_at) VALUES ('train', 'bogus', 'now')")


def test_threads_share_one_store(store):
    sid = store.create_session("t").id
    errors = []

    def work(i):
        try:
            store.add_images(sid, [NewImage(rgb(100 + i), "generated")])
            store.list_sessions()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.get_session(sid).image_count == 8


def test_two_stores_on_one_data_dir_see_each_others_writes(tmp_path):
    app, cli = Store(tmp_path), Store(tmp_path)  # e.g. the running app and the CLI
    sid = app.create_session("shared").id
    (img,) = cli.add_images("shared", [NewImage(rgb(0), "uploaded")])
    assert [i.id for i in app.list_images(sid)] == [img.id]
    with pytest.raises(StoreError, match="already exists"):
        app.create_session("Shared")
    assert app.schema_version() == cli.schema_version() == len(MIGRATIONS)
    app.close()
    cli.close()
