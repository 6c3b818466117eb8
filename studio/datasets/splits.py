"""Leak-free train / val / test splits by image FAMILY: the one place training, export and evaluation
decide which image goes where.

Family: an image and every image derived from it (corrupted, repaired, ... following `parent_id`
chains, also through parents stored in other sessions) plus byte-identical copies (same sha256).
A corrupted child keeps ~90 % of its parent's pixels, so a child in train and its parent in val is a
leak; every member of a family therefore lands in the same split.

Label role of an image (`label_role`), from its current label regions:
- "human": labelled, not a corrupted image, every region drawn by a person ("human" or
  "sam-assisted" author); an image marked done with no region is a human clean negative.
- "synthetic": a corrupted image (any labels), or any region authored "synthetic".
- "pseudo": any region authored "detector" (a model's output, even if accepted by a person).
- "unlabelled": never labelled.

How a split is drawn (`split_families`, pure; `plan_split` reads the store and calls it):
1. Candidate families are those with at least one "human" image (only they can be held out).
2. They are ranked by sha256(f"{seed}:{family key}") where the family key is the sha256 of the
   family's root image, so the split depends on image content and the seed, not on database ids
   (the same images in another data folder get the same split).
3. The first n_val = round(n * val_fraction) ranked families are val, the next n_test =
   round(n * test_fraction) are test, the rest train. With a positive fraction there is at least one
   val family when n >= 2 and one test family when n >= 3; at least one candidate family always
   stays in train (test shrinks first, then val).
4. Held-out sets (val, test) contain the "human" images of their families only; every other member
   (synthetic children, pseudo or unlabelled images) of a held-out family is "excluded" (used
   nowhere). Families without a human image go to train.

A fixed test set (a folder of images + masks) replaces the session's test split: test_fraction is
then 0 and every family holding an image byte-identical to a test-folder image is excluded.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"
ROLES = ("human", "synthetic", "pseudo", "unlabelled")
HUMAN_AUTHORS = frozenset({"human", "sam-assisted"})
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SplitPlan:
    """Where every image of a session goes. `split_of[id]` is "train", "val", "test" or "excluded";
    `role_of[id]` its label role (module docstring); `family_of[id]` the id of its family's root image
    (the root may lie outside the session). `params` records how the plan was made (fractions, seed,
    method) for checkpoints and manifests."""

    split_of: dict[int, str]
    role_of: dict[int, str]
    family_of: dict[int, int]
    params: dict = field(default_factory=dict)

    def ids(self, split: str, roles: Iterable[str] = ROLES) -> list[int]:
        """Image ids of `split` with one of `roles`, ascending."""
        wanted = set(roles)
        return sorted(i for i, s in self.split_of.items() if s == split and self.role_of[i] in wanted)

    def summary(self) -> dict:
        """Counts per split and role, the number of families, and `params`."""
        counts = Counter(f"{self.split_of[i]}/{self.role_of[i]}" for i in self.split_of)
        families = {s: len({self.family_of[i] for i in self.split_of if self.split_of[i] == s})
                    for s in (*SPLITS, EXCLUDED)}
        return {**self.params, "counts": dict(sorted(counts.items())), "families": families}


def validate_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError unless both fractions are numbers in [0, 1) adding up to less than 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1 (some families must train), got "
                         f"{val_fraction} + {test_fraction}.")


def split_families(keys: Mapping[int, str], candidates: Iterable[int], val_fraction: float = DEFAULT_VAL_FRACTION,
                   test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0) -> dict[int, str]:
    """{family id: "train" | "val" | "test"} for the families in `keys` (family id -> stable content key,
    e.g. the root image's sha256). Only `candidates` (families with a human-labelled image) can be held
    out; see the module docstring for the sizes and the ranking."""
    validate_fractions(val_fraction, test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"The split seed must be a non-negative integer, got {seed!r}.")
    pool = sorted(set(candidates), key=lambda f: (hashlib.sha256(f"{seed}:{keys[f]}".encode()).hexdigest(), f))
    n = len(pool)
    n_val = 0 if val_fraction == 0 or n < 2 else max(1, round(n * val_fraction))
    n_test = 0 if test_fraction == 0 or n < 3 else max(1, round(n * test_fraction))
    while n_val + n_test > n - 1 and n_test > 0:
        n_test -= 1
    while n_val + n_test > n - 1 and n_val > 0:
        n_val -= 1
    out = {f: "train" for f in keys}
    out.update({f: "val" for f in pool[:n_val]})
    out.update({f: "test" for f in pool[n_val:n_val + n_test]})
    return out


def family_roots(parents: Mapping[int, int | None], same: Iterable[Iterable[int]] = ()) -> dict[int, int]:
    """{image id: family id} for every id in `parents` (id -> parent id or None; a parent that is not a
    key counts as a root). Groups in `same` (e.g. ids with one sha256) are joined into one family. The
    family id is the smallest root id of the joined chains."""
    def root(i: int) -> int:
        seen = set()
        while parents.get(i) is not None and i not in seen:
            seen.add(i)
            i = int(parents[i])
        return i

    link: dict[int, int] = {}

    def find(i: int) -> int:
        while link.get(i, i) != i:
            i = link[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            link[max(ra, rb)] = min(ra, rb)

    roots = {i: root(i) for i in parents}
    for group in same:
        members = [roots[i] for i in group if i in roots]
        for other in members[1:]:
            join(members[0], other)
    return {i: find(r) for i, r in roots.items()}


def label_role(store, image) -> str:
    """The label role of a stored image (module docstring)."""
    if not store.is_labelled(image.id):
        return "unlabelled"
    authors = {r.author for r in store.label_state(image.id).regions}
    if image.source == "corrupted" or "synthetic" in authors:
        return "synthetic"
    if authors - HUMAN_AUTHORS:
        return "pseudo"
    return "human"


def plan_split(store, session_id: int | str, *, val_fraction: float = DEFAULT_VAL_FRACTION,
               test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0,
               exclude_sha256: Iterable[str] = ()) -> SplitPlan:
    """The family split of a session's images (module docstring). `exclude_sha256`: contents of a fixed
    test folder; families holding one of them are excluded (and test_fraction should be 0)."""
    validate_fractions(val_fraction, test_fraction)
    images = store.list_images(session_id)
    parents: dict[int, int | None] = {}
    sha: dict[int, str] = {}
    for rec in images:
        parents[rec.id], sha[rec.id] = rec.parent_id, rec.sha256
    pending = [p for p in parents.values() if p is not None and p not in parents]
    while pending:  # ancestors stored in other sessions
        pid = pending.pop()
        if pid in parents:
            continue
        try:
            rec = store.get_image(pid)
        except ValueError:
            parents[pid] = None
            continue
        parents[pid], sha[pid] = rec.parent_id, rec.sha256
        if rec.parent_id is not None and rec.parent_id not in parents:
            pending.append(rec.parent_id)
    by_sha: dict[str, list[int]] = {}
    for i, digest in sha.items():
        by_sha.setdefault(digest, []).append(i)
    family = family_roots(parents, by_sha.values())
    ids = [rec.id for rec in images]
    role = {rec.id: label_role(store, rec) for rec in images}
    excluded_sha = set(exclude_sha256)
    banned = {family[i] for i in family if sha[i] in excluded_sha}
    keys = {family[i]: sha[family[i]] for i in ids}
    candidates = {family[i] for i in ids if role[i] == "human" and family[i] not in banned}
    assignment = split_families({f: k for f, k in keys.items() if f not in banned}, candidates,
                                val_fraction, test_fraction, seed)
    split_of = {}
    for i in ids:
        s = assignment.get(family[i], EXCLUDED)
        split_of[i] = s if s == "train" or (s in ("val", "test") and role[i] == "human") else EXCLUDED
    params = {"method": "family", "val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
              "seed": int(seed), "fixed_test_images": len(excluded_sha)}
    return SplitPlan(split_of=split_of, role_of=role, family_of={i: family[i] for i in ids}, params=params)
