"""SAM-assisted masks: set an image once, answer many clicks in milliseconds (+ an offline fallback).

`SamMasker` has Segment Anything's shape: `set_image(image)` computes the image embedding once
(or finds it in the cache), `predict(points, labels, box)` turns clicks into `MaskProposal`s at the
image's native size. Three backends sit behind it, each a small class with the same four members
(`model_id`, `fingerprint`, `encode(rgb) -> ImageEmbedding`, `decode(...) -> list[MaskProposal]`):

    SegmentAnythingBackend   Meta's `segment-anything` package: official sam_vit_{b,l,h}_*.pth files
                             (loaded with weights_only=True) or an already-built `Sam` module.
    TransformersSamBackend   transformers' `SamModel` + `SamProcessor` from a local folder or hub id.
    SuperpixelBackend        no weights at all: SLIC superpixels merged by colour. Approximate.

Spec strings for `load_segmenter`:
    "superpixel" (or "demo")        the offline fallback, the demo default
    "sam:/path/sam_vit_b_01ec64.pth" model type read from the file name (vit_b / vit_l / vit_h)
    "sam-vit_b:/path/any_name.pth"   model type given explicitly
    "hf-sam:/folder" or "hf-sam:facebook/sam-vit-base"

Embedding cache. Every embedding is keyed by sha256(image shape + pixels) and by the model key,
sha256(cache format + backend model id + checkpoint fingerprint). The checkpoint fingerprint of a
file is sha256(size + first 1 MiB + last 1 MiB) (cheap even for the 2.5 GB vit_h file; checkpoints
are not edited in place); of an in-memory module, sha256 over its state dict, computed once when
the masker is made. Entries live in an in-memory LRU (default 8) and, when the caller passes a
`cache_dir`, on disk as `<cache_dir>/<model key[:24]>/<image sha256>.safetensors` holding the
embedding array(s) plus `original_size` and `input_size` (int64 [h, w]) and metadata naming the
format, model key and image hash. Files are written to a temporary sibling and renamed
(os.replace), after `set_image` has returned (a background writer; `flush()` waits for it), so a
cold click costs the encoder and nothing else; a file that cannot be read or does not match is ignored and rewritten. The disk
cache is not size-limited: the caller owns `cache_dir` and may delete it at any time.

Conventions: images are RGB uint8 HWC (or PIL RGB); points are (x, y) pixels of that image; masks
are bool[H, W] at the image's size. Nothing here runs at import time; torch is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engines.images import as_rgb, image_digest
from engines.models import DEMO, LoadedModel, ModelNotFoundError, first_line, local_folder

CACHE_FORMAT = "artifact-studio-segment-embedding/1"
DEFAULT_MEMORY_ENTRIES = 8
SUPERPIXEL = "superpixel"
SAM_TYPES = ("vit_b", "vit_l", "vit_h")
FINGERPRINT_EDGE_BYTES = 1 << 20
SUPERPIXEL_NOTE = ("Approximate masks: no SAM weights are loaded, so clicks select SLIC superpixels merged by "
                   "colour; expect blocky edges. Load a SAM checkpoint (sam:/path/sam_vit_b_01ec64.pth) for real masks.")
SPEC_HELP = ("use 'superpixel', 'sam:/path/sam_vit_b_01ec64.pth', 'sam-vit_b:/path/file.pth' or "
             "'hf-sam:/folder_or_hub_id'")


@dataclass(frozen=True)
class MaskProposal:
    """One candidate mask. `mask` is bool[H, W] at the image's native size (True = selected).

    `score` is the backend's quality estimate (SAM: predicted IoU; superpixels: a colour-contrast
    heuristic in [0, 1)). `logits` are SAM's low-resolution mask logits, float32 [1, 4E, 4E]
    (1x256x256 for the real 1024-px models), to pass back as `previous_logits`; None for the fallback.
    """

    mask: np.ndarray
    score: float
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class ImageEmbedding:
    """What a backend needs to answer clicks on one image without running its encoder again.

    `arrays` are the named embedding arrays (numpy, on CPU); `original_size` is the image's (H, W);
    `input_size` the (h, w) the encoder saw before padding.
    """

    arrays: dict[str, np.ndarray]
    original_size: tuple[int, int]
    input_size: tuple[int, int]


# ----------------------------------------------------------------------------------------------
# The masker: validation, the two-level cache, prefetch

class SamMasker:
    """Click-to-mask over one backend, with an embedding cache (memory LRU + optional disk).

    `encoder_calls` counts how often the image encoder really ran (foreground and prefetch);
    `memory_hits` / `disk_hits` count cache hits; `last_source` says where the last `set_image`
    found its embedding ("memory", "disk" or "encoder"). Thread-safe for one session: a prefetch
    worker may run while `predict` answers clicks on the current image.
    """

    def __init__(self, backend, *, cache_dir: str | os.PathLike | None = None,
                 memory_entries: int = DEFAULT_MEMORY_ENTRIES):
        if int(memory_entries) < 0:
            raise ValueError(f"memory_entries must be 0 or more, got {memory_entries}.")
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_entries = int(memory_entries)
        self.model_key = hashlib.sha256(
            f"{CACHE_FORMAT}\n{backend.model_id}\n{backend.fingerprint}".encode()).hexdigest()
        self.encoder_calls = 0
        self.memory_hits = 0
        self.disk_hits = 0
        self.last_source: str | None = None
        self.cache_problems: list[str] = []  # unreadable cache files that were recomputed, failed writes
        self.prefetch_errors: list[str] = []
        self._memory: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._current: ImageEmbedding | None = None
        self._cond = threading.Condition()  # guards the memory cache, the queue and the counters
        self._encoder_lock = threading.Lock()  # one encoder call at a time (device memory)
        self._foreground_waiting = 0
        self._queue: deque[tuple[str, np.ndarray]] = deque()
        self._running: str | None = None
        self._worker: threading.Thread | None = None
        self._writes: deque[tuple[str, ImageEmbedding]] = deque()  # disk writes not yet done
        self._writing: tuple[str, ImageEmbedding] | None = None  # the write in progress
        self._writer: threading.Thread | None = None
        self._closed = False

    # -- what it is
    @classmethod
    def from_sam(cls, sam, *, model_id: str = "custom", cache_dir=None, device: str = "cpu",
                 memory_entries: int = DEFAULT_MEMORY_ENTRIES) -> "SamMasker":
        """Wrap an already-built `segment_anything.modeling.Sam` (its state dict is hashed once for the cache key)."""
        return cls(SegmentAnythingBackend(sam, model_id=model_id, device=device), cache_dir=cache_dir,
                   memory_entries=memory_entries)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, model_type: str | None = None,
                        builder: Callable[[], Any] | None = None, cache_dir=None, device: str = "cpu",
                        memory_entries: int = DEFAULT_MEMORY_ENTRIES) -> "SamMasker":
        """Official `sam_vit_*.pth` file -> masker. See `load_sam_checkpoint` for `model_type` / `builder`."""
        sam, model_id, fingerprint = load_sam_checkpoint(path, model_type=model_type, builder=builder)
        backend = SegmentAnythingBackend(sam, model_id=model_id, fingerprint=fingerprint, device=device)
        return cls(backend, cache_dir=cache_dir, memory_entries=memory_entries)

    @classmethod
    def from_transformers(cls, source: str | os.PathLike, *, cache_dir=None, device: str = "cpu",
                          memory_entries: int = DEFAULT_MEMORY_ENTRIES) -> "SamMasker":
        """transformers `SamModel` + `SamProcessor` from a local folder (save_pretrained) or a hub id."""
        return cls(TransformersSamBackend.load(str(source), device=device), cache_dir=cache_dir,
                   memory_entries=memory_entries)

    @property
    def approximate(self) -> bool:
        """True for the superpixel fallback: masks are a rough stand-in for SAM's."""
        return bool(getattr(self.backend, "approximate", False))

    @property
    def note(self) -> str:
        return getattr(self.backend, "note", "")

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the current image, or None before `set_image`."""
        current = self._current
        return None if current is None else current.original_size

    # -- the two calls
    def set_image(self, image) -> None:
        """Make `image` (RGB uint8 HWC or PIL RGB) current, computing its embedding only on a cache miss.

        If the prefetch worker is encoding this very image, waits for that call instead of encoding
        twice; if it is only queued, it is taken out of the queue and encoded here.
        """
        rgb = as_rgb(image)
        digest = image_digest(rgb)
        with self._cond:
            if any(key == digest for key, _ in self._queue):
                self._queue = deque(item for item in self._queue if item[0] != digest)
            while self._running == digest:
                self._cond.wait()
        embedding, source = self._load_or_encode(digest, rgb, background=False)
        self._current = embedding
        self.last_source = source

    def predict(self, points: Sequence[Sequence[float]] | None = None, labels: Sequence[int] | None = None,
                box: Sequence[float] | None = None, previous_logits: np.ndarray | None = None,
                multimask: bool = True) -> list[MaskProposal]:
        """Masks for clicks and/or a box on the current image, best score first (up to 3; 1 if not multimask).

        points: (x, y) pixels with 0 <= x < W, 0 <= y < H; labels: 1 positive / 0 negative per point
        (None means all positive); box: (x0, y0, x1, y1) with 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H;
        previous_logits: a previous proposal's `logits` to refine (ignored by the superpixel fallback).
        """
        current = self._current
        if current is None:
            raise RuntimeError("No image is set: call set_image first.")
        pts, lbs, bx = check_prompt(points, labels, box, current.original_size)
        mask_input = check_logits(previous_logits, getattr(self.backend, "logits_shape", None))
        return self.backend.decode(current, pts, lbs, bx, mask_input, bool(multimask))

    # -- prefetch
    def prefetch(self, images: Sequence) -> int:
        """Compute embeddings of the next images in one background daemon thread; returns how many were queued.

        Images already in memory, queued or being encoded are skipped. Embeddings land in the memory
        (and disk) cache, so a later `set_image` on them is a cache hit. The worker runs one encoder
        call at a time and yields to a foreground `set_image` between calls; `predict` never waits for it.
        """
        items = []
        for image in images:
            rgb = as_rgb(image)
            items.append((image_digest(rgb), np.array(rgb, copy=True)))
        queued = 0
        with self._cond:
            if self._closed:
                raise RuntimeError("This masker was closed; make a new one to prefetch.")
            for digest, rgb in items:
                if digest in self._memory or digest == self._running or any(k == digest for k, _ in self._queue):
                    continue
                self._queue.append((digest, rgb))
                queued += 1
            if queued and self._worker is None:
                self._worker = threading.Thread(target=self._work, name="segment-prefetch", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return queued

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until the prefetch queue is empty and idle and every pending disk write is done;
        False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._running is None
                                       and not self._writes and self._writing is None, timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every embedding computed by `set_image` is on disk; False if `timeout` passed first.

        A cold `set_image` answers as soon as the encoder is done: its disk-cache write happens in
        a background thread afterwards (a failed write only costs a recompute after a restart).
        """
        with self._cond:
            return self._cond.wait_for(lambda: not self._writes and self._writing is None, timeout)

    def close(self) -> None:
        """Drop queued prefetches and let the worker stop after its current image. Caches stay on disk
        (pending disk writes still finish in the background)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def clear_memory(self) -> None:
        """Forget the in-memory embeddings (the current image stays usable)."""
        with self._cond:
            self._memory.clear()

    # -- internals
    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._foreground_waiting == 0 or self._closed)
                if not self._queue or self._closed:
                    self._worker = None
                    self._cond.notify_all()
                    return
                digest, rgb = self._queue.popleft()
                self._running = digest
            try:
                self._load_or_encode(digest, rgb, background=True)
            except Exception as exc:  # noqa: BLE001 - a failed prefetch must not kill the worker; set_image retries and raises
                self.prefetch_errors.append(f"{digest[:12]}: {type(exc).__name__}: {first_line(exc)}")
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _load_or_encode(self, digest: str, rgb: np.ndarray, *, background: bool) -> tuple[ImageEmbedding, str]:
        with self._cond:
            embedding = self._memory.get(digest)
            if embedding is not None:
                self._memory.move_to_end(digest)
                self.memory_hits += 1
                return embedding, "memory"
        embedding = self._pending_write(digest)
        if embedding is not None:
            with self._cond:
                self.memory_hits += 1
                self._memory_put(digest, embedding)
            return embedding, "memory"
        embedding = self._disk_get(digest, rgb.shape[:2])
        if embedding is not None:
            with self._cond:
                self.disk_hits += 1
                self._memory_put(digest, embedding)
            return embedding, "disk"
        if background:
            with self._encoder_lock:
                embedding = self.backend.encode(rgb)
        else:
            with self._cond:
                self._foreground_waiting += 1
            try:
                with self._encoder_lock:
                    embedding = self.backend.encode(rgb)
            finally:
                with self._cond:
                    self._foreground_waiting -= 1
                    self._cond.notify_all()
        with self._cond:
            self.encoder_calls += 1
            self._memory_put(digest, embedding)
        if background:
            self._disk_put(digest, embedding)
        else:  # the click is waiting: write the cache file after answering
            self._write_later(digest, embedding)
        return embedding, "encoder"

    def _write_later(self, digest: str, embedding: ImageEmbedding) -> None:
        if self.cache_dir is None:
            return
        with self._cond:
            self._writes.append((digest, embedding))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="segment-cache-writer", daemon=True)
                self._writer.start()
            self._cond.notify_all()

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                if not self._writes:
                    self._writer = None
                    self._cond.notify_all()
                    return
                digest, embedding = self._writing = self._writes.popleft()
            try:
                self._disk_put(digest, embedding)
            finally:
                with self._cond:
                    self._writing = None
                    self._cond.notify_all()

    def _pending_write(self, digest: str) -> ImageEmbedding | None:
        with self._cond:
            pending = [*self._writes, *([self._writing] if self._writing else [])]
            return next((e for key, e in pending if key == digest), None)

    def _memory_put(self, digest: str, embedding: ImageEmbedding) -> None:  # caller holds self._cond
        if self.memory_entries == 0:
            return
        self._memory[digest] = embedding
        self._memory.move_to_end(digest)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def cache_path(self, image) -> Path | None:
        """Where the disk cache keeps (or would keep) this image's embedding; None without a cache_dir."""
        if self.cache_dir is None:
            return None
        return self._disk_path(image_digest(as_rgb(image)))

    def _disk_path(self, digest: str) -> Path:
        return self.cache_dir / self.model_key[:24] / f"{digest}.safetensors"

    def _disk_get(self, digest: str, shape: tuple[int, int]) -> ImageEmbedding | None:
        if self.cache_dir is None:
            return None
        path = self._disk_path(digest)
        if not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata() or {}
                arrays = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self.cache_problems.append(f"{path.name}: unreadable ({first_line(exc)}); recomputed.")
            return None
        problem = None
        if meta.get("format") != CACHE_FORMAT or meta.get("model_key") != self.model_key or meta.get("image") != digest:
            problem = "metadata does not match this model and image"
        else:
            original, given = arrays.pop("original_size", None), arrays.pop("input_size", None)
            if original is None or given is None or original.shape != (2,) or given.shape != (2,):
                problem = "sizes are missing"
            elif tuple(int(v) for v in original) != tuple(shape):
                problem = "original size does not match the image"
            else:
                problem = self.backend.check(arrays, tuple(int(v) for v in given))
        if problem:
            self.cache_problems.append(f"{path.name}: {problem}; recomputed.")
            return None
        return ImageEmbedding(arrays=arrays, original_size=tuple(int(v) for v in original),
                              input_size=tuple(int(v) for v in given))

    def _disk_put(self, digest: str, embedding: ImageEmbedding) -> None:
        if self.cache_dir is None:
            return
        from safetensors.numpy import save_file

        path = self._disk_path(digest)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        arrays = {name: np.ascontiguousarray(value) for name, value in embedding.arrays.items()}
        arrays["original_size"] = np.asarray(embedding.original_size, dtype=np.int64)
        arrays["input_size"] = np.asarray(embedding.input_size, dtype=np.int64)
        meta = {"format": CACHE_FORMAT, "model_key": self.model_key, "image": digest,
                "model_id": self.backend.model_id}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(arrays, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only disk costs a recompute later, never a click
            self.cache_problems.append(f"{path.name}: not written ({first_line(exc)}).")
        finally:
            if tmp.exists():
                tmp.unlink()


class SuperpixelMasker(SamMasker):
    """The offline fallback (no weights): SLIC superpixels, merged by colour at two coarser levels.

    `set_image` runs SLIC once (Lab, ~`n_segments` segments, `compactness`) on the image scaled to a
    long side of at most `working_size` px; neighbouring superpixels whose mean Lab colours differ
    by less than `merge_thresholds` are joined (connected components), giving three granularities.
    `predict` returns, per granularity, the segments under positive points plus the segments lying
    more than half inside the box, minus the segments under negative points; when two granularities
    give the same mask, the largest one grown by rings of neighbouring superpixels fills in, so there
    are three distinct proposals whenever the image has room for them. Masks are upsampled
    to native size by nearest neighbour. Labelled `approximate=True`, with a `note` saying so.
    """

    def __init__(self, *, cache_dir=None, memory_entries: int = DEFAULT_MEMORY_ENTRIES, n_segments: int = 400,
                 compactness: float = 10.0, working_size: int = 512,
                 merge_thresholds: tuple[float, float] = (8.0, 16.0)):
        backend = SuperpixelBackend(n_segments=n_segments, compactness=compactness, working_size=working_size,
                                    merge_thresholds=merge_thresholds)
        super().__init__(backend, cache_dir=cache_dir, memory_entries=memory_entries)


# ----------------------------------------------------------------------------------------------
# Loading

def load_segmenter(spec: str | None, *, cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                   memory_entries: int = DEFAULT_MEMORY_ENTRIES) -> SamMasker:
    """Build a masker from a spec string (see the module docstring); None or "" means "superpixel".

    A missing file or folder raises ModelNotFoundError; an unknown spec or a file that is not a SAM
    checkpoint raises ValueError; both with one sentence.
    """
    text = (spec or SUPERPIXEL).strip()
    family, sep, path = text.partition(":")
    family = family.strip().lower()
    common = dict(cache_dir=cache_dir, memory_entries=memory_entries)
    if not sep and family in (SUPERPIXEL, DEMO):
        return SuperpixelMasker(**common)
    if sep and not path.strip():
        raise ValueError(f"Segmenter spec '{text}' names no file or folder after ':'; {SPEC_HELP}.")
    if family == "sam":
        return SamMasker.from_checkpoint(path.strip(), device=device, **common)
    match = re.fullmatch(r"sam[-_](vit[-_][blh])", family)
    if match:
        return SamMasker.from_checkpoint(path.strip(), model_type=match.group(1).replace("-", "_"), device=device,
                                         **common)
    if family == "hf-sam":
        return SamMasker.from_transformers(path.strip(), device=device, **common)
    raise ValueError(f"Unknown segmenter '{text}'; {SPEC_HELP}.")


def load_segmenter_model(spec: str | None, *, data_dir: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """`load_segmenter` in the shape of `engines.registry.LOADERS` (disk cache under <data_dir>/cache/segment)."""
    masker = load_segmenter(spec, cache_dir=Path(data_dir) / "cache" / "segment", device=device)
    path = (spec or "").partition(":")[2] or None
    return LoadedModel(model=masker, kind="segmenter", model_id=(spec or SUPERPIXEL), path=path,
                       is_demo=masker.approximate, device=device, note=masker.note)


def sam_type_from_name(path: str | os.PathLike) -> str | None:
    """'vit_b' for 'sam_vit_b_01ec64.pth' (also 'vit-b'); None when the name does not say."""
    found = re.search(r"vit[-_]?([blh])(?![a-z])", Path(path).name.lower())
    return f"vit_{found.group(1)}" if found else None


def load_sam_checkpoint(path: str | os.PathLike, *, model_type: str | None = None,
                        builder: Callable[[], Any] | None = None):
    """Official SAM checkpoint -> (Sam in eval mode, model id, file fingerprint).

    The architecture comes from `builder` (a no-argument callable returning an untrained `Sam`,
    e.g. for custom sizes) or from `segment_anything.sam_model_registry[model_type]` built WITHOUT a
    checkpoint; `model_type` defaults to the one in the file name. The file is read with
    `torch.load(weights_only=True)` (pickles that need code are refused), its keys and shapes are
    compared with the architecture (built on the meta device first, so a wrong file fails fast),
    then loaded strictly.
    """
    import torch

    from engines.checkpoints import safe_torch_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"SAM checkpoint '{path}' does not exist; download sam_vit_b_01ec64.pth (or vit_l/vit_h) "
                                 "from the segment-anything releases and pass its path.")
    if builder is None:
        from segment_anything import sam_model_registry

        model_type = model_type or sam_type_from_name(path)
        if model_type not in SAM_TYPES:
            raise ValueError(f"Cannot tell the SAM model type of '{path.name}'; name it like sam_vit_b_01ec64.pth "
                             f"or use sam-vit_b:PATH (types: {', '.join(SAM_TYPES)}).")
        builder, model_id = sam_model_registry[model_type], model_type
    else:
        model_id = f"custom:{model_type or getattr(builder, '__name__', 'builder')}"
    raw = safe_torch_load(path)
    state = raw
    for wrapper in ("model", "state_dict"):
        if not any(k.startswith("image_encoder.") for k in state) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    with torch.device("meta"):
        skeleton = builder()
    check_state_fits(skeleton.state_dict(), state, path.name, model_id)
    sam = builder()
    sam.load_state_dict(state, strict=True)
    return sam.eval(), model_id, file_fingerprint(path)


def check_state_fits(own: dict, state: dict, name: str, model_id: str) -> None:
    """Raise one-sentence ValueError naming missing / unexpected / wrong-shape keys."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise ValueError(f"'{name}' is not a SAM {model_id} checkpoint: {'; '.join(parts)}.")


# ----------------------------------------------------------------------------------------------
# Backend a: Meta's segment-anything

class SegmentAnythingBackend:
    """`segment_anything.SamPredictor` over a `Sam` module; the embedding is the predictor's `features`."""

    approximate = False
    note = ""

    def __init__(self, sam, *, model_id: str = "custom", fingerprint: str | None = None, device: str = "cpu"):
        from segment_anything import SamPredictor

        self.model = sam.to(device).eval()
        self.device = device
        encoder, prompt = sam.image_encoder, sam.prompt_encoder
        mean = [round(float(v), 4) for v in sam.pixel_mean.flatten()]
        std = [round(float(v), 4) for v in sam.pixel_std.flatten()]
        self.model_id = f"segment-anything:{model_id}:img{encoder.img_size}:mean{mean}:std{std}"
        self.fingerprint = fingerprint or module_fingerprint(sam)
        emb_h, emb_w = prompt.image_embedding_size
        self.embedding_shape = (1, prompt.embed_dim, emb_h, emb_w)
        self.logits_shape = (1, 4 * emb_h, 4 * emb_w)
        self._predictor = SamPredictor(self.model)
        self._lock = threading.Lock()  # the predictor's image state is restored per call
        self._on_device: tuple[ImageEmbedding, Any] | None = None

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        import torch
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.model)  # a throwaway predictor: the shared one may be answering clicks
        with torch.inference_mode():
            predictor.set_image(rgb)
        return ImageEmbedding(arrays={"features": predictor.features.float().cpu().numpy()},
                              original_size=tuple(int(v) for v in predictor.original_size),
                              input_size=tuple(int(v) for v in predictor.input_size))

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        return _check_embedding(arrays, "features", self.embedding_shape, input_size, self.model.image_encoder.img_size)

    def decode(self, embedding: ImageEmbedding, points, labels, box, mask_input, multimask) -> list[MaskProposal]:
        import torch

        with self._lock, torch.inference_mode():
            predictor = self._predictor
            if self._on_device is None or self._on_device[0] is not embedding:
                dtype = next(self.model.parameters()).dtype
                features = torch.from_numpy(embedding.arrays["features"]).to(self.device, dtype)
                self._on_device = (embedding, features)
            predictor.features = self._on_device[1]
            predictor.original_size = embedding.original_size
            predictor.input_size = embedding.input_size
            predictor.is_image_set = True
            masks, scores, low_res = predictor.predict(
                point_coords=points, point_labels=labels, box=box,
                mask_input=None if mask_input is None else mask_input.reshape(1, *self.logits_shape[1:]),
                multimask_output=multimask)
        return _proposals(masks, scores, low_res)


