"""The store's SQLite schema as numbered migrations (MIGRATIONS[k] takes a database from version k to
k+1; never edit a shipped one, add the next), and the value sets its CHECK constraints allow.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Callable

import sqlite_utils


IMAGE_SOURCES = ("generated", "uploaded", "corrupted", "repaired", "sample")
MASK_AUTHORS = ("human", "sam-assisted", "detector", "synthetic", "classifier-assisted")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def utc_now() -> str:
    """Now as ISO-8601 UTC with microseconds (every timestamp of the store)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _m1_initial(db: sqlite_utils.Database) -> None:
    statuses = ", ".join(f"'{s}'" for s in JOB_STATUSES)
    sources = ", ".join(f"'{s}'" for s in IMAGE_SOURCES)
    authors = ", ".join(f"'{a}'" for a in MASK_AUTHORS)
    for sql in [
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE,
            created_at TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            prompt TEXT NOT NULL, negative_prompt TEXT, seed INTEGER, num_inference_steps INTEGER,
            guidance_scale REAL, width INTEGER, height INTEGER, count INTEGER NOT NULL,
            model_id TEXT, params TEXT NOT NULL DEFAULT '{}', duration_s REAL,
            created_at TEXT NOT NULL)""",
        f"""CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, path TEXT NOT NULL,
            width INTEGER NOT NULL, height INTEGER NOT NULL,
            source TEXT NOT NULL CHECK (source IN ({sources})),
            parent_id INTEGER REFERENCES images(id) ON DELETE SET NULL,
            generation_id INTEGER REFERENCES generations(id) ON DELETE SET NULL,
            model_id TEXT, params TEXT NOT NULL DEFAULT '{{}}', original_name TEXT,
            created_at TEXT NOT NULL)""",
        f"""CREATE TABLE masks (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, path TEXT NOT NULL,
            author TEXT NOT NULL CHECK (author IN ({authors})),
            class_name TEXT, caption TEXT, bbox TEXT, version INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL)""",
        f"""CREATE TABLE jobs (
            id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN ({statuses})),
            params TEXT NOT NULL DEFAULT '{{}}', log_path TEXT, pid INTEGER,
            created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, error TEXT)""",
        "CREATE INDEX idx_images_session_id ON images(session_id)",
        "CREATE INDEX idx_images_sha256 ON images(sha256)",
        "CREATE INDEX idx_images_parent_id ON images(parent_id)",
        "CREATE INDEX idx_images_generation_id ON images(generation_id)",
        "CREATE INDEX idx_generations_session_id ON generations(session_id)",
        "CREATE INDEX idx_masks_image_id ON masks(image_id)",
        "CREATE INDEX idx_masks_sha256 ON masks(sha256)",
        "CREATE INDEX idx_jobs_status ON jobs(status)",
    ]:
        db.execute(sql)


def _m2_detection(db: sqlite_utils.Database) -> None:
    """Detector runs, stored heatmaps, draft masks and raw (non-binary) label maps."""
    for sql in [
        """CREATE TABLE detector_runs (
            id INTEGER PRIMARY KEY, detector_id TEXT NOT NULL, family TEXT NOT NULL,
            is_demo INTEGER NOT NULL DEFAULT 0, params TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)""",
        """CREATE TABLE heatmaps (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            run_id INTEGER NOT NULL REFERENCES detector_runs(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, path TEXT NOT NULL, created_at TEXT NOT NULL)""",
        "CREATE INDEX idx_heatmaps_image_id ON heatmaps(image_id)",
        "CREATE INDEX idx_heatmaps_sha256 ON heatmaps(sha256)",
        "ALTER TABLE masks ADD COLUMN status TEXT NOT NULL DEFAULT 'final' CHECK (status IN ('draft', 'final'))",
        "ALTER TABLE masks ADD COLUMN raw_sha256 TEXT",
        "ALTER TABLE masks ADD COLUMN raw_path TEXT",
        "ALTER TABLE masks ADD COLUMN params TEXT NOT NULL DEFAULT '{}'",
    ]:
        db.execute(sql)


def _m3_labels(db: sqlite_utils.Database) -> None:
    """Label states (the regions of an image after each edit, for persistent undo/redo), the head
    state per image, and per-session taxonomies."""
    for sql in [
        """CREATE TABLE label_states (
            id INTEGER PRIMARY KEY,
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL, regions TEXT NOT NULL, action TEXT NOT NULL, created_at TEXT NOT NULL,
            UNIQUE (image_id, seq))""",
        """CREATE TABLE label_heads (
            image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE, seq INTEGER NOT NULL)""",
        """CREATE TABLE taxonomies (
            session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
            classes TEXT NOT NULL, updated_at TEXT NOT NULL)""",
    ]:
        db.execute(sql)


def _m4_jobs(db: sqlite_utils.Database) -> None:
    """Jobs know their session, output folder and result; metrics rows per job."""
    for sql in [
        "ALTER TABLE jobs ADD COLUMN session_id INTEGER REFERENCES sessions(id) ON DELETE SET NULL",
        "ALTER TABLE jobs ADD COLUMN out_dir TEXT",
        "ALTER TABLE jobs ADD COLUMN result TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE job_metrics (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            step INTEGER NOT NULL, loss REAL, miou REAL, lr REAL, row TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL)""",
        "CREATE INDEX idx_job_metrics_job_id ON job_metrics(job_id)",
    ]:
        db.execute(sql)


