"""studio.store.store, migration 3: label states (regions, persistent undo/redo), reviewed images, taxonomies."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

import studio.store.store as store_module
import studio.store.schema as store_schema
from studio.store.records import LabelState, NewImage, NewMask
from studio.store.store import Store, StoreError

H, W = 12, 16
LABEL_TABLES = ("label_states", "label_heads", "masks", "taxonomies")
DEFAULT = [{"name": "blur", "definition": "a blurred patch"}, {"name": "noise", "definition": "grain"}]


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def box(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    """bool mask with [y0:y1, x0:x1] True."""
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def snapshot(data_dir: Path) -> tuple[dict, set]:
    """Row counts of the label tables and the set of files under files/ (any new file or folder shows)."""
    conn = sqlite3.connect(data_dir / "studio.db")
    try:
        counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in LABEL_TABLES}
    finally:
        conn.close()
    files = {p.relative_to(data_dir).as_posix() for p in (data_dir / "files").rglob("*")}
    return counts, files


def seqs(store: Store, image_id: int) -> list[int]:
    return [r[0] for r in store.db.execute("SELECT seq FROM label_states WHERE image_id = ? ORDER BY seq",
                                           (image_id,)).fetchall()]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir):
    with Store(data_dir) as s:
        yield s


@pytest.fixture
def image(store):
    session = store.create_session("labels")
    (rec,) = store.add_images(session.id, [NewImage(rgb=noise(H, W, 0), source="uploaded")])
    return rec


# ------------------------------------------------------------------ the state before any edit
def test_before_any_edit_the_regions_are_the_final_masks_without_drafts(store, image):
    final = store.add_mask(image.id, box(1, 4, 2, 6), "human", "blur", "soft edge")
    store.add_mask(image.id, box(5, 9, 5, 9), "detector", status="draft")
    final2 = store.add_mask(image.id, box(8, 12, 10, 16), "synthetic")
    state = store.label_state(image.id)
    assert isinstance(state, LabelState)
    assert (state.image_id, state.seq, state.can_undo, state.can_redo, state.action) == (image.id, 0, False, False, "")
    assert [(r.key, r.mask_id, r.class_name, r.caption, r.author, r.bbox) for r in state.regions] == [
        (f"m{final}", final, "blur", "soft edge", "human", (2, 1, 5, 3)),
        (f"m{final2}", final2, None, None, "synthetic", (10, 8, 15, 11)),
    ]
    assert seqs(store, image.id) == []  # reading writes nothing


def test_an_image_without_masks_has_no_regions(store, image):
    state = store.label_state(image.id)
    assert (state.seq, state.regions, state.can_undo, state.can_redo) == (0, (), False, False)
    with pytest.raises(StoreError):
        store.label_state(image.id + 99)


# ------------------------------------------------------------------ edits
def test_add_update_and_remove_each_make_one_state(store, image):
    s1 = store.edit_regions(image.id, add=[NewMask(mask=box(1, 3, 1, 4), author="human", class_name="blur",
                                                   caption="a smudge")], action="add one")
    assert (s1.seq, s1.can_undo, s1.can_redo, s1.action) == (1, True, False, "add one")
    (r,) = s1.regions
    assert (r.class_name, r.caption, r.author, r.bbox) == ("blur", "a smudge", "human", (1, 1, 3, 2))
    assert np.array_equal(store.load_mask(r.mask_id), box(1, 3, 1, 4))
    assert seqs(store, image.id) == [1]

    # class + caption only: no new mask row
    n_masks = len(store.list_masks(image.id))
    s2 = store.edit_regions(image.id, update={r.key: {"class_name": "noise", "caption": "grain"}})
    (r2,) = s2.regions
    assert (s2.seq, r2.key, r2.mask_id, r2.class_name, r2.caption, r2.bbox) == \
        (2, r.key, r.mask_id, "noise", "grain", r.bbox)
    assert len(store.list_masks(image.id)) == n_masks

    # a new mask: a new mask version, the old one stays loadable, bbox follows the new mask
    s3 = store.edit_regions(image.id, update={r.key: {"mask": box(4, 10, 6, 15)}})
    (r3,) = s3.regions
    assert s3.seq == 3 and r3.key == r.key and r3.mask_id > r.mask_id
    assert (r3.class_name, r3.caption, r3.bbox) == ("noise", "grain", (6, 4, 14, 9))
    masks = {m.id: m for m in store.list_masks(image.id)}
    assert len(masks) == n_masks + 1 and masks[r3.mask_id].version == masks[r.mask_id].version + 1
    assert masks[r3.mask_id].bbox == (6, 4, 14, 9)
    assert np.array_equal(store.load_mask(r3.mask_id), box(4, 10, 6, 15))
    assert np.array_equal(store.load_mask(r.mask_id), box(1, 3, 1, 4))

    # a second region, then remove the first
    s4 = store.edit_regions(image.id, add=[NewMask(mask=box(0, 2, 12, 16), author="sam-assisted")])
    assert s4.seq == 4 and [x.key for x in s4.regions][0] == r.key and len(s4.regions) == 2
    s5 = store.edit_regions(image.id, remove=[r.key], action="delete")
    assert (s5.seq, s5.action, [x.author for x in s5.regions]) == (5, "delete", ["sam-assisted"])
    assert seqs(store, image.id) == [1, 2, 3, 4, 5]
    assert store.label_state(image.id) == s5


def test_existing_final_masks_can_be_edited_as_regions(store, image):
    mid = store.add_mask(image.id, box(0, 2, 0, 2), "human", "blur")
    state = store.edit_regions(image.id, update={f"m{mid}": {"caption": "corner"}})
    (r,) = state.regions
    assert (r.key, r.mask_id, r.class_name, r.caption) == (f"m{mid}", mid, "blur", "corner")


@pytest.mark.parametrize("change", [
    {"update": {"nope": {"class_name": "blur"}}},
    {"remove": ["nope"]},
    {"update": {"nope": {"mask": box(0, 2, 0, 2)}}},
    {"add": [NewMask(mask=box(0, 2, 0, 2), author="human")], "remove": ["r999"]},
])
def test_an_unknown_region_key_raises_and_writes_nothing(store, image, data_dir, change):
    existing = store.edit_regions(image.id, add=[NewMask(mask=box(1, 5, 1, 5), author="human")])
    before, state = snapshot(data_dir), store.label_state(image.id)
    with pytest.raises(StoreError, match="do not exist"):
        store.edit_regions(image.id, **change)
    assert snapshot(data_dir) == before
    assert store.label_state(image.id) == state == existing


def test_a_failing_add_among_good_ones_writes_nothing(store, image, data_dir):
    store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")])
    before, state = snapshot(data_dir), store.label_state(image.id)
    good1, good2 = box(2, 6, 2, 9), box(7, 11, 1, 5)  # masks never stored before: their files would be new
    bad = np.zeros((H + 1, W), bool)
    with pytest.raises(ValueError, match="does not match image"):
        store.edit_regions(image.id, add=[NewMask(mask=good1, author="human"), NewMask(mask=bad, author="human"),
                                          NewMask(mask=good2, author="human")])
    assert snapshot(data_dir) == before
    assert store.label_state(image.id) == state
    # the same with an update whose mask has the wrong shape after a good add
    with pytest.raises(ValueError):
        store.edit_regions(image.id, add=[NewMask(mask=good1, author="human")],
                           update={state.regions[0].key: {"mask": bad}})
    assert snapshot(data_dir) == before
    # invalid values are refused before anything is written
    with pytest.raises(ValueError):
        store.edit_regions(image.id, add=[NewMask(mask=good1.astype(np.uint8), author="human")])
    with pytest.raises(ValueError):
        store.edit_regions(image.id, update={state.regions[0].key: {"colour": "red"}})
    assert snapshot(data_dir) == before


# ------------------------------------------------------------------ undo / redo
def test_undo_and_redo_move_the_head(store, image):
    a = store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")], action="a")
    b = store.edit_regions(image.id, add=[NewMask(mask=box(5, 8, 5, 8), author="human")], action="b")
    c = store.edit_regions(image.id, update={a.regions[0].key: {"class_name": "blur"}}, action="c")
    u1 = store.undo(image.id)
    assert (u1.seq, u1.regions, u1.can_undo, u1.can_redo, u1.action) == (2, b.regions, True, True, "b")
    u2 = store.undo(image.id)
    assert (u2.seq, u2.regions, u2.can_redo) == (1, a.regions, True)
    r1 = store.redo(image.id)
    assert (r1.seq, r1.regions) == (2, b.regions)
    r2 = store.redo(image.id)
    assert (r2.seq, r2.regions, r2.can_redo, r2.action) == (3, c.regions, False, "c")
    assert store.redo(image.id).seq == 3  # no-op at the end
    assert seqs(store, image.id) == [1, 2, 3]  # undo/redo only move the head


def test_a_new_edit_after_undo_drops_the_redo_tail(store, image):
    a = store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")], action="a")
    store.edit_regions(image.id, add=[NewMask(mask=box(5, 8, 5, 8), author="human")], action="b")
    store.edit_regions(image.id, add=[NewMask(mask=box(9, 11, 9, 11), author="human")], action="c")
    store.undo(image.id)
    store.undo(image.id)
    assert seqs(store, image.id) == [1, 2, 3]
    d = store.edit_regions(image.id, update={a.regions[0].key: {"caption": "new branch"}}, action="d")
    assert (d.seq, d.can_undo, d.can_redo, d.action) == (2, True, False, "d")
    assert [(r.key, r.caption) for r in d.regions] == [(a.regions[0].key, "new branch")]
    rows = store.db.execute("SELECT seq, action FROM label_states WHERE image_id = ? ORDER BY seq",
                            (image.id,)).fetchall()
    assert rows == [(1, "a"), (2, "d")]  # old "b" and "c" rows are gone
    assert store.redo(image.id).seq == 2


def test_history_and_current_state_survive_a_restart(data_dir):
    with Store(data_dir) as s:
        session = s.create_session("restart")
        (img,) = s.add_images(session.id, [NewImage(rgb=noise(H, W, 3), source="uploaded")])
        a = s.edit_regions(img.id, add=[NewMask(mask=box(0, 4, 0, 4), author="human", class_name="blur")])
        b = s.edit_regions(img.id, update={a.regions[0].key: {"mask": box(2, 9, 2, 9)}})
        c = s.edit_regions(img.id, update={a.regions[0].key: {"caption": "later"}})
        s.undo(img.id)
        current = s.label_state(img.id)
        assert (current.seq, current.regions) == (2, b.regions)
    with Store(data_dir) as s:
        again = s.label_state(img.id)
        assert again == current and (again.can_undo, again.can_redo) == (True, True)
        assert s.redo(img.id).regions == c.regions
        assert s.undo(img.id).regions == b.regions
        assert s.undo(img.id).regions == a.regions
        assert np.array_equal(s.load_mask(b.regions[0].mask_id), box(2, 9, 2, 9))
    with Store(data_dir) as s:
        assert s.label_state(img.id).regions == a.regions and s.label_state(img.id).can_redo


def test_undoing_the_first_edit_restores_the_regions_before_it(store, image):
    original = store.add_mask(image.id, box(0, 2, 0, 2), "human", "blur")
    before = store.label_state(image.id)
    state = store.edit_regions(image.id, add=[NewMask(mask=box(5, 9, 5, 9), author="human")])
    assert len(state.regions) == 2
    undone = store.undo(image.id)
    assert undone.seq == 0
    assert undone.regions == before.regions  # actually: m<original> and m<new mask> (the added region stays)
    assert [r.mask_id for r in undone.regions] == [original]


def test_undoing_to_the_start_after_a_mask_update_shows_the_original_regions(store, image):
    state = store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")])
    key = state.regions[0].key
    store.edit_regions(image.id, update={key: {"mask": box(0, 6, 0, 6)}})
    store.undo(image.id)
    assert [r.key for r in store.undo(image.id).regions] == []


# ------------------------------------------------------------------ reviewed / progress
def test_mark_reviewed_with_no_regions_counts_as_labelled(store):
    session = store.create_session("progress")
    a, b, c = store.add_images(session.id, [NewImage(rgb=noise(H, W, i), source="uploaded") for i in range(3)])
    assert store.label_progress(session.id) == (0, 3)
    assert not any(store.is_labelled(r.id) for r in (a, b, c))
    reviewed = store.mark_reviewed(a.id)
    assert (reviewed.seq, reviewed.regions, reviewed.action, reviewed.can_undo) == (1, (), "reviewed", True)
    assert store.is_labelled(a.id) and not store.is_labelled(b.id)
    assert store.label_progress(session.id) == (1, 3)
    store.add_mask(b.id, box(0, 2, 0, 2), "human")  # a final mask counts
    store.add_mask(c.id, box(0, 2, 0, 2), "detector", status="draft")  # a draft does not
    assert store.label_progress(session.id) == (2, 3)
    assert store.is_labelled(b.id) and not store.is_labelled(c.id)
    assert store.label_progress(session.name) == (2, 3)
    store.undo(a.id)  # back to "never edited"
    assert not store.is_labelled(a.id) and store.label_progress(session.id) == (1, 3)


def test_mark_reviewed_keeps_the_current_regions(store, image):
    state = store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")])
    reviewed = store.mark_reviewed(image.id)
    assert (reviewed.seq, reviewed.regions, reviewed.action) == (2, state.regions, "reviewed")


# ------------------------------------------------------------------ taxonomies
def test_taxonomy_default_until_set_and_per_session(store):
    one, two = store.create_session("one"), store.create_session("two")
    assert store.session_taxonomy(one.id, DEFAULT) == DEFAULT
    store.set_session_taxonomy(one.id, [{"name": " hands ", "definition": " extra fingers "}, {"name": "text"}])
    assert store.session_taxonomy(one.id, DEFAULT) == [{"name": "hands", "definition": "extra fingers"},
                                                       {"name": "text", "definition": ""}]
    assert store.session_taxonomy("one", DEFAULT)[0]["name"] == "hands"
    assert store.session_taxonomy(two.id, DEFAULT) == DEFAULT
    store.set_session_taxonomy(one.id, [{"name": "only"}])  # replaced, not merged
    assert [c["name"] for c in store.session_taxonomy(one.id, DEFAULT)] == ["only"]
    assert store.db.execute("SELECT COUNT(*) FROM taxonomies").fetchone()[0] == 1
    with pytest.raises(StoreError):
        store.session_taxonomy("missing", DEFAULT)
    with pytest.raises(StoreError):
        store.set_session_taxonomy("missing", DEFAULT)


@pytest.mark.parametrize("classes", [
    [],
    [{"name": "blur"}, {"name": "blur"}],
    [{"name": "blur"}, {"name": " blur "}],
    [{"definition": "no name"}],
    [{"name": "  "}],
    [{"name": "blur"}, "noise"],
])
def test_a_bad_taxonomy_is_refused_and_nothing_changes(store, classes):
    session = store.create_session("tax")
    store.set_session_taxonomy(session.id, [{"name": "kept"}])
    with pytest.raises(ValueError, match="unique, non-empty name"):
        store.set_session_taxonomy(session.id, classes)
    assert store.session_taxonomy(session.id, DEFAULT) == [{"name": "kept", "definition": ""}]


def test_a_null_class_name_is_refused(store):
    session = store.create_session("tax")
    with pytest.raises(ValueError):
        store.set_session_taxonomy(session.id, [{"name": None, "definition": "x"}])


def test_delete_session_removes_its_label_rows(store):
    keep, gone = store.create_session("keep"), store.create_session("gone")
    (k,) = store.add_images(keep.id, [NewImage(rgb=noise(H, W, 1), source="uploaded")])
    (g,) = store.add_images(gone.id, [NewImage(rgb=noise(H, W, 2), source="uploaded")])
    for rec, sess in ((k, keep), (g, gone)):
        store.edit_regions(rec.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")])
        store.edit_regions(rec.id, add=[NewMask(mask=box(4, 8, 4, 8), author="human")])
        store.undo(rec.id)
        store.set_session_taxonomy(sess.id, [{"name": f"c-{sess.name}"}])

    def rows(table, where, arg):
        return store.db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", (arg,)).fetchone()[0]

    store.delete_session(gone.id)
    assert rows("label_states", "image_id = ?", g.id) == 0
    assert rows("label_heads", "image_id = ?", g.id) == 0
    assert rows("taxonomies", "session_id = ?", gone.id) == 0
    assert rows("label_states", "image_id = ?", k.id) == 2
    assert rows("label_heads", "image_id = ?", k.id) == 1
    assert store.session_taxonomy(keep.id, DEFAULT) == [{"name": "c-keep", "definition": ""}]
    assert store.label_state(k.id).seq == 1


# ------------------------------------------------------------------ migration 2 -> 3 (and any later ones)
def test_a_v2_database_is_migrated_to_v3(tmp_path, monkeypatch):
    data = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
        with Store(data) as old:
            assert old.schema_version() == 2
            assert not {"label_states", "label_heads", "taxonomies"} & set(old.db.table_names())
            session = old.create_session("legacy")
            (img,) = old.add_images(session.id, [NewImage(rgb=noise(H, W, 7), source="uploaded")])
            mid = old.add_mask(img.id, box(1, 5, 2, 8), "human", "blur", "smear")
            old.add_mask(img.id, box(6, 9, 6, 9), "detector", status="draft")
            _, (hid,) = old.add_detector_run("demo", "upernet", True,
                                             heatmaps=[(img.id, np.full((H, W), 0.25, np.float32))])
    latest = len(store_module.MIGRATIONS)  # 3, or more once later migrations exist
    assert store_module.MIGRATIONS[2] is store_schema._m3_labels
    with Store(data) as new:
        assert new.schema_version() == latest >= 3
        names = [r["name"] for r in new.db.query("SELECT name FROM migrations ORDER BY version")]
        assert names[:3] == ["_m1_initial", "_m2_detection", "_m3_labels"] and len(names) == latest
        assert {"label_states", "label_heads", "taxonomies"} <= set(new.db.table_names())
        (s,) = new.list_sessions()
        assert (s.name, s.image_count) == ("legacy", 1)
        assert np.array_equal(new.load_rgb(img.id), noise(H, W, 7))
        assert [(m.id, m.status, m.class_name) for m in new.list_masks(img.id)][0] == (mid, "final", "blur")
        assert abs(float(new.load_heatmap(hid)[0, 0]) - 0.25) <= 1 / 65535
        state = new.label_state(img.id)
        assert [(r.key, r.mask_id, r.caption, r.bbox) for r in state.regions] == [(f"m{mid}", mid, "smear", (2, 1, 7, 4))]
        assert new.label_progress(s.id) == (1, 1)
        # the v3 features work on the migrated database
        edited = new.edit_regions(img.id, update={f"m{mid}": {"class_name": "noise"}})
        assert edited.seq == 1 and edited.regions[0].class_name == "noise"
        new.set_session_taxonomy(s.id, [{"name": "x"}])
    with Store(data) as again:
        assert again.schema_version() == latest
        assert again.db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == latest
        assert again.label_state(img.id).regions[0].class_name == "noise"
        assert again.session_taxonomy(s.id, DEFAULT) == [{"name": "x", "definition": ""}]


@pytest.mark.parametrize("change", [{"author": "robot"}, {"class_name": 5}, {"caption": ["a", "list"]}])
def test_an_update_without_a_mask_is_validated_like_a_mask(store, image, data_dir, change):
    state = store.edit_regions(image.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")])
    before = snapshot(data_dir)
    with pytest.raises(ValueError):
        store.edit_regions(image.id, update={state.regions[0].key: change})
    assert snapshot(data_dir) == before


def test_region_keys_are_numbered_per_image_and_never_reused(store, image):
    other = store.add_images(image.session_id, [NewImage(rgb=noise(H, W, 99), source="uploaded")])[0]
    store.edit_regions(other.id, add=[NewMask(mask=box(0, 3, 0, 3), author="human")] * 2)
    first = store.edit_regions(image.id, add=[NewMask(mask=box(1, 4, 1, 4), author="human")])
    assert [r.key for r in first.regions] == ["r1"]  # not continued from the other image
    two = store.edit_regions(image.id, add=[NewMask(mask=box(5, 8, 5, 8), author="human")])
    assert [r.key for r in two.regions] == ["r1", "r2"]
    store.edit_regions(image.id, remove=["r2"])
    again = store.edit_regions(image.id, add=[NewMask(mask=box(5, 9, 5, 9), author="human")])
    assert [r.key for r in again.regions] == ["r1", "r3"]  # r2 is in the history: never reused
