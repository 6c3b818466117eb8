"""`artifact-studio doctor [--fix] [--verify]`: check a data directory and repair what is safe.

Checks (each finding is one sentence):

- ``integrity``: SQLite's ``PRAGMA integrity_check`` (``quick_check`` at start-up) and foreign keys.
- ``temp``: temporary files left under ``files/`` by a killed process (``.tmp-*``). Fixed: removed.
- ``orphan``: content files under ``files/`` that no row refers to (a killed import). Fixed: removed.
- ``stray``: other files under ``files/`` (not ``<sha256>.png``). Reported only.
- ``missing``: image, mask and heatmap rows whose file is gone. Reported only (restore the file from
  a backup, or delete the session/image); never deleted automatically.
- ``damaged`` (with ``--verify``): files whose bytes no longer match their sha256. Reported only.
- ``interrupted``: jobs marked running whose process is gone. Fixed: marked interrupted (resumable).
- ``duplicate-metrics``: several metric rows of one job for the same step (a resumed job before this
  was fixed). Fixed: the newest row of each step is kept.
- ``staging``: leftover export staging folders (``.<name>.export-*``) in the exports folder, older
  than an hour. Fixed: removed.

The file checks run while holding the database write lock: any writer stores its files inside its
own write transaction, so a file without a row seen under the lock is truly left over, never one
that a running command is about to commit.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from studio.store.store import TEMP_PREFIX, Store

_CONTENT_NAME = re.compile(r"[0-9a-f]{64}\.png")
STAGING_AGE_S = 3600


@dataclass(frozen=True)
class Finding:
    """One problem: `kind` (see the module doc), a one-sentence `detail`, and whether it was fixed."""
    kind: str
    detail: str
    fixed: bool = False


@dataclass(frozen=True)
class DoctorReport:
    findings: tuple[Finding, ...]
    checked_files: int

    @property
    def remaining(self) -> list[Finding]:
        return [f for f in self.findings if not f.fixed]

    def to_json(self) -> dict:
        return {"checked_files": self.checked_files, "findings": [asdict(f) for f in self.findings],
                "remaining": len(self.remaining)}


def run_doctor(store: Store, *, fix: bool = False, verify: bool = False, quick: bool = False,
               fix_only: tuple[str, ...] | None = None, exports_dir: Path | None = None) -> DoctorReport:
    """Check the store (see the module doc); with `fix`, repair what is safe (`fix_only`: only those
    kinds). `quick` uses quick_check instead of the full integrity check."""
    findings: list[Finding] = []

    def may_fix(kind: str) -> bool:
        return fix and (fix_only is None or kind in fix_only)

    pragma = "quick_check" if quick else "integrity_check"
    rows = [r[0] for r in store.db.execute(f"PRAGMA {pragma}").fetchall()]
    if rows != ["ok"]:
        for text in rows[:10]:
            findings.append(Finding("integrity", f"The database reports: {text}."))
    for table, rowid, parent, _ in store.db.execute("PRAGMA foreign_key_check").fetchall()[:10]:
        findings.append(Finding("integrity", f"Row {rowid} of {table} refers to a missing row of {parent}."))

    checked = 0
    with store.transaction():  # the write lock: no writer is between writing a file and committing its row
        referenced = _referenced(store)
        files_dir = store.files_dir
        on_disk: dict[str, Path] = {}
        for path in sorted(files_dir.rglob("*")) if files_dir.is_dir() else []:
            if path.is_dir():
                continue
            rel = path.relative_to(store.data_dir).as_posix()
            if path.name.startswith(TEMP_PREFIX):
                fixed = may_fix("temp") and _unlink(path)
                findings.append(Finding("temp", f"Leftover temporary file {rel} (from an interrupted write).", fixed))
            elif _CONTENT_NAME.fullmatch(path.name) and path.parent.name == path.name[:2]:
                on_disk[path.name[:-4]] = path
            else:
                findings.append(Finding("stray", f"Unexpected file {rel} in the content folder (not made by the store)."))
        checked = len(on_disk)
        for sha, path in sorted(on_disk.items()):
            if sha not in referenced:
                rel = path.relative_to(store.data_dir).as_posix()
                fixed = may_fix("orphan") and _unlink(path)
                findings.append(Finding("orphan", f"Content file {rel} belongs to no image, mask or heatmap "
                                                  "(left by an interrupted command).", fixed))
        for sha, (what, rel) in sorted(referenced.items(), key=lambda kv: kv[1]):
            if sha not in on_disk:
                findings.append(Finding("missing", f"The file of {what} is missing ({rel}); restore it from a backup "
                                                   "or delete that item."))
            elif verify and _sha256(on_disk[sha]) != sha:
                findings.append(Finding("damaged", f"The file of {what} is damaged: {rel} no longer matches its "
                                                   "checksum; restore it from a backup."))
        if may_fix("orphan") or may_fix("temp"):
            for folder in sorted(files_dir.glob("*"), reverse=True) if files_dir.is_dir() else []:
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        for job_id, step, count in store.db.execute(
                "SELECT job_id, step, COUNT(*) FROM job_metrics GROUP BY job_id, step HAVING COUNT(*) > 1 "
                "ORDER BY job_id, step").fetchall():
            fixed = False
            if may_fix("duplicate-metrics"):
                store.db.execute("DELETE FROM job_metrics WHERE job_id = ? AND step = ? AND id < "
                                 "(SELECT MAX(id) FROM job_metrics WHERE job_id = ? AND step = ?)",
                                 (job_id, step, job_id, step))
                fixed = True
            findings.append(Finding("duplicate-metrics", f"Job {job_id} has {count} metric rows for step {step}.", fixed))
    findings += _interrupted_jobs(store, may_fix("interrupted"))
    findings += _staging_leftovers(exports_dir or store.data_dir / "exports", may_fix("staging"))
    return DoctorReport(findings=tuple(findings), checked_files=checked)


def startup_check(store: Store, exports_dir: Path | None = None) -> str:
    """The cheap part, run when the server starts: quick integrity check, leftover temporary files
    and export staging folders removed, everything else counted. Returns one line to print."""
    report = run_doctor(store, fix=True, quick=True, fix_only=("temp", "staging"), exports_dir=exports_dir)
    fixed = [f for f in report.findings if f.fixed]
    remaining = report.remaining
    parts = []
    if fixed:
        parts.append(f"removed {len(fixed)} leftover temporary file(s)")
    if remaining:
        kinds: dict[str, int] = {}
        for f in remaining:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        parts.append(", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
                     + " problem(s) remain: run `artifact-studio doctor` for details")
    status = "; ".join(parts) if parts else "no problems"
    return f"Data check ({report.checked_files} content files): {status}."


def _referenced(store: Store) -> dict[str, tuple[str, str]]:
    """sha256 -> (what refers to it, its relative path) for every file a row refers to."""
    out: dict[str, tuple[str, str]] = {}
    queries = (("image", "SELECT id, sha256, path FROM images"),
               ("mask", "SELECT id, sha256, path FROM masks"),
               ("raw map of mask", "SELECT id, raw_sha256, raw_path FROM masks WHERE raw_sha256 IS NOT NULL"),
               ("heatmap", "SELECT id, sha256, path FROM heatmaps"))
    for what, sql in queries:
        for row_id, sha, rel in store.db.execute(sql).fetchall():
            out.setdefault(sha, (f"{what} {row_id}", rel))
    return out


def _interrupted_jobs(store: Store, fix: bool) -> list[Finding]:
    from studio.jobs import JobManager, process_alive

    if fix:
        return [Finding("interrupted", f"Job {job_id} was running but its process is gone; it is now marked "
                                       "interrupted (resume it from the Train tab or with --resume).", True)
                for job_id in JobManager(store).recover()]
    return [Finding("interrupted", f"Job {job.id} is marked running but its process is gone.")
            for job in store.list_jobs("running") if job.pid is None or not process_alive(job.pid, job.id)]


def _staging_leftovers(exports_dir: Path, fix: bool) -> list[Finding]:
    findings = []
    if not exports_dir.is_dir():
        return findings
    now = time.time()
    for folder in sorted(exports_dir.rglob(".*.export-*")):
        if folder.is_dir() and now - folder.stat().st_mtime > STAGING_AGE_S:
            fixed = False
            if fix:
                shutil.rmtree(folder, ignore_errors=True)
                fixed = not folder.exists()
            findings.append(Finding("staging", f"Leftover export staging folder {folder} (an interrupted export).",
                                    fixed))
    return findings


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_report(report: DoctorReport, fix: bool) -> list[str]:
    """Lines for the CLI: one per finding, then a summary."""
    lines = [("fixed: " if f.fixed else "problem: ") + f.detail for f in report.findings]
    remaining = len(report.remaining)
    fixed = len(report.findings) - remaining
    summary = f"checked {report.checked_files} content file(s): "
    if not report.findings:
        summary += "no problems."
    else:
        summary += f"{fixed} fixed, {remaining} remaining"
        if remaining and not fix and any(f.kind in ("temp", "orphan", "interrupted", "duplicate-metrics", "staging")
                                         for f in report.remaining):
            summary += " (`artifact-studio doctor --fix` repairs what is safe)"
        summary += "."
    return lines + [summary]


def report_json(report: DoctorReport) -> str:
    return json.dumps(report.to_json(), indent=2)
