"""Session ids are never reused (migration _m6_session_ids), also on a database made before it."""
from __future__ import annotations

import pytest

import studio.store.store as store_module
from studio.store.store import MIGRATIONS, Store


def test_a_deleted_sessions_id_is_never_given_again(tmp_path):
    store = Store(tmp_path)
    assert "_m6_session_ids" in [row["name"] for row in store.db.table("migrations").rows]
    a, b = store.create_session("a"), store.create_session("b")
    store.delete_session(b.id)
    c = store.create_session("c")
    assert c.id > b.id > a.id
    store.delete_session(c.id)
    store.close()
    again = Store(tmp_path)  # the high-water mark lives in the database, not in the process
    assert again.create_session("d").id > c.id
    again.close()


def test_migrating_an_older_database_keeps_ids_and_starts_after_the_highest(tmp_path, monkeypatch):
    # migrations are positional: a database from before _m6 has exactly the migrations that precede it
    older = MIGRATIONS[:[m.__name__ for m in MIGRATIONS].index("_m6_session_ids")]
    monkeypatch.setattr(store_module, "MIGRATIONS", older)
    store = Store(tmp_path)
    for name in ("x", "y", "z"):  # as the older code did: SQLite picks the id
        store.db.execute("INSERT INTO sessions (name, created_at, updated_at) VALUES (?, 'x', 'x')", (name,))
    ids = [s.id for s in sorted(store.list_sessions(), key=lambda s: s.id)]
    store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    store = Store(tmp_path)
    assert [s.id for s in sorted(store.list_sessions(), key=lambda s: s.id)] == ids
    store.delete_session(ids[-1])
    assert store.create_session("w").id == ids[-1] + 1
    store.close()


@pytest.mark.parametrize("how", ["sql insert", "store"])
def test_any_insert_raises_the_high_water_mark(tmp_path, how):
    store = Store(tmp_path)
    if how == "sql insert":  # e.g. another code path inserting with an explicit id
        store.db.execute("INSERT INTO sessions (id, name, created_at, updated_at) VALUES (40, 'forty', 'x', 'x')")
    else:
        store.create_session("one")
    top = max(s.id for s in store.list_sessions())
    store.delete_session(top)
    assert store.create_session("next").id == top + 1
    store.close()
