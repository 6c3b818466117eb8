"""The experiment runner's plan and run folder: steps, units and their keys, table rows, and the
files every step reads and writes (done records, atomic JSON/NPY/PNG writes).

A unit's key is the sha256 of its kind, its parameters, the keys of the units it reads and a code
version (see studio/experiments/runner.py for the protocol). Imported by the runner, the steps and the
report; imports only studio.experiments.config and .adapter (never the runner, the jobs or the web).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from studio.experiments.config import ExperimentConfig, path_of

STEPS = ("data", "selector", "corruption", "detectors", "evaluation")
STEP_TITLES = {"data": "1 Data", "selector": "2 Region selector", "corruption": "3 Corruption",
               "detectors": "4-5 Detectors (Tables 1-4)", "evaluation": "6 Evaluation on the test set"}
CODE_VERSION = {"data": 1, "selector": 2, "regions": 1, "corrupt": 3, "detector": 3, "evaluate": 3}
"""Part of every unit's key: bump a kind's number when its results change (selector 1->2, detector 2->3: recipes
from engines.training.recipes; evaluate 2->3: scored by engines.training.detector.evaluate_detector)."""
RESOLVED = "config.resolved.json"
RUN_FILE = "run.json"
JOBS_FILE = "jobs.json"
DONE = "done.json"
JOB_KIND = "experiment"
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


# ---------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Unit:
    """One cached piece of work of a step (see the module docstring)."""

    step: str
    kind: str
    name: str
    params: dict
    inputs: tuple[str, ...]
    key: str

    @property
    def folder(self) -> str:
        return f"units/{self.kind}/{self.name.replace('/', '-')}-{self.key[:12]}"


@dataclass(frozen=True)
class Row:
    """One row of a paper table: `train` names the training set ("human", "pseudo" or a corruption
    variant), `paper` the key of the paper's published number (studio/experiments/report.py)."""

    table: str
    label: str
    train: str
    paper: str


def table_rows(config: ExperimentConfig) -> dict[str, list[Row]]:
    """The rows of each selected table, in the paper's order."""
    v = config.values
    n, k = v["corruption"]["num_inference_steps"], v["corruption"]["inversion_steps"]
    labels = {"proposed": f"Proposed ({v['corruption']['inversion']}, corruption at step {n - k})",
              "rotate": "Rotation", "blur": "Blur", "gaussian": "Gaussian noise",
              "downscale": "Downscale (not in the paper)"}
    tables: dict[str, list[Row]] = {}
    for table in v["experiment"]["tables"]:
        if table == "table1":
            rows = [Row(table, f"Human labels only (RichHF-{v['data']['human_images']})", "human", "human"),
                    Row(table, "Pseudo labels (region selector)", "pseudo", "pseudo"),
                    Row(table, "Corruption (ours)", "proposed", "corruption")]
        elif table == "table2":
            rows = [Row(table, labels[m], m, m) for m in v["table2"]["methods"]]
        elif table == "table3":
            rows = [Row(table, f"Step {s}" + (" (proposed)" if n - s == k else ""),
                        "proposed" if n - s == k else f"step{s}", f"step{s}" if n == 50 else "")
                    for s in v["table3"]["steps"]]
        else:
            rows = [Row(table, "Direct (no resampling)" if x == "direct" else "Resampled (proposed)",
                        "direct" if x == "direct" else "proposed", x) for x in v["table4"]["variants"]]
        tables[table] = rows
    return tables


def variants(config: ExperimentConfig) -> dict[str, dict]:
    """Corruption variants the selected tables need: name -> {method, steps}."""
    c = config.values["corruption"]
    n, k = c["num_inference_steps"], c["inversion_steps"]
    out: dict[str, dict] = {}
    for rows in table_rows(config).values():
        for row in rows:
            name = row.train
            if name in ("human", "pseudo") or name in out:
                continue
            if name == "proposed":
                out[name] = {"method": "proposed", "steps": k}
            elif name.startswith("step"):
                out[name] = {"method": "proposed", "steps": n - int(name[4:])}
            elif name == "direct":
                out[name] = {"method": "direct", "steps": k}
            else:
                out[name] = {"method": name, "steps": c["baseline_steps"]}
    return out


def training_sets(config: ExperimentConfig) -> list[str]:
    seen: list[str] = []
    for rows in table_rows(config).values():
        for row in rows:
            if row.train not in seen:
                seen.append(row.train)
    return seen


