"""Long-running work (training, tuning) as supervised subprocesses whose state lives in `jobs`.

A job is launched as its own process session (`python -m studio.jobs run ID`, or `accelerate launch`
with the job's `processes` (> 1) or when accelerate's default config names several devices), so it
keeps running when the app restarts and
the UI re-attaches by reading the table. Cancel writes a flag file the worker checks between steps:
the worker saves its checkpoint and ends as `cancelled`. A job whose process died is marked
`interrupted` on the next start and can be resumed (same output folder: the trainer continues from
its last checkpoint). One job runs at a time; others wait as `queued` and start when it ends.

Device: a job's params hold the device it runs on ("cpu", "cuda", "cuda:1", "mps"); `launch` fills
in the best one present (CUDA > MPS > CPU, `engines.models.pick_device`) when none is given and refuses
one this machine lacks (one sentence, no job created). The worker passes it to `train_detector` /
the pipeline `tune_lora` tunes (`job_call`). Under `accelerate launch` every process runs the worker;
only the main process (RANK 0) writes the job row, metrics, checkpoints and the log lines.

Layout: <data-dir>/jobs/<id>/{log.txt, cancel, out/}.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from studio.store.records import JobRecord
from studio.store.store import Store

JOB_KINDS = ("detector", "region-selector", "lora", "experiment", "classifier", "lora-feedback")
ONE_PROCESS_KINDS = ("lora", "classifier", "lora-feedback")
"""Job kinds whose trainer runs in one process (no data-parallel launch)."""
ROOT = Path(__file__).resolve().parent.parent


class JobManager:
    """Launch, cancel, resume and recover jobs of one data directory."""

    def __init__(self, store: Store):
        self.store = store

    def job_dir(self, job_id: int) -> Path:
        return self.store.data_dir / "jobs" / str(int(job_id))

    def launch(self, kind: str, params: dict, session_id: int | None = None) -> JobRecord:
        """Queue a job and start it now unless another job is running. `params["device"]` (default: the
        best device present) and `params["processes"]` (data-parallel processes, default 1) are checked
        first; a bad one raises ValueError and creates nothing."""
        if kind not in JOB_KINDS:
            raise ValueError(f"Unknown job kind '{kind}'; use one of {', '.join(JOB_KINDS)}.")
        params = {**params, "device": resolve_device(params.get("device"))}
        processes = params.get("processes", 1)
        if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= 64:
            raise ValueError(f"processes must be a whole number from 1 to 64, got {processes!r}.")
        if processes > 1 and kind in ONE_PROCESS_KINDS:
            what = "Classifier training" if kind == "classifier" else "LoRA tuning"
            raise ValueError(f"{what} runs in one process; leave processes at 1.")
        if processes > 1 and params["device"].startswith("cuda"):
            import torch

            if processes > torch.cuda.device_count():
                raise ValueError(f"{processes} processes need {processes} CUDA GPUs; this machine has "
                                 f"{torch.cuda.device_count()}.")
        from studio.safeio import Created

        with self.store.transaction(), Created() as created:  # the row and its folder, or neither
            job = self.store.create_job(kind, params, session_id)
            folder = self.job_dir(job.id)
            created.mkdir(folder / "out")
            self.store.update_job(job.id, log_path=str(folder / "log.txt"), out_dir=str(folder / "out"))
        self.start_next()
        return self.store.get_job(job.id)

    def start_next(self) -> JobRecord | None:
        """Start the oldest queued job if none is running; returns it."""
        self.recover()
        if self.store.list_jobs("running"):
            return None
        queued = self.store.list_jobs("queued")
        if not queued:
            return None
        job = queued[-1]
        folder = self.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cancel").unlink(missing_ok=True)
        log = open(folder / "log.txt", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        proc = subprocess.Popen(self.command(job), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(ROOT), env=env, start_new_session=True)
        log.close()
        return self.store.update_job(job.id, status="running", pid=proc.pid, started_at=_now(), error=None)

    def command(self, job: JobRecord) -> list[str]:
        """Plain python; `accelerate launch --multi_gpu --num_processes N` for a job with processes N > 1 (on
        a CPU job too: see below); `accelerate launch` with its default config when that names several devices."""
        worker = ["-m", "studio.jobs", "--data-dir", str(self.store.data_dir), "run", str(job.id)]
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        processes = int(job.params.get("processes", 1) or 1)
        if job.kind not in ONE_PROCESS_KINDS and processes > 1:
            # --multi_gpu selects accelerate's torchrun launcher (N processes with RANK/WORLD_SIZE); `--cpu`
            # would run one process. The worker's Accelerator(cpu=True) then uses gloo on a CPU job.
            return [*launch, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                    *worker]
        if job.kind not in ONE_PROCESS_KINDS and "processes" not in job.params and _accelerate_processes() > 1:
            return [*launch, *worker]
        return [sys.executable, *worker]

    def cancel(self, job_id: int) -> JobRecord:
        """Ask a running job to stop (it saves its checkpoint); a queued one is cancelled at once."""
        job = self.store.get_job(job_id)
        if job.status == "queued":
            return self.store.update_job(job.id, status="cancelled", finished_at=_now())
        if job.status != "running":
            raise ValueError(f"Job {job.id} is {job.status}; only queued or running jobs can be cancelled.")
        self.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        (self.job_dir(job.id) / "cancel").write_text("cancel requested\n")
        return job

    def resume(self, job_id: int) -> JobRecord:
        """Run an interrupted, cancelled or failed job again in its folder (continues from `last`)."""
        job = self.store.get_job(job_id)
        if job.status not in ("interrupted", "cancelled", "failed"):
            raise ValueError(f"Job {job.id} is {job.status}; only interrupted, cancelled or failed jobs can be resumed.")
        self.store.update_job(job.id, status="queued", finished_at=None, error=None, pid=None)
        self.start_next()
        return self.store.get_job(job.id)

    def recover(self) -> list[int]:
        """Mark running jobs whose process is gone as interrupted; returns their ids."""
        lost = []
        for job in self.store.list_jobs("running"):
            if job.pid is None or not process_alive(job.pid, job.id):
                fresh = self.store.get_job(job.id)  # the worker may have just finished
                if fresh.status == "running":
                    self.store.update_job(job.id, status="interrupted", finished_at=_now(),
                                          error="The job's process ended without reporting (killed or crashed).")
                    lost.append(job.id)
        return lost

    def kill(self, job_id: int) -> None:
        """Hard stop (SIGTERM to the job's process group); the job becomes interrupted. For tests/admin."""
        job = self.store.get_job(job_id)
        if job.pid:
            try:
                os.killpg(job.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def log_tail(self, job_id: int, lines: int = 40) -> str:
        job = self.store.get_job(job_id)
        if not job.log_path or not Path(job.log_path).is_file():
            return ""
        data = Path(job.log_path).read_bytes()[-20000:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])


def process_alive(pid: int, job_id: int) -> bool:
    """True if `pid` runs and is this job's worker (guards against pid reuse on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return True
        if b"studio.jobs" not in args or str(job_id).encode() not in args:
            return False
        status = Path(f"/proc/{pid}/stat").read_text().split()
        return len(status) < 3 or status[2] != "Z"  # a zombie has finished
    return True


def resolve_device(device: str | None) -> str:
    """The device a job runs on: `device` checked against this machine, or the best one present."""
    from engines.models import check_device, pick_device

    return check_device(device) if device not in (None, "", "auto") else pick_device()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank() -> tuple[int, int]:
    """(rank, world size) of this worker process: set by `accelerate launch` / torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def _accelerate_processes() -> int:
    """num_processes of the default accelerate config, 1 if none."""
    try:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        if not Path(default_config_file).is_file():
            return 1
        return int(getattr(load_config_from_file(default_config_file), "num_processes", 1) or 1)
    except Exception:  # noqa: BLE001 - a broken accelerate config means: run plainly
        return 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- worker

def run_job(data_dir: Path, job_id: int) -> int:
    """The worker: run one job to the end, recording metrics, result and final status. Under a
    data-parallel launch every process runs this; only rank 0 writes to the store and prints."""
    from studio.services import Services, quiet_libraries

    quiet_libraries()
    rank, world = _rank()
    main = rank == 0
    store = Store(data_dir)
    manager = JobManager(store)
    job = store.get_job(job_id)
    folder = manager.job_dir(job.id)
    cancel_flag = folder / "cancel"

    def should_stop() -> bool:
        return cancel_flag.exists()

    def log(row: dict) -> None:
        if main:
            store.add_job_metric(job.id, {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))})
            print(json.dumps(row), flush=True)

    status, error, result = "failed", None, {}
    try:
        services = Services(data_dir=Path(data_dir), store=store, device=job.params.get("device", "cpu"))
        if job.kind == "experiment":
            result = _run_experiment_step(services, job, Path(job.out_dir or folder / "out"), should_stop, log)
        elif job.kind in ("classifier", "lora-feedback"):
            runner = {"classifier": _run_classifier, "lora-feedback": _run_lora_feedback}[job.kind]
            result = runner(services, job, Path(job.out_dir or folder / "out"), should_stop, log)
        else:
            call = job_call(services, job, Path(job.out_dir or folder / "out"), should_stop, log, world=world)
            result = _result(job, call(), call.data)
        status = "cancelled" if result.get("stopped") else "succeeded"
    except ValueError as exc:
        error = " ".join(str(exc).split())
        if main:
            print(f"error: {error}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a worker records any crash in its job row
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    if main:
        store.update_job(job.id, status=status, finished_at=_now(), error=error, result=_finite(result))
        cancel_flag.unlink(missing_ok=True)
        manager.start_next()
    store.close()
    return 0 if status != "failed" else 1


def job_call(services, job: JobRecord, out: Path, should_stop=None, log=None, world: int = 1):
    """The engine call the worker makes for `job`, as a `functools.partial` (not yet run): data and
    models are prepared, the device is bound (`train_detector(device=...)`; for LoRA the pipeline and
    detector handed to `tune_lora` are loaded on it). `world` > 1: an `accelerate.Accelerator` (gloo on
    CPU) is created and passed to the trainer."""
    if job.kind in ("detector", "region-selector"):
        return _detector_call(services, job, out, should_stop, log, world)
    if job.kind == "lora":
        return _lora_call(services, job, out, should_stop, log)
    raise ValueError(f"Unknown job kind '{job.kind}'.")


@dataclass(frozen=True)
class JobCall:
    """An engine call ready to run: `engine` is a functools.partial of `train_detector` or `tune_lora`
    (its args/keywords show what the worker passes: device, data, models); `data` is the
    `TrainingData` of a detector job."""
    engine: functools.partial
    data: object = None

    def __call__(self):
        return self.engine()


def _result(job: JobRecord, outcome, data=None) -> dict:
    if job.kind == "lora":
        return {**outcome.to_json(), "stopped": bool(getattr(outcome, "stopped", False))}
    result = outcome
    return {"best_dir": str(result.best_dir) if result.best_dir else None, "last_dir": str(result.last_dir),
            "headline_metric": "artifact_iou", "best_val_artifact_iou": result.best_artifact_iou,
            "best_miou": result.best_miou, "best_step": result.best_step, "steps_done": result.steps_done,
            "test": result.test_metrics and {k: v for k, v in result.test_metrics.items() if k != "images"},
            "stopped": bool(result.stopped), "device": result.device, "data": data.summary}


def _finite(value):
    """JSON-safe copy: NaN/inf (e.g. a best mIoU before any evaluation) become None."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _detector_call(services, job: JobRecord, out: Path, should_stop, log, world: int):
    from engines.training.detector import TrainConfig, train_detector
    from engines.training.recipes import describe
    from studio.datasets.training_data import detector_samples

    params = dict(job.params)
    config = TrainConfig(**params.get("config", {}))
    config.validate()
    accelerator = _accelerator(services.device) if world > 1 else None
    main = accelerator is None or accelerator.is_main_process

    def pseudo_progress(done: int, total: int) -> None:
        if main:
            print(f"pseudo-labelling: {done}/{total} images", flush=True)

    if accelerator is not None:
        with accelerator.main_process_first():  # the main process fills the pseudo-label cache first
            data = detector_samples(services, job.session_id, params, region_selector=job.kind == "region-selector",
                                    progress=pseudo_progress)
    else:
        data = detector_samples(services, job.session_id, params, region_selector=job.kind == "region-selector",
                                progress=pseudo_progress)
    if main:
        print(f"recipe '{config.recipe}' on {services.device} ({world} process(es)):\n{describe(config)}", flush=True)
        print(f"data: {json.dumps(data.summary)}", flush=True)
    train = functools.partial(train_detector, config, data.train, data.val, out, should_stop=should_stop, log=log,
                              resume=True, device=services.device, test=data.test or None,
                              num_workers=params.get("workers"), accelerator=accelerator,
                              extra_provenance={"split": data.split.params if data.split else None,
                                                "session_id": job.session_id, "job_id": job.id,
                                                "data": {k: v for k, v in data.summary.items() if k != "split"}})
    return JobCall(train, data)


def _accelerator(device: str):
    """The Accelerator of a data-parallel worker: split batches (batch_size is the global batch), on
    the CPU (gloo) when the job's device is the CPU."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=device.startswith("cpu"), dataloader_config=DataLoaderConfiguration(split_batches=True))


def _lora_call(services, job: JobRecord, out: Path, should_stop, log):
    from engines.training.tune import TuneConfig, tune_lora

    params = dict(job.params)
    config = TuneConfig(**{k: tuple(v) if k == "eval_seeds" else v for k, v in params.get("config", {}).items()})
    spec, eval_spec = (params.get("detector") or "demo").strip(), (params.get("eval_detector") or "").strip() or None
    if eval_spec is not None and eval_spec == spec:
        raise ValueError(f"The evaluation detector '{eval_spec}' is the detector tuning optimises; give another one.")
    services.model_spec = params.get("model") or "demo"
    text2image = services.text2image()
    detector = services.detector(spec)
    judge = services.detector(eval_spec) if eval_spec else None
    return JobCall(functools.partial(tune_lora, config, text2image.loaded, detector, params["prompts"], out,
                                     should_stop=should_stop, log=log,
                                     held_out_prompts=params.get("eval_prompts") or None, eval_detector=judge))


def _run_experiment_step(services, job: JobRecord, out: Path, should_stop, log) -> dict:
    from studio.experiments.steps import run_step_job

    return run_step_job(services, job, out, should_stop, log)


def _run_classifier(services, job: JobRecord, out: Path, should_stop, log) -> dict:
    """Fine-tune a classifier on the session's labelled regions (see engines.training.classifier)."""
    from engines.classification.classify import ArtifactClassifier, load_classifier
    from engines.training.classifier import ClassifierTrainConfig, evaluate, train_head, train_vlm
    from studio.datasets.classifier_data import classifier_samples
    from studio.datasets.splits import DEFAULT_TEST_FRACTION

    params = dict(job.params)
    if job.session_id is None:
        raise ValueError("A classifier job needs a session with labelled regions.")
    taxonomy = services.taxonomy(job.session_id)
    data = classifier_samples(services.store, job.session_id, taxonomy, level=params.get("level", "region"),
                              val_fraction=float(params.get("val_fraction", 0.2)),
                              test_fraction=float(params.get("test_fraction", DEFAULT_TEST_FRACTION)),
                              seed=int(params.get("split_seed", params.get("seed", 0))))
    config = ClassifierTrainConfig(**params.get("config", {}))
    spec = params.get("classifier", "demo")
    loaded = load_classifier(spec, device=services.device, taxonomy=taxonomy)
    # the test split is scored before training (zero-shot) and with the best checkpoint after; val chooses it
    test_zero_shot = evaluate(ArtifactClassifier(loaded), data.test, taxonomy) if data.test else {}
    provenance = {"session_id": job.session_id, "job_id": job.id, "classifier": spec, "data": data.summary,
                  "split": data.split.params if data.split else None}
    if loaded.extra.family == "vlm":
        base = spec.split(":", 1)[1].split("#", 1)[0] if spec.startswith("vlm:") else spec
        result = train_vlm(config, loaded, taxonomy, data.train, data.val, out, base=base, should_stop=should_stop,
                           log=log, provenance=provenance)
    else:
        result = train_head(config, taxonomy, data.train, data.val, out, init=loaded, device=services.device,
                            should_stop=should_stop, log=log, provenance=provenance)
    summary = {k: v for k, v in result.to_json().items() if k != "history"}
    test = None
    if data.test and not result.stopped and result.best_dir and Path(result.best_dir).is_dir():
        del loaded  # a VLM: free the trained copy before the best checkpoint is loaded
        _free_device_memory()
        best = ArtifactClassifier(load_classifier(str(result.best_dir), device=services.device, taxonomy=taxonomy))
        test = {"zero_shot": test_zero_shot, "tuned": evaluate(best, data.test, taxonomy)}
    return {**summary, "test": test, "data": data.summary}


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_lora_feedback(services, job: JobRecord, out: Path, should_stop, log) -> dict:
    """Tune a LoRA with a classifier's artifact probability as the reward (engines.training.feedback)."""
    from engines.classification.classify import ArtifactClassifier, load_classifier
    from engines.training.feedback import FeedbackConfig, tune_feedback

    params = dict(job.params)
    config = FeedbackConfig(**params.get("config", {}))
    services.model_spec = params.get("model") or "demo"
    text2image = services.text2image()
    from studio.services import default_taxonomy

    classifier = ArtifactClassifier(load_classifier(params["classifier"], device=services.device,
                                                    taxonomy=params.get("taxonomy") or default_taxonomy()))
    detector = services.detector(params.get("detector") or "demo")
    result = tune_feedback(config, text2image.loaded, classifier, params["prompts"], out,
                           eval_prompts=params.get("eval_prompts") or None, detector=detector,
                           should_stop=should_stop, log=log)
    return {**result.to_json(), "stopped": bool(result.stopped)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.jobs")
    parser.add_argument("--data-dir", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    return run_job(Path(args.data_dir), args.job_id)


if __name__ == "__main__":
    sys.exit(main())
