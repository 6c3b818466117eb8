"""Sessions, images (RGB uint8 HWC, stored as PNG) with their generations, and detector runs with their
heatmaps (float32 [H, W] in [0, 1], stored as 16-bit grey PNGs): the `ImagesMixin` part of `Store`.

Its methods use what studio.store.store.Store defines (`_conn`, `db`, `_lock`, `_tx`, `_put_file`,
`_file_path`, `_remove_created`, `_read_stored`, `_data_dir`) and `_insert_mask` of studio.store.labels.
Imports studio.store.checks, studio.store.records and studio.store.schema.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.store.checks import check_name, check_optional, encode_mask, png_bytes, to_json
from studio.store.records import GenerationRecord, HeatmapRecord, ImageRecord, NewImage, SessionInfo, StoreError
from studio.store.schema import IMAGE_SOURCES, utc_now

GENERATION_KEYS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
                   "width", "height", "count", "model_id", "params", "duration_s")
MAX_CAPTION_LENGTH = 10_000
_INT, _REAL = (int, np.integer), (float, int, np.integer, np.floating)
_GENERATION_TYPES = {"prompt": (str,), "negative_prompt": (str,), "model_id": (str,), "params": (dict,),
                     "seed": _INT, "num_inference_steps": _INT, "width": _INT, "height": _INT,
                     "count": _INT, "guidance_scale": _REAL, "duration_s": _REAL}

_FILE_REFERENCES = ("SELECT 1 FROM images WHERE sha256 = :sha UNION ALL SELECT 1 FROM masks WHERE sha256 = :sha "
                    "UNION ALL SELECT 1 FROM masks WHERE raw_sha256 = :sha "
                    "UNION ALL SELECT 1 FROM heatmaps WHERE sha256 = :sha LIMIT 1")


def _check_caption(what: str, caption: Any) -> None:
    check_optional(what, caption, str)
    if caption is not None and len(caption) > MAX_CAPTION_LENGTH:
        raise ValueError(f"{what} is {len(caption)} characters long; at most {MAX_CAPTION_LENGTH} are accepted.")


def _check_rgb(rgb: Any, index: int) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        got = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"Image {index}: rgb must be a uint8 numpy array of shape (H, W, 3), got {got}.")


class ImagesMixin:
    """Sessions, images, generations, detector runs and heatmaps of a `Store`."""

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
        row.update(session_id=session_id, params=to_json(row.get("params", {}), "generation['params']"),
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
            check_optional(f"Image {i}: parent_id", item.parent_id, int)
            check_optional(f"Image {i}: model_id", item.model_id, str)
            check_optional(f"Image {i}: original_name", item.original_name, str)
            _check_caption(f"Image {i}: caption", item.caption)
            params = to_json(item.params, f"Image {i}: params")
            masks = [encode_mask(m, f"Image {i}: mask {j}") for j, m in enumerate(item.masks)]
            data = png_bytes(Image.fromarray(np.ascontiguousarray(item.rgb)))
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

    def get_generation(self, generation_id: int) -> GenerationRecord:
        with self._lock:
            rows = list(self.db.query("SELECT * FROM generations WHERE id = ?", (generation_id,)))
            if not rows:
                raise StoreError(f"Unknown generation id {generation_id!r}.")
            return GenerationRecord(**dict(rows[0], params=json.loads(rows[0]["params"])))

    # ------------------------------------------------------------ detector runs and heatmaps
    def add_detector_run(self, detector_id: str, family: str, is_demo: bool, params: dict | None = None,
                         heatmaps: list[tuple[int, np.ndarray]] = ()) -> tuple[int, list[int]]:
        """Record one detector run and its heatmaps [(image_id, float32 [H, W] in [0, 1])] atomically.

        Heatmaps are stored as 16-bit grey PNGs (score * 65535). Returns (run_id, heatmap ids).
        """
        params_json = to_json(params or {}, "params")
        encoded = []
        for image_id, scores in heatmaps:
            if not isinstance(scores, np.ndarray) or scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
                raise ValueError(f"Heatmap of image {image_id}: scores must be a float array of shape (H, W).")
            if not np.isfinite(scores).all():
                raise ValueError(f"Heatmap of image {image_id}: scores contain NaN or infinite values.")
            data = png_bytes(Image.fromarray(np.round(np.clip(scores, 0, 1) * 65535).astype(np.uint16)))
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
