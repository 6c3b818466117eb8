"""Image captions: the `_m5_captions` migration, store reads/writes, and caption files (studio.datasets.captions)."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import studio.store.store as store_module
import studio.store.schema as store_schema
from studio.datasets.captions import caption_for, match_captions, read_captions
from studio.store.records import NewImage
from studio.store.store import MIGRATIONS, Store, StoreError


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data") as s:
        yield s


# ------------------------------------------------------------------ the store
def test_the_captions_migration_is_recorded_and_adds_the_column(store):
    names = [r["name"] for r in store.db.query("SELECT name FROM migrations ORDER BY version")]
    assert "_m5_captions" in names and store_schema._m5_captions in MIGRATIONS
    assert "caption" in {c.name for c in store.db.table("images").columns}


def test_images_carry_captions_generated_ones_their_prompt_children_their_parents(store):
    sid = store.create_session("s").id
    (up,) = store.add_images(sid, [NewImage(rgb(0), "uploaded", caption="a red barn")])
    (plain,) = store.add_images(sid, [NewImage(rgb(1), "uploaded")])
    (gen,) = store.add_images(sid, [NewImage(rgb(2), "generated", params={"prompt": "a cat"})],
                              generation={"prompt": "a cat", "seed": 1})
    (child,) = store.add_images(sid, [NewImage(rgb(3), "corrupted", parent_id=gen.id)])
    (own,) = store.add_images(sid, [NewImage(rgb(4), "corrupted", parent_id=gen.id, caption="other")])
    assert (up.caption, plain.caption, gen.caption, child.caption, own.caption) == ("a red barn", None, "a cat", "a cat", "other")
    assert [r.caption for r in store.list_images(sid)] == ["a red barn", None, "a cat", "a cat", "other"]
    assert store.set_caption(plain.id, "  a bowl of fruit ").caption == "a bowl of fruit"
    assert store.get_image(plain.id).caption == "a bowl of fruit"
    assert store.set_caption(plain.id, "   ").caption is None
    with pytest.raises(StoreError, match="Unknown image"):
        store.set_caption(999, "x")
    with pytest.raises(ValueError, match="caption"):
        store.set_caption(up.id, 3)
    with pytest.raises(ValueError, match="characters"):
        store.add_images(sid, [NewImage(rgb(5), "uploaded", caption="x" * 10_001)])
    assert len(store.list_images(sid)) == 5


def test_a_v4_database_gets_generated_prompts_as_captions(tmp_path, monkeypatch):
    data = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:4])
        with Store(data) as old:
            sid = old.create_session("legacy").id
            (gen,) = old.add_images(sid, [NewImage(rgb(0), "generated", params={"prompt": "a dog"})],
                                    generation={"prompt": "a dog"})
            (up,) = old.add_images(sid, [NewImage(rgb(1), "uploaded")])
            assert "caption" not in {c.name for c in old.db.table("images").columns}
    with Store(data) as new:
        assert new.schema_version() == len(MIGRATIONS)
        assert (new.get_image(gen.id).caption, new.get_image(up.id).caption) == ("a dog", None)
    conn = sqlite3.connect(data / "studio.db")
    assert conn.execute("SELECT caption FROM images ORDER BY id").fetchall() == [("a dog",), (None,)]
    conn.close()


# ------------------------------------------------------------------ caption files
def test_jsonl_and_csv_caption_files(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"file_name": "cat.png", "caption": "a cat"}\n\n{"image": "sub/dog.jpg", "text": "a dog"}\n')
    assert read_captions(jsonl) == {"cat.png": "a cat", "sub/dog.jpg": "a dog"}
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('File_Name,Caption\ncat.png,"a cat, sitting"\ndog,a dog\n')
    assert read_captions(csv_file) == {"cat.png": "a cat, sitting", "dog": "a dog"}
    for name, text, words in [("a.jsonl", '{"file_name": "x.png"}\n', "caption column"),
                              ("b.jsonl", "not json\n", "line 1"),
                              ("c.txt", "x", ".jsonl or .csv"),
                              ("d.csv", "file_name,caption\n", "no caption"),
                              ("e.jsonl", '{"file_name": "x.png", "caption": 3}\n', "must be text"),
                              ("f.jsonl", '{"file": "x.png", "caption": "a"}\n{"file": "x.png", "caption": "b"}\n',
                               "two different captions")]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=words) as info:
            read_captions(path)
        assert "\n" not in str(info.value) and str(info.value).endswith(".")
    with pytest.raises(ValueError, match="does not exist"):
        read_captions(tmp_path / "missing.jsonl")


def test_match_captions_by_name_or_unique_stem_and_refuses_unknown_images():
    names = ["cat.png", "dog.jpg", "bird.png", "bird.jpg"]
    assert match_captions({"cat.png": "a", "sub/dog": "b", "bird.jpg": "c"}, names) == \
        {"cat.png": "a", "dog.jpg": "b", "bird.jpg": "c"}
    with pytest.raises(ValueError, match=r"names 2 image\(s\) that are not among the images given \(first: 'fish.png'\); "
                                         r"nothing was changed\."):
        match_captions({"cat.png": "a", "fish.png": "b", "bird": "ambiguous stem"}, names, "c.jsonl")


def test_caption_for_prefers_the_caption_then_the_prompt():
    class Rec:
        def __init__(self, caption, params):
            self.caption, self.params = caption, params

    assert caption_for(Rec("a", {"prompt": "b"})) == "a"
    assert caption_for(Rec(None, {"prompt": "b"})) == "b"
    assert caption_for(Rec("", {"prompt": "b"})) == ""
    assert caption_for(Rec(None, {})) == ""
