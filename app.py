"""Artifact Studio composition root: parse options, open the store, build the UI, launch.

`python app.py [serve options]` equals `artifact-studio serve [options]`; every other
`artifact-studio` command is dispatched to studio.cli.main.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def main(argv: list[str] | None = None) -> int:
    from studio.cli import main as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    return cli.main(argv, serve=serve)


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Credentials from --auth USER:PASS and/or --auth-file (one USER:PASS per line)."""
    lines: list[str] = []
    if args.auth:
        lines.append(args.auth)
    if args.auth_file:
        path = Path(args.auth_file).expanduser()
        if path.is_dir():
            raise ValueError(f"Auth file '{path}' is a folder; give a file with one USER:PASSWORD per line.")
        if not path.is_file():
            raise ValueError(f"Auth file '{path}' does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"Auth file '{path}' is not UTF-8 text.") from None
        lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    creds = []
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError("Credentials must look like USER:PASSWORD (both non-empty).")
        creds.append((user, password))
    return creds


def serve(args: argparse.Namespace) -> int:
    """Start the web UI. Refuses non-loopback hosts and --share without credentials.

    Everything is checked before anything is written: credentials, the port (busy: one sentence),
    the data directory and --export-root. Start-up then runs the cheap part of `doctor`, and the
    browser can reach only the content files (never studio.db, logs or caches); with credentials,
    an unauthenticated client gets nothing but the login page.
    """
    creds = read_auth(args)
    exposed = args.share or args.host not in LOOPBACK
    if exposed and not creds:
        raise ValueError(f"Refusing to serve on {'a share link' if args.share else args.host} without a password; "
                         "add --auth USER:PASSWORD or --auth-file FILE.")
    if not (1 <= args.port <= 65535):
        raise ValueError(f"Port {args.port} is out of range; use 1 to 65535.")
    from studio.web.exposure import LoginOnly, check_port_free, private_paths, served_folders
    from studio.safeio import check_out_dir

    export_root = check_out_dir(args.export_root, "--export-root") if getattr(args, "export_root", None) else None
    check_port_free(args.host, args.port)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from engines.models import pick_device
    from studio.doctor import startup_check
    from studio.services import ASSETS_DIR, Services, quiet_libraries, resolve_data_dir, warm_up_libraries
    from studio.web.ui import HEAD, build_ui

    quiet_libraries(now=False)  # torch, diffusers and transformers load after the page is up (warm_up)
    device = args.device or pick_device()
    services = Services.open(resolve_data_dir(args.data_dir), model_spec=args.model, device=device,
                             segmenter_spec=args.sam)
    services.export_root = export_root
    print(f"Artifact Studio data dir: {services.data_dir}", flush=True)
    print(f"Model: {services.model_spec} on {device}" + (" (demo: a tiny model trained on 15 bundled photos)"
                                                         if services.uses_demo_model else ""), flush=True)
    print(startup_check(services.store, services.exports_dir), flush=True)
    services.ensure_samples()
    from studio.jobs import JobManager

    for job_id in JobManager(services.store).recover():
        print(f"Job {job_id} was interrupted (its process is gone); resume it from the Train tab.", flush=True)
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=4)
    app_kwargs = None
    if creds:
        from starlette.middleware import Middleware

        app_kwargs = {"middleware": [Middleware(LoginOnly)]}
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=creds or None,
        allowed_paths=served_folders(services.data_dir, ASSETS_DIR), blocked_paths=private_paths(services.data_dir),
        app_kwargs=app_kwargs, ssr_mode=False, show_error=True, footer_links=["settings"], head=HEAD,
        prevent_thread_lock=True,
    )
    warm_up_libraries()  # torch, diffusers, transformers: imported now that the page is served
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
