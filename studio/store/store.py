"""The session store: SQLite (via sqlite-utils) plus content-addressed files.

`Store` is the only writer of session data. Layout under ``data_dir``::

    studio.db                      SQLite database (WAL mode, foreign keys on)
    files/<sha[:2]>/<sha>.png      image and mask PNGs, named by sha256 of the PNG bytes

Images are RGB uint8 HWC numpy arrays; masks are ``bool[H, W]`` (True = artifact region).
The database stores file paths relative to ``data_dir`` (``files/ab/<sha>.png``); records
returned here carry absolute paths. Timestamps are ISO-8601 UTC strings, parameters are JSON
text (``sort_keys=True``), so the database is browsable as-is with sqlite3 or Datasette.
Files are never overwritten: the same sha256 means the same bytes, so an existing file is reused.

This module opens and migrates the database and owns transactions and the file store; `Store` gets its
methods from mixins: studio.store.images (sessions, images, heatmaps), studio.store.labels (masks,
regions, undo/redo, taxonomies) and studio.store.jobs; shared checks are in studio.store.checks.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import sqlite_utils
from PIL import Image

from studio.safeio import atomic_write_bytes
from studio.store.images import ImagesMixin
from studio.store.jobs import JobsMixin
from studio.store.labels import LabelsMixin
from studio.store.records import StoreError
from studio.store.schema import MIGRATIONS, utc_now

TEMP_PREFIX = ".tmp-"
"""Name prefix of files being written under files/; any left over (a killed process) are garbage."""


# ---------------------------------------------------------------- opening a data directory
def _prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed; a file, a device or an unwritable place is one StoreError."""
    if data_dir.exists() and not data_dir.is_dir():
        raise StoreError(f"The data directory {_shown(data_dir)} is not a folder (it is a file or a device); "
                         "choose a folder with --data-dir or $ARTIFACT_STUDIO_HOME.")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"Cannot create the data directory {_shown(data_dir)}: "
                         f"{os.strerror(exc.errno) if exc.errno else exc}.") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise StoreError(f"The data directory {_shown(data_dir)} is read-only; Artifact Studio needs to write "
                         "there (choose another with --data-dir).")


def _open_problem(data_dir: Path, exc: sqlite3.Error) -> str:
    """One sentence for an error while opening/migrating ``studio.db``."""
    text = str(exc).lower()
    db = _shown(data_dir / "studio.db")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return (f"{db} is damaged or is not an Artifact Studio database ({exc}); move it aside or restore a "
                "backup (`artifact-studio doctor` checks a database).")
    if "readonly" in text or "read-only" in text:
        return f"{db} is read-only; Artifact Studio needs to write there (choose another --data-dir)."
    if "disk is full" in text or "disk full" in text:
        return f"The disk holding {db} is full; free some space and try again."
    if "locked" in text or "busy" in text:
        return f"{db} is locked by another process for too long ({exc}); try again when it has finished."
    return f"Cannot open {db}: {exc}."


def _first_words(exc: BaseException) -> str:
    """An exception's text without object reprs such as <_io.BytesIO object at 0x...>, at most 120 characters."""
    import re

    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip().rstrip(".")
    return text[:120] or type(exc).__name__


