"""Reading the RichHF-18k dataset (TFRecord files of `tf.train.Example`) without TensorFlow.

RichHF-18k ships `train.tfrecord`, `dev.tfrecord` and `test.tfrecord`. Each record is a
`tf.train.Example` with the features `filename` (bytes), `aesthetics_score`, `artifact_score`,
`misalignment_score`, `overall_score` (floats), `artifact_map` and `misalignment_map` (encoded
512x512 single-channel images, values 0-255) and `prompt_misalignment_label` (a space-separated
string of 0/1, one per prompt token; 0 = misaligned token). The images themselves are not in the
dataset: they are Pick-a-Pic v1 images, joined by `filename` (see `match_images`).

This module has four parts, top to bottom:

1. CRC32C (Castagnoli), used by the TFRecord framing: `crc32c`, `masked_crc32c`.
2. TFRecord framing: `iter_tfrecord` (raw payloads), `write_tfrecord`.
3. `tf.train.Example` messages built at run time from a descriptor with the `protobuf` package:
   `make_example` (encode) and `parse_example` (decode to a dict).
4. RichHF-18k on top: `read_richhf` yields `RichHFRecord` or `CorruptRecord`;
   `binarize_artifact_map` and `match_images` help turn records into training pairs.

Nothing is computed at import time: CRC tables and protobuf classes are built on first use.
"""
from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.images import IMAGE_SUFFIXES

RICHHF_SCORE_FIELDS = ("aesthetics_score", "artifact_score", "misalignment_score", "overall_score")
RICHHF_MAP_FIELDS = ("artifact_map", "misalignment_map")
RICHHF_FIELDS = ("filename", *RICHHF_SCORE_FIELDS, *RICHHF_MAP_FIELDS, "prompt_misalignment_label")
"""Every feature a RichHF-18k record must carry."""
CAPTION_FIELDS = ("caption", "prompt")
"""Optional text features read as the image's caption (the first present)."""

# --------------------------------------------------------------------------------------------
# 1. CRC32C
# --------------------------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_MASK_DELTA = 0xA282EAD8
_NUMPY_MIN_BYTES = 2048  # below this, the lane-parallel numpy path is not faster


@functools.cache
def _crc_tables() -> tuple[list[list[int]], np.ndarray]:
    """Slicing-by-8 tables (8 x 256 Python ints) and table 0 as a numpy uint32 array."""
    t0 = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        t0.append(c)
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ t0[prev[i] & 0xFF] for i in range(256)])
    return tables, np.array(t0, dtype=np.uint32)


