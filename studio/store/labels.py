"""Masks (bool[H, W], stored as 1-bit PNGs), label regions with persistent undo/redo, and session taxonomies:
the `LabelsMixin` part of `Store`.

Its methods use what studio.store.store.Store defines (`_conn`, `db`, `_lock`, `_tx`, `_put_file`,
`_remove_created`, `_read_stored`, `_data_dir`) and `_session_id`, `_touch`, `get_image` of studio.store.images.
Imports studio.store.checks, studio.store.records and studio.store.schema.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from studio.store.checks import check_name, check_optional, encode_mask
from studio.store.records import ImageRecord, LabelRegion, LabelState, MaskRecord, NewMask, StoreError
from studio.store.schema import MASK_AUTHORS, utc_now


class LabelsMixin:
    """Masks, label regions (undo/redo) and taxonomies of a `Store`."""

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
        encoded = encode_mask(new, "mask")
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
        encoded_new = [encode_mask(m, f"new region {i}") for i, m in enumerate(add)]
        encoded_upd = {}
        for key, change in update.items():
            unknown = set(change) - {"mask", "class_name", "caption", "author"}
            if unknown:
                raise ValueError(f"Region {key}: unknown field(s) {sorted(unknown)}.")
            if "author" in change and change["author"] not in MASK_AUTHORS:
                raise ValueError(f"Region {key}: author {change['author']!r} is not one of {list(MASK_AUTHORS)}.")
            for name in ("class_name", "caption"):
                if name in change:
                    check_optional(f"Region {key}: {name}", change[name], str)
            if "mask" in change:
                current = change.get("author", "human")
                encoded_upd[key] = encode_mask(NewMask(mask=change["mask"], author=current,
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


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    return None if xs.size == 0 else (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _region_from_json(row: dict) -> LabelRegion:
    return LabelRegion(key=row["key"], mask_id=int(row["mask_id"]), class_name=row.get("class_name"),
                       caption=row.get("caption"), author=row["author"],
                       bbox=None if row.get("bbox") is None else tuple(row["bbox"]))