def _key(kind: str, params: dict, inputs: list[Unit]) -> str:
    blob = json.dumps({"kind": kind, "version": CODE_VERSION[kind], "params": params,
                       "inputs": [u.key for u in inputs]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _unit(step: str, kind: str, name: str, params: dict, inputs: list[Unit]) -> Unit:
    return Unit(step, kind, name, params, tuple(u.name for u in inputs), _key(kind, params, inputs))


def plan(config: ExperimentConfig) -> list[Unit]:
    """Every unit of the experiment, in execution order."""
    v = config.values
    data_params = {"data": v["data"], "sources": v["corruption"]["sources"], "max_side": v["corruption"]["max_side"]}
    if not v["data"]["synthesise"]:
        data_params["files"] = _file_stamps(v["data"])
    data = _unit("data", "data", "data", data_params, [])
    model = {"architecture": v["model"]["architecture"], "init": v["model"]["init"]}
    selector = _unit("selector", "selector", "selector",
                     {**model, **v["selector"], "train_config": _train_config(v, "selector", v["selector"]["seed"])},
                     [data])
    regions = _unit("corruption", "regions", "regions", {}, [data, selector])
    units = [data, selector, regions]
    c = v["corruption"]
    corrupt: dict[str, Unit] = {}
    for name, variant in variants(config).items():
        params = {**variant, "inversion": c["inversion"], "preset": c["preset"],
                  "num_inference_steps": c["num_inference_steps"], "baseline_steps": c["baseline_steps"],
                  "guidance_scale": c["guidance_scale"], "threshold": v["selector"]["threshold"],
                  "empty_regions": c["empty_regions"], "seed": c["seed"], "examples": c["examples"],
                  "diffusion": v["model"]["diffusion"]}
        corrupt[name] = _unit("corruption", "corrupt", f"corrupt/{name}", params, [data, regions])
    units += list(corrupt.values())
    detectors = []
    for train in training_sets(config):
        for seed in v["experiment"]["seeds"]:
            params = {**model, **v["detector"], "train": train, "seed": seed,
                      "train_config": _train_config(v, "detector", seed)}
            inputs = [data]
            if train == "pseudo":
                params["pseudo_threshold"] = v["pseudo"]["threshold"]
                inputs.append(regions)
            elif train != "human":
                inputs.append(corrupt[train])
            detectors.append(_unit("detectors", "detector", f"detector/{train}-s{seed}", params, inputs))
    units += detectors
    units += [_unit("evaluation", "evaluate", f"evaluate/{d.name.split('/', 1)[1]}", {}, [d, data]) for d in detectors]
    return units


def _train_config(values: dict, section: str, seed: int) -> dict:
    """The full training config (engines.training.recipes.resolve_recipe, as JSON) of the selector or a
    detector: part of the unit's key, so a recipe that changes in the engines retrains."""
    from studio.experiments import adapter

    s = values[section]
    return adapter.train_config(arch=values["model"]["architecture"], init=values["model"]["init"], recipe=s["recipe"],
                                steps=s["steps"], batch_size=s["batch_size"], crop=s["crop"], lr=s["lr"],
                                eval_every=s["eval_every"], seed=seed, selector=section == "selector").to_json()


def _file_stamps(data: dict) -> dict:
    """Size and mtime of the input files, so a replaced file invalidates the data step."""
    stamps = {}
    for key in ("train_tfrecord", "val_tfrecord", "test_tfrecord", "captions"):
        if data[key] and path_of(data[key]).is_file():
            st = path_of(data[key]).stat()
            stamps[key] = [str(path_of(data[key]).resolve()), st.st_size, st.st_mtime_ns]
    return stamps


def step_key(units: list[Unit]) -> str:
    return hashlib.sha256("|".join(u.key for u in units).encode()).hexdigest()


class Stopped(Exception):
    """should_stop() asked a unit to end early (its partial work is kept)."""


# ---------------------------------------------------------------------------------------------- run folder

def read_config(run_dir: Path) -> ExperimentConfig:
    """The resolved config a run folder was started with."""
    file = Path(run_dir) / RESOLVED
    if not file.is_file():
        raise ValueError(f"'{run_dir}' is not an experiment run folder (no {RESOLVED}).")
    saved = json.loads(file.read_text())
    return ExperimentConfig(values=saved["values"], profile=saved["profile"], source=saved.get("source"),
                            text=saved.get("text", ""))


def unit_done(run_dir: Path, unit: Unit) -> dict | None:
    """The unit's done record if it finished with this key, else None."""
    file = Path(run_dir) / unit.folder / DONE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("key") == unit.key else None


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary sibling, then rename (a killed run never leaves half a file)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, np.ascontiguousarray(array))
    os.replace(tmp, path)


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