def _crc_update_py(crc: int, data: bytes | memoryview) -> int:
    """Advance the (unconditioned) CRC register over `data`: slicing-by-8, then byte by byte."""
    tables, _ = _crc_tables()
    t0, t1, t2, t3, t4, t5, t6, t7 = tables
    view = memoryview(data).cast("B")
    n8 = len(view) - len(view) % 8
    for lo, hi in struct.iter_unpack("<II", view[:n8]):
        lo ^= crc
        crc = (t7[lo & 0xFF] ^ t6[(lo >> 8) & 0xFF] ^ t5[(lo >> 16) & 0xFF] ^ t4[lo >> 24]
               ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24])
    for byte in view[n8:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


@functools.cache
def _zero_shift_tables(length: int) -> tuple[list[int], ...]:
    """Four byte tables of the linear map "advance the CRC register over `length` zero bytes"."""
    _, t0 = _crc_tables()
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for _ in range(length):
        basis = t0[basis & 0xFF] ^ (basis >> 8)
    images = [int(v) for v in basis]
    tables = []
    for byte in range(4):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ images[byte * 8 + low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def _crc_update_numpy(crc: int, data: bytes | memoryview) -> int:
    """The same register update, with K lanes of L bytes run side by side in numpy.

    The CRC register is linear over GF(2): crc(A || B) = shift_|B|(crc(A)) ^ crc0(B), where
    crc0 starts from 0 and shift_n advances a register over n zero bytes. So each lane is run
    from 0 (lane 0 from `crc`), then the lanes are folded left to right with shift_L.
    """
    _, t0 = _crc_tables()
    view = memoryview(data).cast("B")
    n = len(view)
    lane = 1 << (max(n // 4, 1).bit_length() // 2)  # ~sqrt(n/4): balances numpy steps and folds
    lanes = n // lane
    block = np.frombuffer(view, dtype=np.uint8, count=lanes * lane).reshape(lanes, lane).T.copy()
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = crc
    for column in block:
        regs = t0[(regs ^ column) & 0xFF] ^ (regs >> 8)
    z0, z1, z2, z3 = _zero_shift_tables(lane)
    values = regs.tolist()
    crc = values[0]
    for value in values[1:]:
        crc = z0[crc & 0xFF] ^ z1[(crc >> 8) & 0xFF] ^ z2[(crc >> 16) & 0xFF] ^ z3[crc >> 24] ^ value
    return _crc_update_py(crc, view[lanes * lane:])


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`; pass a previous result as `crc` to continue it.

    Uses the `google_crc32c` or `crc32c` package when one is installed, otherwise pure Python
    (slicing-by-8) for short inputs and a numpy lane-parallel version for long ones.
    crc32c(b"123456789") == 0xE3069283.
    """
    native = _native_crc32c()
    if native is not None:
        return native(bytes(data), crc)
    update = _crc_update_numpy if len(data) >= _NUMPY_MIN_BYTES else _crc_update_py
    return update(crc ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


@functools.cache
def _native_crc32c() -> Callable[[bytes, int], int] | None:
    """A compiled CRC32C from an already installed package, or None."""
    try:
        import google_crc32c

        return lambda data, crc: google_crc32c.extend(crc, data)
    except ImportError:
        pass
    try:
        import crc32c as crc32c_package

        return lambda data, crc: crc32c_package.crc32c(data, crc)
    except ImportError:
        return None


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC32C that TFRecord stores: rotate right by 15 bits, add 0xa282ead8."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# 2. TFRecord framing
# --------------------------------------------------------------------------------------------
# Each record: uint64 LE length | uint32 LE masked CRC32C of those 8 bytes | data |
# uint32 LE masked CRC32C of data.

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


@dataclass(frozen=True)
class FramingError:
    """A record whose bytes could not be taken from a TFRecord file.

    `fatal` is True when the framing is lost (bad length CRC, truncated tail) and no further
    record can be found; False when only this record's data is damaged (bad data CRC).
    """

    index: int
    reason: str
    fatal: bool


def _open_tfrecord(path: str | os.PathLike) -> tuple[Path, int]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file; expected a TFRecord file such as train.tfrecord.")
    if not path.is_file():
        raise ValueError(f"{path}: is not a file; expected a TFRecord file such as train.tfrecord.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), so it holds no TFRecord records.")
    with path.open("rb") as handle:
        head = handle.read(_HEADER.size)
    if head[:2] == b"\x1f\x8b" and not (len(head) == _HEADER.size and _header_ok(head)):
        raise ValueError(f"{path}: is gzip-compressed; only uncompressed TFRecord files are read "
                         "(decompress it first, e.g. with gunzip).")
    return path, size


def _header_ok(header: bytes) -> bool:
    return masked_crc32c(header[:8]) == _HEADER.unpack(header)[1]


def iter_tfrecord(
    path: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, bytes | FramingError]]:
    """Yield (index, payload bytes) for each record of a TFRecord file, checking both CRCs.

    A record with a bad data CRC is yielded as a non-fatal `FramingError` and reading goes on;
    a bad length CRC or a truncated tail yields one fatal `FramingError` and ends the file.
    `progress(bytes_read, file_size)` is called after each record; `should_stop()` is checked
    before each record and ends the iteration quietly when it returns True.
    Raises ValueError for a missing or empty file, at the call (not at the first `next()`).
    """
    path, size = _open_tfrecord(path)
    return _iter_frames(path, size, progress, should_stop)


def _iter_frames(
    path: Path,
    size: int,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> Iterator[tuple[int, bytes | FramingError]]:
    with path.open("rb") as handle:
        index = 0
        offset = 0
        while offset < size:
            if should_stop is not None and should_stop():
                return
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size:
                yield index, FramingError(index, f"truncated: {len(header)} bytes left at offset {offset}, "
                                                 f"less than a {_HEADER.size}-byte record header", True)
                return
            length = _HEADER.unpack(header)[0]
            if not _header_ok(header):
                yield index, FramingError(index, f"bad length CRC at offset {offset}; the framing is lost, "
                                                 "so reading stops here", True)
                return
            remaining = size - offset - _HEADER.size
            if length + _FOOTER.size > remaining:
                yield index, FramingError(index, f"truncated: the record at offset {offset} needs "
                                                 f"{length + _FOOTER.size} bytes but {remaining} are left", True)
                return
            data = handle.read(length)
            footer = handle.read(_FOOTER.size)
            if len(data) < length or len(footer) < _FOOTER.size:  # the file shrank while reading
                yield index, FramingError(index, f"truncated: the record at offset {offset} ends early", True)
                return
            offset += _HEADER.size + length + _FOOTER.size
            if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
                yield index, FramingError(index, "bad data CRC: the record's bytes are damaged", False)
            else:
                yield index, data
            if progress is not None:
                progress(offset, size)
            index += 1


def write_tfrecord(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
    """Write `payloads` as TFRecord records (uncompressed) to `path`; returns how many were written."""
    count = 0
    with Path(path).open("wb") as handle:
        for payload in payloads:
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise ValueError(f"record {count}: payloads must be bytes, got {type(payload).__name__}.")
            payload = bytes(payload)
            length = struct.pack("<Q", len(payload))
            handle.write(length)
            handle.write(_FOOTER.pack(masked_crc32c(length)))
            handle.write(payload)
            handle.write(_FOOTER.pack(masked_crc32c(payload)))
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# 3. tf.train.Example, built from a descriptor (tensorflow/core/example/{example,feature}.proto)
# --------------------------------------------------------------------------------------------


@functools.cache
def _example_classes() -> dict[str, type]:
    """Message classes for Example, Features, Feature, BytesList, FloatList, Int64List.

    Built in a private descriptor pool, so they never clash with TensorFlow or TensorBoard
    protos loaded in the same process. Field numbers match TensorFlow's .proto files.
    """
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError:
        raise ValueError("reading TFRecord examples needs the protobuf package; "
                         "install it with `pip install protobuf`.") from None
    fd = descriptor_pb2.FieldDescriptorProto
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="artifact_studio/tensorflow_example.proto", package="tensorflow", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> descriptor_pb2.DescriptorProto:
        msg = file_proto.message_type.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            field = msg.field.add(name=field_name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = type_name
        return msg

    repeated, optional = fd.LABEL_REPEATED, fd.LABEL_OPTIONAL
    message("BytesList", ("value", 1, repeated, fd.TYPE_BYTES, ""))
    message("FloatList", ("value", 1, repeated, fd.TYPE_FLOAT, ""))  # packed: proto3 default
    message("Int64List", ("value", 1, repeated, fd.TYPE_INT64, ""))  # packed: proto3 default
    feature = message("Feature",
                      ("bytes_list", 1, optional, fd.TYPE_MESSAGE, ".tensorflow.BytesList"),
                      ("float_list", 2, optional, fd.TYPE_MESSAGE, ".tensorflow.FloatList"),
                      ("int64_list", 3, optional, fd.TYPE_MESSAGE, ".tensorflow.Int64List"))
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = message("Features",
                       ("feature", 1, repeated, fd.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry"))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=optional, type=fd.TYPE_STRING)
    entry.field.add(name="value", number=2, label=optional, type=fd.TYPE_MESSAGE,
                    type_name=".tensorflow.Feature")
    message("Example", ("features", 1, optional, fd.TYPE_MESSAGE, ".tensorflow.Features"))

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    names = ("Example", "Features", "Feature", "BytesList", "FloatList", "Int64List")
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))
            for name in names}


FeatureValue = str | bytes | float | int
"""A feature value for `make_example`: one of these, or a list/tuple of one kind."""


def _feature_kind(name: str, value: object) -> tuple[str, list]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"feature {name!r} is an empty list; its kind (bytes, float or int) cannot be told.")
    if all(isinstance(v, (str, bytes)) for v in values):
        return "bytes_list", [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    if all(isinstance(v, (int, np.integer)) for v in values):
        return "int64_list", [int(v) for v in values]
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return "float_list", [float(v) for v in values]
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(f"feature {name!r} has values of type {', '.join(kinds)}; accepted are str/bytes "
                     "(bytes_list), float (float_list), int (int64_list), or a list of one of these.")


def make_example(**features: FeatureValue | list[FeatureValue] | tuple[FeatureValue, ...]) -> bytes:
    """Serialize a `tf.train.Example` with the given features.

    str/bytes -> bytes_list (str as UTF-8), float -> float_list (stored as float32),
    int -> int64_list; a list or tuple of one kind gives several values (ints mixed with
    floats give a float_list). Example: make_example(filename="a.png", overall_score=3.5).
    """
    classes = _example_classes()
    example = classes["Example"]()
    for name, value in features.items():
        kind, values = _feature_kind(name, value)
        getattr(example.features.feature[name], kind).value.extend(values)
    return example.SerializeToString()


def parse_example(payload: bytes) -> dict[str, tuple[str | None, list]]:
    """Decode a serialized `tf.train.Example` to {name: (kind, values)}.

    kind is "bytes_list", "float_list", "int64_list", or None for a feature with no kind set.
    Raises ValueError when the bytes are not an Example.
    """
    from google.protobuf.message import DecodeError

    example = _example_classes()["Example"]()
    try:
        example.ParseFromString(payload)
    except DecodeError as exc:
        raise ValueError(f"not a tf.train.Example ({exc}).") from None
    result: dict[str, tuple[str | None, list]] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        result[name] = (kind, list(getattr(feature, kind).value) if kind else [])
    return result


# --------------------------------------------------------------------------------------------
# 4. RichHF-18k records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RichHFRecord:
    """One RichHF-18k record.

    Scores are the float32 values stored in the file, as Python floats. The maps are uint8
    [H, W] (512x512 in the real data), one aggregated map per record (not per annotator);
    `prompt_misalignment_label` has one 0/1 per prompt token (0 = misaligned), () when empty.
    `caption` is the text of an optional `caption` (or `prompt`) feature when a record carries one
    (RichHF-18k itself does not: its prompts are Pick-a-Pic's), else None.
    Compared by identity (eq=False), as the maps are arrays.
    """

    index: int
    filename: str
    aesthetics_score: float
    artifact_score: float
    misalignment_score: float
    overall_score: float
    artifact_map: np.ndarray
    misalignment_map: np.ndarray
    prompt_misalignment_label: tuple[int, ...]
    caption: str | None = None


@dataclass(frozen=True)
class CorruptRecord:
    """A record that could not be read; `index` is its position in the file (0-based)."""

    index: int
    reason: str


class _BadRecord(Exception):
    """Internal: why one record cannot become a RichHFRecord."""


def _single(features: dict, name: str, kinds: tuple[str, ...]) -> object:
    if name not in features:
        raise _BadRecord(f"missing field {name}")
    kind, values = features[name]
    if kind not in kinds:
        raise _BadRecord(f"field {name} is a {kind or 'feature with no value'}, expected {' or '.join(kinds)}")
    if len(values) != 1:
        raise _BadRecord(f"field {name} has {len(values)} values, expected 1")
    return values[0]


def _decode_map(name: str, encoded: bytes) -> np.ndarray:
    """Decode an encoded map to uint8 [H, W].

    Colour or alpha images become one channel with Pillow's "L" conversion, as RichHF's own
    reader decodes with `channels=1`; 16-bit and float images are refused.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            if image.mode not in ("L", "1", "P", "LA", "RGB", "RGBA"):
                raise _BadRecord(f"undecodable map: field {name} is a {image.mode} image, "
                                 "expected 8-bit single channel")
            if image.mode != "L":
                image = image.convert("L")
            return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise _BadRecord(f"undecodable map: field {name} is not a readable image ({exc})") from None


def _parse_label(raw: bytes) -> tuple[int, ...]:
    try:
        tokens = raw.decode("utf-8").split()
    except UnicodeDecodeError:
        raise _BadRecord("field prompt_misalignment_label is not UTF-8 text") from None
    if any(token not in ("0", "1") for token in tokens):
        raise _BadRecord("field prompt_misalignment_label must be space-separated 0/1 values")
    return tuple(int(token) for token in tokens)


def _to_record(index: int, payload: bytes) -> RichHFRecord:
    try:
        features = parse_example(payload)
    except ValueError as exc:
        raise _BadRecord(str(exc)) from None
    filename = _single(features, "filename", ("bytes_list",))
    try:
        filename = filename.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRecord("field filename is not UTF-8 text") from None
    scores = {name: float(_single(features, name, ("float_list", "int64_list"))) for name in RICHHF_SCORE_FIELDS}
    maps = {name: _decode_map(name, _single(features, name, ("bytes_list",))) for name in RICHHF_MAP_FIELDS}
    label = _parse_label(_single(features, "prompt_misalignment_label", ("bytes_list",)))
    caption = None
    for name in CAPTION_FIELDS:  # optional: kept when present
        if name in features:
            try:
                caption = _single(features, name, ("bytes_list",)).decode("utf-8")
            except UnicodeDecodeError:
                raise _BadRecord(f"field {name} is not UTF-8 text") from None
            break
    return RichHFRecord(index=index, filename=filename, **scores, **maps, prompt_misalignment_label=label,
                        caption=caption)


def read_richhf(
    path: str | os.PathLike,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[RichHFRecord | CorruptRecord]:
    """Yield every record of a RichHF-18k TFRecord file (train/dev/test.tfrecord) in order.

    A record with a bad data CRC, or that is not an Example, lacks a field or holds an
    undecodable map, is yielded as `CorruptRecord` and reading continues with the next one.
    A bad length CRC or a truncated tail ends the file with one `CorruptRecord` (the framing is
    lost). `progress(bytes_read, file_size)` is called after each record; `should_stop()` is
    checked before each record and ends the iteration quietly. Raises ValueError for a missing
    or empty file, at the call.
    """
    return _richhf_records(iter_tfrecord(path, progress=progress, should_stop=should_stop))


def _richhf_records(frames: Iterator[tuple[int, bytes | FramingError]]) -> Iterator[RichHFRecord | CorruptRecord]:
    for index, item in frames:
        if isinstance(item, FramingError):
            yield CorruptRecord(index, item.reason)
            continue
        try:
            yield _to_record(index, item)
        except _BadRecord as exc:
            yield CorruptRecord(index, str(exc))


def binarize_artifact_map(raw: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Turn a RichHF artifact map (uint8 [H, W], 0-255) into a mask: bool [H, W], True = artifact.

    A pixel is artifact iff raw / 255 >= threshold, with `threshold` a fraction in (0, 1].
    RichHF-18k stores ONE aggregated map per record, not one per annotator. If that map is the
    mean of 3 annotators' binary maps, its values are multiples of 85 (0, 85, 170, 255), and the
    papers' "at least 2 of 3 annotators" rule is raw >= 170, which any threshold in (1/3, 2/3]
    reproduces; the default 0.5 is in that range. The released maps may however be smoothed
    (soft heatmaps with values between those steps), in which case no threshold recovers the
    annotators' votes exactly: inspect `np.unique(raw)` and pick the threshold that suits you.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise ValueError(f"the artifact map must be uint8 [H, W], got {raw.dtype} with shape {raw.shape}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of 255 in (0, 1], got {threshold}.")
    return raw.astype(np.float64) / 255.0 >= threshold


def match_images(
    records_filenames: list[str], images_dir: str | os.PathLike
) -> tuple[dict[str, Path], list[str]]:
    """Find each record's image (Pick-a-Pic v1) in `images_dir` (not its subfolders).

    A name matches a file of exactly that name first; otherwise a file whose stem equals the
    name's stem, ignoring case, with any image suffix (IMAGE_SUFFIXES), so "abc.png" finds
    "ABC.jpg". When several files share that stem, one whose whole name matches ignoring case
    wins, else the first in sorted order. Returns ({record filename: path}, unmatched names in
    input order, each once). Raises ValueError when `images_dir` is not a folder.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; expected the folder that holds the Pick-a-Pic images.")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    by_name = {p.name: p for p in files}
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(p.stem.lower(), []).append(p)
    found: dict[str, Path] = {}
    unmatched: list[str] = []
    seen: set[str] = set()
    for name in records_filenames:
        if name in seen:
            continue
        seen.add(name)
        if name in by_name:
            found[name] = by_name[name]
            continue
        candidates = by_stem.get(Path(name).stem.lower(), [])
        same_name = [p for p in candidates if p.name.lower() == Path(name).name.lower()]
        if same_name or candidates:
            found[name] = (same_name or candidates)[0]
        else:
            unmatched.append(name)
    return found, unmatched
