"""studio.datasets.splits: family splits (an image and everything derived from it share one split), held-out
sets of human labels only, and the same split in training data, export and evaluation."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from studio.datasets.export import export_session, safe_name
from studio.services import Services
from studio.datasets.splits import EXCLUDED, family_roots, plan_split, split_families
from studio.store.records import NewImage, NewMask
from studio.store.store import Store
from studio.datasets.training_data import detector_samples, read_test_folder

TAXONOMY = [{"name": "distortion", "definition": ""}]


def rgb(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def square(size: int = 24, at: int = 4) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[at:at + 8, at:at + 8] = True
    return mask


def build_session(store: Store, name: str = "fam", originals: int = 8, order=None) -> dict:
    """`originals` human-labelled uploads, each with 2 corrupted children (synthetic masks) and one
    unlabelled repaired grandchild; plus a detector-labelled image and 2 never-labelled images.
    Returns {"originals": [...], "children": {orig id: [...]}, "grandchildren": {...}, "pseudo", "unlabelled"}."""
    store.create_session(name)
    seeds = list(range(originals)) if order is None else list(order)
    out = {"originals": [], "children": {}, "grandchildren": {}}
    for k in seeds:
        (orig,) = store.add_images(name, [NewImage(rgb=rgb(k), source="uploaded", original_name=f"o{k}.png",
                                                   masks=(NewMask(mask=square(at=k % 10), author="human"),))])
        kids = store.add_images(name, [NewImage(rgb=rgb(100 + 10 * k + j), source="corrupted", parent_id=orig.id,
                                                original_name=f"o{k}-c{j}.png",
                                                masks=(NewMask(mask=square(at=2 + j), author="synthetic"),))
                                       for j in range(2)])
        (grand,) = store.add_images(name, [NewImage(rgb=rgb(500 + k), source="repaired", parent_id=kids[0].id,
                                                    original_name=f"o{k}-r.png")])
        out["originals"].append(orig)
        out["children"][orig.id] = kids
        out["grandchildren"][orig.id] = grand
    out["pseudo"] = store.add_images(name, [NewImage(rgb=rgb(900), source="generated", original_name="det.png",
                                                     masks=(NewMask(mask=square(), author="detector"),))])[0]
    out["unlabelled"] = store.add_images(name, [NewImage(rgb=rgb(901 + i), source="uploaded", original_name=f"u{i}.png")
                                                for i in range(2)])
    return out


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def services(store, tmp_path):
    return Services(data_dir=tmp_path / "data", store=store)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_family_lands_in_one_split_and_held_out_sets_are_human(store, seed):
    made = build_session(store)
    plan = plan_split(store, "fam", val_fraction=0.25, test_fraction=0.25, seed=seed)
    assert plan.summary()["families"]["val"] == 2 and plan.summary()["families"]["test"] == 2  # of 8 human families
    for orig in made["originals"]:
        split = plan.split_of[orig.id]
        members = [*made["children"][orig.id], made["grandchildren"][orig.id]]
        assert {plan.family_of[m.id] for m in members} == {plan.family_of[orig.id]}
        if split == "train":
            assert all(plan.split_of[m.id] == "train" for m in members)
        else:  # a held-out family: the human original only; its derived images are used nowhere
            assert split in ("val", "test") and all(plan.split_of[m.id] == EXCLUDED for m in members)
    for split in ("val", "test"):
        assert plan.ids(split) == plan.ids(split, ["human"])  # human labels only
    assert plan.split_of[made["pseudo"].id] == "train" and plan.role_of[made["pseudo"].id] == "pseudo"
    assert all(plan.role_of[u.id] == "unlabelled" and plan.split_of[u.id] == "train" for u in made["unlabelled"])


def test_split_depends_on_content_and_seed_not_on_database_ids(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    made_a = build_session(a)
    made_b = build_session(b, order=[7, 3, 5, 0, 6, 1, 4, 2])  # the same images, added in another order
    name_a = {o.id: o.original_name for o in made_a["originals"]}
    name_b = {o.id: o.original_name for o in made_b["originals"]}
    assert name_a != name_b  # the ids differ
    for seed in (0, 5):
        pa, pb = (plan_split(s, "fam", val_fraction=0.25, test_fraction=0.25, seed=seed) for s in (a, b))
        for split in ("val", "test"):
            assert sorted(name_a[i] for i in pa.ids(split)) == sorted(name_b[i] for i in pb.ids(split))
    assert plan_split(a, "fam", seed=0).split_of == plan_split(a, "fam", seed=0).split_of
    assert any(plan_split(a, "fam", seed=s).ids("val") != plan_split(a, "fam", seed=0).ids("val") for s in range(1, 6))
    a.close(), b.close()


def test_split_sizes_and_pure_helpers():
    keys = {i: f"k{i}" for i in range(10)}
    out = split_families(keys, range(10), 0.2, 0.2, seed=0)
    assert sorted(out.values()).count("val") == 2 and sorted(out.values()).count("test") == 2
    two = split_families({1: "a", 2: "b"}, [1, 2], 0.2, 0.2)
    assert sorted(two.values()) == ["train", "val"]  # one val, no test, one train
    assert sorted(split_families({1: "a", 2: "b", 3: "c"}, [1, 2, 3], 0.1, 0.1).values()) == ["test", "train", "val"]
    only_train = split_families({1: "a", 2: "b"}, [1], 0.5, 0.2)  # 2 has no human label: always train
    assert only_train == {1: "train", 2: "train"}
    assert family_roots({1: None, 2: 1, 3: 2, 4: None, 5: 99}) == {1: 1, 2: 1, 3: 1, 4: 4, 5: 99}
    assert family_roots({1: None, 2: None, 3: 2}, same=[[1, 3]]) == {1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="below 1"):
        split_families(keys, range(10), 0.6, 0.4)


def test_training_export_and_evaluation_use_the_same_split(store, services, tmp_path):
    made = build_session(store)
    params = {"val_fraction": 0.25, "test_fraction": 0.25, "split_seed": 4}
    data = detector_samples(services, store.get_session("fam").id, params)
    plan = plan_split(store, "fam", val_fraction=0.25, test_fraction=0.25, seed=4)
    names = {r.id: r.original_name for r in store.list_images("fam")}
    assert sorted(s.name for s in data.val) == sorted(names[i] for i in plan.ids("val"))
    assert sorted(s.name for s in data.test) == sorted(names[i] for i in plan.ids("test"))
    assert all(s.source == "human" for s in data.val + data.test)
    held_out = {plan.family_of[i] for i in plan.ids("val") + plan.ids("test")}
    train_names = {s.name for s in data.train}
    for orig in made["originals"]:  # no train image comes from a held-out family
        family = [orig, *made["children"][orig.id], made["grandchildren"][orig.id]]
        if plan.family_of[orig.id] in held_out:
            assert not train_names & {m.original_name for m in family}
    assert {s.source for s in data.train} == {"human", "synthetic", "pseudo"}
    assert not any(s.name.startswith("u") for s in data.train)  # never-labelled images are not trained on
    assert data.summary["split"]["seed"] == 4

    out = tmp_path / "mmseg"
    summary = export_session(store, "fam", "mmseg", out, TAXONOMY, val_fraction=0.25, test_fraction=0.25, seed=4)
    for split in ("val", "test"):
        exported = sorted(p.name for p in (out / "img_dir" / split).iterdir())
        assert exported == sorted(f"{safe_name(store.get_image(i))}.png" for i in plan.ids(split))
    assert summary.skipped_unlabelled == 2 + 4  # the 2 never-labelled + the 4 train families' grandchildren
    assert summary.skipped_held_out == 4 * 3  # 4 held-out families x (2 children + 1 grandchild)
    with open(out / "splits.csv", newline="") as f:
        assert {int(r["image_id"]): r["split"] for r in csv.DictReader(f)} == \
            {i: s for i, s in plan.split_of.items() if s != EXCLUDED and plan.role_of[i] != "unlabelled"}


def test_unlabelled_images_only_as_background_when_asked(store, services, tmp_path):
    made = build_session(store, originals=4)
    sid = store.get_session("fam").id
    data = detector_samples(services, sid, {"unlabelled_as_background": True, "split_seed": 1})
    plan = data.split
    background = [s for s in data.train if s.name.endswith("(background)")]
    expected = [i for i, s in plan.split_of.items() if s == "train" and plan.role_of[i] == "unlabelled"]
    assert len(background) == len(expected) == 2 + sum(
        plan.split_of[made["grandchildren"][o.id].id] == "train" for o in made["originals"])
    assert all(s.source == "pseudo" and s.mask_paths == () for s in background)
    out = tmp_path / "png"
    summary = export_session(store, "fam", "png", out, TAXONOMY, unlabelled_as_background=True, seed=1)
    assert summary.skipped_unlabelled == 0 and summary.splits["val"] + summary.splits["test"] == 2


def test_fixed_test_folder_must_match_and_its_families_are_excluded(store, services, tmp_path):
    from PIL import Image

    made = build_session(store, originals=5)
    images, masks = tmp_path / "ti", tmp_path / "tm"
    images.mkdir(), masks.mkdir()
    leaked = made["originals"][0]
    Image.open(leaked.path).save(images / "a.png")  # a session image reused as a test image
    Image.fromarray(square().astype(np.uint8) * 255).save(masks / "a.png")
    Image.fromarray(rgb(77)).save(images / "b.png")
    with pytest.raises(ValueError, match="do not match") as err:
        read_test_folder(images, masks)
    assert "\n" not in str(err.value) and "b" in str(err.value)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "b.png")
    with pytest.raises(ValueError, match="b.png is 5x5 but its image is 24x24"):
        read_test_folder(images, masks)
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(masks / "b.png")
    data = detector_samples(services, store.get_session("fam").id,
                            {"test_images": str(images), "test_masks": str(masks), "val_fraction": 0.25})
    assert sorted(s.name for s in data.test) == ["a", "b"] and data.summary["test_source"] == "folder"
    family = {leaked.original_name, *(c.original_name for c in made["children"][leaked.id])}
    assert not family & {s.name for s in data.train + data.val}  # the reused image's family is left out
    assert data.split.params["test_fraction"] == 0.0
    np.testing.assert_array_equal(data.test[0].load_mask(), square())


def test_pseudo_labels_are_batched_cached_and_never_held_out(store, services):
    build_session(store, originals=3)
    sid = store.get_session("fam").id
    ticks = []
    params = {"pseudo_detector": "demo", "pseudo_threshold": 0.5, "split_seed": 0}
    first = detector_samples(services, sid, params, progress=lambda done, total: ticks.append((done, total)))
    pseudo = [s for s in first.train if s.source == "pseudo" and s.mask_threshold is not None]
    assert len(pseudo) == first.summary["pseudo_cache"]["computed"] > 0 and ticks[-1] == (len(pseudo), len(pseudo))
    again = detector_samples(services, sid, params)
    assert again.summary["pseudo_cache"]["computed"] == 0 and again.summary["pseudo_cache"]["cached"] == len(pseudo)
    heat = services.detector("demo").predict([pseudo[0].load()[0]])[0].scores
    np.testing.assert_array_equal(pseudo[0].load_mask(), np.round(heat * 65535) >= 0.5 * 65535)
    assert all(s.source == "human" for s in first.val + first.test)
