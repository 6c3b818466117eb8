"""Image captions from a file beside the images: JSONL or CSV, matched to image files by name.

A caption is the text an image is inverted and resampled with (region corruption); the store keeps
it in `images.caption`. Accepted files:

- JSONL (`.jsonl`, `.json` with one object per line): {"file_name": "cat.png", "caption": "a cat"}.
- CSV (`.csv`, `.tsv`) with a header row naming the two columns.

The image column may be called file_name, filename, file, image or path; the text column caption,
text or prompt (the first of each found, case-insensitive). A name matches an image by its file
name ("cat.png"), or by its stem ("cat") when exactly one image has that stem; folders in the name
are ignored ("train/cat.png" matches cat.png). A file naming images that are not among those given
is refused as a whole (`match_captions`), so nothing is half-applied.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

NAME_KEYS = ("file_name", "filename", "file", "image", "path")
TEXT_KEYS = ("caption", "text", "prompt")
MAX_CAPTIONS_BYTES = 64 * 1024 * 1024


def read_captions(path) -> dict[str, str]:
    """{name as written in the file: caption} from a JSONL or CSV captions file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The captions file {path} does not exist.")
    if path.stat().st_size > MAX_CAPTIONS_BYTES:
        raise ValueError(f"The captions file {path.name} is larger than {MAX_CAPTIONS_BYTES // 2**20} MB.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"The captions file {path.name} is not UTF-8 text.") from None
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(text, "\t" if suffix == ".tsv" else ",", path.name)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(text, path.name)
    else:
        raise ValueError(f"The captions file {path.name} must be .jsonl or .csv (one caption per image).")
    captions: dict[str, str] = {}
    for line, row in rows:
        name_key, text_key = _key(row, NAME_KEYS), _key(row, TEXT_KEYS)
        if name_key is None or text_key is None:
            raise ValueError(f"{path.name} line {line} needs an image column ({'/'.join(NAME_KEYS)}) "
                             f"and a caption column ({'/'.join(TEXT_KEYS)}).")
        name, caption = row[name_key], row[text_key]
        if not isinstance(name, str) or not name.strip() or not isinstance(caption, str):
            raise ValueError(f"{path.name} line {line}: the image name and the caption must be text.")
        name = name.strip()
        if name in captions and captions[name] != caption:
            raise ValueError(f"{path.name} gives two different captions for {name}.")
        captions[name] = caption
    if not captions:
        raise ValueError(f"The captions file {path.name} holds no caption.")
    return captions


def match_captions(captions: dict[str, str], names: Iterable[str], source: str = "the captions file") -> dict[str, str]:
    """{image file name: caption} for the image file `names`; refuses a file naming unknown images."""
    names = list(names)
    by_name = {n: n for n in names}
    stems: dict[str, list[str]] = {}
    for n in names:
        stems.setdefault(Path(n).stem, []).append(n)
    matched: dict[str, str] = {}
    unknown = []
    for written, caption in captions.items():
        base = PureWindowsPath(PurePosixPath(written).name).name
        target = by_name.get(base) or (stems[base][0] if len(stems.get(base, ())) == 1 else None)
        if target is None:
            unknown.append(written)
        elif target in matched and matched[target] != caption:
            raise ValueError(f"{source} gives two different captions for {target}; nothing was changed.")
        else:
            matched[target] = caption
    if unknown:
        raise ValueError(f"{source} names {len(unknown)} image(s) that are not among the images given "
                         f"(first: {unknown[0]!r}); nothing was changed.")
    return matched


def caption_for(record) -> str:
    """The text to invert and resample a stored image with: its caption, else the prompt it was
    generated with, else ""."""
    caption = getattr(record, "caption", None)
    if caption is not None:
        return caption
    return str((record.params or {}).get("prompt", "") or "")


def _key(row: dict, keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): k for k in row}
    return next((lowered[k] for k in keys if k in lowered), None)


def _jsonl_rows(text: str, name: str):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{name} line {number} is not a JSON object (JSONL: one object per line).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{name} line {number} is not a JSON object (JSONL: one object per line).")
        rows.append((number, row))
    return rows


def _csv_rows(text: str, delimiter: str, name: str):
    try:
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        return [(number, row) for number, row in enumerate(reader, start=2)
                if any(isinstance(v, str) and v.strip() for v in row.values())]
    except csv.Error as exc:
        raise ValueError(f"{name} is not a readable CSV file ({exc}).") from None