# ----------------------------------------------------------------------------------------------
# Backend b: transformers SamModel

class TransformersSamBackend:
    """transformers `SamModel` + `SamProcessor`: embeddings from `model.get_image_embeddings`."""

    approximate = False

    def __init__(self, model, processor, *, model_id: str, fingerprint: str | None = None, device: str = "cpu",
                 note: str = ""):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.note = note
        vision, prompt = model.config.vision_config, model.config.prompt_encoder_config
        self.image_size = int(prompt.image_size)
        longest = _processor_longest_edge(processor)
        if longest != self.image_size:
            raise ValueError(f"SAM processor resizes to {longest} px but the model expects {self.image_size} px; "
                             "save the processor that belongs to this model.")
        emb = int(prompt.image_embedding_size)
        self.embedding_shape = (1, int(vision.output_channels), emb, emb)
        self.logits_shape = (1, 4 * emb, 4 * emb)
        self.model_id = f"transformers-sam:{model_id}"
        processor_config = json.dumps(_processor_dict(processor), sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(
            f"{fingerprint or module_fingerprint(model)}\n{processor_config}".encode()).hexdigest()
        self._on_device: tuple[ImageEmbedding, Any] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str, *, device: str = "cpu") -> "TransformersSamBackend":
        from transformers import SamImageProcessor, SamModel, SamProcessor

        folder = local_folder(source)
        where = str(folder) if folder is not None else source
        try:
            model = SamModel.from_pretrained(where, local_files_only=folder is not None)
        except (OSError, ValueError) as exc:
            if folder is not None:
                raise ModelNotFoundError(f"SAM folder '{source}' could not be loaded as a transformers SamModel: "
                                         f"{first_line(exc)}") from None
            raise ModelNotFoundError(
                f"SAM model '{source}' was not found: it is not a local folder and is not in the Hugging Face cache "
                "(and the hub is unreachable); download it once or pass a folder written by save_pretrained.") from None
        note = ""
        try:
            processor = SamProcessor.from_pretrained(where, local_files_only=folder is not None)
        except (OSError, ValueError):
            size = int(model.config.prompt_encoder_config.image_size)
            processor = SamProcessor(SamImageProcessor(size={"longest_edge": size},
                                                       pad_size={"height": size, "width": size}))
            note = f"No SAM processor config next to the model; using SAM's default preprocessing at {size} px."
        fingerprint = _folder_fingerprint(folder) if folder is not None else _hub_fingerprint(source)
        return cls(model, processor, model_id=source, fingerprint=fingerprint, device=device, note=note)

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=rgb, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
            features = self.model.get_image_embeddings(pixels)
        original = tuple(int(v) for v in inputs["original_sizes"][0])
        resized = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        return ImageEmbedding(arrays={"image_embeddings": features.float().cpu().numpy()},
                              original_size=original, input_size=resized)

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        return _check_embedding(arrays, "image_embeddings", self.embedding_shape, input_size, self.image_size)

    def decode(self, embedding: ImageEmbedding, points, labels, box, mask_input, multimask) -> list[MaskProposal]:
        import torch
        import torch.nn.functional as F

        (orig_h, orig_w), (in_h, in_w) = embedding.original_size, embedding.input_size
        scale = np.array([in_w / orig_w, in_h / orig_h])
        dtype = next(self.model.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if points is not None:
            kwargs["input_points"] = torch.as_tensor(points * scale, dtype=dtype, device=self.device)[None, None]
            kwargs["input_labels"] = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None, None]
        if box is not None:
            kwargs["input_boxes"] = torch.as_tensor(box * np.tile(scale, 2), dtype=dtype, device=self.device)[None, None]
        if mask_input is not None:
            kwargs["input_masks"] = torch.as_tensor(mask_input.reshape(1, *self.logits_shape), dtype=dtype,
                                                    device=self.device)
        with self._lock, torch.inference_mode():
            if self._on_device is None or self._on_device[0] is not embedding:
                features = torch.from_numpy(embedding.arrays["image_embeddings"]).to(self.device, dtype)
                self._on_device = (embedding, features)
            out = self.model(image_embeddings=self._on_device[1], multimask_output=multimask, **kwargs)
            low_res = out.pred_masks[0, 0].float()  # [C, 4E, 4E]
            scores = out.iou_scores[0, 0].float()
            full = F.interpolate(low_res[None], (self.image_size, self.image_size), mode="bilinear", align_corners=False)
            full = F.interpolate(full[..., :in_h, :in_w], (orig_h, orig_w), mode="bilinear", align_corners=False)
            masks = (full[0] > 0.0).cpu().numpy()
        return _proposals(masks, scores.cpu().numpy(), low_res.cpu().numpy())


