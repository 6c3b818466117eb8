"""Write discipline and one-sentence failures, shared by the CLI, the server and the UI.

- `describe_failure(exc, data_dir)`: one sentence (naming the file, field or path) for any error a
  command can meet: ValueError (user mistakes), OSError (full disk, read-only places, paths under a
  file...), sqlite3 errors (damaged or read-only database), MemoryError. None for a real bug.
- `check_out_dir(path, flag)`: validate an output folder *before* any work is done or anything is
  written: not a file, not under a file, not in a pseudo file system, on a writable location.
- `Created`: remembers the files and folders a command creates and removes them if it fails.
- `atomic_write_bytes(path, data)`: temporary name in the same folder, flushed, then renamed.
- `shown(path)`: a path as printable text (undecodable file-name bytes as \\xNN).

Limits checked before work (each documented in README "Limits"): `MAX_BATCH_PIXELS` and
`MAX_BATCH_IMAGES` for one import, `MAX_SEEDS` for one corrupt/repair command; engine limits live
beside their engines (engines.images.MAX_PIXELS, engines.detection.detect.MAX_WINDOWS,
engines.generation.generate.MAX_PROMPT_CHARS).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator

MAX_BATCH_IMAGES = 10_000
"""Most image files one `import` (or upload) takes at once."""
MAX_BATCH_PIXELS = 500_000_000
"""Most pixels one `import` (sum of width * height: 1.5 GB as RGB) or `import-masks` (sum over the
masks to decode: 0.5 GB as bool) takes at once; checked from headers before anything is decoded."""
MAX_SEEDS = 16
"""Most seeds one `corrupt` or `repair` command takes."""
PSEUDO_FILE_SYSTEMS = ("/proc", "/sys", "/dev")
"""Places no output may go to (kernel interfaces, not storage)."""

_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def shown(path: str | os.PathLike | bytes) -> str:
    """A path as printable text: bytes that are not valid UTF-8 appear as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """Whitespace collapsed, object reprs (<... at 0x...>) removed, surrogates made printable."""
    text = " ".join(_REPR.sub("", str(text)).split())
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def describe_os_error(exc: OSError) -> str:
    """One sentence for an OSError, naming its path."""
    name = exc.filename if exc.filename is not None else exc.filename2
    where = shown(name) if name is not None else None
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full{f' (writing {where})' if where else ''}; free some space and run it again."
    if where is None:
        return one_line(exc.strerror or str(exc) or type(exc).__name__).rstrip(".") + "."
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; choose a writable place."
    if code in (errno.EACCES, errno.EPERM):
        return f"Permission denied for {where}; choose a place you can write to."
    if code == errno.ENOTDIR:
        return f"{where}: part of this path is a file, not a folder."
    if code == errno.EISDIR:
        return f"{where} is a folder, not a file."
    if code == errno.ENOENT:
        return f"{where} does not exist."
    if code == errno.EEXIST:
        return f"{where} already exists."
    if code == errno.ENAMETOOLONG:
        return f"{where}: the file name is too long."
    if code == errno.EIO:
        return f"Input/output error on {where}: the disk or the file may be damaged."
    reason = exc.strerror or one_line(str(exc))
    return f"{where}: {reason.rstrip('.')}."


def describe_sqlite_error(exc: sqlite3.Error, data_dir: Path | None) -> str:
    db = shown(Path(data_dir) / "studio.db") if data_dir is not None else "the studio database"
    text = str(exc).lower()
    if "full" in text:
        return f"The disk holding {db} is full; free some space and run it again (nothing was stored)."
    if "readonly" in text or "read-only" in text:
        return f"{db} is read-only; Artifact Studio needs to write there (choose another --data-dir)."
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return (f"{db} is damaged ({one_line(str(exc))}); `artifact-studio doctor` checks it — restore a backup "
                "if it reports errors.")
    if "locked" in text or "busy" in text:
        return f"{db} stayed locked by another process; try again when it has finished."
    if "disk i/o" in text:
        return f"Input/output error on {db}: the disk may be failing or full."
    return f"Database error in {db}: {one_line(str(exc))}."


def describe_failure(exc: BaseException, data_dir: Path | None = None) -> str | None:
    """One sentence for an expected failure; None for an unexpected one (a bug)."""
    if isinstance(exc, ValueError):
        return one_line(str(exc)) or type(exc).__name__
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, sqlite3.Error):
        return describe_sqlite_error(exc, data_dir)
    if isinstance(exc, MemoryError):
        return "Ran out of memory; use smaller or fewer images at once."
    if type(exc).__name__ == "SafetensorError":
        return f"A safetensors file is damaged or truncated ({one_line(str(exc))})."
    return None


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The absolute output folder for `path`, validated without writing anything.

    Refused with one sentence: an existing file, a path under a file, a pseudo file system
    (/proc, /sys, /dev), a read-only or unwritable location.
    """
    if path is None or not str(path).strip():
        raise ValueError(f"{flag} needs a folder.")
    out = Path(os.path.abspath(Path(path).expanduser()))
    system = next((p for p in PSEUDO_FILE_SYSTEMS if out.is_relative_to(p)), None)
    if system is not None and not out.is_relative_to("/dev/shm"):
        raise ValueError(f"{flag} {shown(out)} is inside {system}, a system folder, not storage; "
                         "choose another folder.")
    probe = out
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == out:
            raise ValueError(f"{flag} {shown(out)} is a file; give a folder.")
        raise ValueError(f"{flag} {shown(out)} cannot be created: {shown(probe)} is a file, not a folder.")
    if not probe.exists():
        raise ValueError(f"{flag} {shown(out)} cannot be created: {shown(probe)} is a broken link.")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable"
        raise ValueError(f"{flag} {shown(out)} cannot be written: {shown(probe)} {why}.")
    return out


class Created:
    """Paths a command creates; `undo()` (or leaving the `with` block by an exception) removes them.

    Record a folder *before* creating what goes into it (`mkdir`), files as they are written.
    Files are removed before the folders that held them; folders only when they are empty.
    """

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def mkdir(self, folder: Path) -> Path:
        """Create `folder` and any missing parents, remembering those that did not exist."""
        folder = Path(folder)
        missing = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for p in reversed(missing):
            p.mkdir()
            self.paths.append(p)
        return folder

    def file(self, path: Path) -> Path:
        """Remember a file about to be written (only if it does not exist yet: never remove older files)."""
        path = Path(path)
        if not path.exists():
            self.paths.append(path)
        return path

    def undo(self) -> None:
        for p in reversed(self.paths):
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        self.paths.clear()

    def __enter__(self) -> "Created":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.undo()


def atomic_write_bytes(path: Path, data: bytes, *, prefix: str | None = None, suffix: str = ".tmp") -> None:
    """Write `data` to `path` through a temporary name in the same folder (`prefix` + random +
    `suffix`; default prefix ".<name>."), flushed, then renamed; the temporary file never outlives a
    failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}." if prefix is None else prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (e.g. with PIL's save); renamed to `path` on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