def _shown(path: Any) -> str:
    """A path as printable text: undecodable bytes of the file name are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class Store(ImagesMixin, LabelsMixin, JobsMixin):
    """Sessions, images, generations, masks and jobs in ``<data_dir>/studio.db``; thread-safe."""

    def __init__(self, data_dir: Path | str):
        self._data_dir = Path(data_dir).expanduser().resolve()
        self._lock = threading.RLock()
        self._tx_depth, self._tx_created = 0, []
        _prepare_data_dir(self._data_dir)
        try:
            self._conn = sqlite3.connect(str(self.db_path), timeout=5.0, check_same_thread=False,
                                         isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(_open_problem(self._data_dir, exc)) from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=5000")
            self.db = sqlite_utils.Database(self._conn, execute_plugins=False)
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(_open_problem(self._data_dir, exc)) from None

    data_dir = property(lambda self: self._data_dir)
    db_path = property(lambda self: self._data_dir / "studio.db")
    files_dir = property(lambda self: self._data_dir / "files")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE); a nested call is a savepoint inside it.

        On any exception (a failing COMMIT included) the files this transaction or savepoint
        created are removed first, while the database write lock is still held (so no other writer
        can have started to reuse them), then the rows are rolled back.
        """
        with self._lock:
            if self._tx_depth:
                name, mark = f"sp{self._tx_depth}", len(self._tx_created)
                self._conn.execute(f"SAVEPOINT {name}")
                self._tx_depth += 1
                try:
                    yield
                except BaseException:
                    self._remove_created(self._tx_created[mark:])
                    del self._tx_created[mark:]
                    if self._conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.execute(f"ROLLBACK TO {name}")
                            self._conn.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._tx_depth -= 1
                self._conn.execute(f"RELEASE {name}")
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._tx_depth, self._tx_created = 1, []
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                self._remove_created(self._tx_created)
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            finally:
                self._tx_depth, self._tx_created = 0, []

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Store"]:
        """Make several store calls one all-or-nothing change: they join this write transaction
        (each as a savepoint), and if anything inside raises, every row and every file they added
        is gone again. Holds the database write lock, so other processes wait until it ends."""
        with self._tx():
            yield self

    def _migrate(self) -> None:
        """Apply each pending migration once, in its own transaction, and record it."""
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, "
                            "name TEXT NOT NULL, applied_at TEXT NOT NULL)")
        if self.schema_version() > len(MIGRATIONS):
            raise StoreError(f"{self.db_path} has schema version {self.schema_version()}, newer than this "
                             f"Artifact Studio supports ({len(MIGRATIONS)}); upgrade the app.")
        for version, migration in enumerate(MIGRATIONS, start=1):
            with self._tx():  # re-read inside the write lock: another process may have migrated
                if version > self.schema_version():
                    migration(self.db)
                    self.db.table("migrations").insert(
                        {"version": version, "name": migration.__name__, "applied_at": utc_now()})

    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(version) FROM migrations").fetchone()
            return int(row[0] or 0)

    # ------------------------------------------------------------ files
    def _file_path(self, sha: str) -> Path:
        return self.files_dir / sha[:2] / f"{sha}.png"

    def _put_file(self, data: bytes, sha: str, created: list[Path]) -> str:
        """Store PNG bytes content-addressed; never overwrite good bytes. Called inside `_tx`: new
        files/dirs are appended to ``created`` and to the transaction's list, so a failed caller or a
        rolled-back transaction removes them. Bytes go to a temporary name, are flushed to disk and
        renamed, so the final name never holds a partial file. Returns the path relative to data_dir."""
        path = self._file_path(sha)
        for folder in (self.files_dir, path.parent):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
                self._tx_created.append(folder)
        try:
            intact = path.stat().st_size == len(data)
        except FileNotFoundError:
            intact = None
        if not intact:  # missing, or a damaged leftover of the same name: (re)write it
            atomic_write_bytes(path, data, prefix=TEMP_PREFIX, suffix=".png")
            if intact is None:
                created.append(path)
                self._tx_created.append(path)
        return path.relative_to(self._data_dir).as_posix()

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        for p in reversed(created):  # files before the directories that hold them
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() else p.unlink()

    @staticmethod
    def _read_stored(path: Path, what: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
        """Decode a stored PNG; a missing or damaged file is one StoreError naming it."""
        try:
            with Image.open(path) as im:
                return convert(im)
        except FileNotFoundError:
            raise StoreError(f"The file of {what} is missing from the store ({_shown(path)}); "
                             "`artifact-studio doctor` lists missing files.") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise StoreError(f"The stored file of {what} is damaged ({_shown(path)}: {_first_words(exc)}); "
                             "`artifact-studio doctor` checks the store.") from None