def _processor_longest_edge(processor) -> int:
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(value) if value else -1


def _processor_dict(processor) -> dict:
    image_processor = getattr(processor, "image_processor", processor)
    try:
        return image_processor.to_dict()
    except (AttributeError, TypeError):
        return {"repr": repr(image_processor)}


# ----------------------------------------------------------------------------------------------
# Backend c: superpixels (no weights)

class SuperpixelBackend:
    """SLIC over-segmentation + colour merges; see `SuperpixelMasker`. Embedding arrays:

    labels int32[h, w] (superpixel id per working-size pixel), groups int32[2, n] (id of each
    superpixel at the two merged levels), lab_sum/lab_sq float64[n, 3] and count int64[n] (colour
    statistics per superpixel, for scores), edges int32[m, 2] (adjacent superpixel pairs).
    """

    approximate = True
    note = SUPERPIXEL_NOTE
    logits_shape = None

    def __init__(self, *, n_segments: int = 400, compactness: float = 10.0, working_size: int = 512,
                 merge_thresholds: tuple[float, float] = (8.0, 16.0)):
        if n_segments < 2 or compactness <= 0 or working_size < 16 or len(merge_thresholds) != 2:
            raise ValueError("Superpixel settings need n_segments >= 2, compactness > 0, working_size >= 16 and "
                             "two merge thresholds.")
        import skimage

        self.n_segments, self.compactness = int(n_segments), float(compactness)
        self.working_size, self.merge_thresholds = int(working_size), tuple(float(t) for t in merge_thresholds)
        self.model_id = (f"superpixel:slic:n{self.n_segments}:c{self.compactness}:w{self.working_size}:"
                         f"t{self.merge_thresholds}")
        self.fingerprint = f"scikit-image {skimage.__version__}"

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        from PIL import Image
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from skimage.color import rgb2lab
        from skimage.segmentation import slic

        height, width = rgb.shape[:2]
        scale = min(1.0, self.working_size / max(height, width))
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        small = rgb if (h, w) == (height, width) else np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        raw = slic(small, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                   convert2lab=True, channel_axis=-1)
        _, labels = np.unique(raw, return_inverse=True)
        labels = labels.reshape(h, w).astype(np.int32)
        n = int(labels.max()) + 1
        lab = rgb2lab(small).reshape(-1, 3)
        flat = labels.ravel()
        count = np.bincount(flat, minlength=n).astype(np.int64)
        lab_sum = np.stack([np.bincount(flat, lab[:, c], minlength=n) for c in range(3)], axis=1)
        lab_sq = np.stack([np.bincount(flat, lab[:, c] ** 2, minlength=n) for c in range(3)], axis=1)
        pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                                np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1)])
        pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
        edges = np.unique(pairs, axis=0).astype(np.int32).reshape(-1, 2)
        means = lab_sum / np.maximum(count, 1)[:, None]
        distance = np.linalg.norm(means[edges[:, 0]] - means[edges[:, 1]], axis=1) if len(edges) else np.zeros(0)
        groups = []
        for threshold in self.merge_thresholds:
            keep = edges[distance < threshold]
            graph = coo_matrix((np.ones(len(keep)), (keep[:, 0], keep[:, 1])), shape=(n, n))
            groups.append(connected_components(graph, directed=False)[1].astype(np.int32))
        arrays = {"labels": labels, "groups": np.stack(groups), "count": count, "lab_sum": lab_sum,
                  "lab_sq": lab_sq, "edges": edges}
        return ImageEmbedding(arrays=arrays, original_size=(height, width), input_size=(h, w))

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        need = {"labels", "groups", "count", "lab_sum", "lab_sq", "edges"}
        if set(arrays) != need:
            return f"arrays {sorted(arrays)} are not {sorted(need)}"
        labels, n = arrays["labels"], len(arrays["count"])
        if labels.shape != tuple(input_size) or labels.size == 0 or labels.min() < 0 or labels.max() >= n:
            return "label map does not fit"
        if arrays["groups"].shape != (2, n) or arrays["lab_sum"].shape != (n, 3) or arrays["lab_sq"].shape != (n, 3):
            return "segment tables do not fit"
        if arrays["edges"].size and (arrays["edges"].min() < 0 or arrays["edges"].max() >= n):
            return "edge list does not fit"
        return None

    def decode(self, embedding: ImageEmbedding, points, labels_, box, mask_input, multimask) -> list[MaskProposal]:
        arrays = embedding.arrays
        labels, count = arrays["labels"], arrays["count"]
        n = len(count)
        (height, width), (h, w) = embedding.original_size, embedding.input_size
        sy, sx = h / height, w / width
        levels = [np.arange(n, dtype=np.int32), arrays["groups"][0], arrays["groups"][1]]
        pos_ids = neg_ids = np.zeros(0, dtype=np.int32)
        if points is not None:
            rows = np.clip((points[:, 1] * sy).astype(int), 0, h - 1)
            cols = np.clip((points[:, 0] * sx).astype(int), 0, w - 1)
            under = labels[rows, cols]
            pos_ids, neg_ids = under[labels_ == 1], under[labels_ == 0]
        inside = None
        if box is not None:
            x0, x1 = int(np.floor(box[0] * sx)), int(np.ceil(box[2] * sx))
            y0, y1 = int(np.floor(box[1] * sy)), int(np.ceil(box[3] * sy))
            inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n)
        seen: set[bytes] = set()
        proposals, chosen_sets = [], []
        for level in levels:
            ngroups = int(level.max()) + 1
            chosen = np.zeros(ngroups, dtype=bool)
            chosen[level[pos_ids]] = True
            if inside is not None:
                frac = np.bincount(level, inside, minlength=ngroups) / np.bincount(level, count, minlength=ngroups)
                chosen |= frac > 0.5
            chosen[level[neg_ids]] = False
            selected = chosen[level]  # per superpixel
            if not selected.any() and proposals:
                continue
            signature = np.packbits(selected).tobytes()
            if signature in seen:
                continue
            seen.add(signature)
            mask = self._upsample(selected[labels], height, width, sy, sx, h, w)
            proposals.append(MaskProposal(mask=mask, score=self._contrast(arrays, selected), logits=None))
            chosen_sets.append(selected)
        if multimask and proposals:  # SAM's shape: three proposals; grow the largest by rings of neighbours
            selected = max(chosen_sets, key=lambda sel: int(sel.sum()))
            while len(proposals) < 3 and len(arrays["edges"]):
                grown = selected.copy()
                a, b = selected[arrays["edges"][:, 0]], selected[arrays["edges"][:, 1]]
                grown[arrays["edges"][a, 1]] = True
                grown[arrays["edges"][b, 0]] = True
                if grown.sum() == selected.sum():
                    break
                selected = grown
                signature = np.packbits(selected).tobytes()
                if signature not in seen:
                    seen.add(signature)
                    proposals.append(MaskProposal(mask=self._upsample(selected[labels], height, width, sy, sx, h, w),
                                                  score=self._contrast(arrays, selected), logits=None))
                    chosen_sets.append(selected)
        proposals.sort(key=lambda p: -p.score)
        return proposals[:3] if multimask else proposals[:1]

    @staticmethod
    def _upsample(small: np.ndarray, height: int, width: int, sy: float, sx: float, h: int, w: int) -> np.ndarray:
        rows = np.minimum(((np.arange(height) + 0.5) * sy).astype(int), h - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * sx).astype(int), w - 1)
        return np.take(np.take(small, rows, axis=0), cols, axis=1)

    @staticmethod
    def _contrast(arrays: dict, selected: np.ndarray) -> float:
        """d / (d + sigma_in + sigma_ring + 1): d = Lab distance between the region's mean colour and that of
        the superpixels touching it, sigma = their colour spreads. ~1 for a flat region on a different
        flat background, ~0 for part of a flat area. A heuristic, not a predicted IoU."""
        if not selected.any():
            return 0.0
        edges = arrays["edges"]
        touching = np.zeros_like(selected)
        if len(edges):
            a, b = selected[edges[:, 0]], selected[edges[:, 1]]
            touching[edges[a & ~b, 1]] = True
            touching[edges[b & ~a, 0]] = True
        if not touching.any():
            return 0.0

        def stats(which):
            n = arrays["count"][which].sum()
            mean = arrays["lab_sum"][which].sum(0) / n
            var = np.maximum(arrays["lab_sq"][which].sum(0) / n - mean ** 2, 0.0)
            return mean, float(np.sqrt(var.sum()))

        (mean_in, spread_in), (mean_out, spread_out) = stats(selected), stats(touching)
        d = float(np.linalg.norm(mean_in - mean_out))
        return d / (d + spread_in + spread_out + 1.0)


