"""Jobs: a real training subprocess, cancel with a usable checkpoint, interrupted detection, resume."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engines.detectors import load_detector
from studio.jobs import JobManager
from studio.store import NewImage, NewMask, Store

CONFIG = {"arch": "tiny", "steps": 400, "batch_size": 2, "crop": 32, "lr": 1e-3, "eval_every": 5, "seed": 0}


def labelled_session(store: Store) -> int:
    session = store.create_session("train")
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), bool)
        mask[8 + i:16 + i, 8:16] = True
        rgb[mask] = (255, 0, 255)
        items.append(NewImage(rgb=rgb, source="uploaded", original_name=f"{i}.png",
                              masks=(NewMask(mask=mask, author="human"),)))
    store.add_images(session.id, items)
    return session.id


def wait_for(predicate, seconds: float = 180.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_job_runs_cancels_with_checkpoint_and_resumes(tmp_path):
    store = Store(tmp_path)
    manager = JobManager(store)
    job = manager.launch("detector", {"config": CONFIG, "seed": 0}, labelled_session(store))
    assert job.status == "running" and job.pid
    wait_for(lambda: len(store.job_metrics(job.id)) >= 2)
    manager.cancel(job.id)
    wait_for(lambda: store.get_job(job.id).status in ("cancelled", "failed", "succeeded"))
    done = store.get_job(job.id)
    assert done.status == "cancelled", done.error
    last = done.result["last_dir"]
    assert load_detector(last, data_dir=tmp_path).extra.family  # the checkpoint is usable as a detector spec
    steps_before = done.result["steps_done"]
    assert 0 < steps_before < CONFIG["steps"]
    again = manager.resume(job.id)
    assert again.status == "running"
    n = len(store.job_metrics(job.id))
    wait_for(lambda: len(store.job_metrics(job.id)) > n or store.get_job(job.id).status != "running")
    manager.cancel(job.id)
    wait_for(lambda: store.get_job(job.id).status != "running")
    assert store.get_job(job.id).result["steps_done"] >= steps_before
    store.close()


def test_killed_job_is_marked_interrupted_and_queue_moves_on(tmp_path):
    store = Store(tmp_path)
    manager = JobManager(store)
    sid = labelled_session(store)
    first = manager.launch("detector", {"config": CONFIG, "seed": 0}, sid)
    second = manager.launch("detector", {"config": CONFIG, "seed": 1}, sid)
    assert store.get_job(second.id).status == "queued"  # one job at a time
    manager.kill(first.id)
    wait_for(lambda: bool(manager.recover()) or store.get_job(first.id).status != "running")
    assert store.get_job(first.id).status == "interrupted"
    # A fresh manager (an app restart) sees the same state and starts the queued job.
    restarted = JobManager(Store(tmp_path))
    restarted.start_next()
    assert restarted.store.get_job(second.id).status == "running"
    restarted.cancel(second.id)
    wait_for(lambda: restarted.store.get_job(second.id).status != "running")
    with pytest.raises(ValueError):
        restarted.cancel(first.id)
    store.close()
