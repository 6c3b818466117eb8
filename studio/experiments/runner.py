"""The experiment runner: the synthetic-artifact paper's protocol (Menn, Liang, Marculescu) from one config.

`artifact-studio experiment run CONFIG.toml [--profile tiny|paper] [--device D] [--out DIR]` runs five
steps, each one job of studio/jobs.py (progress, cancel, interrupted -> resumable), then writes the
report (studio/experiments/report.py):

1. data        RichHF-18k preprocessing (engines/detection/richhf_prep.py: annotators inferred from each map's
               value grid, >= 2 of 3 votes), the fixed test set (ids + digest), RichHF-100, validation
               images, source images for corruption and pseudo labels.
2. selector    the region selector: the config's UperNet on RichHF-100 (paper: 1,000 iterations, batch 8),
               trained with the recipe engines.training.recipes resolves; checkpoint chosen on validation.
3. corruption  the selector's maps on the source images ("regions"), then one corrupted dataset per
               variant: the proposed method (ReNoise, N=50, k=10), the baselines (corrupted at step N-20,
               20 steps resampled), Table 3's corruption step s (k = N - s), Table 4's direct corruption
               (pure N(0, 1) in the image latent, no resampling). Items are sharded over processes.
4. detectors   one detector per training set and seed (human labels only, pseudo labels, each variant),
               same recipe; checkpoint chosen on validation.
5. evaluation  every chosen checkpoint on the fixed test set, scored as the trainer scores
               (engines.training.detector.evaluate_detector): artifact-class IoU (the paper's "mIoU"),
               2-class mIoU, per-image IoU.

Caching. A step is a list of units; a unit's key is the sha256 of its kind, its parameters, the keys of
the units it reads and a code version. A unit lives in `RUN/units/<kind>/<name>-<key12>/` and is done
when its `done.json` holds that key, so rerunning (or changing one table) redoes only what changed.
Units are resumable inside: the data and corruption units skip items already written (each file is
written to a temporary name and renamed before its manifest line), trainers continue from their last
checkpoint (engines.training.detector, bit-exact on CPU). All randomness is a function of the config's
seeds, so a killed and rerun experiment gives the same results as an uninterrupted one.

Several processes (`accelerate launch`, as the job system does when accelerate is configured for
several devices): corruption items and detector/evaluation units are spread over ranks
(RANK/WORLD_SIZE); the data and selector steps run on rank 0 while the others wait. Each rank uses
its own device (cuda:LOCAL_RANK).

Files: this module plans (units, keys, table rows), orchestrates (one job per step, resume, lock) and
reports status; studio/experiments/config.py reads and checks configs; studio/experiments/dataset.py
(step 1) and studio/experiments/steps.py (steps 2-5, and one step as a job's body) do the work through
studio/experiments/adapter.py, the only place that calls the training, corruption and detection engines;
studio/experiments/report.py writes the results.
"""
from __future__ import annotations

import fcntl
import json
import sys
import time
from pathlib import Path

from studio.experiments.config import PAPER_COUNTS, ExperimentConfig
from studio.experiments.plan import (JOB_KIND, JOBS_FILE, RESOLVED, RUN_FILE, STEP_TITLES, STEPS, TERMINAL, Unit, now,
                                     plan, read_config, step_key, unit_done, write_json)

# ---------------------------------------------------------------------------------------------- orchestration

def default_run_dir(data_dir: Path, config: ExperimentConfig) -> Path:
    return Path(data_dir) / "experiments" / f"{config.name}-{config.profile}"


def prepare_run(config: ExperimentConfig, run_dir: Path, *, data_dir: Path, device: str) -> list[str]:
    """Write the config and run record into the run folder; returns notes for the user."""
    run_dir.mkdir(parents=True, exist_ok=True)
    notes = []
    resolved = run_dir / RESOLVED
    if resolved.is_file():
        old = read_config(run_dir)
        if old.digest() != config.digest():
            notes.append("the config differs from this folder's previous run; finished units whose inputs did not "
                         "change are reused, the rest is redone")
    write_json(resolved, config.to_json() | {"text": config.text})
    if config.text:
        (run_dir / "config.toml").write_text(config.text)
    run = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {"created_at": now()}
    run.update(data_dir=str(Path(data_dir).resolve()), device=device, name=config.name, profile=config.profile,
               updated_at=now())
    write_json(run_dir / RUN_FILE, run)
    return notes


