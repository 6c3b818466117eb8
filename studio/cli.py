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

import numpy as np

EXIT_USER_ERROR = 1
DEBUG_ENV = "ARTIFACT_STUDIO_DEBUG"
"""Set to 1 to see library warnings and the traceback of an unexpected error."""


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

            message = describe_failure(exc, _data_dir_of(args))
            if message is None:
                if debug:
                    raise
                message = (f"unexpected error ({type(exc).__name__}: {one_line(str(exc))[:300]}); this is a bug "
                           f"- rerun with {DEBUG_ENV}=1 to see where it happened.")
            print(f"artifact-studio: {message}", file=sys.stderr)
            return EXIT_USER_ERROR


def _data_dir_of(args):
    from studio.services import resolve_data_dir

    try:
        return resolve_data_dir(getattr(args, "data_dir", None))
    except (OSError, RuntimeError, ValueError):
        return None


def _open_services(args, model: str | None = None, uses: str | None = None):
    """Services for one command; `uses` is the model/detector spec deciding the default device
    (real models go to CUDA/MPS when present, the demo stays on CPU)."""
    from studio.services import Services, quiet_libraries, resolve_data_dir

    quiet_libraries()
    device = getattr(args, "device", None)
    spec = uses if uses is not None else model
    if device is None:
        from engines.models import pick_device

        device = pick_device() if spec not in (None, "", "demo") else "cpu"
    return Services.open(resolve_data_dir(args.data_dir), model_spec=model, device=device)


def _session(services, args):
    """The session named by --session. With --create-session a missing one is returned as None and
    only created by `_store_into` once the command's work has succeeded."""
    from studio.store import StoreError, check_name

    try:
        return services.store.get_session(args.session)
    except StoreError:
        if getattr(args, "create_session", False):
            name = check_name(args.session, "A session name")  # a name that cannot be created fails now
            if name.isdecimal():
                raise StoreError(f"A session name cannot be only digits ({name!r}); digits refer to session ids.") from None
            return None
        raise


def _store_into(services, args, session, write, *write_args):
    """Run `write(session_id, *write_args)` as one transaction; with --create-session the session is
    created (or, if another process just created it, reused) inside that same transaction, so a
    failed write leaves no empty session behind."""
    if session is not None:
        return write(session.id, *write_args)
    with services.store.transaction():
        session = services.store.ensure_session(args.session)
        return write(session.id, *write_args)


def cmd_generate(args) -> int:
    from engines.generate import Cancelled, GenerateParams

    params = GenerateParams(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                            num_inference_steps=args.steps, guidance_scale=args.guidance,
                            width=args.width, height=args.height, num_images=args.count,
                            record_trajectory=args.trajectory)
    params.validate()
    if args.lora and not Path(args.lora).expanduser().is_dir():
        raise ValueError(f"LoRA folder '{args.lora}' does not exist.")
    services = _open_services(args, args.model)
    try:
        session = _session(services, args)
        engine = services.text2image()
        if args.lora:
            services.use_lora(args.lora)
        bar = _StderrProgress("generating")
        try:
            result = engine.generate(params, progress=bar)
        except Cancelled as exc:
            raise ValueError(str(exc)) from None
        finally:
            bar.close()
        records = _store_into(services, args, session, services.save_generation, result, args.lora)
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
    from studio.store import NewImage

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
    captions = _captions_for(args.captions, files) if args.captions else {}  # checked before anything is written
    items = []
    for path in sized:
        try:
            rgb = load_image(path)
        except ValueError as exc:
            refuse(exc)
            continue
        items.append(NewImage(rgb=rgb, source="uploaded", original_name=display_path(path.name),
                              params={"imported_from": display_path(path.resolve())}, caption=captions.get(path.name)))
    services = _open_services(args)
    try:
        session = _session(services, args)
        for message in bad:
            print(f"artifact-studio: skipped {message}", file=sys.stderr)
        records = _store_into(services, args, session, services.store.add_images, items) if items else []
        for rec in records:
            print(rec.path)
        return EXIT_USER_ERROR if bad and not records else 0
    finally:
        services.close()


def _captions_for(captions_file, files) -> dict:
    """{image file name: caption} from a captions file for the given image files (refuses unknown names)."""
    from studio.captions import match_captions, read_captions

    return match_captions(read_captions(captions_file), [f.name for f in files], Path(captions_file).name)


def cmd_sessions(args) -> int:
    services = _open_services(args)
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


