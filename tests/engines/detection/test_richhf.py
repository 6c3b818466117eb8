"""RichHF-18k reading: CRC32C, TFRecord framing, tf.train.Example, records, maps and image joins.

Files are written in the real format (TFRecord of tf.train.Example with RichHF's field names and
PNG-encoded single-channel maps) by the engine's own writer, whose bytes were checked against
TensorFlow's generated Example classes when it was written.
"""
from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from engines.detection import richhf
from engines.detection.richhf import (
    CorruptRecord,
    RichHFRecord,
    binarize_artifact_map,
    crc32c,
    make_example,
    masked_crc32c,
    match_images,
    parse_example,
    read_richhf,
    write_tfrecord,
)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_map(size: int, seed: int) -> np.ndarray:
    """A map of mean-of-3-annotators values (0, 85, 170, 255) with some structure."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4, (size, size)) * 85).astype(np.uint8)


def richhf_fields(i: int, size: int) -> dict:
    return dict(
        filename=f"{i:04d}-abcdef.png",
        aesthetics_score=0.25 * i,
        artifact_score=0.5 + i,
        misalignment_score=1.0 / 3.0,
        overall_score=4.75 - i,
        artifact_map=make_map(size, seed=i),
        misalignment_map=make_map(size, seed=100 + i),
        prompt_misalignment_label=" ".join("01"[(i + k) % 2] for k in range(i + 2)) if i != 2 else "",
    )


def encode(fields: dict, drop: str | None = None) -> bytes:
    features = {k: (png(v) if isinstance(v, np.ndarray) else v) for k, v in fields.items() if k != drop}
    return make_example(**features)


SIZES = (512, 64, 64, 64)


@pytest.fixture(scope="module")
def fields() -> list[dict]:
    return [richhf_fields(i, size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def payloads(fields) -> list[bytes]:
    return [encode(f) for f in fields]


def frame_offsets(payloads: list[bytes]) -> list[int]:
    """Start offset of each record in the file write_tfrecord produces."""
    offsets, at = [], 0
    for p in payloads:
        offsets.append(at)
        at += 8 + 4 + len(p) + 4
    return offsets + [at]


def assert_same(record, expected: dict, index: int) -> None:
    assert isinstance(record, RichHFRecord), record
    assert record.index == index
    assert record.filename == expected["filename"]
    for name in richhf.RICHHF_SCORE_FIELDS:
        assert getattr(record, name) == float(np.float32(expected[name]))  # stored as float32
    for name in richhf.RICHHF_MAP_FIELDS:
        got = getattr(record, name)
        assert got.dtype == np.uint8 and got.shape == expected[name].shape
        np.testing.assert_array_equal(got, expected[name])
    label = expected["prompt_misalignment_label"]
    assert record.prompt_misalignment_label == tuple(int(t) for t in label.split())


# --- CRC32C -----------------------------------------------------------------------------------


def test_crc32c_vectors_and_mask():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    crc = crc32c(b"123456789")
    assert masked_crc32c(b"123456789") == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283  # continuation


def test_pure_python_and_numpy_crc_paths_agree():
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    for n in (1, 7, 8, 9, 2047, 2048, 2049, 65_536, 100_003, 300_001):
        start = 0xFFFFFFFF
        assert richhf._crc_update_numpy(start, data[:n]) == richhf._crc_update_py(start, data[:n]), n
    assert richhf._crc_update_py(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283


# --- framing and Example --------------------------------------------------------------------


def test_make_example_kinds_round_trip():
    payload = make_example(s="héllo", b=b"\x00\xff", f=1.5, i=-3, fs=[1.0, 2], ints=(1, 2, 3), strs=["a", "b"])
    assert parse_example(payload) == {
        "s": ("bytes_list", ["héllo".encode()]),
        "b": ("bytes_list", [b"\x00\xff"]),
        "f": ("float_list", [1.5]),
        "i": ("int64_list", [-3]),
        "fs": ("float_list", [1.0, 2.0]),
        "ints": ("int64_list", [1, 2, 3]),
        "strs": ("bytes_list", [b"a", b"b"]),
    }
    # Wire bytes of tensorflow/core/example: Example.features=1, Features.feature map=1 (key=1,
    # value=2), Feature.float_list=2, FloatList.value=1 packed.
    assert make_example(x=[1.0, 2.5]).hex() == "0a130a110a0178120c120a0a080000803f00002040"
    with pytest.raises(ValueError, match="empty list"):
        make_example(x=[])
    with pytest.raises(ValueError, match="accepted are"):
        make_example(x=[1, "a"])


def test_write_tfrecord_framing_bytes(tmp_path):
    path = tmp_path / "one.tfrecord"
    assert write_tfrecord(path, [b"abc"]) == 1
    raw = path.read_bytes()
    assert len(raw) == 8 + 4 + 3 + 4
    assert struct.unpack("<Q", raw[:8])[0] == 3
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(raw[:8])
    assert raw[12:15] == b"abc"
    assert struct.unpack("<I", raw[15:])[0] == masked_crc32c(b"abc")
    assert [item for _, item in richhf.iter_tfrecord(path)] == [b"abc"]


# --- RichHF records ---------------------------------------------------------------------------


def test_round_trip_all_fields(tmp_path, fields, payloads):
    path = tmp_path / "dev.tfrecord"
    assert write_tfrecord(path, payloads[:3]) == 3
    seen = []
    records = list(read_richhf(path, progress=lambda done, total: seen.append((done, total))))
    assert len(records) == 3
    for i, record in enumerate(records):
        assert_same(record, fields[i], i)
    assert records[0].artifact_map.shape == (512, 512) and records[1].artifact_map.shape == (64, 64)
    assert records[2].prompt_misalignment_label == ()  # empty label string
    size = os.path.getsize(path)
    assert seen == [(o, size) for o in frame_offsets(payloads[:3])[1:]]


def test_should_stop_ends_reading(tmp_path, payloads):
    path = tmp_path / "stop.tfrecord"
    write_tfrecord(path, payloads[1:])
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    assert [r.index for r in read_richhf(path, should_stop=should_stop)] == [0, 1]


def test_flipped_data_byte_is_one_corrupt_record_and_reading_goes_on(tmp_path, fields, payloads):
    path = tmp_path / "flipped.tfrecord"
    write_tfrecord(path, payloads[1:])  # records 0..2 hold fields 1..3
    raw = bytearray(path.read_bytes())
    start = frame_offsets(payloads[1:])[1]
    raw[start + 12 + 40] ^= 0x01  # a byte inside record 1's data
    path.write_bytes(bytes(raw))
    records = list(read_richhf(path))
    assert len(records) == 3
    assert_same(records[0], fields[1], 0)
    assert isinstance(records[1], CorruptRecord) and records[1].index == 1
    assert "bad data CRC" in records[1].reason
    assert_same(records[2], fields[3], 2)


def test_bad_length_crc_ends_the_file(tmp_path, fields, payloads):
    path = tmp_path / "badlen.tfrecord"
    write_tfrecord(path, payloads[1:])
    raw = bytearray(path.read_bytes())
    raw[frame_offsets(payloads[1:])[1]] ^= 0x01  # record 1's length
    path.write_bytes(bytes(raw))
    records = list(read_richhf(path))
    assert len(records) == 2
    assert_same(records[0], fields[1], 0)
    assert records[1] == CorruptRecord(1, records[1].reason) and "bad length CRC" in records[1].reason


@pytest.mark.parametrize("cut", [5, 12 + 100, -2])  # inside the header, the data, the data CRC
def test_truncated_file_reads_complete_records_then_one_corrupt(tmp_path, fields, payloads, cut):
    path = tmp_path / "truncated.tfrecord"
    write_tfrecord(path, payloads[1:])
    offsets = frame_offsets(payloads[1:])
    end = offsets[2] + cut if cut > 0 else offsets[3] + cut  # cut record 2
    path.write_bytes(path.read_bytes()[:end])
    records = list(read_richhf(path))
    assert len(records) == 3
    assert_same(records[0], fields[1], 0)
    assert_same(records[1], fields[2], 1)
    assert isinstance(records[2], CorruptRecord) and records[2].index == 2
    assert records[2].reason.startswith("truncated")


def test_missing_field_and_bad_payloads_are_corrupt_records(tmp_path, fields, payloads):
    path = tmp_path / "bad.tfrecord"
    write_tfrecord(path, [
        encode(fields[1], drop="artifact_map"),
        b"\xff\xff\xff",  # not a protobuf message
        encode(dict(fields[1], misalignment_map=b"not a png")),
        encode(dict(fields[1], prompt_misalignment_label="1 2")),
        payloads[3],
    ])
    records = list(read_richhf(path))
    assert [type(r).__name__ for r in records] == ["CorruptRecord"] * 4 + ["RichHFRecord"]
    assert records[0] == CorruptRecord(0, "missing field artifact_map")
    assert "not a tf.train.Example" in records[1].reason
    assert records[2].reason.startswith("undecodable map: field misalignment_map")
    assert "0/1" in records[3].reason
    assert_same(records[4], fields[3], 4)


def test_colour_map_becomes_one_channel():
    grey = make_map(64, seed=5)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    assert np.array_equal(richhf._decode_map("artifact_map", png(rgb)), grey)


def test_missing_empty_or_gzip_file_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_richhf(tmp_path / "absent.tfrecord")
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_richhf(tmp_path / "empty.tfrecord")
    with pytest.raises(ValueError, match="not a file"):
        read_richhf(tmp_path)
    gz = tmp_path / "train.tfrecord.gz"
    gz.write_bytes(gzip.compress(b"x" * 100))
    with pytest.raises(ValueError, match="gzip"):
        read_richhf(gz)


# --- maps and images --------------------------------------------------------------------------


def test_binarize_artifact_map_thresholds():
    raw = np.array([[0, 84, 85, 127], [128, 170, 171, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(binarize_artifact_map(raw), raw >= 128)  # raw / 255 >= 0.5
    steps = np.array([[0, 85, 170, 255]], dtype=np.uint8)
    for threshold in (0.34, 0.5, 2 / 3):  # any threshold in (1/3, 2/3] gives "at least 2 of 3"
        np.testing.assert_array_equal(binarize_artifact_map(steps, threshold), [[False, False, True, True]])
    np.testing.assert_array_equal(binarize_artifact_map(raw, 1 / 3), raw >= 85)
    np.testing.assert_array_equal(binarize_artifact_map(raw, 1.0), raw == 255)
    assert binarize_artifact_map(raw).dtype == np.bool_
    with pytest.raises(ValueError, match="threshold"):
        binarize_artifact_map(raw, 0.0)
    with pytest.raises(ValueError, match="uint8"):
        binarize_artifact_map(raw.astype(np.float32))


def test_match_images_exact_stem_and_unmatched(tmp_path):
    for name in ("exact.png", "Other.JPG", "dup.jpeg", "dup.png", "notes.txt", "bare"):
        (tmp_path / name).write_bytes(b"x")
    names = ["exact.png", "other.png", "dup.png", "dup.webp", "notes.png", "bare.png", "missing.png",
             "exact.png", "missing.png"]
    found, unmatched = match_images(names, tmp_path)
    assert found == {
        "exact.png": tmp_path / "exact.png",      # exact name
        "other.png": tmp_path / "Other.JPG",      # stem, case-insensitive, other suffix
        "dup.png": tmp_path / "dup.png",          # exact wins over a same-stem file
        "dup.webp": tmp_path / "dup.jpeg",        # several same-stem files: first in sorted order
    }
    assert unmatched == ["notes.png", "bare.png", "missing.png"]  # .txt / no suffix are not images
    with pytest.raises(ValueError, match="not a folder"):
        match_images(names, tmp_path / "nope")
