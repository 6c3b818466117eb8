"""Nothing half-applied: fault injection (full disk, an exception mid-write, a failing COMMIT, kill -9)
per command, each comparing the database dump and the file tree before and after; parallel writers;
the store's nested transactions; resumed-job metrics; doctor."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from snapshots import db_dump, file_tree, snapshot
from studio.store.checks import check_name
from studio.store.records import NewImage, NewMask
from studio.store.store import Store, StoreError

ROOT = Path(__file__).resolve().parents[2]
GEN = ["--prompt", "x", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64"]


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), [ln for ln in captured.err.splitlines() if ln.strip()]


def full_disk(path="x") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def fail_on_call(monkeypatch, owner, name: str, n: int, error: BaseException) -> list:
    """Make owner.name raise `error` on its n-th call (1-based); returns the call log."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise error
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture
def data(tmp_path, demo_dir) -> Path:
    """A data dir with the demo pipeline and a session "s" of three labelled-able images."""
    from engines.detection.detectors import ensure_demo_detector

    target = tmp_path / "data"
    shutil.copytree(demo_dir, target / "models" / "demo-sd")
    ensure_demo_detector(target)
    with Store(target) as store:
        store.add_images(store.create_session("s").id,
                         [NewImage(rgb=noise(40, 56, i), source="uploaded", original_name=f"im{i}.png")
                          for i in range(3)])
    return target


def mask_folder(tmp_path: Path, store_dir: Path) -> Path:
    """A png mask folder matching every image of session "s" by name."""
    folder = tmp_path / "masks"
    folder.mkdir()
    with Store(store_dir) as store:
        for rec in store.list_images("s"):
            mask = np.zeros((rec.height, rec.width), np.uint8)
            mask[5:15, 5 + rec.id:25] = 255
            Image.fromarray(mask).save(folder / f"{Path(rec.original_name).stem}.png")
    return folder


# ------------------------------------------------------------------ fault injection per command
def test_import_disk_full_mid_write_keeps_nothing(capsys, tmp_path, data, monkeypatch):
    files = []
    for i in range(4):
        files.append(tmp_path / f"in{i}.png")
        Image.fromarray(noise(30, 30, 10 + i)).save(files[-1])
    before = snapshot(data)
    fail_on_call(monkeypatch, Store, "_put_file", 3, full_disk(data / "files"))
    rc, out, err = run(capsys, "import", "--data-dir", data, "--session", "fresh", "--create-session", *files)
    assert rc == 1 and out == [] and len(err) == 1 and "disk is full" in err[0], err
    assert snapshot(data) == before  # no rows, no session, no content files, no temp files


def test_import_masks_disk_full_is_all_or_nothing_and_a_rerun_adds_each_region_once(capsys, tmp_path, data,
                                                                                      monkeypatch):
    """The issue's example: 1-3 of 6 images got masks, and a rerun gave them the region twice."""
    masks = mask_folder(tmp_path, data)
    before = snapshot(data)
    with monkeypatch.context() as patch:
        fail_on_call(patch, Store, "_put_file", 2, full_disk(data / "files"))
        rc, _, err = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "png", masks)
    assert rc == 1 and len(err) == 1 and "disk is full" in err[0], err
    assert snapshot(data) == before
    rc, out, _ = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "png", masks)
    assert rc == 0 and out == ["imported 3 region(s) onto 3 image(s)"]
    with Store(data) as store:
        assert [len(store.label_state(r.id).regions) for r in store.list_images("s")] == [1, 1, 1]


def test_import_masks_exception_mid_write_keeps_nothing(capsys, tmp_path, data, monkeypatch):
    masks = mask_folder(tmp_path, data)
    before = snapshot(data)
    fail_on_call(monkeypatch, Store, "_push_state", 2, RuntimeError("injected"))
    rc, _, err = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "png", masks)
    assert rc == 1 and len(err) == 1 and "RuntimeError" in err[0], err
    assert snapshot(data) == before


