"""The paper protocol end to end on a reduced tiny config (synthetic RichHF data, toy UperNet, demo diffusion
model): every table has its rows, every number is finite and in range, the corruption rows train on
synthetic masks only, the test set never reaches a training set, each step is a job, and a run killed
twice (during the corruption and during detector training) and rerun gives what an uninterrupted run gives.

One run serves every test here (module fixture): it is killed with SIGKILL (runner and job) at two
moments, rerun to the end, and then the two units that were interrupted are recomputed from scratch
to compare with their resumed results.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # real processes end to end
ROOT = Path(__file__).resolve().parents[3]

CI_TOML = """
[experiment]
name = "ci"
seeds = [0, 1]
threads = 1

[data]
synthesise = true
human_images = 6

[data.synthetic]
train = 24
val = 6
test = 8
clean = 4
size = 64

[model]
architecture = "tiny"

[selector]
steps = 8
batch_size = 2
crop = 64
lr = 0.001
eval_every = 4

[corruption]
preset = "renoise-fast"
num_inference_steps = 10
inversion_steps = 2
baseline_steps = 4
max_side = 64
empty_regions = "top:0.05"
examples = 2

[detector]
steps = 16
batch_size = 2
crop = 64
lr = 0.001
eval_every = 4

[table3]
steps = [9, 8, 7, 6, 5, 4]
"""
TIMEOUT = 3600  # safety nets only: every wait below is for an event


def _command(cfg: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "app", "experiment", "run", str(cfg), "--data-dir", str(data), "--out", str(out),
            "--device", "cpu"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _unit_folders(out: Path, kind: str) -> list[Path]:
    root = out / "units" / kind
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _corrupt_in_progress(out: Path) -> Path | None:
    """A corruption variant that has written at least one item but is not finished."""
    for folder in _unit_folders(out, "corrupt"):
        shard = folder / "manifest.rank0.jsonl"
        if not (folder / "done.json").exists() and shard.is_file() and shard.read_text().strip():
            return folder
    return None


def _detector_in_progress(out: Path) -> Path | None:
    """A detector, after another one finished, that saved a mid-training checkpoint and is not finished."""
    folders = _unit_folders(out, "detector")
    if not any((f / "done.json").exists() for f in folders):
        return None
    for folder in folders:
        state = folder / "train" / "last" / "trainer_state.json"
        if not (folder / "done.json").exists() and state.is_file():
            try:
                if json.loads(state.read_text())["step"] == 4:  # the first checkpoint: 12 steps to go
                    return folder
            except (OSError, ValueError, KeyError):
                continue
    return None


def _running_job_pid(data: Path) -> int | None:
    import sqlite3

    db = sqlite3.connect(data / "studio.db")
    try:
        row = db.execute("SELECT pid FROM jobs WHERE status = 'running' ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return row[0] if row else None


def _run_until(cmd, out: Path, data: Path, condition) -> Path:
    """Start the runner; SIGKILL it and its running job as soon as `condition(out)` holds."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            caught = condition(out)
            if caught is not None:
                pid = _running_job_pid(data)
                assert pid is not None, "the condition held while no job was running"
                os.killpg(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
                return caught
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        pytest.fail("the run did not reach the point where it is interrupted")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    cfg, data, out = root / "ci.toml", root / "data", root / "run"
    cfg.write_text(CI_TOML)
    cmd = _command(cfg, data, out)
    killed_corrupt = _run_until(cmd, out, data, _corrupt_in_progress)
    killed_detector = _run_until(cmd, out, data, _detector_in_progress)
    checkpoint_step = json.loads((killed_detector / "train" / "last" / "trainer_state.json").read_text())["step"]
    final = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert final.returncode == 0, final.stderr[-3000:]
    return SimpleNamespace(root=root, cfg=cfg, data=data, out=out, cmd=cmd, stderr=final.stderr,
                           killed_corrupt=killed_corrupt, killed_detector=killed_detector,
                           checkpoint_step=checkpoint_step)


def _config(run):
    from studio.experiments.plan import read_config

    return read_config(run.out)


def _csv_rows(run) -> list[dict]:
    with open(run.out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def test_every_table_has_its_rows_and_every_number_is_finite_and_in_range(run):
    from studio.experiments.plan import table_rows

    rows = _csv_rows(run)
    expected = table_rows(_config(run))
    assert set(expected) == {"table1", "table2", "table3", "table4"}
    for table, wanted in expected.items():
        got = [r for r in rows if r["table"] == table]
        assert [r["row"] for r in got] == [w.label for w in wanted]
        assert [r["train"] for r in got] == [w.train for w in wanted]
    assert [len(v) for v in expected.values()] == [3, 5, 6, 2]
    for r in rows:
        assert r["seeds"] == "0 1"
        for key in ("artifact_iou_mean", "artifact_iou_std", "miou_mean", "miou_std", "mean_image_iou_mean",
                    "per_image_iou_median", "precision_mean", "recall_mean"):
            value = float(r[key])  # present for every row (two seeds: a std exists)
            assert math.isfinite(value) and 0.0 <= value <= 100.0, (r["row"], key, value)
        assert int(r["test_images"]) > 0
        assert r["paper_convnext_t"] == "" and r["paper_swin_t"] == ""  # not found: n/a, never invented
    md = (run.out / "results.md").read_text()
    for title in ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "Paper numbers", "Per-image IoU"):
        assert title in md
    assert md.count("| n/a | n/a |") == len(rows)
    assert "## Config: deviations from the paper's protocol" in md  # the shrunk values, beside the paper's
    assert "| `detector training: steps` | 16 | 10000 |" in md and "| `selector training: lr` | 0.001 | 6e-05 |" in md
    assert "(paper: 7,801)" in run.stderr and "(paper: 500)" in run.stderr


def test_the_headline_is_the_artifact_class_iou_on_the_fixed_test_set(run):
    """Recompute one row independently: its detector on the test arrays, artifact IoU = TP / (TP + FP + FN)."""
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector
    from studio.experiments.plan import plan, unit_done

    units = {u.name: u for u in plan(_config(run))}
    data = run.out / units["data"].folder
    test_set = json.loads((data / "test_set.json").read_text())
    index = {r["id"]: r for r in json.loads((data / "index.json").read_text())}
    ious = []
    for seed in (0, 1):
        trained = unit_done(run.out, units[f"detector/human-s{seed}"])["result"]
        detector = ArtifactDetector(load_detector(str(run.out / trained["checkpoint"]),
                                                  data_dir=run.out / trained["checkpoint"]))
        tp = fp = fn = 0
        for rid in test_set["ids"]:
            image = np.load(data / index[rid]["image"])
            truth = np.load(data / index[rid]["mask"])
            pred = detector.predict([image])[0].scores >= 0.5
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
        ious.append(100.0 * tp / (tp + fp + fn))
    row = next(r for r in _csv_rows(run) if r["table"] == "table1" and r["train"] == "human")
    assert float(row["artifact_iou_mean"]) == pytest.approx(np.mean(ious), abs=1e-3)
    assert float(row["artifact_iou_std"]) == pytest.approx(np.std(ious, ddof=1), abs=1e-3)


def test_checkpoints_are_chosen_on_validation_with_the_paper_recipe_and_scored_on_test(run):
    """Each trained unit's checkpoint is `best`, chosen on the experiment's validation images (its recorded
    val score is recomputed on them; it is the first step with the highest val artifact IoU), trained with
    the config engines.training.recipes resolved for it (the paper recipe: plain cross-entropy), never shown
    the test set; the evaluation scores exactly that checkpoint."""
    from engines.detection.detectors import load_detector
    from engines.training.detector import evaluate_detector
    from studio.experiments import adapter
    from studio.experiments.plan import plan, unit_done

    units = {u.name: u for u in plan(_config(run))}
    data = run.out / units["data"].folder
    index = json.loads((data / "index.json").read_text())
    val = [adapter.sample(np.load(data / r["image"]), np.load(data / r["mask"]), "human", r["id"])
           for r in index if r["role"] == "val"]
    checked = 0
    for unit in units.values():
        if unit.kind not in ("selector", "detector"):
            continue
        result = unit_done(run.out, unit)["result"]
        if result["checkpoint"] is None:
            continue
        folder = run.out / result["checkpoint"]
        assert folder.name == "best" and result["selected_on"] == "val artifact_iou", unit.name
        meta = json.loads((folder / "detector.json").read_text())["provenance"]
        assert meta["config"] == unit.params["train_config"] and meta["recipe"] == "paper"
        assert meta["class_weights"] == [1.0, 1.0] and meta["config"]["sampling"] == "uniform"
        assert meta["config"]["color_jitter"] == 0.0 and meta["config"]["lr"] == 0.001
        assert meta["experiment_split"]["val_ids"] == [s.name for s in val] and meta["val"]["num_images"] == len(val)
        assert meta["test_images"] == 0 and "test" not in meta
        rows = [json.loads(line) for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "artifact_iou" in r]
        first_best = max(rows, key=lambda r: r["artifact_iou"])
        assert meta["best_step"] == result["best_step"] == first_best["step"], unit.name
        if unit.kind == "detector":
            scored = unit_done(run.out, units[unit.name.replace("detector/", "evaluate/")])["result"]
            assert scored["checkpoint"] == result["checkpoint"]
        if unit.name in ("selector", "detector/human-s0"):
            loaded = load_detector(str(folder), data_dir=folder)
            again = evaluate_detector(loaded.model, loaded.extra, val)
            assert again.artifact_iou == pytest.approx(meta["val"]["artifact_iou"], abs=1e-9)
            assert again.miou == pytest.approx(meta["val"]["miou"], abs=1e-9)
        checked += 1
    assert checked >= 10


def test_corrupted_datasets_follow_the_papers_protocol(run):
    """Table 3's corruption step s of N inverts N - s steps; the baselines corrupt after `baseline_steps`;
    direct corruption resamples nothing; every item uses the config's preset and is labelled by the
    corrupted area."""
    from studio.experiments.plan import plan, variants

    config = _config(run)
    c = config.values["corruption"]
    n, k = c["num_inference_steps"], c["inversion_steps"]
    units = {u.name: u for u in plan(config)}
    seen = set()
    for name in variants(config):
        manifest = run.out / units[f"corrupt/{name}"].folder / "manifest.jsonl"
        made = [r for r in map(json.loads, manifest.read_text().splitlines()) if "skipped" not in r]
        for row in made:
            p = row["params"]
            assert (p["num_inference_steps"], p["preset"], p["label"]) == (n, c["preset"], "corrupted"), name
            if name.startswith("step"):
                assert (p["method"], p["inversion_steps"]) == ("renoise", n - int(name[4:])), name
            elif name == "proposed":
                assert (p["method"], p["inversion_steps"]) == ("renoise", k)
            elif name == "direct":
                assert p["method"] == "direct" and row["unet_calls"] == 0
            else:
                assert (p["method"], p["baseline_steps"]) == (name, c["baseline_steps"]) and row["unet_calls"] > 0
            seen.add(name)
    assert seen == {"proposed", "rotate", "blur", "gaussian", "downscale", "direct", "step9", "step7", "step6",
                    "step5", "step4"}


def test_corruption_rows_train_on_synthetic_masks_only(run):
    from studio.experiments.plan import plan, unit_done, variants

    config = _config(run)
    units = {u.name: u for u in plan(config)}
    for variant in variants(config):
        manifest = run.out / units[f"corrupt/{variant}"].folder / "manifest.jsonl"
        made = {f"{variant}:{r['id']}": r for r in map(json.loads, manifest.read_text().splitlines())
                if "skipped" not in r}
        assert made, variant
        for seed in (0, 1):
            unit = units[f"detector/{variant}-s{seed}"]
            training = json.loads((run.out / unit.folder / "training_set.json").read_text())
            assert {t["source"] for t in training} == {"synthetic"}
            assert {t["name"] for t in training} == set(made)
            assert {t["digest"] for t in training} == {r["digest"] for r in made.values()}
            assert unit_done(run.out, unit)["result"]["sources"] == {"synthetic": len(made)}
    human = json.loads((run.out / units["detector/human-s0"].folder / "training_set.json").read_text())
    assert {t["source"] for t in human} == {"human"} and len(human) == 6


def test_the_test_set_never_appears_in_any_training_set(run):
    from studio.experiments.plan import plan

    units = {u.name: u for u in plan(_config(run))}
    data = run.out / units["data"].folder
    index = json.loads((data / "index.json").read_text())
    test = [r for r in index if r["role"] == "test"]
    test_set = json.loads((data / "test_set.json").read_text())
    assert [r["id"] for r in test] == test_set["ids"] and len(test) >= 5
    test_ids, test_digests = {r["id"] for r in test}, {r["digest"] for r in test}
    test_files = {r["filename"] for r in test}
    for r in index:  # RichHF-100 (selector and human row), validation, sources
        if r["role"] != "test":
            assert r["id"] not in test_ids and r["digest"] not in test_digests and r["filename"] not in test_files
    for unit in units.values():
        if unit.kind == "detector":
            training = json.loads((run.out / unit.folder / "training_set.json").read_text())
            assert not {t["digest"] for t in training} & test_digests, unit.name
            assert not {t["name"].split(":")[-1] for t in training} & test_ids, unit.name
    for unit in units.values():  # every row is scored on the same test set
        if unit.kind == "evaluate":
            result = json.loads((run.out / unit.folder / "done.json").read_text())["result"]
            assert result["test_digest"] == test_set["digest"] and set(result["per_image_iou"]) == test_ids


def test_each_step_is_a_job_and_finished_steps_were_not_redone(run):
    from studio.store.store import Store

    store = Store(run.data)
    try:
        jobs = [j for j in store.list_jobs() if j.kind == "experiment"]
    finally:
        store.close()
    by_step = {}
    for job in jobs:
        by_step.setdefault(job.params["step"], []).append(job)
    assert set(by_step) == {"data", "selector", "corruption", "detectors", "evaluation"}
    for step, step_jobs in by_step.items():
        # one job per step: the interrupted steps were resumed (same job), never started again
        assert len(step_jobs) == 1 and step_jobs[0].status == "succeeded", step
    recorded = json.loads((run.out / "jobs.json").read_text())
    assert recorded == {step: j[0].id for step, j in by_step.items()}
    assert run.stderr.count("resumed (interrupted)") == 1  # the detectors step; corruption was resumed in run 2


def test_a_killed_detector_resumed_from_its_checkpoint_and_matches_an_uninterrupted_training(run):
    """The detector killed mid-training continued from its `last` checkpoint (its second attempt's first
    logged step follows the checkpoint) and, retrained from scratch without interruption, gives the same
    weights and the same results."""
    unit = run.killed_detector
    name = json.loads((unit / "done.json").read_text())["name"]
    log = (run.data / "jobs" / str(json.loads((run.out / "jobs.json").read_text())["detectors"]) / "log.txt").read_text()
    attempts = log.split(f"unit {name}: start")
    assert len(attempts) == 3  # killed once, resumed once
    first_row = next(json.loads(line) for line in attempts[2].splitlines() if line.startswith("{"))
    assert first_row["unit"] == name and first_row["step"] == run.checkpoint_step + 1

    resumed = {p: (unit / "train" / p / "model.safetensors").read_bytes() for p in ("last", "best")}
    before = (run.out / "results.csv").read_text()
    evaluate = next(p for p in _unit_folders(run.out, "evaluate") if p.name.startswith(f"evaluate-{name.split('/')[1]}-"))
    shutil.rmtree(unit)
    shutil.rmtree(evaluate)
    again = subprocess.run(run.cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    for part, data in resumed.items():
        assert (unit / "train" / part / "model.safetensors").read_bytes() == data
    assert (run.out / "results.csv").read_text() == before


def test_a_killed_corruption_resumed_and_matches_an_uninterrupted_one(run):
    unit = run.killed_corrupt
    rows = [json.loads(line) for line in (unit / "manifest.jsonl").read_text().splitlines()]
    def items() -> dict:  # (a SIGKILL may leave a hidden temporary file behind: not an item)
        return {p.name: p.read_bytes() for p in sorted((unit / "items").glob("*.npy")) if not p.name.startswith(".")}

    arrays = items()
    assert arrays and len(rows) == 4
    shutil.rmtree(unit)
    again = subprocess.run(run.cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4-5 Detectors (Tables 1-4): done" in again.stderr  # nothing downstream was redone
    assert items() == arrays
    fresh = [json.loads(line) for line in (unit / "manifest.jsonl").read_text().splitlines()]
    assert [r.get("digest") for r in fresh] == [r.get("digest") for r in rows]


def test_report_files_status_and_the_experiments_tab(run):
    from studio.experiments.runner import run_status
    from studio.services import Services
    from studio.web.tabs import experiments

    plots = {p.name for p in (run.out / "plots").glob("*.png")}
    assert {"table1.png", "table2.png", "table3.png", "table4.png", "per_image_iou.png",
            "corrupted_examples.png"} <= plots
    env = json.loads((run.out / "environment.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["torch"] and env["config"]["experiment"]["name"] == "ci"
    assert (run.out / "config.toml").read_text() == CI_TOML

    services = Services.open(run.data)
    try:
        status = run_status(run.out, services.store)
        assert status["finished"] and [s["state"] for s in status["steps"]] == ["done"] * 5
        dropdown, summary, rows, results, gallery = experiments.refresh(services, None)
        assert dropdown.value == str(run.out.resolve())
        assert "finished" in summary and [r[1] for r in rows] == ["done"] * 5
        assert "Table 3. Corruption step" in results and "![" not in results
        assert len(gallery) == len(plots)
    finally:
        services.close()
    out = subprocess.run([sys.executable, "-m", "app", "experiment", "status", str(run.out)], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.count(" done ") == 5 and "(complete)" in out.stdout
