"""SynArtifact's question-answer template, built from a taxonomy: the question (`build_question`,
`yesno_question`), the reference answer (`render_answer`, `parse_answer`) and the caption prefixes.

A taxonomy is a list of classes {"name", "definition"} (at most 26: one option letter each); answers are
JSON ``{"artifacts": [{"option", "class", "caption"}], "other": ...}``. Imports no sibling module.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
YES_SPELLINGS = ("yes", " yes", "Yes", " Yes")
NO_SPELLINGS = ("no", " no", "No", " No")
ANSWER_PREFIX = '{"artifacts": [{"option": "'


def check_taxonomy(taxonomy) -> list[dict]:
    """[{"name", "definition"}] with unique non-empty names, at most 26 classes (one letter each)."""
    if not isinstance(taxonomy, (list, tuple)) or not taxonomy:
        raise ValueError("A taxonomy must be a non-empty list of classes, each a dict with a 'name'.")
    out = []
    for c in taxonomy:
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ValueError("Every taxonomy class needs a non-empty 'name'.")
        out.append({"name": name.strip(), "definition": str(c.get("definition") or "").strip()})
    names = [c["name"] for c in out]
    if len(set(names)) != len(names):
        raise ValueError("Taxonomy class names must be unique.")
    if len(out) > len(LETTERS):
        raise ValueError(f"The VLM template gives each class a letter; a taxonomy can have at most {len(LETTERS)} classes.")
    return out


def build_question(taxonomy, region: str | None = None) -> str:
    """SynArtifact's question: the task, the options with their explanations, the reference answer format.

    `region`: None for a whole image, "crop" for a region shown as a crop, "box" for a region outlined in red.
    """
    classes = check_taxonomy(taxonomy)
    subject = {None: "This image was made by a text-to-image model.",
               "crop": "This image is a crop around one region of an image made by a text-to-image model.",
               "box": "This image was made by a text-to-image model; one region is outlined with a red box."}[region]
    where = "the outlined region" if region == "box" else "the image"
    lines = [subject, f"Which of these artifact types does {where} show? Options:"]
    for letter, c in zip(LETTERS, classes):
        lines.append(f"{letter}. {c['name']}: {c['definition']}" if c["definition"] else f"{letter}. {c['name']}")
    example = json.dumps({"artifacts": [{"option": "A", "class": classes[0]["name"],
                                         "caption": "where the artifact is and what is wrong"}], "other": "none"})
    lines.append(f"Answer in JSON like this reference answer: {example}. List every artifact you see with its "
                 "option letter, class and a short caption; put artifacts that fit no option in \"other\"; answer "
                 '{"artifacts": [], "other": "none"} when there is none.')
    return "\n".join(lines)


def yesno_question(taxonomy, index: int, region: str | None = None) -> str:
    """The template plus one yes/no question about option `index`."""
    classes = check_taxonomy(taxonomy)
    where = "the outlined region" if region == "box" else "the image"
    return (build_question(classes, region) + f"\nQuestion: does {where} show option {LETTERS[index]} "
            f"({classes[index]['name']})? Answer yes or no.")


def render_answer(taxonomy, artifacts: Sequence[tuple[str, str | None]], other: str = "none") -> str:
    """The reference-format answer for (class name, caption) pairs; classes outside the taxonomy go to "other"."""
    classes = check_taxonomy(taxonomy)
    letter_of = {c["name"]: LETTERS[i] for i, c in enumerate(classes)}
    items, extra = [], []
    for name, caption in artifacts:
        caption = " ".join(str(caption or "").split()) or (name or "an artifact")
        if name in letter_of:
            items.append({"option": letter_of[name], "class": name, "caption": caption})
        else:
            extra.append(caption)
    return json.dumps({"artifacts": items, "other": "; ".join(extra) if extra else other})


def parse_answer(text: str, taxonomy) -> list[tuple[str, str]]:
    """(class name, caption) pairs from a model's answer in the reference format.

    Tolerant: the first JSON object in the text is read; an item is matched by its option letter, else by
    its class name (case-insensitive); unknown items are dropped. Text that is not JSON gives []."""
    classes = check_taxonomy(taxonomy)
    by_letter = {LETTERS[i]: c["name"] for i, c in enumerate(classes)}
    by_name = {c["name"].lower(): c["name"] for c in classes}
    start = text.find("{")
    if start < 0:
        return []
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return []
    items = data.get("artifacts", []) if isinstance(data, dict) else []
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        option = str(item.get("option", "")).strip().upper()[:1]
        name = by_letter.get(option) or by_name.get(str(item.get("class", "")).strip().lower())
        if name is not None:
            out.append((name, str(item.get("caption", "") or "").strip()))
    return out


def caption_prefix(taxonomy, index: int) -> str:
    """The reference answer started up to the caption of option `index` (its caption is generated from here)."""
    classes = check_taxonomy(taxonomy)
    return ANSWER_PREFIX + f'{LETTERS[index]}", "class": {json.dumps(classes[index]["name"])}, "caption": "'


def cut_caption(text: str) -> str:
    """The generated caption up to its closing (unescaped) quote, whitespace collapsed."""
    match = re.search(r'(?<!\\)"', text)
    caption = text[:match.start()] if match else text
    return " ".join(caption.replace('\\"', '"').split())