# ----------------------------------------------------------------------------------------------
# Helpers: validation, hashing

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


def _folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
            value = path.read_text() if path.suffix == ".json" else file_fingerprint(path)
            digest.update(f"{path.name}|{value}\n".encode())
    return digest.hexdigest()


def _hub_fingerprint(repo_id: str) -> str | None:
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None  # falls back to hashing the loaded state dict
    return _folder_fingerprint(Path(config).parent) if config else None


def _check_embedding(arrays: dict, name: str, shape: tuple, input_size: tuple[int, int], side: int) -> str | None:
    if set(arrays) != {name}:
        return f"arrays {sorted(arrays)} are not ['{name}']"
    value = arrays[name]
    if value.dtype != np.float32 or tuple(value.shape) != tuple(shape):
        return f"{name} is {value.dtype}{tuple(value.shape)}, expected float32{tuple(shape)}"
    if not (0 < input_size[0] <= side and 0 < input_size[1] <= side and max(input_size) == side):
        return f"input size {input_size} does not fit a {side}-px encoder"
    if not np.isfinite(value).all():
        return f"{name} holds NaN or infinite values"
    return None


def _proposals(masks: np.ndarray, scores: np.ndarray, low_res: np.ndarray) -> list[MaskProposal]:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [MaskProposal(mask=np.asarray(masks[i], dtype=bool), score=float(scores[i]),
                         logits=np.ascontiguousarray(low_res[i:i + 1], dtype=np.float32)) for i in order]


