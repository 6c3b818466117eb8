"""`artifact-studio` commands that train or classify: train-detector, tune (and tune --feedback),
train-classifier, classify, jobs, cancel.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.cli.common import EXIT_USER_ERROR, StderrProgress, open_services, read_prompts
from studio.cli.data import unique_names


def add_train_arguments(td: argparse.ArgumentParser) -> None:
    """train-detector's flags: every knob of the recipe (unset = the recipe's value), the data split and
    the run (device, processes)."""
    td.add_argument("--session", help="session with labelled (and synthetic) images")
    td.add_argument("--recipe", default="balanced", choices=["paper", "balanced"],
                    help="paper: the synthetic-artifact paper's UperNet recipe; balanced: class-balanced sampling and "
                         "loss weights for small sessions (README: Training recipes)")
    td.add_argument("--arch", default="tiny", help="tiny, upernet-convnext-tiny, upernet-swin-tiny, or a checkpoint folder")
    td.add_argument("--init", default=None, help="ADE20K UperNet folder or hub id to initialise from")
    knobs = td.add_argument_group("recipe knobs (default: the recipe's value)")
    knobs.add_argument("--steps", type=int, default=None)
    knobs.add_argument("--batch-size", type=int, default=None, help="global batch (split over --processes)")
    knobs.add_argument("--crop", type=int, default=None)
    knobs.add_argument("--input-size", type=int, default=None, help="detector input size (default: the crop)")
    knobs.add_argument("--lr", type=float, default=None, help="default 6e-5 with pretrained weights, "
                                                                "the measured from-scratch rate otherwise")
    knobs.add_argument("--betas", type=_float_pair, default=None, help="AdamW betas, e.g. 0.9,0.999")
    knobs.add_argument("--weight-decay", type=float, default=None)
    knobs.add_argument("--lr-schedule", choices=["poly", "constant"], default=None)
    knobs.add_argument("--warmup-steps", type=int, default=None)
    knobs.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None)
    knobs.add_argument("--scale-range", type=_float_pair, default=None, help="random resize range, e.g. 0.5,2.0")
    knobs.add_argument("--color-jitter", type=float, default=None, help="0 = none")
    knobs.add_argument("--sampling", choices=["balanced", "uniform"], default=None)
    knobs.add_argument("--source-weights", type=_source_weights, default=None, help="e.g. human=1,synthetic=0.5")
    knobs.add_argument("--balance-alpha", type=float, default=None)
    knobs.add_argument("--negative-fraction", type=float, default=None)
    knobs.add_argument("--p-pos", type=float, default=None, help="chance a crop is placed on an artifact")
    knobs.add_argument("--min-area", type=float, default=None, help="balanced sampling: smallest area fraction counted")
    knobs.add_argument("--balance-clip", type=float, default=None, help="balanced sampling: largest balance factor")
    knobs.add_argument("--artifact-weight-cap", type=float, default=None, help="cap of the automatic artifact weight")
    knobs.add_argument("--artifact-weight", type=_auto_float, default=None,
                       help="class weight of the artifact class: a number (1 = plain cross-entropy) or auto")
    knobs.add_argument("--aux-weight", type=float, default=None, help="auxiliary-head loss weight (ADE20K UperNets)")
    knobs.add_argument("--eval-every", type=int, default=None)
    knobs.add_argument("--seed", type=int, default=None)
    data = td.add_argument_group("data and split")
    data.add_argument("--val-fraction", type=float, default=None, help="share of families with human labels in val (0.2)")
    data.add_argument("--test-fraction", type=float, default=None, help="share in test (0.2)")
    data.add_argument("--split-seed", type=int, default=None, help="seed of the family split (0)")
    data.add_argument("--test-images", default=None, help="a fixed test set: image folder (with --test-masks)")
    data.add_argument("--test-masks", default=None, help="masks of --test-images, matched by file name")
    data.add_argument("--sources", default=None, help="train on these sources, e.g. human,synthetic (default all)")
    data.add_argument("--region-selector", action="store_true", help="train the region selector (human masks only)")
    data.add_argument("--pseudo-detector", default=None, help="also use this detector's thresholded output on unlabelled images")
    data.add_argument("--pseudo-threshold", type=float, default=None)
    data.add_argument("--unlabelled-as-background", action="store_true",
                      help="train never-labelled images as all-background (off: they are not used)")
    run = td.add_argument_group("run")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA > MPS > CPU)")
    run.add_argument("--processes", type=int, default=None, help="data-parallel processes (accelerate launch)")
    run.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: by core count)")
    td.add_argument("--resume", type=int, metavar="JOB", help="resume an interrupted/cancelled job instead")
    td.add_argument("--detach", action="store_true", help="start the job and return at once")
    td.add_argument("--json", action="store_true")


def _float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.9,0.999, got {text!r}") from None
    return a, b


def _auto_float(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _source_weights(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected source=weight pairs like human=1,synthetic=0.5, got {text!r}") from None
    return out


TRAIN_KNOBS = ("steps", "batch_size", "crop", "input_size", "lr", "betas", "weight_decay", "lr_schedule", "warmup_steps",
               "hflip", "scale_range", "color_jitter", "sampling", "source_weights", "balance_alpha",
               "negative_fraction", "p_pos", "min_area", "balance_clip", "artifact_weight", "artifact_weight_cap",
               "aux_weight", "eval_every", "seed")


def cmd_train_detector(args) -> int:
    from engines.training.recipes import describe
    from engines.training.detector import TrainConfig
    from studio.jobs import JobManager
    from studio.datasets.training_data import detector_job_params

    services = open_services(args)
    try:
        manager = JobManager(services.store)
        if args.resume is not None:
            job = manager.resume(args.resume)
        else:
            if not args.session:
                raise ValueError("--session is required (or --resume JOB).")
            session = services.store.get_session(args.session)
            config = {k: getattr(args, k) for k in TRAIN_KNOBS}
            if config["artifact_weight"] == "auto":
                config["artifact_weight"] = None
                explicit_auto = True
            else:
                explicit_auto = False
            params = detector_job_params(
                args.recipe, region_selector=args.region_selector, arch=args.arch, init=args.init, config=config,
                data={"val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
                      "split_seed": args.split_seed, "test_images": args.test_images, "test_masks": args.test_masks,
                      "sources": [v.strip() for v in args.sources.split(",")] if args.sources else None,
                      "pseudo_detector": args.pseudo_detector, "pseudo_threshold": args.pseudo_threshold,
                      "unlabelled_as_background": args.unlabelled_as_background or None},
                run={"device": args.device, "processes": args.processes, "workers": args.workers})
            if explicit_auto:
                params["config"]["artifact_weight"] = None
            kind = "region-selector" if args.region_selector else "detector"
            job = manager.launch(kind, params, session.id)
            print(f"recipe '{args.recipe}' resolved ({job.params['device']}, {job.params.get('processes', 1)} "
                  f"process(es)):\n{describe(TrainConfig(**job.params['config']))}", file=sys.stderr)
        return _follow(manager, job.id, args)
    finally:
        services.close()


def _check_train_config(config: dict) -> None:
    from engines.training.detector import TrainConfig

    TrainConfig(**config).validate()


def cmd_tune(args) -> int:
    from engines.training.tune import TuneConfig
    from engines.training.tune_eval import split_prompts
    from studio.jobs import JobManager

    if args.feedback:
        return cmd_tune_feedback(args)
    if not args.detector:
        raise ValueError("--detector is required (or --feedback classifier:SPEC).")
    prompts = read_prompts(args.prompts, "Prompt file")
    eval_prompts = read_prompts(args.eval_prompts, "Evaluation prompt file") if args.eval_prompts else None
    if eval_prompts is not None and args.eval_fraction is not None:
        raise ValueError("Give --eval-prompts or --eval-fraction, not both.")
    config = _tune_config(args)
    settings = TuneConfig(**{k: tuple(v) if k == "eval_seeds" else v for k, v in config.items()})
    settings.validate()
    split = split_prompts(prompts, eval_prompts, fraction=settings.eval_fraction, seed=settings.seed)
    eval_detector = (args.eval_detector or "").strip() or None
    if eval_detector is not None and eval_detector == args.detector.strip():
        raise ValueError(f"The evaluation detector '{eval_detector}' is the detector tuning optimises; give another one.")
    count = min(len(split.evaluate), settings.eval_prompts)
    print(f"tune: {len(split.train)} training prompt(s); evaluation on {count} {_EVAL_SET_WORDS[split.source]} "
          f"x {len(settings.eval_seeds)} seed(s)" + (f", also judged by {eval_detector}" if eval_detector else ""),
          file=sys.stderr)
    services = open_services(args)
    try:
        manager = JobManager(services.store)
        job = manager.launch("lora", {"config": config, "prompts": prompts, "eval_prompts": eval_prompts,
                                      "detector": args.detector, "eval_detector": eval_detector, "model": args.model,
                                      "device": args.device})
        return _follow(manager, job.id, args)
    finally:
        services.close()


_EVAL_SET_WORDS = {"held-out": "held-out prompt(s) from --eval-prompts",
                   "split": "held-out prompt(s) (a seeded share of --prompts, never trained on)",
                   "training": "TRAINING prompt(s) (not held out: --eval-fraction 0)"}


def _tune_config(args) -> dict:
    """TuneConfig fields from the `tune` flags; flags not given keep the engine's defaults."""
    config = {"steps": args.steps, "seed": args.seed}
    if args.eval_seeds is not None:
        try:
            config["eval_seeds"] = [int(s) for s in args.eval_seeds.split(",")]
        except ValueError:
            raise ValueError(f"Evaluation seeds must be comma-separated integers, got '{args.eval_seeds}'.") from None
    for flag, key in (("eval_fraction", "eval_fraction"), ("eval_count", "eval_prompts"), ("loss", "loss_mode"),
                      ("lr", "lr"), ("inference_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                      ("size", "width"), ("size", "height")):
        if getattr(args, flag) is not None:
            config[key] = getattr(args, flag)
    return config


def _tune_lines(result: dict) -> list[str]:
    """A `tune` job's result as lines: where the evaluation came from, then before -> after per detector."""
    lines = [f"lora_dir: {result.get('lora_dir')}", f"steps: {result.get('steps_done')}"
             + (" (stopped)" if result.get("stopped") else "")]
    seeds, prompts = result.get("eval_seeds") or [], result.get("eval_prompts") or []
    lines.append(f"evaluation: {len(prompts)} {_EVAL_SET_WORDS.get(result.get('eval_set'), 'prompt(s)')} x "
                 f"{len(seeds)} seed(s) {list(seeds)}, the same prompts and seeds before and after; "
                 f"{len(result.get('train_prompts') or [])} training prompt(s)")
    for name, before, after, change in (
            ("optimised detector", result.get("before"), result.get("after"), result.get("change")),
            ("independent detector", result.get("independent_before"), result.get("independent_after"),
             result.get("independent_change"))):
        if not before:
            continue
        line = f"{name} {before.get('detector')}: artifact area {100 * before['artifact_area']:.2f}%"
        if after:
            line += (f" -> {100 * after['artifact_area']:.2f}% ({100 * change['artifact_area']:+.2f} points; "
                     f"{change['lower']} of {after['images']} images lower, {change['higher']} higher), mean score "
                     f"{before['mean_score']:.4f} -> {after['mean_score']:.4f}")
        else:
            line += f", mean score {before['mean_score']:.4f} (no after: stopped)"
        lines.append(line)
    if result.get("outside_change") is not None:
        lines.append(f"outside change: {result['outside_change']:.2f} (mean |pixel change|, uint8 levels, where "
                     "neither heatmap marks an artifact)")
    return lines


def cmd_tune_feedback(args) -> int:
    """`tune --feedback classifier:SPEC`: DDPO on the LoRA with the classifier's artifact probability as reward.
    Held-out prompts as in `tune` (engines.training.tune_eval.split_prompts): --eval-prompts FILE, else a seeded --eval-fraction
    (default 0.25) of --prompts that is never trained on."""
    from engines.training.tune_eval import split_prompts
    from engines.training.feedback import FeedbackConfig
    from studio.jobs import JobManager

    spec = args.feedback.strip()
    if not spec.startswith("classifier:") or not spec[len("classifier:"):].strip():
        raise ValueError(f"--feedback must look like classifier:SPEC (e.g. classifier:demo), got '{args.feedback}'.")
    prompts = read_prompts(args.prompts, "Prompt file")
    eval_prompts = read_prompts(args.eval_prompts, "Evaluation prompt file") if args.eval_prompts else None
    if eval_prompts is not None and args.eval_fraction is not None:
        raise ValueError("Give --eval-prompts or --eval-fraction, not both.")
    fraction = 0.25 if args.eval_fraction is None else args.eval_fraction
    split = split_prompts(prompts, eval_prompts, fraction=fraction, seed=args.seed)
    prompts, held_out = list(split.train), list(split.evaluate)
    config = {"steps": args.steps, "seed": args.seed}
    FeedbackConfig(**config).validate()
    from engines.classification.classify import check_classifier

    check_classifier(spec[len("classifier:"):])  # before any job exists
    services = open_services(args)
    try:
        manager = JobManager(services.store)
        job = manager.launch("lora-feedback", {"config": config, "prompts": prompts, "eval_prompts": held_out,
                                               "classifier": spec[len("classifier:"):].strip(),
                                               "detector": args.detector or "demo", "model": args.model})
        return _follow(manager, job.id, args)
    finally:
        services.close()


def cmd_train_classifier(args) -> int:
    from engines.training.classifier import ClassifierTrainConfig
    from studio.jobs import JobManager, resolve_device
    from studio.datasets.splits import validate_fractions

    services = open_services(args)
    try:
        manager = JobManager(services.store)
        if args.resume is not None:
            job = manager.resume(args.resume)
        else:
            if not args.session:
                raise ValueError("--session is required (or --resume JOB).")
            session = services.store.get_session(args.session)
            family = "vlm" if args.classifier.strip().startswith("vlm:") or _is_vlm_folder(args.classifier) else "head"
            lr = args.lr if args.lr is not None else (1e-3 if family == "head" else 1e-4 if args.lora else 1e-5)
            batch = args.batch_size if args.batch_size is not None else (32 if family == "head" else 4)
            config = {"steps": args.steps, "batch_size": batch, "lr": lr, "eval_every": args.eval_every,
                      "seed": args.seed, "lora": bool(args.lora)}
            ClassifierTrainConfig(**config).validate()
            validate_fractions(args.val_fraction, args.test_fraction)
            if args.split_seed < 0:
                raise ValueError(f"--split-seed must be a non-negative integer, got {args.split_seed}.")
            device = resolve_device(args.device or ("cpu" if family == "head" else services.device))
            from engines.classification.classify import check_classifier

            check_classifier(args.classifier)  # before any job exists: a head loads, a VLM's config is read
            _check_classified_regions(services, session)
            job = manager.launch("classifier", {"config": config, "classifier": args.classifier, "level": args.level,
                                                "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
                                                "split_seed": args.split_seed, "device": device}, session.id)
        return _follow(manager, job.id, args)
    finally:
        services.close()


def _check_classified_regions(services, session) -> None:
    """ValueError unless some labelled region of the session has a class of its taxonomy (checked before a job exists)."""
    names = {c["name"] for c in services.taxonomy(session.id)}
    if not any(n and name in names for name, n in services.store.class_counts(session.id).items()):
        raise ValueError(f"Session '{session.name}' has no labelled region with a class of its taxonomy; give regions "
                         "a class in the Label tab first.")


def _is_vlm_folder(spec: str) -> bool:
    folder = Path(spec.strip()).expanduser()
    meta = folder / "classifier.json"
    try:
        return folder.is_dir() and meta.is_file() and json.loads(meta.read_text()).get("family") == "vlm"
    except (OSError, ValueError, AttributeError):
        return False  # not a VLM checkpoint; loading it says what is wrong


def cmd_classify(args) -> int:
    from dataclasses import replace

    from engines.images import find_images, load_image

    if args.threshold is not None and not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be strictly between 0 and 1, got {args.threshold}.")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1.")
    if args.regions != "none" and not args.session:
        raise ValueError("--regions labels needs --session (folders have no regions).")
    services = open_services(args, uses=args.classifier)
    try:
        taxonomy = None
        if args.session:
            session = services.store.get_session(args.session)
            records = services.store.list_images(session.id)
            if not records:
                raise ValueError(f"Session '{session.name}' has no images.")
            taxonomy = services.taxonomy(session.id)
            names = [Path(r.original_name or f"image-{r.id}").stem + f"-{r.id}" for r in records]
            images = [services.store.load_rgb(r.id) for r in records]
            regions, keys = None, None
            if args.regions == "labels":
                states = [services.store.label_state(r.id).regions for r in records]
                regions = [[tuple(x.bbox) for x in st if x.bbox] for st in states]
                keys = [[x.key for x in st if x.bbox] for st in states]
        else:
            files = find_images([args.images])
            if not files:
                raise ValueError(f"No image files in {args.images}.")
            images, names, regions, keys = [load_image(f) for f in files], unique_names(files), None, None
        classifier = services.classifier(args.classifier, taxonomy)
        if args.threshold is not None:
            from engines.classification.classify import ArtifactClassifier

            classifier = ArtifactClassifier(replace(classifier.loaded, extra=replace(classifier.spec, threshold=args.threshold)))
        if classifier.loaded.note:
            print(f"note: {classifier.loaded.note}", file=sys.stderr)
        if taxonomy is not None and classifier.fixed_classes and \
                [c["name"] for c in classifier.classes()] != [c["name"] for c in taxonomy]:
            print("note: this head was trained on other classes than the session's taxonomy; its own classes are used.",
                  file=sys.stderr)
        bar = StderrProgress("classifying")
        try:
            results = classifier.classify(images, regions, taxonomy=taxonomy, captions=not args.no_captions,
                                          batch_size=args.batch_size, progress=bar)
        finally:
            bar.close()
        rows = []
        counters: dict = {}
        for r in results:
            row = {"name": names[r.image_index], **r.to_json()}
            if keys is not None:
                n = counters.get(r.image_index, 0)
                row["region_key"] = keys[r.image_index][n]
                counters[r.image_index] = n + 1
            rows.append(row)
        if args.json:
            print(json.dumps({"classifier": classifier.classifier_id, "demo": classifier.loaded.is_demo,
                              "threshold": classifier.spec.threshold, "results": rows}, indent=2))
        else:
            for row, r in zip(rows, results):
                where = f" {row['region_key']}" if "region_key" in row else ""
                found = ", ".join(f"{p.class_name} {p.probability:.2f}" for p in r.predicted) or "no artifact class"
                print(f"{row['name']}{where}: {found}")
                for p in r.predicted:
                    if p.caption:
                        print(f"    {p.class_name}: {p.caption}")
        return 0
    finally:
        services.close()


def _follow(manager, job_id: int, args) -> int:
    """Print a job's metric rows to stderr until it ends (Ctrl-C detaches; the job keeps running)."""
    import time

    job = manager.store.get_job(job_id)
    print(f"job {job.id} ({job.kind}) {job.status}; log: {job.log_path}", file=sys.stderr)
    if args.detach:
        print(job.id)
        return 0
    seen = 0
    try:
        while True:
            rows = manager.store.job_metrics(job_id)
            for row in rows[seen:]:
                print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      file=sys.stderr)
            seen = len(rows)
            job = manager.store.get_job(job_id)
            if job.status in ("succeeded", "failed", "cancelled", "interrupted"):
                break
            if job.status == "running":
                manager.recover()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"artifact-studio: detached; job {job_id} keeps running (`artifact-studio cancel {job_id}` stops it).",
              file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps({"job": job.id, "kind": job.kind, "status": job.status, "error": job.error,
                          "result": job.result}, indent=2))
    else:
        print(f"job {job.id} {job.status}" + (f": {job.error}" if job.error else ""))
        if job.kind == "lora" and job.result:
            for line in _tune_lines(job.result):
                print(f"  {line}")
            return 0 if job.status in ("succeeded", "cancelled") else EXIT_USER_ERROR
        for key, value in job.result.items():
            if key not in ("data", "history"):
                print(f"  {key}: {value}")
        if job.kind == "classifier" and job.status == "succeeded":
            test = job.result.get("test") or {}
            if test.get("tuned"):
                zero, tuned = test.get("zero_shot") or {}, test["tuned"]
                print(f"test set ({tuned.get('samples')} samples): micro F1 {_fmt(zero.get('micro_f1'))} zero-shot -> "
                      f"{_fmt(tuned.get('micro_f1'))} tuned, exact match {_fmt(zero.get('exact_match'))} -> "
                      f"{_fmt(tuned.get('exact_match'))}")
            else:
                print("no test set: the val numbers chose the checkpoint, so they are optimistic; label more images")
        if job.kind in ("detector", "region-selector") and job.status == "succeeded":
            test = job.result.get("test")
            if test:
                print(f"test set ({test.get('num_images')} images): artifact_iou {_fmt(test.get('artifact_iou'))} "
                      f"(headline), 2-class mIoU {_fmt(test.get('miou'))}")
            else:
                print("no test set: the val numbers chose the checkpoint, so they are optimistic; label more images "
                      "or give --test-images/--test-masks")
    return 0 if job.status in ("succeeded", "cancelled") else EXIT_USER_ERROR


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def cmd_jobs(args) -> int:
    from studio.jobs import JobManager

    services = open_services(args)
    try:
        manager = JobManager(services.store)
        manager.recover()
        jobs = services.store.list_jobs()
        if args.json:
            print(json.dumps([{"id": j.id, "kind": j.kind, "status": j.status, "session_id": j.session_id,
                               "created_at": j.created_at, "finished_at": j.finished_at, "error": j.error,
                               "result": j.result} for j in jobs], indent=2))
        else:
            for j in jobs:
                print(f"{j.id:>4}  {j.kind:<16} {j.status:<12} {j.created_at[:19]}  {j.error or ''}")
        return 0
    finally:
        services.close()


def cmd_cancel(args) -> int:
    from studio.jobs import JobManager

    services = open_services(args)
    try:
        job = JobManager(services.store).cancel(args.job)
        print(f"job {job.id}: cancel requested" if job.status == "running" else f"job {job.id}: {job.status}")
        return 0
    finally:
        services.close()
