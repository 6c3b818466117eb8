"""Helpers shared by the `artifact-studio` commands: services for one command, the session
named by --session, one-transaction writes, following a job, progress on stderr.
"""
from __future__ import annotations

import sys
from pathlib import Path


EXIT_USER_ERROR = 1
DEBUG_ENV = "ARTIFACT_STUDIO_DEBUG"
"""Set to 1 to see library warnings and the traceback of an unexpected error."""


def data_dir_of(args):
    from studio.services import resolve_data_dir

    try:
        return resolve_data_dir(getattr(args, "data_dir", None))
    except (OSError, RuntimeError, ValueError):
        return None


def open_services(args, model: str | None = None, uses: str | None = None, *, models: bool = True):
    """Services for one command; `uses` is the model/detector spec deciding the default device
    (real models go to CUDA/MPS when present, the demo stays on CPU). `models=False`: a command that runs
    no model (sessions, import) does not import torch, diffusers or transformers to quiet them."""
    from studio.services import Services, quiet_libraries, resolve_data_dir

    quiet_libraries(now=models)
    device = getattr(args, "device", None)
    spec = uses if uses is not None else model
    if device is None:
        from engines.models import pick_device

        device = pick_device() if spec not in (None, "", "demo") else "cpu"
    return Services.open(resolve_data_dir(args.data_dir), model_spec=model, device=device)


def session_arg(services, args):
    """The session named by --session. With --create-session a missing one is returned as None and
    only created by `store_into` once the command's work has succeeded."""
    from studio.store.checks import check_name
    from studio.store.store import StoreError

    try:
        return services.store.get_session(args.session)
    except StoreError:
        if getattr(args, "create_session", False):
            name = check_name(args.session, "A session name")  # a name that cannot be created fails now
            if name.isdecimal():
                raise StoreError(f"A session name cannot be only digits ({name!r}); digits refer to session ids.") from None
            return None
        raise


def store_into(services, args, session, write, *write_args):
    """Run `write(session_id, *write_args)` as one transaction; with --create-session the session is
    created (or, if another process just created it, reused) inside that same transaction, so a
    failed write leaves no empty session behind."""
    if session is not None:
        return write(session.id, *write_args)
    with services.store.transaction():
        session = services.store.ensure_session(args.session)
        return write(session.id, *write_args)


def captions_for(captions_file, files) -> dict:
    """{image file name: caption} from a captions file for the given image files (refuses unknown names)."""
    from studio.datasets.captions import match_captions, read_captions

    return match_captions(read_captions(captions_file), [f.name for f in files], Path(captions_file).name)


def read_prompts(path: str, what: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (at most 10 MB, each prompt within MAX_PROMPT_CHARS)."""
    from engines.generation.generate import MAX_PROMPT_CHARS

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


class StderrProgress:
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
