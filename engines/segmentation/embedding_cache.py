"""The image-embedding cache of `SamMasker`: fingerprints, the model key and the on-disk entries.

Every embedding is keyed by sha256(image shape + pixels) and by the model key,
sha256(cache format + backend model id + checkpoint fingerprint). The checkpoint fingerprint of a
file is sha256(size + first 1 MiB + last 1 MiB) (cheap even for the 2.5 GB vit_h file; checkpoints
are not edited in place); of an in-memory module, sha256 over its state dict, computed once when
the masker is made. On disk (when the caller passes a `cache_dir`) an entry is
`<cache_dir>/<model key[:24]>/<image sha256>.safetensors` holding the embedding array(s) plus
`original_size` and `input_size` (int64 [h, w]) and metadata naming the format, model key and image
hash. Files are written to a temporary sibling and renamed (os.replace); a file that cannot be read
or does not match is ignored (and rewritten by the masker). The disk cache is not size-limited: the
caller owns `cache_dir` and may delete it at any time. The in-memory LRU, and writing files after
`set_image` has returned, are `SamMasker`'s (engines/segmentation/segment.py).
Imports engines/segmentation/backend.py (ImageEmbedding); safetensors and torch are imported lazily.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from engines.models import first_line
from engines.segmentation.backend import ImageEmbedding

CACHE_FORMAT = "artifact-studio-segment-embedding/1"
FINGERPRINT_EDGE_BYTES = 1 << 20


def embedding_model_key(model_id: str, fingerprint: str) -> str:
    """sha256(cache format + backend model id + checkpoint fingerprint), hex."""
    return hashlib.sha256(f"{CACHE_FORMAT}\n{model_id}\n{fingerprint}".encode()).hexdigest()


def embedding_path(cache_dir: Path, model_key: str, digest: str) -> Path:
    """Where the embedding of the image with sha256 `digest` lives under `cache_dir`."""
    return cache_dir / model_key[:24] / f"{digest}.safetensors"


def read_embedding(path: Path, model_key: str, digest: str, shape: tuple[int, int],
                   check: Callable[[dict, tuple[int, int]], str | None], problems: list[str]) -> ImageEmbedding | None:
    """The embedding stored at `path` for image `digest` of `shape` (H, W), or None when there is none or it
    does not fit (unreadable, other model or image, wrong sizes, or `check(arrays, input_size)`, the
    backend's, names a problem); every rejected file adds a sentence to `problems`."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            meta = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        problems.append(f"{path.name}: unreadable ({first_line(exc)}); recomputed.")
        return None
    problem = None
    if meta.get("format") != CACHE_FORMAT or meta.get("model_key") != model_key or meta.get("image") != digest:
        problem = "metadata does not match this model and image"
    else:
        original, given = arrays.pop("original_size", None), arrays.pop("input_size", None)
        if original is None or given is None or original.shape != (2,) or given.shape != (2,):
            problem = "sizes are missing"
        elif tuple(int(v) for v in original) != tuple(shape):
            problem = "original size does not match the image"
        else:
            problem = check(arrays, tuple(int(v) for v in given))
    if problem:
        problems.append(f"{path.name}: {problem}; recomputed.")
        return None
    return ImageEmbedding(arrays=arrays, original_size=tuple(int(v) for v in original),
                          input_size=tuple(int(v) for v in given))


def write_embedding(path: Path, digest: str, embedding: ImageEmbedding, model_key: str, model_id: str,
                    problems: list[str]) -> None:
    """Write `embedding` to a temporary sibling of `path`, then rename; a failure adds a sentence to `problems`."""
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    arrays = {name: np.ascontiguousarray(value) for name, value in embedding.arrays.items()}
    arrays["original_size"] = np.asarray(embedding.original_size, dtype=np.int64)
    arrays["input_size"] = np.asarray(embedding.input_size, dtype=np.int64)
    meta = {"format": CACHE_FORMAT, "model_key": model_key, "image": digest,
            "model_id": model_id}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:  # a full or read-only disk costs a recompute later, never a click
        problems.append(f"{path.name}: not written ({first_line(exc)}).")
    finally:
        if tmp.exists():
            tmp.unlink()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256(size + first 1 MiB + last 1 MiB): cheap for multi-GB checkpoints, which are never edited in place."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}|".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
        if size > FINGERPRINT_EDGE_BYTES:
            handle.seek(max(FINGERPRINT_EDGE_BYTES, size - FINGERPRINT_EDGE_BYTES))
            digest.update(handle.read())
    return digest.hexdigest()


def module_fingerprint(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """sha256 over a model folder: the text of each .json file and the fingerprint of each .safetensors / .bin file."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
            value = path.read_text() if path.suffix == ".json" else file_fingerprint(path)
            digest.update(f"{path.name}|{value}\n".encode())
    return digest.hexdigest()