def cmd_detect(args) -> int:
    """Every option and --out is checked first; heatmaps are computed, files written to --out, and the
    session's run stored last: if anything fails, the files written are removed and nothing is stored."""
    from engines.detect import COLORMAPS, Cancelled, find_regions, render_overlay
    from engines.images import find_images, load_image
    from studio.safeio import Created, atomic_output, check_out_dir

    if args.images and not args.out:
        raise ValueError("--images needs --out DIR to write heatmaps and overlays to.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}.")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}.")
    if args.colormap not in COLORMAPS:
        raise ValueError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {args.colormap}.")
    out = check_out_dir(args.out, "--out") if args.out else None
    files = []
    if args.images:
        files = find_images([args.images])
        if not files:
            raise ValueError(f"No image files in {args.images}.")
    services = _open_services(args, uses=args.detector)
    try:
        detector = services.detector(args.detector)
        records = []
        if args.session:
            session = services.store.get_session(args.session)
            records = services.store.list_images(session.id)
            if not records:
                raise ValueError(f"Session '{session.name}' has no images.")
            names = [Path(r.original_name or f"image-{r.id}").stem + f"-{r.id}" for r in records]
            images = [services.store.load_rgb(r.id) for r in records]
        else:
            images = [load_image(f) for f in files]
            names = unique_names(files)
        bar = _StderrProgress("detecting")
        try:
            with services.gpu_lock:
                heatmaps = [h.scores for h in detector.predict(images, mode=args.mode, progress=bar)]
        except Cancelled as exc:
            raise ValueError(str(exc)) from None
        finally:
            bar.close()
        if records:  # report what is stored: 16-bit heatmaps
            heatmaps = [(np.round(np.clip(s, 0, 1) * 65535).astype(np.uint16).astype(np.float32) / 65535.0)
                        .astype(np.float32) for s in heatmaps]
        report = []
        for name, rgb, scores in zip(names, images, heatmaps):
            regions, _ = find_regions(scores, args.threshold)
            report.append({"name": name, "width": rgb.shape[1], "height": rgb.shape[0],
                           "artifact_percent": round(100.0 * float((scores >= args.threshold).mean()), 4),
                           "max_score": round(float(scores.max()), 6),
                           "regions": [dict(asdict_region(r)) for r in regions]})
        overlays = [render_overlay(rgb, scores, colormap=args.colormap, alpha=args.alpha) if out else None
                    for rgb, scores in zip(images, heatmaps)]
        with Created() as created:
            if out:
                from PIL import Image

                created.mkdir(out)
                for name, scores, overlay in zip(names, heatmaps, overlays):
                    for suffix, array in (("heatmap", np.round(scores * 255).astype(np.uint8)), ("overlay", overlay)):
                        with atomic_output(created.file(out / f"{name}_{suffix}.png")) as tmp:
                            Image.fromarray(array).save(tmp, format="PNG")
                regions_json = json.dumps({"detector": detector.detector_id, "demo": detector.loaded.is_demo,
                                           "threshold": args.threshold, "images": report}, indent=2)
                from studio.safeio import atomic_write_bytes

                atomic_write_bytes(created.file(out / "regions.json"), regions_json.encode())
            if records:
                services.store_detection(detector, [r.id for r in records], heatmaps, args.mode)
        if args.json:
            print(json.dumps({"detector": detector.detector_id, "demo": detector.loaded.is_demo,
                              "threshold": args.threshold, "images": report}, indent=2))
        else:
            for row in report:
                print(f"{row['name']}: {row['artifact_percent']:.2f}% artifact, {len(row['regions'])} region(s), "
                      f"max score {row['max_score']:.3f}")
        if detector.loaded.note:
            print(f"note: {detector.loaded.note}", file=sys.stderr)
        return 0
    finally:
        services.close()


def asdict_region(region) -> dict:
    from dataclasses import asdict

    row = asdict(region)
    row["bbox"] = list(region.bbox)
    row["area_percent"] = round(region.area_percent, 4)
    return row


def unique_names(files) -> list[str]:
    """Output names from file stems; stems shared by several files get their suffix appended."""
    from collections import Counter

    counts = Counter(f.stem for f in files)
    return [f.stem if counts[f.stem] == 1 else f"{f.stem}-{f.suffix.lstrip('.').lower()}" for f in files]


def _by_stem(files, what: str) -> dict:
    """{stem: path}; two files with one stem would be ambiguous, so they are refused."""
    out: dict = {}
    for f in files:
        if f.stem in out:
            raise ValueError(f"Two {what} files share the name '{f.stem}' ({out[f.stem].name}, {f.name}); "
                             "rename one so they can be matched.")
        out[f.stem] = f
    return out


