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

Modules: backend.py (`MaskProposal`, `ImageEmbedding`: what backends exchange with the masker),
sam_backends.py (the two SAM backends, checkpoint loading), superpixel.py (the fallback backend),
embedding_cache.py (fingerprints, keys and files of the disk cache).

Embedding cache. Embeddings live in an in-memory LRU (default 8) and, when the caller passes a
`cache_dir`, on disk (embedding_cache.py describes keys and files). Files are written after
`set_image` has returned (a background writer; `flush()` waits for it), so a cold click costs the
encoder and nothing else; a file that cannot be read or does not match is ignored and rewritten.

Conventions: images are RGB uint8 HWC (or PIL RGB); points are (x, y) pixels of that image; masks
are bool[H, W] at the image's size. Nothing here runs at import time; torch is imported lazily.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from engines.images import as_rgb, image_digest
from engines.models import DEMO, LoadedModel, first_line
from engines.segmentation.backend import ImageEmbedding, MaskProposal
from engines.segmentation.embedding_cache import embedding_model_key, embedding_path, read_embedding, write_embedding
from engines.segmentation.sam_backends import SegmentAnythingBackend, TransformersSamBackend, load_sam_checkpoint
from engines.segmentation.superpixel import SuperpixelBackend

DEFAULT_MEMORY_ENTRIES = 8
SUPERPIXEL = "superpixel"
SPEC_HELP = ("use 'superpixel', 'sam:/path/sam_vit_b_01ec64.pth', 'sam-vit_b:/path/file.pth' or "
             "'hf-sam:/folder_or_hub_id'")


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
        self.model_key = embedding_model_key(backend.model_id, backend.fingerprint)
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
        return embedding_path(self.cache_dir, self.model_key, digest)

    def _disk_get(self, digest: str, shape: tuple[int, int]) -> ImageEmbedding | None:
        if self.cache_dir is None:
            return None
        return read_embedding(self._disk_path(digest), self.model_key, digest, shape, self.backend.check,
                              self.cache_problems)

    def _disk_put(self, digest: str, embedding: ImageEmbedding) -> None:
        if self.cache_dir is None:
            return
        write_embedding(self._disk_path(digest), digest, embedding, self.model_key, self.backend.model_id,
                        self.cache_problems)


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


# ----------------------------------------------------------------------------------------------
# Helpers: validation

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