class RunLock:
    """An exclusive lock on a run folder (one `experiment run` at a time per folder)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ValueError(f"Another `experiment run` is using '{self.path.parent}'; wait for it or use "
                             "`experiment status`.") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        return False


def run_experiment(config: ExperimentConfig, run_dir: Path, *, store, device: str, echo=None,
                   poll: float = 1.0) -> int:
    """Run every unfinished step as a job (one at a time, in order), then write the report.
    Returns 0 when the report is complete, 1 when a step failed or was cancelled."""
    from studio.jobs import JobManager

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    run_dir = Path(run_dir).resolve()
    manager = JobManager(store)
    with RunLock(run_dir):
        for note in prepare_run(config, run_dir, data_dir=store.data_dir, device=device):
            echo(f"note: {note}")
        echo(f"experiment '{config.name}' (profile {config.profile}) on {device}; run folder: {run_dir}")
        units = plan(config)
        jobs = _read_jobs(run_dir)
        for number, step in enumerate(STEPS, start=1):
            mine = [u for u in units if u.step == step]
            done = sum(unit_done(run_dir, u) is not None for u in mine)
            if done == len(mine):
                echo(f"[{number}/{len(STEPS)}] {STEP_TITLES[step]}: done ({len(mine)} unit(s), cached)")
                _echo_after(step, run_dir, mine, echo)
                continue
            key = step_key(mine)
            job, how = _job_for_step(manager, jobs.get(step), key)
            if job is None:
                job = manager.launch(JOB_KIND, {"run_dir": str(run_dir), "step": step, "key": key, "device": device})
                how = "started"
            jobs[step] = job.id
            write_json(run_dir / JOBS_FILE, jobs)
            echo(f"[{number}/{len(STEPS)}] {STEP_TITLES[step]}: {done}/{len(mine)} unit(s) done; {how} job {job.id}")
            try:
                job = _follow(manager, job.id, echo, poll)
            except KeyboardInterrupt:
                echo(f"detached; job {job.id} keeps running. Rerun the same command to re-attach; "
                     f"`artifact-studio cancel {job.id}` stops it.")
                return 130
            if job.status != "succeeded":
                why = f": {job.error}" if job.error else ""
                echo(f"step {step} {job.status}{why}. Rerun the same command to resume it.")
                return 1
            missing = [u.name for u in mine if unit_done(run_dir, u) is None]
            if missing:
                echo(f"step {step} ended with {len(missing)} unit(s) unfinished ({missing[0]}); rerun to resume.")
                return 1
            _echo_after(step, run_dir, mine, echo)
    from studio.experiments.report import write_report

    report = write_report(run_dir)
    echo(f"report: {report}")
    return 0


def _read_jobs(run_dir: Path) -> dict:
    file = Path(run_dir) / JOBS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def _job_for_step(manager, job_id: int | None, key: str):
    """(the step's earlier job to resume or re-attach to (same config), how), else (None, "")."""
    from studio.store.store import StoreError

    if job_id is None:
        return None, ""
    manager.recover()
    try:
        job = manager.store.get_job(job_id)
    except StoreError:
        return None, ""
    if job.kind != JOB_KIND or job.params.get("key") != key:
        return None, ""
    if job.status in ("running", "queued"):
        return job, "attached to"
    if job.status in ("interrupted", "cancelled", "failed"):
        return manager.resume(job.id), f"resumed ({job.status})"
    return None, ""


def _follow(manager, job_id: int, echo, poll: float):
    seen, last = 0, 0.0
    while True:
        job = manager.store.get_job(job_id)
        rows = manager.store.job_metrics(job_id)
        if rows[seen:] and time.monotonic() - last >= 5.0:
            row = rows[-1]
            echo(f"    {row.get('unit', '')}: {row.get('step')}/{row.get('total')}")
            last = time.monotonic()
        seen = len(rows)
        if job.status in TERMINAL:
            return job
        if job.status == "running":
            manager.recover()
        time.sleep(poll)


def _echo_after(step: str, run_dir: Path, units: list[Unit], echo) -> None:
    if step == "data":
        result = unit_done(run_dir, units[0])["result"]
        c, used = result["counts"], result["used"]
        echo(f"    kept after the annotator rule: train {c['train'].get('eligible', 0)} of {c['train'].get('records', 0)} "
             f"records (paper: {PAPER_COUNTS['train']:,}), test {used.get('test', 0)} of {c['test'].get('records', 0)} "
             f"(paper: {PAPER_COUNTS['test']}); RichHF-100 set: {used.get('human', 0)}, validation: {used.get('val', 0)}, "
             f"sources: {used.get('source', 0)}; test digest {result['test_digest'][:16]}")


# ---------------------------------------------------------------------------------------------- status

def run_status(run_dir: Path, store=None) -> dict:
    """Per-step state of a run folder: done / running / queued / interrupted / cancelled / failed / pending,
    units done of total, the job, and the running unit's progress."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    units = plan(config)
    jobs = _read_jobs(run_dir)
    run = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    steps = []
    for step in STEPS:
        mine = [u for u in units if u.step == step]
        done = [u for u in mine if unit_done(run_dir, u) is not None]
        job_id, job_status = jobs.get(step), None
        if job_id is not None and store is not None:
            try:
                job = store.get_job(job_id)
                job_status = job.status if job.params.get("key") == step_key(mine) else None
            except Exception:  # noqa: BLE001 - a job row deleted by hand: no job
                job_status = None
        state = "done" if len(done) == len(mine) else (job_status if job_status and job_status != "succeeded" else "pending")
        current = None
        for u in mine:
            if u in done:
                continue
            files = sorted((run_dir / u.folder).glob("progress.rank*.json")) if (run_dir / u.folder).is_dir() else []
            if files:
                progress = [json.loads(f.read_text()) for f in files]
                current = {"unit": u.name, "done": sum(p["done"] for p in progress),
                           "total": sum(p["total"] for p in progress)}
                break
        seconds = sum(float(unit_done(run_dir, u).get("seconds", 0.0)) for u in done)
        steps.append({"step": step, "title": STEP_TITLES[step], "state": state, "units_done": len(done),
                      "units_total": len(mine), "job_id": job_id, "job_status": job_status, "current": current,
                      "seconds": round(seconds, 1)})
    return {"run_dir": str(run_dir), "name": config.name, "profile": config.profile, "device": run.get("device"),
            "data_dir": run.get("data_dir"), "steps": steps, "finished": all(s["state"] == "done" for s in steps),
            "report": (run_dir / "results.md").is_file()}


def list_runs(data_dir: Path, store=None) -> list[Path]:
    """Run folders under <data-dir>/experiments and those named by experiment jobs, newest first."""
    found = set()
    root = Path(data_dir) / "experiments"
    if root.is_dir():
        found |= {p.resolve() for p in root.iterdir() if (p / RESOLVED).is_file()}
    if store is not None:
        for job in store.list_jobs():
            if job.kind == JOB_KIND and job.params.get("run_dir"):
                p = Path(job.params["run_dir"])
                if (p / RESOLVED).is_file():
                    found.add(p.resolve())
    return sorted(found, key=lambda p: (p / RESOLVED).stat().st_mtime, reverse=True)


ASSETS = Path(__file__).resolve().parents[2] / "assets" / "experiments"


def load_run_config(path: str, profile: str | None) -> ExperimentConfig:
    """load_config; `paper` / `tiny` (no such file here) name the shipped assets/experiments/*.toml."""
    from studio.experiments.config import load_config

    if not Path(path).expanduser().exists() and (ASSETS / f"{path}.toml").is_file():
        path = str(ASSETS / f"{path}.toml")
    return load_config(path, profile)


def resolve_device(device: str | None) -> str:
    """--device, checked (one sentence when unavailable); default CUDA > MPS > CPU."""
    from engines.models import pick_device

    if device is None or device == "auto":
        return pick_device()
    import torch

    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or mps, got '{device}'.")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine.")
        index = device.split(":", 1)[1] if ":" in device else "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple MPS is not available on this machine.")
    return device


def cli_experiment(args, open_services) -> int:
    """`artifact-studio experiment run|status|report` (see studio/cli/main.py for the arguments)."""
    if args.experiment_command == "run":
        config = load_run_config(args.config, args.profile)  # every config check happens before any work
        device = resolve_device(args.device)
        services = open_services(args)
        try:
            run_dir = Path(args.out).expanduser() if args.out else default_run_dir(services.data_dir, config)
            return run_experiment(config, run_dir, store=services.store, device=device)
        finally:
            services.close()
    run_dir = Path(args.run_dir).expanduser()
    read_config(run_dir)  # a clear error for a folder that is not a run
    if args.experiment_command == "report":
        from studio.experiments.report import write_report

        print(write_report(run_dir))
        return 0
    services = open_services(args) if args.data_dir or not (run_dir / RUN_FILE).is_file() else None
    if services is None:
        from studio.services import Services

        recorded = Path(json.loads((run_dir / RUN_FILE).read_text())["data_dir"])
        services = Services.open(recorded) if (recorded / "studio.db").is_file() else None
    try:
        if services is not None:
            from studio.jobs import JobManager

            JobManager(services.store).recover()
        status = run_status(run_dir, services.store if services else None)
    finally:
        if services is not None:
            services.close()
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"experiment {status['name']} (profile {status['profile']}) on {status['device']}: {status['run_dir']}")
    for s in status["steps"]:
        job = f"job {s['job_id']}" if s["job_id"] is not None else ""
        cur = f"{s['current']['unit']}: {s['current']['done']}/{s['current']['total']}" if s["current"] else ""
        print(f"  {s['title']:<34} {s['state']:<12} {s['units_done']}/{s['units_total']} units  {s['seconds']:>8.1f} s  "
              f"{job}  {cur}".rstrip())
    print("report: " + ("results.md" if status["report"] else "not written yet")
          + (" (complete)" if status["finished"] and status["report"] else ""))
    return 0