def cmd_evaluate(args) -> int:
    from engines.detect import evaluate_masks, score_image
    from engines.images import find_images, load_image

    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}.")
    if args.session:
        return _evaluate_session(args)
    if not args.masks:
        raise ValueError("--masks DIR is required (or --session with --detector).")
    truth = _by_stem(find_images([args.masks]), "mask")
    if not truth:
        raise ValueError(f"No mask files in {args.masks}.")
    if args.detector:
        if not args.images:
            raise ValueError("--detector needs --images DIR with the images to run on.")
        files = [f for f in find_images([args.images]) if f.stem in truth]
        if not files:
            raise ValueError(f"No image in {args.images} has a mask with the same file name in {args.masks}.")
        services = _open_services(args, uses=args.detector)
        try:
            detector = services.detector(args.detector)
            note = detector.loaded.note
            bar = _StderrProgress("detecting")
            try:
                preds = {f.stem: h.scores for f, h in zip(files, detector.predict([load_image(f) for f in files],
                                                                                  mode=args.mode, progress=bar))}
            finally:
                bar.close()
        finally:
            services.close()
    else:
        note = ""
        preds = {stem: read_prediction(p) for stem, p in _by_stem(find_images([args.predictions]), "prediction").items()
                 if stem in truth}
        if not preds:
            raise ValueError(f"No prediction in {args.predictions} has a mask with the same file name in {args.masks}.")
    missing = sorted(set(truth) - set(preds))
    scores = [score_image(preds[name] >= args.threshold, read_mask(truth[name]), name) for name in sorted(preds)]
    _print_metrics(args, evaluate_masks(scores), {"unmatched_masks": missing},
                   f"images: {len(scores)} (masks without prediction: {len(missing)})  threshold: {args.threshold}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _print_metrics(args, metrics, extra: dict, header: str) -> None:
    """Text or JSON report; the headline is the artifact-class IoU (README: Metrics)."""
    if args.json:
        report = {**metrics.to_json(), "headline_metric": "artifact_iou", "threshold": args.threshold, **extra}
        print(json.dumps(_nan_to_none(report), indent=2, allow_nan=False))
        return
    print(header)
    for key in ("artifact_iou", "background_iou", "miou", "mean_image_iou", "precision", "recall", "f1"):
        print(f"{key:>15}: {getattr(metrics, key):.4f}")
    print("headline: artifact_iou (artifact-class IoU); miou is the 2-class mean, ~0.48 for a detector that "
          "finds nothing")


def _evaluate_session(args) -> int:
    """--session: the detector on the session's held-out split (studio.splits, the split training used:
    the checkpoint's recorded fractions and seed unless given)."""
    from engines.detect import evaluate_masks, score_image
    from studio.splits import plan_split
    from studio.training_data import held_out_samples

    if not args.detector:
        raise ValueError("--session evaluates a --detector (predictions folders need --masks).")
    if args.masks or args.images:
        raise ValueError("--session takes its images and masks from the session; leave out --images/--masks.")
    recorded = _recorded_split(args.detector)
    fractions = {"val_fraction": args.val_fraction if args.val_fraction is not None else recorded.get("val_fraction", 0.2),
                 "test_fraction": args.test_fraction if args.test_fraction is not None else
                 recorded.get("test_fraction", 0.2),
                 "split_seed": args.split_seed if args.split_seed is not None else recorded.get("seed", 0)}
    services = _open_services(args, uses=args.detector)
    try:
        session = services.store.get_session(args.session)
        plan = plan_split(services.store, session.id, val_fraction=float(fractions["val_fraction"]),
                          test_fraction=float(fractions["test_fraction"]), seed=int(fractions["split_seed"]))
        samples = held_out_samples(services.store, plan, args.split)
        if not samples:
            raise ValueError(f"Session '{session.name}' has no {args.split} images under this split (val_fraction "
                             f"{fractions['val_fraction']}, test_fraction {fractions['test_fraction']}); label more "
                             "images by hand.")
        detector = services.detector(args.detector)
        note = detector.loaded.note
        scores = []
        for start in range(0, len(samples), 8):
            chunk = [s.load() for s in samples[start:start + 8]]
            maps = detector.predict([image for image, _ in chunk], mode=args.mode)
            scores += [score_image(h.scores >= args.threshold, mask, s.name)
                       for h, (_, mask), s in zip(maps, chunk, samples[start:start + 8])]
    finally:
        services.close()
    _print_metrics(args, evaluate_masks(scores), {"session": session.name, "split": args.split, **fractions},
                   f"session {session.name}, {args.split} split (by family, human labels only): {len(scores)} images  "
                   f"threshold: {args.threshold}")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _recorded_split(detector: str) -> dict:
    """The split a checkpoint folder was trained with (its detector.json provenance "split"), else {}."""
    meta = Path(detector).expanduser() / "detector.json"
    if not meta.is_file():
        return {}
    try:
        return dict(json.loads(meta.read_text()).get("provenance", {}).get("split") or {})
    except (OSError, ValueError):
        return {}


def _nan_to_none(value):
    """Strict JSON: NaN metrics (a class absent from the whole set) become null."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def read_mask(path) -> np.ndarray:
    """A ground-truth mask file -> bool[H, W]: any non-black pixel of its grey version is artifact."""
    from engines.images import load_image

    return load_image(path).max(axis=2) >= 128


def read_prediction(path) -> np.ndarray:
    """A prediction file -> float32 [H, W] in [0, 1]: 16-bit PNGs / 65535, 8-bit images / 255."""
    from PIL import Image

    from engines.images import image_size, load_image

    image_size(path)  # a missing, non-image or over-large file is one sentence naming it
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return (np.asarray(im, dtype=np.float32) / 65535.0).clip(0, 1)
    except (OSError, SyntaxError, ValueError):
        pass  # load_image below names the damage
    return load_image(path).max(axis=2).astype(np.float32) / 255.0


def cmd_import_richhf(args) -> int:
    from engines.images import load_image
    from engines.richhf import CorruptRecord, binarize_artifact_map, match_images, read_richhf
    from studio.store import NewImage, NewMask

    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}.")
    records, corrupt = [], []
    for rec in read_richhf(args.tfrecord):
        (corrupt if isinstance(rec, CorruptRecord) else records).append(rec)
    if not records:
        raise ValueError(f"No RichHF record could be read from {args.tfrecord} ({len(corrupt)} damaged); "
                         "nothing was imported.")
    for bad in corrupt:
        print(f"artifact-studio: skipped record {bad.index}: {bad.reason}", file=sys.stderr)
    found, unmatched = match_images([r.filename for r in records], args.images)
    items = []
    for rec in records:
        if rec.filename not in found:
            continue
        rgb = load_image(found[rec.filename])
        h, w = rgb.shape[:2]
        raw = _resize_map(rec.artifact_map, h, w)
        items.append(NewImage(
            rgb=rgb, source="uploaded", original_name=rec.filename, caption=rec.caption,
            params={"dataset": "RichHF-18k", "record": rec.index, "aesthetics_score": rec.aesthetics_score,
                    "artifact_score": rec.artifact_score, "misalignment_score": rec.misalignment_score,
                    "overall_score": rec.overall_score,
                    "prompt_misalignment_label": list(rec.prompt_misalignment_label)},
            masks=(NewMask(mask=binarize_artifact_map(raw, args.threshold), author="human", raw=raw,
                           class_name=None, caption=None,
                           params={"dataset": "RichHF-18k", "threshold": args.threshold,
                                   "map_size": list(rec.artifact_map.shape[::-1])}),)))
    print(f"records: {len(records) + len(corrupt)} read, {len(corrupt)} corrupt, {len(items)} matched, "
          f"{len(unmatched)} without an image", file=sys.stderr)
    for name in unmatched[:20]:
        print(f"artifact-studio: no image for {name}", file=sys.stderr)
    if not items:
        raise ValueError(f"No RichHF record matched an image in {args.images}; nothing was imported.")
    services = _open_services(args)
    try:
        session = _session(services, args)
        for rec in _store_into(services, args, session, services.store.add_images, items):
            print(rec.path)
        return 0
    finally:
        services.close()


def _resize_map(raw: np.ndarray, h: int, w: int) -> np.ndarray:
    """RichHF maps are 512x512 over the whole image; resize (bilinear) to the image's native size."""
    from PIL import Image

    if raw.shape == (h, w):
        return raw
    return np.asarray(Image.fromarray(raw).resize((w, h), Image.BILINEAR))


def cmd_export(args) -> int:
    from studio.export import export_session
    from studio.safeio import check_out_dir

    check_out_dir(args.out, "--out")
    services = _open_services(args)
    try:
        session = services.store.get_session(args.session)
        summary = export_session(services.store, session.id, args.format, args.out, services.taxonomy(session.id),
                                 val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                                 overwrite=args.overwrite, unlabelled_as_background=args.unlabelled_as_background)
        print(f"exported {summary.images} image(s) and {summary.regions} region(s) as {summary.fmt} to {summary.out_dir}")
        splits = ", ".join(f"{k} {v}" for k, v in summary.splits.items())
        print(f"split by family: {splits}; left out: {summary.skipped_unlabelled} unlabelled, "
              f"{summary.skipped_held_out} derived from held-out images (see splits.csv)")
        return 0
    finally:
        services.close()


def cmd_import_masks(args) -> int:
    from studio.export import import_masks

    services = _open_services(args)
    try:
        session = services.store.get_session(args.session)
        summary = import_masks(services.store, session.id, args.format, args.path)
        for name in summary.unmatched:
            print(f"artifact-studio: no image in the session matches {name}", file=sys.stderr)
        for name, mask_size, image_size in summary.size_mismatches:
            print(f"artifact-studio: skipped {name}: mask is {mask_size[1]}x{mask_size[0]}, image is "
                  f"{image_size[1]}x{image_size[0]} (not stretched)", file=sys.stderr)
        print(f"imported {summary.regions} region(s) onto {summary.matched} image(s)")
        return 0 if summary.matched else EXIT_USER_ERROR
    finally:
        services.close()


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
    from engines.train_recipes import describe
    from engines.train_detector import TrainConfig
    from studio.jobs import JobManager
    from studio.training_data import detector_job_params

    services = _open_services(args)
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
    from engines.train_detector import TrainConfig

    TrainConfig(**config).validate()


def cmd_tune(args) -> int:
    from engines.tune import TuneConfig, split_prompts
    from studio.jobs import JobManager

    if args.feedback:
        return cmd_tune_feedback(args)
    if not args.detector:
        raise ValueError("--detector is required (or --feedback classifier:SPEC).")
    prompts = _read_prompts(args.prompts, "Prompt file")
    eval_prompts = _read_prompts(args.eval_prompts, "Evaluation prompt file") if args.eval_prompts else None
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
    services = _open_services(args)
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


def _read_prompts(path: str, what: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (at most 10 MB, each prompt within MAX_PROMPT_CHARS)."""
    from engines.generate import MAX_PROMPT_CHARS

    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{what} '{path}' is a folder; give a text file with one prompt per line.")
    if not file.is_file():
        raise ValueError(f"{what} '{path}' does not exist.")
    if file.stat().st_size > 10_000_000:
        raise ValueError(f"{what} '{path}' is larger than 10 MB; give one prompt per line.")
    try:
        prompts = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{what} '{path}' is not UTF-8 text.") from None
    if not prompts:
        raise ValueError(f"{what} '{path}' has no prompts (one per line).")
    long = next((i for i, p in enumerate(prompts, start=1) if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise ValueError(f"Prompt {long} of {what.lower()} '{path}' is longer than {MAX_PROMPT_CHARS} characters.")
    return prompts


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
    Held-out prompts as in `tune` (engines.tune.split_prompts): --eval-prompts FILE, else a seeded --eval-fraction
    (default 0.25) of --prompts that is never trained on."""
    from engines.tune import split_prompts
    from engines.tune_feedback import FeedbackConfig
    from studio.jobs import JobManager

    spec = args.feedback.strip()
    if not spec.startswith("classifier:") or not spec[len("classifier:"):].strip():
        raise ValueError(f"--feedback must look like classifier:SPEC (e.g. classifier:demo), got '{args.feedback}'.")
    prompts = _read_prompts(args.prompts, "Prompt file")
    eval_prompts = _read_prompts(args.eval_prompts, "Evaluation prompt file") if args.eval_prompts else None
    if eval_prompts is not None and args.eval_fraction is not None:
        raise ValueError("Give --eval-prompts or --eval-fraction, not both.")
    fraction = 0.25 if args.eval_fraction is None else args.eval_fraction
    split = split_prompts(prompts, eval_prompts, fraction=fraction, seed=args.seed)
    prompts, held_out = list(split.train), list(split.evaluate)
    config = {"steps": args.steps, "seed": args.seed}
    FeedbackConfig(**config).validate()
    from engines.classify import check_classifier

    check_classifier(spec[len("classifier:"):])  # before any job exists
    services = _open_services(args)
    try:
        manager = JobManager(services.store)
        job = manager.launch("lora-feedback", {"config": config, "prompts": prompts, "eval_prompts": held_out,
                                               "classifier": spec[len("classifier:"):].strip(),
                                               "detector": args.detector or "demo", "model": args.model})
        return _follow(manager, job.id, args)
    finally:
        services.close()


def cmd_train_classifier(args) -> int:
    from engines.train_classifier import ClassifierTrainConfig
    from studio.jobs import JobManager, resolve_device
    from studio.splits import validate_fractions

    services = _open_services(args)
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
            from engines.classify import check_classifier

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
    services = _open_services(args, uses=args.classifier)
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
            from engines.classify import ArtifactClassifier

            classifier = ArtifactClassifier(replace(classifier.loaded, extra=replace(classifier.spec, threshold=args.threshold)))
        if classifier.loaded.note:
            print(f"note: {classifier.loaded.note}", file=sys.stderr)
        if taxonomy is not None and classifier.fixed_classes and \
                [c["name"] for c in classifier.classes()] != [c["name"] for c in taxonomy]:
            print("note: this head was trained on other classes than the session's taxonomy; its own classes are used.",
                  file=sys.stderr)
        bar = _StderrProgress("classifying")
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

    services = _open_services(args)
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

    services = _open_services(args)
    try:
        job = JobManager(services.store).cancel(args.job)
        print(f"job {job.id}: cancel requested" if job.status == "running" else f"job {job.id}: {job.status}")
        return 0
    finally:
        services.close()


def cmd_corrupt(args) -> int:
    """Resumable dataset builder: each item is written (image, mask: temp + rename) before its manifest
    line, so a rerun skips finished items and a kill leaves no half-written item. Under
    `accelerate launch` (RANK / WORLD_SIZE set) items are sharded across processes, each writing its own
    manifest shard; the shards are merged into manifest.jsonl. Seeds and options are all checked
    before the first item is written."""
    from engines.corrupt import CorruptParams
    from engines.images import find_images
    from studio.safeio import Created, check_out_dir

    seeds = parse_seeds(args.seeds)
    if args.renoise_iterations is not None and args.preset != "custom":
        raise ValueError(f"--renoise-iterations goes with --preset custom (preset {args.preset} fixes its settings).")
    extra = {} if args.renoise_iterations is None else {"renoise_iterations": args.renoise_iterations}
    base = CorruptParams.from_preset(args.preset, num_inference_steps=args.num_inference_steps,
                                     inversion_steps=args.inversion_steps, baseline_steps=args.baseline_steps,
                                     method=args.method, seed=seeds[0], guidance_scale=args.guidance,
                                     label=args.label, **extra)
    base.validate()
    for seed in seeds:  # every seed is checked before the first item is written
        try:
            CorruptParams(**{**base.to_json(), "seed": seed}).validate()
        except ValueError as exc:
            raise ValueError(f"--seeds: {exc}") from None
    if args.masks and not args.images:
        raise ValueError("--masks goes with --images.")
    if args.captions and not args.images:
        raise ValueError("--captions goes with --images (session images carry their captions; `import --captions` sets them).")
    if args.max_side is not None and not 8 <= args.max_side <= 4096:
        raise ValueError(f"--max-side must be between 8 and 4096, got {args.max_side}.")
    captions = _captions_for(args.captions, find_images([args.images])) if args.captions else {}
    out = check_out_dir(args.out, "--out")
    rows = [json.loads(line) for f in out.glob("manifest*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    settings = {k: v for k, v in json.loads(json.dumps(base.to_json())).items() if k not in ("seed", "prompt")}
    for row in rows:  # a rerun resumes; other settings for the same method would mix two datasets
        if row.get("method") == args.method and \
                {k: v for k, v in row.get("params", {}).items() if k not in ("seed", "prompt")} != settings:
            raise ValueError(f"{out} holds {args.method} items made with other settings (item {row.get('item')}); "
                             "use another --out, or the same settings to resume.")
    done = {row["item"] for row in rows}
    with Created() as created:  # a run that fails before writing an item leaves no empty folders
        created.mkdir(out / "images")
        created.mkdir(out / "masks")
        return _corrupt_into(args, out, seeds, base, captions, done)


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """Comma-separated whole numbers, 1 to MAX_SEEDS of them, each in [0, 2**32); checked all at once."""
    from studio.safeio import MAX_SEEDS

    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated whole numbers, got '{text}'.") from None
    if not seeds:
        raise ValueError(f"{flag} needs at least one seed.")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{flag} has {len(seeds)} seeds; at most {MAX_SEEDS} are taken at once.")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ValueError(f"{flag}: seed {bad[0]} is out of range; use 0 to {2**32 - 1}.")
    return seeds


def _corrupt_into(args, out: Path, seeds: list[int], base, captions: dict, done: set) -> int:
    import os

    from PIL import Image

    from engines.corrupt import CorruptParams, random_blob_mask
    from engines.images import find_images, load_image
    from studio.captions import caption_for
    from studio.services import fit_pair

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    shard = out / (f"manifest.rank{rank}.jsonl" if world > 1 else "manifest.jsonl")
    services = _open_services(args, args.model)
    try:
        # Work list: (name, loader of rgb, loader of mask, mask source, prompt, parent info)
        work = []
        if args.session:
            session = services.store.get_session(args.session)
            for rec in services.store.list_images(session.id):
                if rec.source == "corrupted":
                    continue
                src = args.mask_source or ("label regions" if services.store.is_labelled(rec.id) else "random blobs")
                work.append((f"{Path(rec.original_name or 'image').stem}-{rec.id}", rec.id, None, src, caption_for(rec)))
        else:
            masks = _by_stem(find_images([args.masks]), "mask") if args.masks else {}
            for f in find_images([args.images]):
                if args.masks and f.stem not in masks:
                    print(f"artifact-studio: no mask for {f.name}; skipped", file=sys.stderr)
                    continue
                work.append((f.stem, f, masks.get(f.stem), "mask file" if args.masks else "random blobs",
                             captions.get(f.name, "")))
        items = [(w, seed) for w in work for seed in seeds]
        items = [it for i, it in enumerate(items) if i % world == rank]
        todo = [it for it in items if f"{it[0][0]}-{args.method}-s{it[1]}" not in done]
        print(f"{len(items) - len(todo)} item(s) already done, {len(todo)} to do (rank {rank} of {world})", file=sys.stderr)
        corruptor = services.corruptor() if todo else None
        written = []
        bar = _StderrProgress("corrupting")
        for n, ((name, src_ref, mask_ref, mask_source, prompt), seed) in enumerate(todo, start=1):
            item = f"{name}-{args.method}-s{seed}"
            if isinstance(src_ref, int):
                rgb = services.store.load_rgb(src_ref)
                mask = services.corruption_mask(src_ref, mask_source, detector=args.selector,
                                                threshold=args.threshold, seed=seed)
            else:
                rgb = load_image(src_ref)
                mask = (read_mask(mask_ref) if mask_ref is not None
                        else random_blob_mask(rgb.shape[0], rgb.shape[1], seed))
                if mask.shape != rgb.shape[:2]:
                    raise ValueError(f"{Path(mask_ref).name}: mask size {mask.shape[::-1]} differs from the image's "
                                     f"{rgb.shape[1::-1]}; masks are not stretched.")
            rgb, mask = fit_pair(rgb, mask, args.max_side)
            if not mask.any():
                print(f"artifact-studio: empty region for {item}; skipped", file=sys.stderr)
                continue
            params = CorruptParams(**{**base.to_json(), "seed": seed, "prompt": prompt})
            result = corruptor.corrupt(rgb, mask, params)
            for folder, array in (("images", result.image), ("masks", result.mask.astype(np.uint8) * 255)):
                tmp = out / folder / f".{item}.tmp.png"
                Image.fromarray(array).save(tmp)
                os.replace(tmp, out / folder / f"{item}.png")
            row = {"item": item, "image": f"images/{item}.png", "mask": f"masks/{item}.png", "source": str(src_ref),
                   "mask_source": mask_source, "method": args.method, "preset": params.preset, "seed": seed,
                   "caption": prompt, "label": params.label, "params": params.to_json(),
                   "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), **result.metrics(),
                   "unet_calls": result.unet_calls, "cache_hit": result.cache_hit}
            with open(shard, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            written.append(row)
            bar(n, len(todo))
        bar.close()
        if world > 1:
            _merge_manifests(out)
        if args.json:
            print(json.dumps(written, indent=2))
        else:
            print(f"wrote {len(written)} item(s) to {out}")
        return 0
    finally:
        services.close()


def _merge_manifests(out: Path) -> None:
    """manifest.jsonl = the union of all rank shards (atomic replace; safe to run repeatedly)."""
    import os

    rows = {}
    for f in sorted(out.glob("manifest*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows[json.loads(line)["item"]] = line
    tmp = out / ".manifest.tmp"
    tmp.write_text("".join(rows[k] + "\n" for k in sorted(rows)))
    os.replace(tmp, out / "manifest.jsonl")


def cmd_repair(args) -> int:
    """JSON per image: before/after artifact area in the region, the chosen seed, max change outside.

    Options, seeds and --out are checked first; every image is repaired before anything is written;
    then the files go to --out and the session's repaired images are stored in one transaction (a
    failure removes the files again)."""
    from PIL import Image

    from engines.images import load_image
    from engines.repair import RepairParams
    from studio.safeio import Created, atomic_output, check_out_dir
    from studio.store import NewImage

    seeds = tuple(parse_seeds(args.seeds))
    if args.image and not args.out:
        raise ValueError("--image needs --out DIR for the repaired image.")
    RepairParams(threshold=args.threshold, grow=args.grow, feather=args.feather, seeds=seeds,
                 num_inference_steps=args.steps, strength=args.strength, prompt=args.prompt or "").validate()
    out = check_out_dir(args.out, "--out") if args.out else None
    image = load_image(args.image) if args.image else None
    services = _open_services(args, args.model, uses=args.detector)
    try:
        if args.image:
            work = [(Path(args.image).stem, image, None, "")]
        else:
            session = services.store.get_session(args.session)
            work = [(Path(r.original_name or "image").stem + f"-{r.id}", services.store.load_rgb(r.id), r,
                     str(r.params.get("prompt", "") or "")) for r in services.store.list_images(session.id)
                    if r.source != "repaired"]
        rows, results = [], []
        for name, rgb, record, prompt in work:
            params = RepairParams(threshold=args.threshold, grow=args.grow, feather=args.feather, seeds=seeds,
                                  num_inference_steps=args.steps, strength=args.strength,
                                  prompt=args.prompt if args.prompt is not None else prompt)
            try:
                result = services.repair(rgb, args.detector, params)
            except ValueError as exc:
                if args.image:
                    raise
                rows.append({"name": name, "skipped": " ".join(str(exc).split())})
                continue
            best = result.candidates[0]
            row = {"name": name, "seed": best.seed, "artifact_area_before": round(best.artifact_area_before, 6),
                   "artifact_area_after": round(best.artifact_area_after, 6),
                   "max_change_outside_mask": int(best.outside_max_change),
                   "candidates": [{"seed": c.seed, "artifact_area_after": round(c.artifact_area_after, 6)}
                                  for c in result.candidates]}
            if out:
                row["path"] = str(out / f"{name}_repaired.png")
            rows.append(row)
            results.append((row, best.image, record))
        with Created() as created:
            if out:
                created.mkdir(out)
                for row, repaired, _ in results:
                    with atomic_output(created.file(Path(row["path"]))) as tmp:
                        Image.fromarray(repaired).save(tmp, format="PNG")
            stored = [(row, repaired, record) for row, repaired, record in results if record is not None]
            if stored:
                with services.store.transaction():
                    for row, repaired, record in stored:
                        rec = services.store.add_images(record.session_id, [NewImage(
                            rgb=repaired, source="repaired", parent_id=record.id, model_id=services.model_spec,
                            params={k: v for k, v in row.items() if k not in ("path", "name")})])[0]
                        row["image_id"] = rec.id
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                if "skipped" in row:
                    print(f"{row['name']}: skipped ({row['skipped']})")
                else:
                    print(f"{row['name']}: artifact area {100 * row['artifact_area_before']:.2f}% -> "
                          f"{100 * row['artifact_area_after']:.2f}% (seed {row['seed']}), max change outside "
                          f"{row['max_change_outside_mask']}")
        return 0
    finally:
        services.close()


def cmd_doctor(args) -> int:
    """Exit 0 when no problem remains (after --fix), else 1; one line per finding on stdout."""
    from studio.doctor import format_report, report_json, run_doctor
    from studio.services import resolve_data_dir
    from studio.store import Store

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
    from studio.experiment import cli_experiment

    return cli_experiment(args, _open_services)


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


class _StderrProgress:
    """progress(step, total) callable that draws a one-line bar on an interactive stderr."""

    def __init__(self, label: str):
        self.label = label
        self.active = sys.stderr.isatty()

    def __call__(self, step: int, total: int) -> None:
        if self.active:
            filled = int(30 * step / max(total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.active:
            sys.stderr.write("\n")


def _one_line(exc: BaseException) -> str:
    from studio.safeio import one_line

    return one_line(str(exc)) or type(exc).__name__
