"""The jobs table (params and result as JSON text) and each job's metrics rows: the `JobsMixin` part of `Store`.

Its methods use what studio.store.store.Store defines (`db`, `_lock`, `_tx`) and `_session_id` of
studio.store.images. Imports studio.store.checks, studio.store.records and studio.store.schema.
"""

from __future__ import annotations

import json
from typing import Any

from studio.store.checks import to_json
from studio.store.records import JobRecord, StoreError
from studio.store.schema import JOB_STATUSES, utc_now


class JobsMixin:
    """Jobs and their metrics of a `Store`."""

    def create_job(self, kind: str, params: dict, session_id: int | None = None) -> JobRecord:
        """Insert a queued job; returns it."""
        params_json = to_json(params, "params")
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
            fields["result"] = to_json(fields["result"], "result")
        with self._tx():
            self.get_job(job_id)
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), int(job_id)))
        return self.get_job(job_id)


    def add_job_metric(self, job_id: int, row: dict) -> None:
        """One metrics row {step, loss, miou, lr, ...}; the whole row is kept as JSON too.

        A row with a "step" replaces the job's rows of that step and later ones: a resumed job logs
        again from its checkpoint's step, and its history must not hold those steps twice."""
        row_json = to_json(row, "row")
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
