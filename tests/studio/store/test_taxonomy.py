"""The bundled taxonomies and store migration _m7_taxonomy (existing sessions keep their classes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import studio.store.checks as store_checks
import studio.store.labels as store_labels
import studio.store.store as store_module
import studio.store.schema as store_schema
from studio.services import ASSETS_DIR, default_taxonomy
from studio.store.records import NewImage
from studio.store.store import Store

OLD_AUTHORS = ("human", "sam-assisted", "detector", "synthetic")


def test_the_default_is_synartifacts_13_classes_in_four_groups():
    data = json.loads((ASSETS_DIR / "taxonomy.json").read_text())
    classes = default_taxonomy()
    assert len(classes) == 13 and len({c["name"] for c in classes}) == 13
    assert set(data["groups"]) == {"object-aware", "object-agnostic", "lighting-related", "others"}
    assert {c["group"] for c in classes} == set(data["groups"])
    assert sorted(c["paper_index"] for c in classes) == list(range(13))
    names = [c["name"] for c in classes]
    assert names[:3] == ["Distorted and Deformated Components", "Omitted Components", "Duplicated Components"]
    assert [c["group"] for c in classes][-3:] == ["lighting-related"] * 3  # rarest last
    assert all(c["definition"].endswith(".") for c in classes)
    old = json.loads((ASSETS_DIR / "taxonomy_studio_v1.json").read_text())["classes"]
    assert [(c["name"], c["definition"]) for c in old] == list(store_schema._STUDIO_V1_CLASSES)


def test_m7_keeps_existing_sessions_classes_and_widens_mask_authors(tmp_path: Path, monkeypatch):
    data = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
        m.setattr(store_checks, "MASK_AUTHORS", OLD_AUTHORS)
        m.setattr(store_labels, "MASK_AUTHORS", OLD_AUTHORS)
        with Store(data) as old:
            implicit = old.create_session("implicit")
            custom = old.create_session("custom")
            old.set_session_taxonomy(custom.id, [{"name": "hands", "definition": "extra fingers"}])
            (img,) = old.add_images(implicit.id, [NewImage(rgb=np.zeros((6, 6, 3), np.uint8), source="uploaded")])
            mid = old.add_mask(img.id, np.ones((6, 6), bool), "human", "blur", "soft")
    with Store(data) as new:
        names = [r["name"] for r in new.db.query("SELECT name FROM migrations ORDER BY version")]
        assert "_m7_taxonomy" in names
        old_default = [{"name": n, "definition": d} for n, d in store_schema._STUDIO_V1_CLASSES]
        assert new.session_taxonomy(implicit.id, default_taxonomy()) == old_default
        assert new.session_taxonomy(custom.id, default_taxonomy()) == [{"name": "hands", "definition": "extra fingers"}]
        fresh = new.create_session("fresh")
        assert new.session_taxonomy(fresh.id, default_taxonomy()) == default_taxonomy()
        # masks kept (id, author, class) and the new author is accepted, also for a new mask version
        assert [(x.id, x.author, x.class_name) for x in new.list_masks(img.id)] == [(mid, "human", "blur")]
        new.edit_regions(img.id, update={f"m{mid}": {"author": "classifier-assisted", "class_name": "noise"}})
        state = new.edit_regions(img.id, update={f"m{mid}": {"mask": np.eye(6, dtype=bool)}})
        assert state.regions[0].author == "classifier-assisted"
        assert new.list_masks(img.id)[-1].author == "classifier-assisted"
        indexes = {r[0] for r in new.db.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='masks'")}
        assert {"idx_masks_image_id", "idx_masks_sha256"} <= indexes
        assert new.class_counts(implicit.id) == {"noise": 1}
        # _m7 ran after _m6_session_ids: its table rebuild leaves the database consistent and ids unreused
        assert names.index("_m6_session_ids") < names.index("_m7_taxonomy")
        assert new.db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert new.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        new.delete_session(fresh.id)
        assert new.create_session("later").id > fresh.id
