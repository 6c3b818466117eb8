"""The `artifact-studio` command: a thin layer over engines + store.

Heavy modules (torch, diffusers, gradio) are imported inside the commands, so `--help` is fast.
A user mistake prints one line on stderr and exits with status 1 (argparse usage errors: 2);
it never prints a traceback and never leaves a half-written change behind.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from studio.cli.common import (DEBUG_ENV, EXIT_USER_ERROR, StderrProgress, captions_for, data_dir_of, open_services,
                               session_arg, store_into)
from studio.cli.data import cmd_detect, cmd_evaluate, cmd_export, cmd_import_masks, cmd_import_richhf
from studio.cli.synth import cmd_corrupt, cmd_repair
from studio.cli.train import (add_train_arguments, cmd_cancel, cmd_classify, cmd_jobs, cmd_train_classifier,
                              cmd_train_detector, cmd_tune)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (sub-commands inherit it)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default: $ARTIFACT_STUDIO_HOME, else ~/.local/share/artifact-studio)")

    parser = _Parser(prog="artifact-studio", description="Find, label, synthesise and repair artifacts in diffusion-model images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="start the studio web UI (default command of `python app.py`)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; anything else needs --auth)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--model", default=None, help="diffusers text-to-image pipeline: local folder or hub id (default: the embedded demo)")
    serve.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"], help="default: CUDA or MPS when present, else CPU")
    serve.add_argument("--sam", default="superpixel", help="Label tab segmenter: superpixel (offline fallback), "
                       "sam:/path/sam_vit_b_01ec64.pth, or hf-sam:FOLDER_OR_HUB_ID")
    serve.add_argument("--share", action="store_true", help="create a public Gradio share link (needs --auth)")
    serve.add_argument("--auth", help="USER:PASSWORD required to open the UI")
    serve.add_argument("--auth-file", help="file with one USER:PASSWORD per line")
    serve.add_argument("--export-root", help="folder the UI's Export may write into (default: <data-dir>/exports)")

    gen = sub.add_parser("generate", parents=[common], help="generate images into a session; prints each stored image's path")
    gen.add_argument("--session", required=True, help="session name or id")
    gen.add_argument("--create-session", action="store_true", help="create the session if it does not exist")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.5)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--count", type=int, default=1)
    gen.add_argument("--model", default=None, help="local pipeline folder or hub id (default: the embedded demo)")
    gen.add_argument("--trajectory", action="store_true", help="also store the experimental trajectory map (Inspect)")
    gen.add_argument("--lora", default=None, help="a LoRA folder (diffusers format, e.g. from `tune`) to apply")
    gen.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])

    imp = sub.add_parser("import", parents=[common], help="import image files or folders into a session")
    imp.add_argument("--session", required=True, help="session name or id")
    imp.add_argument("--create-session", action="store_true", help="create the session if it does not exist")
    imp.add_argument("--skip-bad", action="store_true", help="report unreadable files and import the rest (default: import nothing if any file is bad)")
    imp.add_argument("--captions", help="JSONL or CSV file of captions by image file name (file_name, caption)")
    imp.add_argument("paths", nargs="+", metavar="PATH")

    det = sub.add_parser("detect", parents=[common], help="artifact heatmaps, overlays and regions for images")
    det.add_argument("--detector", default="demo", help="demo, a checkpoint folder, or FAMILY:PATH (see README)")
    src = det.add_mutually_exclusive_group(required=True)
    src.add_argument("--session", help="run on every image of a session (heatmaps are stored in it)")
    src.add_argument("--images", help="run on the image files of a folder (needs --out)")
    det.add_argument("--out", help="write <name>_heatmap.png, <name>_overlay.png and regions.json here")
    det.add_argument("--mode", default="resize", choices=["resize", "sliding"], help="large-image strategy (README)")
    det.add_argument("--threshold", type=float, default=0.5, help="region threshold in [0, 1]")
    det.add_argument("--colormap", default="jet", choices=["jet", "turbo", "magma"])
    det.add_argument("--alpha", type=float, default=0.6)
    det.add_argument("--json", action="store_true", help="print regions per image as JSON")
    det.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])

    ev = sub.add_parser("evaluate", parents=[common], help="artifact IoU (headline), 2-class mIoU, precision and recall "
                        "against ground-truth masks, or on a session's held-out split")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--detector", help="run this detector on --images (or on --session's split)")
    what.add_argument("--predictions", help="folder of predicted masks or heatmaps (matched to masks by file stem)")
    ev.add_argument("--images", help="image folder (needed with --detector unless --session)")
    ev.add_argument("--masks", help="ground-truth masks folder (white = artifact); not with --session")
    ev.add_argument("--session", help="evaluate --detector on this session's held-out split (by family, human labels)")
    ev.add_argument("--split", default="test", choices=["test", "val"], help="--session: which held-out split (default test)")
    ev.add_argument("--val-fraction", type=float, default=None, help="--session: default the checkpoint's, else 0.2")
    ev.add_argument("--test-fraction", type=float, default=None, help="--session: default the checkpoint's, else 0.2")
    ev.add_argument("--split-seed", type=int, default=None, help="--session: default the checkpoint's, else 0")
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--mode", default="resize", choices=["resize", "sliding"])
    ev.add_argument("--json", action="store_true", help="machine-readable output with per-image rows")
    ev.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])

    rh = sub.add_parser("import-richhf", parents=[common], help="import RichHF-18k artifact maps as human masks")
    rh.add_argument("--session", required=True)
    rh.add_argument("--create-session", action="store_true", help="create the session if it does not exist")
    rh.add_argument("--tfrecord", required=True, help="train/dev/test.tfrecord of RichHF-18k")
    rh.add_argument("--images", required=True, help="folder with the Pick-a-Pic images, matched by filename")
    rh.add_argument("--threshold", type=float, default=0.5, help="fraction of 255; 0.5 = at least 2 of 3 annotators")

    exp = sub.add_parser("export", parents=[common], help="export a session's labels (png, coco, hf, synartifact, mmseg)")
    exp.add_argument("--session", required=True)
    exp.add_argument("--format", required=True, choices=["png", "coco", "hf", "synartifact", "mmseg", "vlm"])
    exp.add_argument("--out", required=True, help="output folder (must be empty or new)")
    exp.add_argument("--val-fraction", type=float, default=0.2, help="share of families (with human labels) in val")
    exp.add_argument("--test-fraction", type=float, default=0.2, help="share of families (with human labels) in test")
    exp.add_argument("--seed", "--split-seed", dest="seed", type=int, default=0, help="split seed (the same as training's --split-seed)")
    exp.add_argument("--unlabelled-as-background", action="store_true",
                     help="also export never-labelled images (train families only) as all-background examples")
    exp.add_argument("--overwrite", action="store_true", help="replace this format's files in a non-empty --out")

    imm = sub.add_parser("import-masks", parents=[common], help="import masks (png folder or COCO json) by file name")
    imm.add_argument("--session", required=True)
    imm.add_argument("--format", required=True, choices=["png", "coco"])
    imm.add_argument("path", metavar="PATH", help="png: a folder of binary masks; coco: annotations.json or its folder")

    td = sub.add_parser("train-detector", parents=[common], help="train an artifact detector (or region selector) as a job")
    add_train_arguments(td)

    tu = sub.add_parser("tune", parents=[common], help="tune a LoRA with a detector's per-pixel feedback (DiffDoctor stage 2)")
    tu.add_argument("--prompts", required=True, help="text file, one prompt per line")
    tu.add_argument("--detector", default=None, help="the detector whose per-pixel map is the loss (required without "
                    "--feedback); with --feedback, the pixel detector of the before/after report (default demo)")
    tu.add_argument("--feedback", default=None, metavar="classifier:SPEC",
                    help="use a classifier's artifact probability as the reward instead (DDPO, see README)")
    tu.add_argument("--model", default="demo")
    tu.add_argument("--steps", type=int, default=200)
    tu.add_argument("--seed", type=int, default=0, help="seeds training and the prompt split (default 0)")
    tu.add_argument("--eval-prompts", metavar="FILE", help="held-out evaluation prompts, one per line; none may "
                    "also be a training prompt")
    tu.add_argument("--eval-fraction", type=float, default=None, help="without --eval-prompts: hold out this "
                    "share of --prompts, chosen by --seed (default 0.25; 0 evaluates on the training prompts)")
    tu.add_argument("--eval-detector", metavar="SPEC", help="also score the evaluation images with this detector, "
                    "which tuning does not optimise")
    tu.add_argument("--eval-seeds", help="comma-separated seeds of the paired before/after images (default 0,1,2)")
    tu.add_argument("--eval-count", type=int, help="evaluate at most this many evaluation prompts (default 8)")
    tu.add_argument("--loss", help="weighted (DiffDoctor's, default), mean or soft")
    tu.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    tu.add_argument("--inference-steps", type=int, help="denoising steps per generation (default 20)")
    tu.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 7.5)")
    tu.add_argument("--size", type=int, help="width and height of the generations (default: the model's)")
    tu.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA > MPS > CPU)")
    tu.add_argument("--detach", action="store_true")
    tu.add_argument("--json", action="store_true")

    tc = sub.add_parser("train-classifier", parents=[common], help="fine-tune an artifact classifier on a session's regions, as a job")
    tc.add_argument("--session", help="session with regions labelled with classes")
    tc.add_argument("--classifier", default="demo", help="demo, head:FOLDER, vlm:FOLDER_OR_HUB_ID or a checkpoint folder")
    tc.add_argument("--lora", action="store_true", help="VLM: train LoRA adapters (default: all language-model weights)")
    tc.add_argument("--level", default="region", choices=["region", "image"], help="classify regions or whole images")
    tc.add_argument("--steps", type=int, default=300)
    tc.add_argument("--batch-size", type=int, default=None, help="default 32 (head) or 4 (VLM)")
    tc.add_argument("--lr", type=float, default=None, help="default 1e-3 (head), 1e-4 (VLM LoRA), 1e-5 (VLM full)")
    tc.add_argument("--eval-every", type=int, default=50)
    tc.add_argument("--val-fraction", type=float, default=0.2, help="share of families (with human labels) in val")
    tc.add_argument("--test-fraction", type=float, default=0.2, help="share of families (with human labels) in test")
    tc.add_argument("--split-seed", type=int, default=0, help="seed of the family split (the same as train-detector's)")
    tc.add_argument("--seed", type=int, default=0, help="training seed")
    tc.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu for a head, else CUDA > MPS > CPU)")
    tc.add_argument("--resume", type=int, metavar="JOB", help="resume an interrupted/cancelled job instead")
    tc.add_argument("--detach", action="store_true", help="start the job and return at once")
    tc.add_argument("--json", action="store_true")

    cl = sub.add_parser("classify", parents=[common], help="name and describe artifacts with a classifier (SynArtifact)")
    cl.add_argument("--classifier", default="demo", help="demo, head:FOLDER, vlm:FOLDER_OR_HUB_ID or a checkpoint folder")
    csrc2 = cl.add_mutually_exclusive_group(required=True)
    csrc2.add_argument("--session", help="classify a session's images (nothing is written to the session)")
    csrc2.add_argument("--images", help="classify the image files of a folder")
    cl.add_argument("--regions", default="none", choices=["none", "labels"],
                    help="session only: classify whole images (none) or each Label region (labels)")
    cl.add_argument("--threshold", type=float, default=None, help="class probability threshold (default: the classifier's)")
    cl.add_argument("--no-captions", action="store_true", help="skip caption generation (faster with a VLM)")
    cl.add_argument("--batch-size", type=int, default=8)
    cl.add_argument("--json", action="store_true", help="machine-readable output")
    cl.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])

    jb = sub.add_parser("jobs", parents=[common], help="list training jobs")
    jb.add_argument("--json", action="store_true")
    ca = sub.add_parser("cancel", parents=[common], help="stop a job (its checkpoint is kept)")
    ca.add_argument("job", type=int)

    co = sub.add_parser("corrupt", parents=[common], help="build a synthetic pixel-labelled dataset by region corruption")
    csrc = co.add_mutually_exclusive_group(required=True)
    csrc.add_argument("--session", help="corrupt the session's images")
    csrc.add_argument("--images", help="folder of clean images (with --masks, or random blobs)")
    co.add_argument("--masks", help="folder of region masks matched to --images by file stem")
    co.add_argument("--mask-source", default=None, choices=["label regions", "detector regions", "region selector", "random blobs"],
                    help="session only (default: label regions when present, else random blobs)")
    co.add_argument("--selector", help="region-selection model for --mask-source 'region selector'")
    co.add_argument("--threshold", type=float, default=0.5, help="detector / region-selector threshold (tau)")
    co.add_argument("--method", default="renoise", choices=["renoise", "ddim", "blur", "rotate", "gaussian", "downscale",
                                                            "direct", "direct-noised"])
    co.add_argument("--num-inference-steps", type=int, default=50)
    co.add_argument("--inversion-steps", type=int, default=10, help="k of renoise/ddim: corrupt at step N-k (paper: 10)")
    co.add_argument("--baseline-steps", type=int, default=20,
                    help="blur/rotate/gaussian/downscale corrupt at step N-this and resample this many steps (paper: 20)")
    co.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1")
    co.add_argument("--guidance", type=float, default=1.0)
    co.add_argument("--preset", default="renoise-sd", choices=["renoise-sd", "renoise-fast", "custom"],
                    help="ReNoise inversion settings: the reference's SD configuration (default), the same without "
                         "noise regularisation (fast), or custom (with --renoise-iterations)")
    co.add_argument("--renoise-iterations", type=int, default=None, help="with --preset custom")
    co.add_argument("--label", default="corrupted", choices=["corrupted", "requested"],
                    help="the stored mask: the corrupted latent cells at pixel resolution (default) or the requested mask")
    co.add_argument("--captions", help="with --images: JSONL or CSV file of captions by image file name")
    co.add_argument("--max-side", type=int, default=512, help="images are resized so the longer side is at most this")
    co.add_argument("--model", default=None)
    co.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    co.add_argument("--out", required=True)
    co.add_argument("--json", action="store_true", help="print the manifest rows written by this run")

    rp = sub.add_parser("repair", parents=[common], help="detect -> mask -> inpaint -> re-score")
    rsrc = rp.add_mutually_exclusive_group(required=True)
    rsrc.add_argument("--image", help="an image file")
    rsrc.add_argument("--session", help="repair every image of a session (results stored as `repaired`)")
    rp.add_argument("--detector", required=True)
    rp.add_argument("--threshold", type=float, default=0.5)
    rp.add_argument("--grow", type=int, default=8)
    rp.add_argument("--feather", type=float, default=4.0)
    rp.add_argument("--seeds", default="0,1,2")
    rp.add_argument("--steps", type=int, default=20)
    rp.add_argument("--strength", type=float, default=0.75)
    rp.add_argument("--prompt", default=None, help="default: the image's prompt when the studio generated it")
    rp.add_argument("--model", default=None)
    rp.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])
    rp.add_argument("--out", help="write <name>_repaired.png (and with --image it is required)")
    rp.add_argument("--json", action="store_true")

    doc = sub.add_parser("doctor", parents=[common], help="check the data directory (database, files, jobs); --fix repairs what is safe")
    doc.add_argument("--fix", action="store_true", help="remove orphan and temporary files, mark lost jobs interrupted, "
                     "drop duplicate metric rows")
    doc.add_argument("--verify", action="store_true", help="also re-hash every content file (slow on big stores)")
    doc.add_argument("--json", action="store_true")
    xp = sub.add_parser("experiment", help="reproduce the synthetic-artifact paper's tables: run, status, report")
    xsub = xp.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)
    xr = xsub.add_parser("run", parents=[common], help="run (or resume) an experiment config; each step is a job")
    xr.add_argument("config", metavar="CONFIG.toml", help="a config file, or paper / tiny for assets/experiments/")
    xr.add_argument("--profile", default=None, help="paper or tiny (or a [profiles.NAME] of the file); default: the file's")
    xr.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: CUDA > MPS > CPU)")
    xr.add_argument("--out", default=None, help="run folder (default: <data-dir>/experiments/<name>-<profile>)")
    xs = xsub.add_parser("status", parents=[common], help="per-step progress of a run folder")
    xs.add_argument("run_dir", metavar="DIR")
    xs.add_argument("--json", action="store_true")
    xrep = xsub.add_parser("report", parents=[common], help="(re)write results.md, results.csv and plots of a run folder")
    xrep.add_argument("run_dir", metavar="DIR")

    ses = sub.add_parser("sessions", parents=[common], help="list sessions")
    ses.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None, serve: Callable[[argparse.Namespace], int] | None = None) -> int:
    """Parse `argv` and run one command; `serve` is provided by app.py (the composition root).

    Every failure is one line on stderr and exit status 1: user mistakes (ValueError), file system
    problems (OSError: full disk, read-only or missing paths), database problems (sqlite3), memory.
    Library warnings are silenced (set ARTIFACT_STUDIO_DEBUG=1 to see them and full tracebacks)."""
    import os
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    for stream in (sys.stdout, sys.stderr):  # paths with undecodable bytes print as \xNN, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        try:
            if args.command == "serve":
                if serve is None:
                    raise ValueError("serve is started through app.py (`python app.py` or `artifact-studio serve`).")
                return serve(args)
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print("artifact-studio: interrupted; nothing half-written was kept.", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line (bugs too, unless debugging)
            from studio.safeio import describe_failure, one_line

            message = describe_failure(exc, data_dir_of(args))
            if message is None:
                if debug:
                    raise
                message = (f"unexpected error ({type(exc).__name__}: {one_line(str(exc))[:300]}); this is a bug "
                           f"- rerun with {DEBUG_ENV}=1 to see where it happened.")
            print(f"artifact-studio: {message}", file=sys.stderr)
            return EXIT_USER_ERROR


def cmd_generate(args) -> int:
    from engines.generation.generate import Cancelled, GenerateParams

    params = GenerateParams(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                            num_inference_steps=args.steps, guidance_scale=args.guidance,
                            width=args.width, height=args.height, num_images=args.count,
                            record_trajectory=args.trajectory)
    params.validate()
    if args.lora and not Path(args.lora).expanduser().is_dir():
        raise ValueError(f"LoRA folder '{args.lora}' does not exist.")
    services = open_services(args, args.model)
    try:
        session = session_arg(services, args)
        engine = services.text2image()
        if args.lora:
            services.use_lora(args.lora)
        bar = StderrProgress("generating")
        try:
            result = engine.generate(params, progress=bar)
        except Cancelled as exc:
            raise ValueError(str(exc)) from None
        finally:
            bar.close()
        records = store_into(services, args, session, services.save_generation, result, args.lora)
        for rec in records:
            print(rec.path)
        if engine.loaded.is_demo:
            print(f"note: {engine.loaded.note}", file=sys.stderr)
        return 0
    finally:
        services.close()


def cmd_import(args) -> int:
    """All files are checked (headers against the limits, then fully decoded) before one transaction
    stores them; with --skip-bad, unreadable files are reported and the others imported."""
    from engines.images import display_path, find_images, image_size, load_image
    from studio.safeio import MAX_BATCH_IMAGES, MAX_BATCH_PIXELS
    from studio.store.records import NewImage

    files = find_images(args.paths)
    if not files:
        raise ValueError("No image files found in the given paths.")
    if len(files) > MAX_BATCH_IMAGES:
        raise ValueError(f"{len(files)} image files is more than the {MAX_BATCH_IMAGES} one import takes; "
                         "import them in smaller groups.")
    bad: list[str] = []

    def refuse(exc: ValueError) -> None:
        if not args.skip_bad:
            raise ValueError(f"{exc} Nothing was imported (use --skip-bad to import the other files).") from None
        bad.append(str(exc))

    sized, pixels = [], 0
    for path in files:
        try:
            width, height = image_size(path)
        except ValueError as exc:
            refuse(exc)
            continue
        sized.append(path)
        pixels += width * height
    if pixels > MAX_BATCH_PIXELS:
        raise ValueError(f"The images add up to {pixels // 1_000_000} megapixels, more than the "
                         f"{MAX_BATCH_PIXELS // 1_000_000} one import takes; import them in smaller groups.")
    captions = captions_for(args.captions, files) if args.captions else {}  # checked before anything is written
    items = []
    for path in sized:
        try:
            rgb = load_image(path)
        except ValueError as exc:
            refuse(exc)
            continue
        items.append(NewImage(rgb=rgb, source="uploaded", original_name=display_path(path.name),
                              params={"imported_from": display_path(path.resolve())}, caption=captions.get(path.name)))
    services = open_services(args, models=False)
    try:
        session = session_arg(services, args)
        for message in bad:
            print(f"artifact-studio: skipped {message}", file=sys.stderr)
        records = store_into(services, args, session, services.store.add_images, items) if items else []
        for rec in records:
            print(rec.path)
        return EXIT_USER_ERROR if bad and not records else 0
    finally:
        services.close()


def cmd_sessions(args) -> int:
    services = open_services(args, models=False)
    try:
        sessions = services.store.list_sessions()
        if args.json:
            print(json.dumps([{"id": s.id, "name": s.name, "images": s.image_count, "created_at": s.created_at,
                               "updated_at": s.updated_at} for s in sessions], indent=2))
        else:
            print(f"data dir: {services.data_dir}")
            for s in sessions:
                print(f"{s.id:>4}  {s.name:<30} {s.image_count:>5} images  updated {s.updated_at}")
        return 0
    finally:
        services.close()


def cmd_doctor(args) -> int:
    """Exit 0 when no problem remains (after --fix), else 1; one line per finding on stdout."""
    from studio.doctor import format_report, report_json, run_doctor
    from studio.services import resolve_data_dir
    from studio.store.store import Store

    data_dir = resolve_data_dir(args.data_dir)
    if not (data_dir / "studio.db").is_file():
        raise ValueError(f"{data_dir} holds no Artifact Studio database (studio.db); nothing to check.")
    with Store(data_dir) as store:
        report = run_doctor(store, fix=args.fix, verify=args.verify)
    if args.json:
        print(report_json(report))
    else:
        for line in format_report(report, args.fix):
            print(line)
    return 0 if not report.remaining else EXIT_USER_ERROR


def cmd_experiment(args) -> int:
    from studio.experiments.runner import cli_experiment

    return cli_experiment(args, open_services)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train-classifier": cmd_train_classifier,
    "classify": cmd_classify,
    "doctor": cmd_doctor,
    "repair": cmd_repair,
    "experiment": cmd_experiment,
    "corrupt": cmd_corrupt,
    "train-detector": cmd_train_detector,
    "tune": cmd_tune,
    "jobs": cmd_jobs,
    "cancel": cmd_cancel,
    "export": cmd_export,
    "import-masks": cmd_import_masks,
    "detect": cmd_detect,
    "evaluate": cmd_evaluate,
    "import-richhf": cmd_import_richhf,
    "generate": cmd_generate,
    "import": cmd_import,
    "sessions": cmd_sessions,
}