class _FailingCommit:
    """A sqlite3 connection whose COMMIT fails like a full disk (everything else passes through)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_generate_commit_failure_keeps_nothing(capsys, data, monkeypatch):
    import studio.services as services_module

    opened = services_module.Services.open.__func__

    def open_failing(cls, *args, **kwargs):
        services = opened(cls, *args, **kwargs)
        services.store._conn = _FailingCommit(services.store._conn)
        return services
    monkeypatch.setattr(services_module.Services, "open", classmethod(open_failing))
    before = snapshot(data)
    rc, out, err = run(capsys, "generate", "--data-dir", data, "--session", "new", "--create-session", *GEN,
                       "--count", "2")
    assert rc == 1 and out == [] and len(err) == 1 and "full" in err[0] and "studio.db" in err[0], err
    assert snapshot(data) == before


def test_generate_images_and_trajectory_maps_are_one_change(capsys, data, monkeypatch):
    before = snapshot(data)
    fail_on_call(monkeypatch, Store, "add_detector_run", 1, full_disk(data / "files"))
    rc, _, err = run(capsys, "generate", "--data-dir", data, "--session", "s", "--prompt", "x", "--steps", "4",
                     "--width", "64", "--height", "64", "--trajectory")
    assert rc == 1 and len(err) == 1 and "disk is full" in err[0], err
    assert snapshot(data) == before


def test_detect_session_with_a_bad_out_or_a_failing_store_keeps_nothing(capsys, tmp_path, data, monkeypatch):
    before = snapshot(data)
    (tmp_path / "a-file").write_text("x")
    rc, _, err = run(capsys, "detect", "--data-dir", data, "--session", "s", "--out", tmp_path / "a-file")
    assert rc == 1 and len(err) == 1 and "is a file" in err[0]
    assert snapshot(data) == before
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fail_on_call(patch, Store, "add_detector_run", 1, full_disk(data / "files"))
        rc, _, err = run(capsys, "detect", "--data-dir", data, "--session", "s", "--out", out)
    assert rc == 1 and len(err) == 1 and "disk is full" in err[0], err
    assert snapshot(data) == before and not out.exists()  # the heatmaps written to --out were removed
    import studio.safeio as safeio

    with monkeypatch.context() as patch:  # the disk fills while the third --out file is written
        fail_on_call(patch, safeio, "atomic_output", 3, full_disk(out / "x.png"))
        rc, _, err = run(capsys, "detect", "--data-dir", data, "--session", "s", "--out", out)
    assert rc == 1 and "disk is full" in err[0]
    assert snapshot(data) == before and not out.exists()
    rc, _, _ = run(capsys, "detect", "--data-dir", data, "--session", "s", "--out", out)
    assert rc == 0 and len(list(out.iterdir())) == 7
    with Store(data) as store:
        assert [len(store.list_heatmaps(r.id)) for r in store.list_images("s")] == [1, 1, 1]


def test_serve_on_a_busy_port_writes_nothing(capsys, tmp_path):
    import socket

    data = tmp_path / "never-created"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rc, _, err = run(capsys, "serve", "--data-dir", data, "--port", busy.getsockname()[1])
    assert rc == 1 and len(err) == 1 and "already in use" in err[0], err
    assert not data.exists()


def test_repair_session_failure_storing_keeps_nothing(capsys, tmp_path, data, monkeypatch):
    out = tmp_path / "out"
    with Store(data) as store:
        store.add_images(store.create_session("r").id, [NewImage(rgb=noise(64, 72, i), source="uploaded")
                                                        for i in range(2)])
    before = snapshot(data)
    calls = fail_on_call(monkeypatch, Store, "add_images", 2, full_disk(data / "files"))
    rc, _, err = run(capsys, "repair", "--data-dir", data, "--session", "r", "--detector", "demo", "--seeds", "0",
                     "--steps", "2", "--threshold", "0.01", "--out", out)  # the trained demo detector scores noise low
    assert len(calls) == 2  # the first repaired image was stored (inside the transaction) before the failure
    assert rc == 1 and len(err) == 1 and "disk is full" in err[0], err
    assert snapshot(data) == before and not out.exists()


def test_a_real_full_disk_is_one_sentence_and_keeps_nothing(capsys, tmp_path):
    """On a 1 MB tmpfs (needs root and mount; skipped elsewhere): the first import fills the disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to create a small file system")
    try:
        data = mount / "data"
        Store(data).close()
        files = []
        for i in range(12):
            files.append(tmp_path / f"big{i}.png")
            Image.fromarray(noise(200, 200, i)).save(files[-1])  # ~120 KB each, 1.4 MB in all
        run(capsys, "import", "--data-dir", data, "--session", "warm", "--create-session", files[0])
        before = snapshot(data)
        rc, out, err = run(capsys, "import", "--data-dir", data, "--session", "s", "--create-session", *files)
        assert rc == 1 and out == [] and len(err) == 1 and "full" in err[0], err
        assert snapshot(data) == before
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------ kill -9
@pytest.mark.slow
def test_kill_during_import_leaves_only_garbage_that_doctor_removes(capsys, tmp_path):
    """kill -9 while the import writes its files: no row is half there, the leftover content and temp
    files are found by doctor and removed by --fix (start-up removes the temp files)."""
    sources = tmp_path / "src"
    sources.mkdir()
    for i in range(60):
        Image.fromarray(noise(160, 160, 100 + i)).save(sources / f"s{i:02d}.png")
    outcomes = []
    for trial in range(3):
        data = tmp_path / f"data{trial}"
        Store(data).close()
        before = snapshot(data)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "app.py", "import", "--data-dir", str(data), "--session", "k",
                                 "--create-session", str(sources)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            written = list((data / "files").glob("*/*")) if (data / "files").exists() else []
            if len(written) > trial * 10:
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Store(data) as store:
            images = sum(s.image_count for s in store.list_sessions())
        assert images in (0, 60)  # all or nothing
        rc, out, _ = run(capsys, "doctor", "--data-dir", data, "--fix")
        leftovers = [line for line in out if line.startswith("fixed:")]
        rc, out, _ = run(capsys, "doctor", "--data-dir", data)
        assert rc == 0 and out[-1].endswith("no problems."), out
        if images == 0:
            assert db_dump(data) == before[0]
            assert {k for k in file_tree(data) if k.startswith("files/") and not k.endswith("/")} == set()
        outcomes.append((images, len(leftovers)))
    assert any(images == 0 and fixed > 0 for images, fixed in outcomes), outcomes


