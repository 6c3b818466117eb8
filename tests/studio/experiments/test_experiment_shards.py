"""Several processes give what one process gives: the corruption items and the detector units spread over
two ranks (as under `accelerate launch` with two devices) produce the same files and results as one rank.

The ranks are two processes calling `run_step(..., rank=r, world=2)` on CPU; they meet only through the
run folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio.experiments.plan import plan, unit_done
from studio.experiments.runner import prepare_run
from studio.experiments.config import resolve
pytestmark = pytest.mark.slow  # real processes end to end
ROOT = Path(__file__).resolve().parents[3]
CONFIG = {
    "experiment": {"name": "shards", "tables": ["table1"], "seeds": [0], "threads": 1},
    "data": {"synthesise": True, "human_images": 4,
             "synthetic": {"train": 16, "val": 4, "test": 4, "clean": 5, "size": 64}},
    "model": {"architecture": "tiny"},
    "selector": {"steps": 4, "batch_size": 2, "crop": 64, "lr": 1e-3, "eval_every": 4},
    "corruption": {"preset": "renoise-fast", "num_inference_steps": 10, "inversion_steps": 2, "baseline_steps": 4,
                   "max_side": 64, "empty_regions": "top:0.05", "examples": 1},
    "detector": {"steps": 6, "batch_size": 2, "crop": 64, "lr": 1e-3, "eval_every": 3},
}


RANK = """
import sys
from pathlib import Path
from studio.experiments.steps import run_step
result = run_step(Path(sys.argv[1]), sys.argv[2], data_dir=Path(sys.argv[3]), device="cpu", rank=int(sys.argv[4]),
                  world=int(sys.argv[5]))
sys.exit(1 if result["stopped"] else 0)
"""


def _run(run_dir: Path, data_dir: Path, step: str, world: int) -> None:
    """One process per rank, as `accelerate launch` starts them (RANK / WORLD_SIZE given explicitly)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(run_dir), step, str(data_dir), str(r), str(world)],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    for proc in procs:
        _, err = proc.communicate(timeout=2400)
        assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data_dir):
    config = resolve(CONFIG)
    root = tmp_path_factory.mktemp("shards")
    one, two = root / "one", root / "two"
    for folder in (one, two):
        prepare_run(config, folder, data_dir=demo_data_dir, device="cpu")
    for step in ("data", "selector"):
        _run(one, demo_data_dir, step, 1)
    units = {u.name: u for u in plan(config)}
    for name in ("data", "selector"):  # the same inputs for both: copy the finished units
        shutil.copytree(one / units[name].folder, two / units[name].folder)
    for step in ("corruption", "detectors"):
        _run(one, demo_data_dir, step, 1)
        _run(two, demo_data_dir, step, 2)
    return one, two, units


def test_sharded_corruption_writes_the_same_items_as_one_process(runs):
    one, two, units = runs
    for name in ("regions", "corrupt/proposed"):
        a, b = unit_done(one, units[name]), unit_done(two, units[name])
        assert a is not None and b is not None and b["world"] == 2
        assert a["result"] == b["result"]
    heat = sorted((one / units["regions"].folder / "heat").glob("*.npy"))
    assert len(heat) == 5
    for f in heat:
        np.testing.assert_array_equal(np.load(f), np.load(two / units["regions"].folder / "heat" / f.name))
    folder = units["corrupt/proposed"].folder
    rows = [json.loads(line) for line in (one / folder / "manifest.jsonl").read_text().splitlines()]
    assert [json.loads(line) for line in (two / folder / "manifest.jsonl").read_text().splitlines()] == rows
    shards = [len((two / folder / f"manifest.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert shards == [3, 2]  # items i % 2 == rank
    for f in sorted((one / folder / "items").glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(two / folder / "items" / f.name))


def test_detector_units_spread_over_ranks_train_the_same_models(runs):
    one, two, units = runs
    detectors = [u for u in units.values() if u.kind == "detector"]
    assert [u.name for u in detectors] == ["detector/human-s0", "detector/pseudo-s0", "detector/proposed-s0"]
    for unit in detectors:
        a, b = unit_done(one, unit), unit_done(two, unit)
        assert a is not None and b is not None
        if a["result"]["checkpoint"] is None:  # an untrained row (no artifact pixel in its labels)
            assert b["result"]["checkpoint"] is None
            continue
        for part in ("last", "best"):
            assert ((one / unit.folder / "train" / part / "model.safetensors").read_bytes()
                    == (two / unit.folder / "train" / part / "model.safetensors").read_bytes())
