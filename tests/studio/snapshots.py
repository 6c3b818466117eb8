"""Before/after snapshots of a data directory for the "nothing changed" checks of the bad-input and
fault-injection tests: the database dump and the file tree (size and CRC-32 of every file)."""
from __future__ import annotations

import sqlite3
import zlib
from pathlib import Path


def db_dump(data_dir: Path) -> list[str]:
    """The database's SQL dump (`iterdump`), read-only; [] when there is no database."""
    db = Path(data_dir) / "studio.db"
    if not db.is_file():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def file_tree(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, crc32) of every file, (0, 0) for every folder (the database's WAL/SHM
    excluded: reads touch them)."""
    root = Path(root)
    if not root.is_dir():
        return {"<not a folder>": (0, 0)} if root.exists() else {}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(("-wal", "-shm")):
            out[p.relative_to(root).as_posix()] = (p.stat().st_size, zlib.crc32(p.read_bytes()))
        elif p.is_dir():
            out[p.relative_to(root).as_posix() + "/"] = (0, 0)
    return out


def snapshot(data_dir: Path) -> tuple:
    """(database dump, file tree) of a data directory."""
    return db_dump(data_dir), file_tree(data_dir)