# ------------------------------------------------------------------ parallel writers
@pytest.mark.slow
def test_two_processes_creating_the_same_session_both_succeed(tmp_path, demo_dir):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data / "models" / "demo-sd")
    Store(data).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    procs = [subprocess.Popen([sys.executable, "app.py", "generate", "--data-dir", str(data), "--session", "new",
                               "--create-session", *GEN[:-4], "--seed", str(seed), "--width", "64", "--height", "64"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [p.communicate(timeout=1800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    with Store(data) as store:
        sessions = store.list_sessions()
        assert [(s.name, s.image_count) for s in sessions] == [("new", 2)]


def test_create_if_missing_interleaved_with_another_process(capsys, tmp_path, data, monkeypatch):
    """Deterministic version of the race: between this command's lookup (missing) and its write,
    another process creates the session. The command must reuse it, not fail "already exists"."""
    import studio.cli.main as cli

    lookup = cli.session_arg

    def lookup_then_other_process_creates(services, args):
        found = lookup(services, args)
        with Store(data) as other:
            other.create_session(args.session)
        return found
    monkeypatch.setattr(cli, "session_arg", lookup_then_other_process_creates)  # what `import` calls
    src = tmp_path / "one.png"
    Image.fromarray(noise(20, 20, 1)).save(src)
    rc, out, err = run(capsys, "import", "--data-dir", data, "--session", "race", "--create-session", src)
    assert rc == 0, err
    with Store(data) as store:
        assert store.get_session("race").image_count == 1
        assert [s.name for s in store.list_sessions()].count("race") == 1


def test_ensure_session_from_many_threads_and_connections(tmp_path):
    data = tmp_path / "data"
    Store(data).close()
    stores = [Store(data) for _ in range(6)]
    barrier, ids, errors = threading.Barrier(6), [], []

    def create(store):
        barrier.wait()
        try:
            ids.append(store.ensure_session("together").id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == [] and len(set(ids)) == 1 and len(ids) == 6


# ------------------------------------------------------------------ the store's transactions
def test_nested_transactions_are_savepoints_and_files_follow_rows(tmp_path):
    with Store(tmp_path / "d") as store:
        sid = store.create_session("s").id
        empty = snapshot(tmp_path / "d")
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.add_images(sid, [NewImage(rgb=noise(8, 8, 1), source="uploaded")])
                raise RuntimeError("after the inner call succeeded")
        assert snapshot(tmp_path / "d") == empty  # the inner call's row and file are gone
        with store.transaction():
            kept = store.add_images(sid, [NewImage(rgb=noise(8, 8, 2), source="uploaded")])[0]
            with pytest.raises(ValueError):
                store.add_images(sid, [NewImage(rgb=noise(8, 8, 3), source="uploaded"),
                                       NewImage(rgb=noise(8, 8, 4), source="uploaded", parent_id=10**6)])
        assert [r.id for r in store.list_images(sid)] == [kept.id]
        assert len([p for p in (tmp_path / "d" / "files").rglob("*.png")]) == 1  # failed savepoint's files gone


def test_a_damaged_leftover_with_the_final_name_is_rewritten(tmp_path):
    with Store(tmp_path / "d") as store:
        sid = store.create_session("s").id
        rgb = noise(16, 16, 7)
        first = store.add_images(sid, [NewImage(rgb=rgb, source="uploaded")])[0]
        store.delete_session(sid)
        Path(first.path).parent.mkdir(parents=True, exist_ok=True)
        Path(first.path).write_bytes(b"half a png")  # e.g. restored badly from a backup
        sid = store.create_session("t").id
        again = store.add_images(sid, [NewImage(rgb=rgb, source="uploaded")])[0]
        np.testing.assert_array_equal(store.load_rgb(again.id), rgb)


@pytest.mark.parametrize("name, words", [
    ("\u200b", "visible"), ("\u200b\u200d\ufeff", "visible"), (" \u3164 ", "visible"), ("\u2800", "visible"),
    ("\ufe0f", "visible"), ("abc\u202e", "U+202E"), ("\u2066x\u2069", "U+2066"), ("a\u200fb", "U+200F"),
    ("a\tb", "control"), ("x" * 101, "100"), ("bad\udcffbytes", "UTF-8"), (42, "text")])
def test_names_that_are_refused(name, words):
    with pytest.raises(StoreError, match=words.replace("+", r"\+")):
        check_name(name, "A session name")


def test_names_that_are_kept():
    assert check_name("  hands \u200b", "n") == "hands"
    assert check_name("\u0645\u0631\u062d\u0628\u0627", "n") == "\u0645\u0631\u062d\u0628\u0627"  # Arabic: RTL text is fine
    assert check_name("family \U0001F468\u200d\U0001F469\u200d\U0001F467", "n").endswith("\U0001F467")  # ZWJ inside


def test_invisible_and_bidi_class_names_are_refused(tmp_path):
    with Store(tmp_path / "d") as store:
        sid = store.create_session("s").id
        with pytest.raises(StoreError, match="visible"):
            store.set_session_taxonomy(sid, [{"name": "\u200b"}])
        with pytest.raises(StoreError, match="bidirectional"):
            store.set_session_taxonomy(sid, [{"name": "hand\u202e"}])


# ------------------------------------------------------------------ jobs and doctor
def test_a_resumed_job_keeps_one_metric_row_per_step(tmp_path):
    with Store(tmp_path / "d") as store:
        job = store.create_job("detector", {})
        for step in range(1, 11):
            store.add_job_metric(job.id, {"step": step, "loss": 1.0 / step})
        for step in range(6, 11):  # resumed from the checkpoint of step 5
            store.add_job_metric(job.id, {"step": step, "loss": 2.0 / step})
        rows = store.job_metrics(job.id)
        assert [r["step"] for r in rows] == list(range(1, 11))
        assert rows[-1]["loss"] == pytest.approx(0.2)


def test_doctor_finds_and_fixes_what_is_safe(capsys, tmp_path):
    from studio.doctor import run_doctor, startup_check

    data = tmp_path / "d"
    with Store(data) as store:
        sid = store.create_session("s").id
        recs = store.add_images(sid, [NewImage(rgb=noise(8, 8, i), source="uploaded") for i in range(2)])
        job = store.create_job("detector", {})
        store.update_job(job.id, status="running", pid=2**22 + 7)
        for _ in range(3):  # rows written by an older version, before resume dedupe
            store.db.execute("INSERT INTO job_metrics (job_id, step, row, created_at) VALUES (?, 5, '{}', 'x')",
                             (job.id,))
    orphan = data / "files" / "ab" / ("ab" + "0" * 62 + ".png")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    temp = Path(recs[0].path).parent / ".tmp-killed.png"
    temp.write_bytes(b"partial")
    Path(recs[1].path).unlink()
    rc, out, _ = run(capsys, "doctor", "--data-dir", data)
    assert rc == 1
    text = "\n".join(out)
    for words in ("Leftover temporary file", "belongs to no image", f"image {recs[1].id} is missing",
                  "3 metric rows for step 5", f"Job {job.id} is marked running"):
        assert words in text, (words, text)
    with Store(data) as store:
        line = startup_check(store)
    assert line.startswith("Data check") and "removed 1 leftover" in line and "run `artifact-studio doctor`" in line
    assert not temp.exists() and orphan.exists()  # start-up removes only temporary files
    rc, out, _ = run(capsys, "doctor", "--data-dir", data, "--fix")
    assert rc == 1 and out[-1].startswith("checked") and "1 remaining" in out[-1]  # the missing file stays
    assert not orphan.exists() and not orphan.parent.exists()
    with Store(data) as store:
        report = run_doctor(store)
        assert [f.kind for f in report.findings] == ["missing"]
        assert store.get_job(job.id).status == "interrupted"
        assert len(store.db.execute("SELECT * FROM job_metrics").fetchall()) == 1


def test_doctor_verify_finds_a_damaged_file(capsys, tmp_path):
    data = tmp_path / "d"
    with Store(data) as store:
        rec = store.add_images(store.create_session("s").id, [NewImage(rgb=noise(8, 8, 1), source="uploaded")])[0]
    raw = bytearray(Path(rec.path).read_bytes())
    raw[-20] ^= 0xFF
    Path(rec.path).write_bytes(bytes(raw))
    rc, out, _ = run(capsys, "doctor", "--data-dir", data)
    assert rc == 0
    rc, out, _ = run(capsys, "doctor", "--data-dir", data, "--verify")
    assert rc == 1 and f"image {rec.id} is damaged" in "\n".join(out)


# ------------------------------------------------------------------ limits before work
def test_an_rle_bomb_is_refused_before_pycocotools_allocates(capsys, tmp_path, data, monkeypatch):
    import json

    from pycocotools import mask as mask_utils

    def never(*args, **kwargs):
        raise AssertionError("pycocotools was asked to decode")
    monkeypatch.setattr(mask_utils, "frPyObjects", never)
    monkeypatch.setattr(mask_utils, "decode", never)
    coco = {"images": [{"id": 1, "file_name": "im0.png"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "segmentation": {"size": [40000, 40000], "counts": "0"}}]}
    (tmp_path / "bomb.json").write_text(json.dumps(coco))
    before = snapshot(data)
    rc, _, err = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "coco",
                     tmp_path / "bomb.json")
    assert rc == 1 and "megapixels" in err[0] and snapshot(data) == before
    # a declared size that fits the limit but not the session's image: skipped without decoding
    coco["annotations"][0]["segmentation"] = {"size": [400, 400], "counts": [160000]}
    (tmp_path / "other.json").write_text(json.dumps(coco))
    rc, out, err = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "coco",
                       tmp_path / "other.json")
    assert rc == 1 and "not stretched" in err[0] and snapshot(data) == before


def test_import_masks_batch_limit_is_checked_before_decoding(capsys, tmp_path, data, monkeypatch):
    import studio.datasets.import_masks as importer

    masks = mask_folder(tmp_path, data)
    monkeypatch.setattr(importer, "MAX_BATCH_PIXELS", 40 * 56 * 2)
    monkeypatch.setattr(importer, "_read_binary_mask", lambda path: pytest.fail("decoded before the batch check"))
    before = snapshot(data)
    rc, _, err = run(capsys, "import-masks", "--data-dir", data, "--session", "s", "--format", "png", masks)
    assert rc == 1 and "megapixels" in err[0] and "smaller groups" in err[0]
    assert snapshot(data) == before


def test_import_batch_limit_is_checked_from_headers(capsys, tmp_path, data, monkeypatch):
    import engines.images as images
    import studio.safeio as safeio

    for i in range(3):
        Image.fromarray(noise(100, 100, i)).save(tmp_path / f"p{i}.png")
    monkeypatch.setattr(safeio, "MAX_BATCH_PIXELS", 25_000)
    monkeypatch.setattr(images, "load_image", lambda *a, **k: pytest.fail("decoded before the batch check"))
    before = snapshot(data)
    rc, _, err = run(capsys, "import", "--data-dir", data, "--session", "s", *[tmp_path / f"p{i}.png" for i in range(3)])
    assert rc == 1 and "smaller groups" in err[0] and snapshot(data) == before


def test_non_utf8_file_names_are_imported_with_a_display_name(capsys, tmp_path, data):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(noise(10, 10, 1)).save(folder / "good.png")
    weird = os.fsencode(folder) + b"/caf\xe9-\xff.png"
    with open(weird, "wb") as f:
        Image.fromarray(noise(10, 10, 2)).save(f, format="PNG")
    (folder / "broken.png").write_bytes(b"nope")
    rc, out, err = run(capsys, "import", "--data-dir", data, "--session", "s", "--skip-bad", folder)
    assert rc == 0 and len(out) == 2, (out, err)
    assert len(err) == 1 and "broken.png" in err[0]
    with Store(data) as store:
        names = {r.original_name for r in store.list_images("s")}
    assert "caf\\xe9-\\xff.png" in names and "good.png" in names
    rc, out, err = run(capsys, "import", "--data-dir", data, "--session", "s", os.fsdecode(weird + b".missing"))
    assert rc == 1 and len(err) == 1 and "caf\\xe9-\\xff.png.missing" in err[0]


def test_a_job_that_cannot_be_set_up_leaves_no_queued_row(tmp_path, monkeypatch):
    from studio.jobs import JobManager

    data = tmp_path / "d"
    with Store(data) as store:
        before = snapshot(data)
        fail_on_call(monkeypatch, Store, "update_job", 1, full_disk(data / "jobs"))
        with pytest.raises(OSError):
            JobManager(store).launch("detector", {"config": {}})
        assert store.list_jobs() == [] and snapshot(data) == before


def test_read_only_places_are_one_sentence(capsys, tmp_path):
    """A read-only data directory and a read-only --out (a tmpfs remounted read-only; needs root)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to create a read-only file system")
    try:
        with Store(mount / "data") as store:
            store.create_session("s")
        (mount / "exports").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        images = tmp_path / "imgs"
        images.mkdir()
        Image.fromarray(noise(20, 20, 1)).save(images / "a.png")
        for argv, words in ((["sessions", "--data-dir", mount / "data"], ["read-only"]),
                            (["import", "--data-dir", mount / "data", "--session", "s", images], ["read-only"]),
                            (["detect", "--data-dir", tmp_path / "d", "--images", images, "--out", mount / "exports" / "o"],
                             ["--out", "read-only file system"]),
                            (["export", "--data-dir", tmp_path / "d", "--session", "s", "--format", "png",
                              "--out", mount / "new"], ["--out", "read-only file system"])):
            rc, out, err = run(capsys, *argv)
            assert rc == 1 and len(err) == 1, (argv, err)
            for word in words:
                assert word in err[0], (word, err[0])
    finally:
        subprocess.run(["umount", str(mount)], check=False)
