"""What a unit runner of the experiment runner gets: `StepContext` (run folder, data directory, device,
rank, progress reporting, stop, and the corruption engine loaded once per process).

Used by studio/experiments/dataset.py and studio/experiments/steps.py; imports only .plan and .adapter.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.experiments import adapter
from studio.experiments.config import ExperimentConfig
from studio.experiments.plan import Unit, now, unit_done, write_json

@dataclass
class StepContext:
    """What a unit runner needs: where, on which device, which rank, how to report and stop."""

    run_dir: Path
    data_dir: Path
    device: str
    config: ExperimentConfig
    units: dict
    rank: int = 0
    world: int = 1
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[dict], None] = lambda row: None
    _engine: object = field(default=None, repr=False)
    _last_report: float = field(default=0.0, repr=False)

    def folder(self, unit: Unit | str) -> Path:
        unit = self.units[unit] if isinstance(unit, str) else unit
        path = self.run_dir / unit.folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def result(self, name: str) -> dict:
        record = unit_done(self.run_dir, self.units[name])
        if record is None:
            raise RuntimeError(f"unit {name} has not finished; run its step first.")
        return record["result"]

    def index(self) -> list[dict]:
        return json.loads((self.folder("data") / "index.json").read_text())

    def progress(self, unit: Unit, done: int, total: int, force: bool = False) -> None:
        clock = time.monotonic()
        if not force and clock - self._last_report < 1.0 and done != total:
            return
        self._last_report = clock
        write_json(self.folder(unit) / f"progress.rank{self.rank}.json", {"done": done, "total": total, "at": now()})
        self.log({"step": int(done), "total": int(total), "unit": unit.name, "rank": self.rank})

    def engine(self):
        """The RegionCorruptor (pipeline loaded once per process)."""
        if self._engine is None:
            loaded = adapter.load_pipeline(self.config.get("model.diffusion"), self.data_dir, self.device)
            self._engine = adapter.corruptor(loaded, self.run_dir / "cache" / "inversions")
        return self._engine