def _m5_captions(db: sqlite_utils.Database) -> None:
    """Images carry a caption (used to invert and resample them); generated images get their prompt."""
    db.execute("ALTER TABLE images ADD COLUMN caption TEXT")
    db.execute("UPDATE images SET caption = (SELECT prompt FROM generations WHERE generations.id = images.generation_id) "
               "WHERE generation_id IS NOT NULL")


def _m6_session_ids(db: sqlite_utils.Database) -> None:
    """Session ids are never reused. SQLite gives a new row MAX(id) + 1, so deleting the newest session
    would hand its id to the next one (a script holding the old id would write into the wrong session).
    `id_high_water` keeps the highest id ever given, kept up by a trigger on every insert; new sessions
    take the next id after it (Store.create_session)."""
    for sql in [
        "CREATE TABLE id_high_water (name TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
        "INSERT INTO id_high_water (name, last_id) VALUES ('sessions', COALESCE((SELECT MAX(id) FROM sessions), 0))",
        """CREATE TRIGGER sessions_high_water AFTER INSERT ON sessions BEGIN
            UPDATE id_high_water SET last_id = MAX(last_id, NEW.id) WHERE name = 'sessions'; END""",
    ]:
        db.execute(sql)


# The default taxonomy before _m7_taxonomy (assets/taxonomy_studio_v1.json), frozen here as that migration saw it.
_STUDIO_V1_CLASSES = [
    ("distortion", "A body part, face, animal or object is deformed: wrong shape, melted, twisted or warped."),
    ("omission", "Something that should be there is missing: fingers, limbs, an eye, part of an object."),
    ("duplication", "A part or object is repeated where it should appear once: extra fingers, limbs, heads or copies."),
    ("fusion", "Two separate things are merged into one: fingers fused, a person blended into furniture."),
    ("illegible-text", "Letters, numbers or symbols are garbled, misspelled or meaningless."),
    ("proportion", "Relative sizes are wrong: a tiny hand, an oversized head, a giant cup."),
    ("structure", "Impossible geometry or perspective: lines that do not meet, impossible architecture, floating parts."),
    ("texture", "Unnatural texture: smeared, plastic, repetitive or patchy surface detail."),
    ("blur", "A local region is blurred or lacks detail compared with its surroundings."),
    ("noise", "Noise, grain, blotches or checkerboard patterns that do not belong to the scene."),
    ("color", "Unnatural colour: colour bleeding, wrong skin tone, oversaturated or banded patches."),
    ("lighting", "Light is inconsistent: highlights or shading from a direction that contradicts the scene."),
    ("shadow-reflection", "A shadow or reflection is missing, misplaced or does not match its object."),
]


def _m7_taxonomy(db: sqlite_utils.Database) -> None:
    """The default taxonomy became SynArtifact's: every existing session that used the implicit old default
    gets an explicit copy of it, so its classes do not change. Mask authors gain "classifier-assisted"
    (the masks table is rebuilt with the wider CHECK, columns, rows, ids and indexes kept)."""
    classes = json.dumps([{"name": n, "definition": d} for n, d in _STUDIO_V1_CLASSES])
    db.execute("INSERT INTO taxonomies (session_id, classes, updated_at) SELECT id, ?, ? FROM sessions "
               "WHERE id NOT IN (SELECT session_id FROM taxonomies)", (classes, utc_now()))
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'masks'").fetchone()
    authors = ", ".join(f"'{a}'" for a in MASK_AUTHORS)
    wider = re.sub(r"CHECK \(author IN \([^)]*\)\)", f"CHECK (author IN ({authors}))", sql)
    if wider == sql:
        return
    indexes = [r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'masks' "
                                        "AND sql IS NOT NULL").fetchall()]
    db.execute(re.sub(r"^CREATE TABLE \"?masks\"?", "CREATE TABLE masks_m7", wider, count=1))
    db.execute("INSERT INTO masks_m7 SELECT * FROM masks")
    db.execute("DROP TABLE masks")
    db.execute("ALTER TABLE masks_m7 RENAME TO masks")
    for index in indexes:
        db.execute(index)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m1_initial, _m2_detection, _m3_labels, _m4_jobs,
                                                             _m5_captions, _m6_session_ids, _m7_taxonomy]
