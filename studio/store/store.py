"""The session store: SQLite (via sqlite-utils) plus content-addressed files.

This module is the only writer of session data. Layout under ``data_dir``::

    studio.db                      SQLite database (WAL mode, foreign keys on)
    files/<sha[:2]>/<sha>.png      image and mask PNGs, named by sha256 of the PNG bytes

Images are RGB uint8 HWC numpy arrays; masks are ``bool[H, W]`` (True = artifact region).
The database stores file paths relative to ``data_dir`` (``files/ab/<sha>.png``); records
returned here carry absolute paths. Timestamps are ISO-8601 UTC strings, parameters are JSON
text (``sort_keys=True``), so the database is browsable as-is with sqlite3 or Datasette.
Files are never overwritten: the same sha256 means the same bytes, so an existing file is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import sqlite_utils
from PIL import Image

from studio.safeio import atomic_write_bytes
from studio.store.records import (GenerationRecord, HeatmapRecord, ImageRecord, JobRecord, LabelRegion, LabelState,
                                  MaskRecord, NewImage, NewMask, SessionInfo, StoreError)
from studio.store.schema import IMAGE_SOURCES, JOB_STATUSES, MASK_AUTHORS, MIGRATIONS, utc_now

GENERATION_KEYS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
                   "width", "height", "count", "model_id", "params", "duration_s")
MAX_NAME_LENGTH = 100
TEMP_PREFIX = ".tmp-"
"""Name prefix of files being written under files/; any left over (a killed process) are garbage."""
MAX_CAPTION_LENGTH = 10_000
_INT, _REAL = (int, np.integer), (float, int, np.integer, np.floating)
_GENERATION_TYPES = {"prompt": (str,), "negative_prompt": (str,), "model_id": (str,), "params": (dict,),
                     "seed": _INT, "num_inference_steps": _INT, "width": _INT, "height": _INT,
                     "count": _INT, "guidance_scale": _REAL, "duration_s": _REAL}


_FILE_REFERENCES = ("SELECT 1 FROM images WHERE sha256 = :sha UNION ALL SELECT 1 FROM masks WHERE sha256 = :sha "
                    "UNION ALL SELECT 1 FROM masks WHERE raw_sha256 = :sha "
                    "UNION ALL SELECT 1 FROM heatmaps WHERE sha256 = :sha LIMIT 1")


# ---------------------------------------------------------------- helpers
def _to_json(value: Any, what: str) -> str:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}.")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable "
                         f"(str/int/finite float/bool/list/dict): {exc}.") from None


def _check_optional(what: str, value: Any, kind: type) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise ValueError(f"{what} must be {kind.__name__} or None, got {value!r}.")


def _check_caption(what: str, caption: Any) -> None:
    _check_optional(what, caption, str)
    if caption is not None and len(caption) > MAX_CAPTION_LENGTH:
        raise ValueError(f"{what} is {len(caption)} characters long; at most {MAX_CAPTION_LENGTH} are accepted.")


def _check_rgb(rgb: Any, index: int) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        got = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"Image {index}: rgb must be a uint8 numpy array of shape (H, W, 3), got {got}.")


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u034f")  # fillers that render as nothing


def _invisible(c: str) -> bool:
    """True for a character that shows nothing by itself: spaces, format/control characters (zero-width
    space and joiners, BOM, tags), variation selectors and blank letters such as the Hangul filler."""
    code = ord(c)
    return (c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Cn", "Co")
            or c in _BLANK_CHARACTERS or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF)


def check_name(name: Any, what: str) -> str:
    """A user-given name (session, class) stripped of surrounding blanks, or StoreError naming the problem:
    not text, invalid UTF-8 bytes, control or bidirectional-override characters, nothing visible, too long."""
    if not isinstance(name, str):
        raise StoreError(f"{what} must be text, got {type(name).__name__}.")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise StoreError(f"{what} contains bytes that are not valid UTF-8; retype it.")
    if any(c in _BIDI_CONTROLS for c in name):
        bad = next(c for c in name if c in _BIDI_CONTROLS)
        raise StoreError(f"{what} cannot contain bidirectional control characters such as U+{ord(bad):04X} "
                         f"({unicodedata.name(bad, 'BIDI CONTROL')}), which make text display in a misleading order.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name.strip()):
        raise StoreError(f"{what} cannot contain control characters such as newlines or tabs.")
    start, end = 0, len(name)
    while start < end and _invisible(name[start]):
        start += 1
    while end > start and _invisible(name[end - 1]):
        end -= 1
    name = name[start:end]
    if not name:
        raise StoreError(f"{what} must contain at least one visible character.")
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}.")
    return name


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _encode_mask(new: Any, what: str) -> tuple:
    """Validate a NewMask and encode it: (new, png bytes, sha256, raw png bytes or None, params JSON)."""
    if not isinstance(new, NewMask):
        raise ValueError(f"{what}: expected a NewMask, got {type(new).__name__}.")
    mask = new.mask
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        got = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"{what} must be a bool numpy array of shape (H, W), got {got}.")
    if new.author not in MASK_AUTHORS:
        raise ValueError(f"{what}: author {new.author!r} is not one of {list(MASK_AUTHORS)}.")
    if new.status not in ("final", "draft"):
        raise ValueError(f"{what}: status {new.status!r} is not 'final' or 'draft'.")
    _check_optional(f"{what}: class_name", new.class_name, str)
    _check_optional(f"{what}: caption", new.caption, str)
    raw = new.raw
    if raw is not None and (not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.shape != mask.shape):
        raise ValueError(f"{what}: raw must be a uint8 array with the same shape as the mask.")
    params_json = _to_json(new.params, f"{what}: params")
    data = _png_bytes(Image.fromarray(mask.astype(np.uint8) * 255).convert("1", dither=Image.Dither.NONE))
    raw_data = None if raw is None else _png_bytes(Image.fromarray(raw))
    return new, data, hashlib.sha256(data).hexdigest(), raw_data, params_json


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


class Store:
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

    # ------------------------------------------------------------ sessions
    def _clean_name(self, name: Any, ignore_id: int | None = None, *, unique: bool = True) -> str:
        name = check_name(name, "A session name")
        if name.isdecimal():
            raise StoreError(f"A session name cannot be only digits ({name!r}); digits refer to session ids.")
        if unique:
            row = self._conn.execute("SELECT id, name FROM sessions WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != ignore_id:
                raise StoreError(f"A session named {row[1]!r} already exists; choose another name.")
        return name

    def _session_id(self, name_or_id: str | int) -> int:
        if isinstance(name_or_id, bool) or not isinstance(name_or_id, (int, str)):
            raise StoreError(f"Unknown session {name_or_id!r}: give a session name or a numeric id.")
        key = name_or_id.strip() if isinstance(name_or_id, str) else name_or_id
        if isinstance(key, int) or key.isdecimal():
            row = self._conn.execute("SELECT id FROM sessions WHERE id = ?", (int(key),)).fetchone()
        else:
            row = self._conn.execute("SELECT id FROM sessions WHERE name = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"Unknown session {str(name_or_id)!r}: no session has that name or id "
                             "(the Sessions tab and list_sessions() show the existing ones).")
        return int(row[0])

    def _session_rows(self, where: str = "", params: tuple = ()) -> list[SessionInfo]:
        sql = ("SELECT s.id, s.name, s.created_at, s.updated_at, COUNT(i.id) AS image_count "
               f"FROM sessions s LEFT JOIN images i ON i.session_id = s.id {where} "
               "GROUP BY s.id ORDER BY s.updated_at DESC, s.id DESC")
        return [SessionInfo(**row) for row in self.db.query(sql, params)]

    def _touch(self, session_id: int) -> None:
        self.db.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (utc_now(), session_id))

    def create_session(self, name: str) -> SessionInfo:
        with self._tx():
            name = self._clean_name(name)
            now = utc_now()
            session_id = self._next_session_id()
            self.db.table("sessions").insert({"id": session_id, "name": name, "created_at": now, "updated_at": now})
        return self.get_session(int(session_id))

    def _next_session_id(self) -> int:
        """One more than any session id ever given (deleted ones included); call inside the write transaction."""
        top = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM sessions").fetchone()[0]
        if self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'id_high_water'").fetchone() is None:
            return int(top) + 1  # a database opened before its migrations ran (tests of older schemas)
        mark = self._conn.execute("SELECT last_id FROM id_high_water WHERE name = 'sessions'").fetchone()
        return max(int(top), int(mark[0]) if mark else 0) + 1

    def get_session(self, name_or_id: str | int) -> SessionInfo:
        with self._lock:
            return self._session_rows("WHERE s.id = ?", (self._session_id(name_or_id),))[0]

    def ensure_session(self, name: str) -> SessionInfo:
        """The session called `name`, created if missing; atomic across processes (INSERT OR IGNORE,
        then select, inside one write transaction), so two processes creating it at once share it."""
        with self._tx():
            name = self._clean_name(name, unique=False)
            now = utc_now()
            self.db.execute("INSERT OR IGNORE INTO sessions (name, created_at, updated_at) VALUES (?, ?, ?)",
                            (name, now, now))
            session_id = self._conn.execute("SELECT id FROM sessions WHERE name = ?", (name,)).fetchone()[0]
            return self._session_rows("WHERE s.id = ?", (int(session_id),))[0]

    def list_sessions(self) -> list[SessionInfo]:
        """All sessions, most recently updated first."""
        with self._lock:
            return self._session_rows()

    def rename_session(self, session_id: int | str, new_name: str) -> SessionInfo:
        with self._tx():
            sid = self._session_id(session_id)
            name = self._clean_name(new_name, ignore_id=sid)
            self.db.execute("UPDATE sessions SET name = ?, updated_at = ? WHERE id = ?", (name, utc_now(), sid))
        return self.get_session(sid)

    def delete_session(self, session_id: int | str) -> None:
        """Delete a session and its images, generations and masks in one transaction, then the
        files that no remaining image or mask references."""
        with self._tx():
            sid = self._session_id(session_id)
            shas = {r[0] for r in self._conn.execute(
                "SELECT sha256 FROM images WHERE session_id = :sid "
                "UNION SELECT m.sha256 FROM masks m JOIN images i ON i.id = m.image_id WHERE i.session_id = :sid "
                "UNION SELECT m.raw_sha256 FROM masks m JOIN images i ON i.id = m.image_id WHERE i.session_id = :sid "
                "UNION SELECT h.sha256 FROM heatmaps h JOIN images i ON i.id = h.image_id WHERE i.session_id = :sid",
                {"sid": sid}) if r[0]}
            for table in ("heatmaps", "label_states", "label_heads"):
                self.db.execute(f"DELETE FROM {table} WHERE image_id IN "
                                "(SELECT id FROM images WHERE session_id = ?)", (sid,))
            self.db.execute("DELETE FROM masks WHERE image_id IN "
                            "(SELECT id FROM images WHERE session_id = ?)", (sid,))
            self.db.execute("DELETE FROM images WHERE session_id = ?", (sid,))
            self.db.execute("DELETE FROM generations WHERE session_id = ?", (sid,))
            self.db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            self.db.execute("DELETE FROM detector_runs WHERE id NOT IN (SELECT run_id FROM heatmaps)")
        # A second write transaction holds the DB write lock so no writer adds a reference meanwhile.
        with self._tx():
            for sha in sorted(shas):
                in_use = self._conn.execute(_FILE_REFERENCES, {"sha": sha}).fetchone()
                if in_use is None:
                    self._file_path(sha).unlink(missing_ok=True)

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

    # ------------------------------------------------------------ images
    def _insert_image_row(self, row: dict) -> int:
        return int(self.db.table("images").insert(row).last_pk)

    def _insert_generation(self, session_id: int, generation: dict, n_images: int) -> int:
        if not isinstance(generation, dict):
            raise ValueError(f"generation must be a dict, got {type(generation).__name__}.")
        unknown = sorted(set(generation) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(f"Unknown generation field(s) {unknown}; accepted: {list(GENERATION_KEYS)}.")
        row = {"count": n_images, **{k: v for k, v in generation.items() if v is not None}}
        for key, kinds in _GENERATION_TYPES.items():
            value = row.get(key)
            if value is None or key == "params":
                continue
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"generation[{key!r}] must be {kinds[0].__name__}, got {value!r}.")
            row[key] = kinds[0](value)
        if "prompt" not in row:
            raise ValueError("generation['prompt'] is required (a string, may be empty).")
        if row.get("seed") is not None and not 0 <= row["seed"] < 2**63:
            raise ValueError(f"generation['seed'] must be in [0, 2**63), got {row['seed']}.")
        row.update(session_id=session_id, params=_to_json(row.get("params", {}), "generation['params']"),
                   created_at=utc_now())
        return int(self.db.table("generations").insert(row).last_pk)

    def add_images(self, session_id: int | str, items: list[NewImage],
                   generation: dict | None = None) -> list[ImageRecord]:
        """Add images (RGB uint8 HWC) all-or-nothing: on any error the rows are rolled back and
        files created by this call are removed. ``generation`` (prompt, seed, ...) adds one
        ``generations`` row that every image links to."""
        items = list(items)
        if not items:
            raise ValueError("add_images needs at least one NewImage.")
        encoded = []
        for i, item in enumerate(items):
            if not isinstance(item, NewImage):
                raise ValueError(f"Image {i}: expected a NewImage, got {type(item).__name__}.")
            _check_rgb(item.rgb, i)
            if item.source not in IMAGE_SOURCES:
                raise ValueError(f"Image {i}: source {item.source!r} is not one of {list(IMAGE_SOURCES)}.")
            _check_optional(f"Image {i}: parent_id", item.parent_id, int)
            _check_optional(f"Image {i}: model_id", item.model_id, str)
            _check_optional(f"Image {i}: original_name", item.original_name, str)
            _check_caption(f"Image {i}: caption", item.caption)
            params = _to_json(item.params, f"Image {i}: params")
            masks = [_encode_mask(m, f"Image {i}: mask {j}") for j, m in enumerate(item.masks)]
            data = _png_bytes(Image.fromarray(np.ascontiguousarray(item.rgb)))
            encoded.append((item, params, data, hashlib.sha256(data).hexdigest(), masks))
        created: list[Path] = []
        ids = []
        try:
            with self._tx():
                sid = self._session_id(session_id)
                gen_id = None if generation is None else self._insert_generation(sid, generation, len(items))
                captions = self._has_captions()  # False only on an old schema opened by a test
                for i, (item, params, data, sha, masks) in enumerate(encoded):
                    if item.parent_id is not None and self._conn.execute(
                            "SELECT 1 FROM images WHERE id = ?", (item.parent_id,)).fetchone() is None:
                        raise StoreError(f"Image {i}: parent image id {item.parent_id} does not exist.")
                    h, w = item.rgb.shape[:2]
                    caption = item.caption
                    if caption is None and generation is not None:
                        caption = generation.get("prompt")
                    if caption is None and item.parent_id is not None and captions:
                        caption = self._conn.execute("SELECT caption FROM images WHERE id = ?",
                                                     (item.parent_id,)).fetchone()[0]
                    row = {"session_id": sid, "sha256": sha, "path": self._put_file(data, sha, created),
                           "width": w, "height": h, "source": item.source, "parent_id": item.parent_id,
                           "generation_id": gen_id, "model_id": item.model_id, "params": params,
                           "original_name": item.original_name, "created_at": utc_now()}
                    if captions:
                        row["caption"] = caption
                    ids.append(self._insert_image_row(row))
                    if masks:
                        record = self._image_record(dict(next(iter(self.db.query(
                            "SELECT * FROM images WHERE id = ?", (ids[-1],))))))
                        for enc in masks:
                            self._insert_mask(record, enc, created)
                self._touch(sid)
        except BaseException:
            self._remove_created(created)
            raise
        return [self.get_image(i) for i in ids]

    def _image_record(self, row: dict) -> ImageRecord:
        row = dict(row, path=str(self._data_dir / row["path"]), params=json.loads(row["params"]))
        return ImageRecord(**row)

    def list_images(self, session_id: int | str) -> list[ImageRecord]:
        """A session's images, oldest first."""
        with self._lock:
            sid = self._session_id(session_id)
            return [self._image_record(r) for r in self.db.query(
                "SELECT * FROM images WHERE session_id = ? ORDER BY id", (sid,))]

    def get_image(self, image_id: int) -> ImageRecord:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM images WHERE id = ?", (image_id,)))
            if not rows:
                raise StoreError(f"Unknown image id {image_id!r}.")
            return self._image_record(rows[0])

    def _has_captions(self) -> bool:
        return any(row[1] == "caption" for row in self._conn.execute("PRAGMA table_info(images)"))

    def set_caption(self, image_id: int, caption: str | None) -> ImageRecord:
        """Set (or, with None or blank text, clear) an image's caption."""
        _check_caption("caption", caption)
        caption = (caption.strip() or None) if caption is not None else None
        with self._tx():
            if self._conn.execute("UPDATE images SET caption = ? WHERE id = ?", (caption, image_id)).rowcount == 0:
                raise StoreError(f"Unknown image id {image_id!r}.")
        return self.get_image(image_id)

    def load_rgb(self, image_id: int) -> np.ndarray:
        """The image's pixels as an RGB uint8 array of shape (H, W, 3)."""
        record = self.get_image(image_id)
        rgb = self._read_stored(Path(record.path), f"image {image_id}", lambda im: np.array(im.convert("RGB")))
        if rgb.shape[:2] != (record.height, record.width):
            raise StoreError(f"The stored file of image {image_id} is damaged ({record.path} is {rgb.shape[1]}x"
                             f"{rgb.shape[0]}, the image is {record.width}x{record.height}); "
                             "`artifact-studio doctor` checks the store.")
        return rgb

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

    def get_generation(self, generation_id: int) -> GenerationRecord:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM generations WHERE id = ?", (generation_id,)))
            if not rows:
                raise StoreError(f"Unknown generation id {generation_id!r}.")
            return GenerationRecord(**dict(rows[0], params=json.loads(rows[0]["params"])))

    # ------------------------------------------------------------ masks
    def add_mask(self, image_id: int, mask: np.ndarray, author: str,
                 class_name: str | None = None, caption: str | None = None, *, status: str = "final",
                 raw: np.ndarray | None = None, params: dict | None = None) -> int:
        """Store ``mask`` (bool[H, W], same H, W as the image) as a 1-bit PNG; returns the mask id.

        ``status`` is "final" or "draft" (e.g. detector regions sent to Label); ``raw`` is an optional
        uint8 [H, W] map the mask was binarised from (e.g. a RichHF-18k artifact map), kept beside it.
        """
        new = NewMask(mask=mask, author=author, class_name=class_name, caption=caption, status=status,
                      raw=raw, params=params or {})
        encoded = _encode_mask(new, "mask")
        created: list[Path] = []
        try:
            with self._tx():
                image = self.get_image(image_id)
                mask_id = self._insert_mask(image, encoded, created)
                self._touch(image.session_id)
        except BaseException:
            self._remove_created(created)
            raise
        return mask_id

    def _insert_mask(self, image: ImageRecord, encoded: tuple, created: list[Path]) -> int:
        new, data, sha, raw_data, params_json = encoded
        if new.mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {new.mask.shape} does not match image {image.id} "
                             f"shape {(image.height, image.width)}.")
        ys, xs = np.nonzero(new.mask)
        bbox = None if xs.size == 0 else [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        raw_sha = None if raw_data is None else hashlib.sha256(raw_data).hexdigest()
        version = self._conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM masks "
                                     "WHERE image_id = ?", (image.id,)).fetchone()[0]
        return int(self.db.table("masks").insert({
            "image_id": image.id, "sha256": sha, "path": self._put_file(data, sha, created),
            "author": new.author, "class_name": new.class_name, "caption": new.caption,
            "bbox": None if bbox is None else json.dumps(bbox), "version": version,
            "created_at": utc_now(), "status": new.status, "raw_sha256": raw_sha,
            "raw_path": None if raw_data is None else self._put_file(raw_data, raw_sha, created),
            "params": params_json}).last_pk)

    def list_masks(self, image_id: int) -> list[MaskRecord]:
        """An image's masks, oldest first."""
        with self._lock:
            self.get_image(image_id)
            return [MaskRecord(**dict(r, path=str(self._data_dir / r["path"]),
                                      raw_path=None if r["raw_path"] is None else str(self._data_dir / r["raw_path"]),
                                      params=json.loads(r["params"]),
                                      bbox=None if r["bbox"] is None else tuple(json.loads(r["bbox"]))))
                    for r in self.db.query("SELECT * FROM masks WHERE image_id = ? ORDER BY id", (image_id,))]

    def load_mask(self, mask_id: int) -> np.ndarray:
        """The mask as bool[H, W] (True = artifact region)."""
        with self._lock:
            row = self._conn.execute("SELECT path FROM masks WHERE id = ?", (mask_id,)).fetchone()
        if row is None:
            raise StoreError(f"Unknown mask id {mask_id!r}.")
        return self._read_stored(self._data_dir / row[0], f"mask {mask_id}",
                                 lambda im: np.array(im.convert("L")) >= 128)

    # ------------------------------------------------------------ detector runs and heatmaps
    def add_detector_run(self, detector_id: str, family: str, is_demo: bool, params: dict | None = None,
                         heatmaps: list[tuple[int, np.ndarray]] = ()) -> tuple[int, list[int]]:
        """Record one detector run and its heatmaps [(image_id, float32 [H, W] in [0, 1])] atomically.

        Heatmaps are stored as 16-bit grey PNGs (score * 65535). Returns (run_id, heatmap ids).
        """
        params_json = _to_json(params or {}, "params")
        encoded = []
        for image_id, scores in heatmaps:
            if not isinstance(scores, np.ndarray) or scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
                raise ValueError(f"Heatmap of image {image_id}: scores must be a float array of shape (H, W).")
            if not np.isfinite(scores).all():
                raise ValueError(f"Heatmap of image {image_id}: scores contain NaN or infinite values.")
            data = _png_bytes(Image.fromarray(np.round(np.clip(scores, 0, 1) * 65535).astype(np.uint16)))
            encoded.append((image_id, scores.shape, data, hashlib.sha256(data).hexdigest()))
        created: list[Path] = []
        try:
            with self._tx():
                run_id = int(self.db.table("detector_runs").insert({
                    "detector_id": detector_id, "family": family, "is_demo": int(bool(is_demo)),
                    "params": params_json, "created_at": utc_now()}).last_pk)
                ids = []
                for image_id, shape, data, sha in encoded:
                    image = self.get_image(image_id)
                    if shape != (image.height, image.width):
                        raise ValueError(f"Heatmap shape {shape} does not match image {image_id} "
                                         f"shape {(image.height, image.width)}.")
                    ids.append(int(self.db.table("heatmaps").insert({
                        "image_id": image_id, "run_id": run_id, "sha256": sha,
                        "path": self._put_file(data, sha, created), "created_at": utc_now()}).last_pk))
        except BaseException:
            self._remove_created(created)
            raise
        return run_id, ids

    def list_heatmaps(self, image_id: int, detector_id: str | None = None) -> list[HeatmapRecord]:
        """An image's heatmaps, newest first; optionally only those of one detector."""
        sql = ("SELECT h.*, r.detector_id, r.family, r.is_demo, r.params AS run_params FROM heatmaps h "
               "JOIN detector_runs r ON r.id = h.run_id WHERE h.image_id = ?")
        args: tuple = (image_id,)
        if detector_id is not None:
            sql += " AND r.detector_id = ?"
            args += (detector_id,)
        with self._lock:
            return [HeatmapRecord(**dict(r, path=str(self._data_dir / r["path"]), is_demo=bool(r["is_demo"]),
                                         run_params=json.loads(r["run_params"])))
                    for r in self.db.query(sql + " ORDER BY h.id DESC", args)]

    def load_heatmap(self, heatmap_id: int) -> np.ndarray:
        """The heatmap as float32 [H, W] in [0, 1]."""
        with self._lock:
            row = self._conn.execute("SELECT path FROM heatmaps WHERE id = ?", (heatmap_id,)).fetchone()
        if row is None:
            raise StoreError(f"Unknown heatmap id {heatmap_id!r}.")
        return self._read_stored(self._data_dir / row[0], f"heatmap {heatmap_id}",
                                 lambda im: (np.asarray(im, dtype=np.float32) / 65535.0).astype(np.float32))

    # ------------------------------------------------------------ labels (regions, undo/redo)
    def label_state(self, image_id: int) -> LabelState:
        """The image's current regions. Before any edit: one region per final mask (drafts excluded)."""
        with self._lock:
            self.get_image(image_id)
            head = self._head(image_id)
            if head == 0:
                regions = tuple(LabelRegion(key=f"m{m.id}", mask_id=m.id, class_name=m.class_name,
                                            caption=m.caption, author=m.author, bbox=m.bbox)
                                for m in self.list_masks(image_id)
                                if m.status == "final" and m.params.get("origin") != "label")
                action = ""
            else:
                row = self._conn.execute("SELECT regions, action FROM label_states WHERE image_id = ? AND seq = ?",
                                         (image_id, head)).fetchone()
                regions = tuple(_region_from_json(r) for r in json.loads(row[0]))
                action = row[1]
            last = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM label_states WHERE image_id = ?",
                                      (image_id,)).fetchone()[0]
            return LabelState(image_id=image_id, seq=head, regions=regions, can_undo=head > 0,
                              can_redo=last > head, action=action)

    def _head(self, image_id: int) -> int:
        row = self._conn.execute("SELECT seq FROM label_heads WHERE image_id = ?", (image_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def _push_state(self, image_id: int, regions: list[LabelRegion], action: str) -> None:
        """Inside a transaction: drop the redo tail, append a state, move the head to it."""
        head = self._head(image_id)
        self.db.execute("DELETE FROM label_states WHERE image_id = ? AND seq > ?", (image_id, head))
        self.db.table("label_states").insert({
            "image_id": image_id, "seq": head + 1, "action": action, "created_at": utc_now(),
            "regions": json.dumps([r.to_json() for r in regions], sort_keys=True)})
        self.db.execute("INSERT INTO label_heads (image_id, seq) VALUES (?, ?) "
                        "ON CONFLICT(image_id) DO UPDATE SET seq = excluded.seq", (image_id, head + 1))

    def edit_regions(self, image_id: int, *, add: list[NewMask] = (), update: dict[str, dict] | None = None,
                     remove: list[str] = (), action: str = "edit") -> LabelState:
        """One undoable label edit, in one transaction.

        `add`: new regions (their masks are stored as new mask rows); `update`: region key ->
        {"mask": bool[H, W], "class_name": ..., "caption": ..., "author": ...} (any subset; a new mask
        becomes a new mask version); `remove`: region keys. Unknown keys raise StoreError.
        """
        update = dict(update or {})
        if not add and not update and not remove:
            raise ValueError("Nothing to change: give regions to add, update or remove.")
        add = [m if not isinstance(m, NewMask) else NewMask(
            mask=m.mask, author=m.author, class_name=m.class_name, caption=m.caption, status=m.status, raw=m.raw,
            params={**m.params, "origin": "label"}) for m in add]
        encoded_new = [_encode_mask(m, f"new region {i}") for i, m in enumerate(add)]
        encoded_upd = {}
        for key, change in update.items():
            unknown = set(change) - {"mask", "class_name", "caption", "author"}
            if unknown:
                raise ValueError(f"Region {key}: unknown field(s) {sorted(unknown)}.")
            if "author" in change and change["author"] not in MASK_AUTHORS:
                raise ValueError(f"Region {key}: author {change['author']!r} is not one of {list(MASK_AUTHORS)}.")
            for name in ("class_name", "caption"):
                if name in change:
                    _check_optional(f"Region {key}: {name}", change[name], str)
            if "mask" in change:
                current = change.get("author", "human")
                encoded_upd[key] = _encode_mask(NewMask(mask=change["mask"], author=current,
                                                        params={"origin": "label"}), f"region {key}")
        created: list[Path] = []
        try:
            with self._tx():
                image = self.get_image(image_id)
                regions = list(self.label_state(image_id).regions)
                keys = {r.key for r in regions}
                missing = sorted((set(update) | set(remove)) - keys)
                if missing:
                    raise StoreError(f"Region(s) {missing} do not exist on image {image_id} (reload the page).")
                regions = [r for r in regions if r.key not in set(remove)]
                for i, region in enumerate(regions):
                    if region.key not in update:
                        continue
                    change = update[region.key]
                    mask_id, bbox = region.mask_id, region.bbox
                    if region.key in encoded_upd:
                        enc = encoded_upd[region.key]
                        enc = (NewMask(mask=enc[0].mask, author=change.get("author", region.author),
                                       class_name=change.get("class_name", region.class_name),
                                       caption=change.get("caption", region.caption),
                                       params={"origin": "label"}),) + enc[1:]
                        mask_id = self._insert_mask(image, enc, created)
                        bbox = _bbox(enc[0].mask)
                    regions[i] = LabelRegion(key=region.key, mask_id=mask_id, bbox=bbox,
                                             class_name=change.get("class_name", region.class_name),
                                             caption=change.get("caption", region.caption),
                                             author=change.get("author", region.author))
                number = self._last_region_number(image_id, regions)
                for enc in encoded_new:
                    mask_id = self._insert_mask(image, enc, created)
                    number += 1
                    regions.append(LabelRegion(key=f"r{number}", mask_id=mask_id, class_name=enc[0].class_name,
                                               caption=enc[0].caption, author=enc[0].author, bbox=_bbox(enc[0].mask)))
                self._push_state(image_id, regions, action)
                self._touch(image.session_id)
        except BaseException:
            self._remove_created(created)
            raise
        return self.label_state(image_id)

    def _last_region_number(self, image_id: int, current: list[LabelRegion]) -> int:
        """The highest N of the keys "rN" this image ever had: new regions are numbered per image (r1, r2, ...)
        and a key is never reused, so undo/redo and history stay unambiguous."""
        keys = {r.key for r in current}
        for (text,) in self._conn.execute("SELECT regions FROM label_states WHERE image_id = ?", (image_id,)):
            keys.update(str(r.get("key", "")) for r in json.loads(text))
        return max([int(k[1:]) for k in keys if k.startswith("r") and k[1:].isdecimal()] or [0])

    def mark_reviewed(self, image_id: int) -> LabelState:
        """Record the current regions (possibly none: "no artifacts") as a labelled state."""
        with self._tx():
            image = self.get_image(image_id)
            self._push_state(image_id, list(self.label_state(image_id).regions), "reviewed")
            self._touch(image.session_id)
        return self.label_state(image_id)

    def undo(self, image_id: int) -> LabelState:
        """Move the image's head one edit back (no-op at the start); survives restarts."""
        return self._move_head(image_id, -1)

    def redo(self, image_id: int) -> LabelState:
        return self._move_head(image_id, +1)

    def _move_head(self, image_id: int, step: int) -> LabelState:
        with self._tx():
            self.get_image(image_id)
            head = self._head(image_id)
            last = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM label_states WHERE image_id = ?",
                                      (image_id,)).fetchone()[0]
            new = min(max(head + step, 0), last)
            self.db.execute("INSERT INTO label_heads (image_id, seq) VALUES (?, ?) "
                            "ON CONFLICT(image_id) DO UPDATE SET seq = excluded.seq", (image_id, new))
        return self.label_state(image_id)

    def label_progress(self, session_id: int | str) -> tuple[int, int]:
        """(labelled, total) images of a session; labelled = edited/reviewed in Label or has a final mask."""
        with self._lock:
            sid = self._session_id(session_id)
            total = self._conn.execute("SELECT COUNT(*) FROM images WHERE session_id = ?", (sid,)).fetchone()[0]
            done = self._conn.execute(
                "SELECT COUNT(*) FROM images i WHERE i.session_id = ? AND (EXISTS (SELECT 1 FROM label_heads h "
                "WHERE h.image_id = i.id AND h.seq > 0) OR EXISTS (SELECT 1 FROM masks m WHERE m.image_id = i.id "
                "AND m.status = 'final'))", (sid,)).fetchone()[0]
            return int(done), int(total)

    def is_labelled(self, image_id: int) -> bool:
        with self._lock:
            return self._head(image_id) > 0 or self._conn.execute(
                "SELECT 1 FROM masks WHERE image_id = ? AND status = 'final' LIMIT 1", (image_id,)).fetchone() is not None

    def class_counts(self, session_id: int | str) -> dict[str | None, int]:
        """Current regions of the session per class name (None = no class), most frequent first."""
        with self._lock:
            sid = self._session_id(session_id)
            ids = [r[0] for r in self._conn.execute("SELECT id FROM images WHERE session_id = ?", (sid,))]
            counts: dict[str | None, int] = {}
            for image_id in ids:
                for region in self.label_state(image_id).regions:
                    counts[region.class_name] = counts.get(region.class_name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] or "")))

    def session_taxonomy(self, session_id: int | str, default: list[dict]) -> list[dict]:
        """The session's classes [{"name", "definition"}], or `default` if it has none of its own."""
        with self._lock:
            sid = self._session_id(session_id)
            row = self._conn.execute("SELECT classes FROM taxonomies WHERE session_id = ?", (sid,)).fetchone()
            return json.loads(row[0]) if row else list(default)

    def set_session_taxonomy(self, session_id: int | str, classes: list[dict]) -> None:
        """Replace the session's classes; each needs a unique non-empty "name" (and a "definition"). Names
        are checked and cleaned like session names (`check_name`); unique after cleaning."""
        names = [c["name"].strip() if isinstance(c, dict) and isinstance(c.get("name"), str) else ""
                 for c in classes]
        if not classes or any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError("A taxonomy needs at least one class, each with a unique, non-empty name.")
        names = [check_name(n, f"Class name {n!r}") for n in names]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:  # e.g. "hand" and "hand" + an invisible character
            raise ValueError(f"The class name {twice!r} appears twice (invisible characters are ignored); "
                             "class names must be unique.")
        clean = [{"name": n, "definition": str(c.get("definition", "")).strip()} for n, c in zip(names, classes)]
        with self._tx():
            sid = self._session_id(session_id)
            self.db.execute("INSERT INTO taxonomies (session_id, classes, updated_at) VALUES (?, ?, ?) "
                            "ON CONFLICT(session_id) DO UPDATE SET classes = excluded.classes, "
                            "updated_at = excluded.updated_at", (sid, json.dumps(clean), utc_now()))

    # ------------------------------------------------------------ jobs
    def create_job(self, kind: str, params: dict, session_id: int | None = None) -> JobRecord:
        """Insert a queued job; returns it."""
        params_json = _to_json(params, "params")
        with self._tx():
            if session_id is not None:
                session_id = self._session_id(session_id)
            job_id = int(self.db.table("jobs").insert({
                "kind": kind, "status": "queued", "params": params_json, "session_id": session_id,
                "created_at": utc_now()}).last_pk)
        return self.get_job(job_id)


    def get_job(self, job_id: int) -> JobRecord:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM jobs WHERE id = ?", (int(job_id),)))
        if not rows:
            raise StoreError(f"Unknown job {job_id!r}; `artifact-studio jobs` lists them.")
        return _job_record(rows[0])


    def list_jobs(self, status: str | None = None) -> list[JobRecord]:
        """Jobs, newest first (optionally of one status)."""
        sql, args = "SELECT * FROM jobs", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._lock:
            return [_job_record(r) for r in self.db.query(sql + " ORDER BY id DESC", args)]


    def update_job(self, job_id: int, **fields: Any) -> JobRecord:
        """Set job fields (status, pid, started_at, finished_at, error, log_path, out_dir, result)."""
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise ValueError(f"Unknown job field(s) {sorted(unknown)}.")
        if "status" in fields and fields["status"] not in JOB_STATUSES:
            raise ValueError(f"Job status {fields['status']!r} is not one of {list(JOB_STATUSES)}.")
        if "result" in fields:
            fields["result"] = _to_json(fields["result"], "result")
        with self._tx():
            self.get_job(job_id)
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), int(job_id)))
        return self.get_job(job_id)


    def add_job_metric(self, job_id: int, row: dict) -> None:
        """One metrics row {step, loss, miou, lr, ...}; the whole row is kept as JSON too.

        A row with a "step" replaces the job's rows of that step and later ones: a resumed job logs
        again from its checkpoint's step, and its history must not hold those steps twice."""
        row_json = _to_json(row, "row")
        with self._tx():
            if "step" in row:
                self.db.execute("DELETE FROM job_metrics WHERE job_id = ? AND step >= ?",
                                (int(job_id), int(row["step"])))
            self.db.table("job_metrics").insert({
                "job_id": int(job_id), "step": int(row.get("step", 0)), "loss": row.get("loss"),
                "miou": row.get("miou"), "lr": row.get("lr"), "row": row_json, "created_at": utc_now()})

    def job_metrics(self, job_id: int) -> list[dict]:
        with self._lock:
            return [json.loads(r["row"]) for r in self.db.query(
                "SELECT row FROM job_metrics WHERE job_id = ? ORDER BY id", (int(job_id),))]


def _job_record(row: dict) -> JobRecord:
    return JobRecord(**dict(row, params=json.loads(row["params"]), result=json.loads(row["result"] or "{}")))


_JOB_FIELDS = {"status", "log_path", "pid", "started_at", "finished_at", "error", "out_dir", "result"}


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _region_from_json(row: dict) -> LabelRegion:
    return LabelRegion(key=row["key"], mask_id=int(row["mask_id"]), class_name=row.get("class_name"),
                       caption=row.get("caption"), author=row["author"],
                       bbox=None if row.get("bbox") is None else tuple(row["bbox"]))
