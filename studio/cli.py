"""The `artifact-studio` command: a thin layer over engines + store.

Heavy modules (torch, diffusers, gradio) are imported inside the commands, so `--help` is fast.
A user mistake prints one line on stderr and exits with status 1 (argparse usage errors: 2);
it never prints a traceback and never leaves a half-written change behind.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data directory (default: $ARTIFACT_STUDIO_HOME, else ~/.local/share/artifact-studio)")

    parser = argparse.ArgumentParser(prog="artifact-studio", description="Find, label, synthesise and repair artifacts in diffusion-model images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="start the studio web UI (default command of `python app.py`)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; anything else needs --auth)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--model", default=None, help="diffusers text-to-image pipeline: local folder or hub id (default: the embedded demo)")
    serve.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"], help="default: CUDA or MPS when present, else CPU")
    serve.add_argument("--share", action="store_true", help="create a public Gradio share link (needs --auth)")
    serve.add_argument("--auth", help="USER:PASSWORD required to open the UI")
    serve.add_argument("--auth-file", help="file with one USER:PASSWORD per line")

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
    gen.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"])

    imp = sub.add_parser("import", parents=[common], help="import image files or folders into a session")
    imp.add_argument("--session", required=True, help="session name or id")
    imp.add_argument("--create-session", action="store_true", help="create the session if it does not exist")
    imp.add_argument("--skip-bad", action="store_true", help="report unreadable files and import the rest (default: import nothing if any file is bad)")
    imp.add_argument("paths", nargs="+", metavar="PATH")

    ses = sub.add_parser("sessions", parents=[common], help="list sessions")
    ses.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None, serve: Callable[[argparse.Namespace], int] | None = None) -> int:
    """Parse `argv` and run one command; `serve` is provided by app.py (the composition root)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "serve":
            if serve is None:
                raise ValueError("serve is started through app.py (`python app.py` or `artifact-studio serve`).")
            return serve(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("artifact-studio: interrupted; nothing half-written was kept.", file=sys.stderr)
        return 130
    except ValueError as exc:  # every user mistake in engines/ and the store is a ValueError
        print(f"artifact-studio: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _open_services(args, model: str | None = None):
    from studio.services import Services, resolve_data_dir

    device = getattr(args, "device", None)
    if device is None:
        from engines.models import pick_device

        device = pick_device() if model not in (None, "demo") else "cpu"
    return Services.open(resolve_data_dir(args.data_dir), model_spec=model, device=device)


def _session(services, args):
    if getattr(args, "create_session", False):
        return services.store.ensure_session(args.session)
    return services.store.get_session(args.session)


def cmd_generate(args) -> int:
    from engines.generate import Cancelled, GenerateParams

    services = _open_services(args, args.model)
    try:
        session = _session(services, args)
        params = GenerateParams(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                num_inference_steps=args.steps, guidance_scale=args.guidance,
                                width=args.width, height=args.height, num_images=args.count)
        params.validate()
        engine = services.text2image()
        if engine.loaded.is_demo:
            print(f"note: {engine.loaded.note}", file=sys.stderr)
        bar = _StderrProgress("generating")
        try:
            result = engine.generate(params, progress=bar)
        except Cancelled as exc:
            raise ValueError(str(exc)) from None
        finally:
            bar.close()
        records = services.save_generation(session.id, result)
        for rec in records:
            print(rec.path)
        return 0
    finally:
        services.close()


def cmd_import(args) -> int:
    from engines.images import find_images, load_image
    from studio.store import NewImage

    services = _open_services(args)
    try:
        session = _session(services, args)
        files = find_images(args.paths)
        if not files:
            raise ValueError("No image files found in the given paths.")
        items, bad = [], []
        for path in files:
            try:
                items.append(NewImage(rgb=load_image(path), source="uploaded", original_name=path.name,
                                      params={"imported_from": str(path.resolve())}))
            except ValueError as exc:
                if not args.skip_bad:
                    raise ValueError(f"{exc} Nothing was imported (use --skip-bad to import the other files).") from None
                bad.append(str(exc))
        for message in bad:
            print(f"artifact-studio: skipped {message}", file=sys.stderr)
        records = services.store.add_images(session.id, items) if items else []
        for rec in records:
            print(rec.path)
        return EXIT_USER_ERROR if bad and not records else 0
    finally:
        services.close()


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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
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
    return " ".join(str(exc).split()) or type(exc).__name__
