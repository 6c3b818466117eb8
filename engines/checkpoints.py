"""Reading PyTorch checkpoint files safely: safetensors, or `torch.load(weights_only=True)`.

A pickle that would need to run code to load is refused with one sentence. Used by every loader of
user-supplied weights (engines.detection.detectors, engines.segmentation.segment).
"""
from __future__ import annotations

import os
from pathlib import Path

from engines.models import ModelNotFoundError, first_line


def safe_torch_load(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; files that need code execution are refused with one sentence.

    mmengine checkpoints carry numpy scalars in their `meta`; exactly those numpy types are allowed.
    """
    import pickle

    import numpy as np
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"Checkpoint '{path}' does not exist.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    from numpy._core.multiarray import scalar

    allowed = [scalar, np.dtype] + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not _looks_like_checkpoint(path):
            raise ValueError(f"'{path.name}' is not a PyTorch checkpoint: its content is neither a zip archive nor a "
                             "pickle (damaged, truncated or another kind of file).") from None
        raise ValueError(f"Refusing to load '{path.name}': it is a pickle that would need to run code to load, not a plain "
                         "weights file; give a safetensors file or a plain state dict.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"'{path.name}' is not a readable PyTorch checkpoint: {first_line(exc)}") from None
    except Exception:  # noqa: BLE001 - arbitrary bytes make the unpickler raise IndexError, KeyError, struct.error...
        raise ValueError(f"'{path.name}' is not a PyTorch checkpoint: its content could not be read as one (damaged, "
                         "truncated or another kind of file).") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'{path.name}' holds a {type(obj).__name__}, not a state dict.")
    return obj


def _looks_like_checkpoint(path: Path) -> bool:
    """True if the file starts like torch.save's zip format or a pickle (PROTO opcode, protocol 2-5)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_safetensors(path: str | os.PathLike) -> dict:
    """safetensors.torch.load_file with a damaged or truncated file refused in one sentence naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"'{path}' is damaged or truncated: not a complete safetensors file "
                         f"({first_line(exc).rstrip('.')}).") from None