def check_prompt(points, labels, box, size: tuple[int, int]):
    """Validate a click/box prompt on an (H, W) image -> (points float64[N, 2] | None, labels int64[N] | None,
    box float64[4] | None). Raises ValueError with one sentence."""
    height, width = size
    pts = lbs = bx = None
    if points is not None and len(points):
        try:
            pts = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("points must be a list of (x, y) pixel pairs.") from None
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"points must be a list of (x, y) pixel pairs, got an array of shape {pts.shape}.")
        if labels is None:
            lbs = np.ones(len(pts), dtype=np.int64)
        else:
            try:
                raw = np.asarray(labels, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise ValueError("labels must be a list of 1 (positive) or 0 (negative), one per point.") from None
            if len(raw) != len(pts):
                raise ValueError(f"labels has {len(raw)} entries but points has {len(pts)}; give one label "
                                 "(1 positive, 0 negative) per point.")
            if not np.isin(raw, (0, 1)).all():
                raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {sorted(set(raw.tolist()))}.")
            lbs = raw.astype(np.int64)
        for x, y in pts:
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < width and 0 <= y < height):
                raise ValueError(f"Point ({x:g}, {y:g}) is outside the {width}x{height} image; x must be in "
                                 f"[0, {width}) and y in [0, {height}).")
    elif labels is not None and len(labels):
        raise ValueError("labels were given without points; give one (x, y) point per label.")
    if box is not None:
        try:
            bx = np.asarray(box, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError("box must be four numbers (x0, y0, x1, y1).") from None
        if bx.shape != (4,) or not np.isfinite(bx).all():
            raise ValueError("box must be four finite numbers (x0, y0, x1, y1).")
        x0, y0, x1, y1 = bx
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"Box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must satisfy 0 <= x0 < x1 <= {width} and "
                             f"0 <= y0 < y1 <= {height} for this {width}x{height} image.")
    if pts is None and bx is None:
        raise ValueError("predict needs a prompt: give at least one point (with its label) or a box.")
    return pts, lbs, bx


def check_logits(previous_logits, shape: tuple | None) -> np.ndarray | None:
    """A previous proposal's logits, shape `shape` (or without the leading 1), as float32; None passes."""
    if previous_logits is None or shape is None:
        return None
    value = np.asarray(previous_logits, dtype=np.float32)
    if value.shape not in (tuple(shape), tuple(shape[1:])) or not np.isfinite(value).all():
        raise ValueError(f"previous_logits must be a finite array of shape {tuple(shape)} (a proposal's logits), "
                         f"got shape {value.shape}.")
    return value.reshape(shape)
