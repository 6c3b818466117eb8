"""studio.datasets.export: every export format read back by its own tool, and export -> import round trips."""
import csv
from collections import Counter
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.datasets.export import EXPORT_FORMATS, export_session, safe_name
from studio.datasets.import_masks import ImportSummary, import_masks
from studio.store.records import NewImage, NewMask
from studio.store.store import Store

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.filterwarnings(  # pycocotools' Cython decode under numpy 2, not ours
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
TAXONOMY = json.loads((ROOT / "assets" / "taxonomy_studio_v1.json").read_text())["classes"]


def rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# (original name, height, width); the third is a generated image without a name, the last has no regions.
IMAGES = [("cat.png", 24, 32), ("../../evil.png", 40, 20), (None, 17, 23), ("clean photo?.png", 16, 16)]


def add_same_images(store: Store, session: str) -> list:
    store.create_session(session)
    return store.add_images(session, [NewImage(rgb=rgb(i, h, w), source="uploaded", original_name=name)
                                      for i, (name, h, w) in enumerate(IMAGES)])


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def src(store):
    """Session "src": 4 images of different sizes, 0-3 regions each, built with masks and label edits; the
    last is marked reviewed without regions (a labelled clean negative)."""
    store.create_session("src")
    h0, w0 = IMAGES[0][1:]
    h1, w1 = IMAGES[1][1:]
    h2, w2 = IMAGES[2][1:]
    items = [
        NewImage(rgb=rgb(0, h0, w0), source="uploaded", original_name=IMAGES[0][0], masks=(
            NewMask(mask=box(h0, w0, 2, 10, 3, 12), author="human", class_name="distortion", caption="melted paw"),
            NewMask(mask=box(h0, w0, 8, 20, 10, 30), author="sam-assisted", class_name="omission",
                    caption="missing ear, left side"))),
        NewImage(rgb=rgb(1, h1, w1), source="uploaded", original_name=IMAGES[1][0], masks=(
            NewMask(mask=box(h1, w1, 5, 15, 2, 9), author="human", class_name="duplication", caption="two noses"),)),
        NewImage(rgb=rgb(2, h2, w2), source="generated", original_name=None, masks=(
            NewMask(mask=box(h2, w2, 0, 4, 0, 5), author="detector", class_name="fusion", caption='fused "fingers"'),
            NewMask(mask=box(h2, w2, 10, 17, 15, 23), author="human", class_name="texture", caption=None),
            NewMask(mask=box(h2, w2, 6, 9, 6, 9), author="human", class_name=None, caption="odd blob"))),
        NewImage(rgb=rgb(3, *IMAGES[3][1:]), source="uploaded", original_name=IMAGES[3][0]),
    ]
    images = store.add_images("src", items)
    # Label edits: the export must follow the current state, not the stored masks.
    first = store.label_state(images[1].id).regions[0]
    store.edit_regions(images[1].id, add=[NewMask(mask=box(h1, w1, 30, 38, 10, 18), author="human"),
                                          NewMask(mask=box(h1, w1, 0, 3, 0, 3), author="human",
                                                  class_name="texture", caption="removed later")],
                       update={first.key: {"caption": "two noses, one blurred"}})
    removed = store.label_state(images[1].id).regions[-1]
    store.edit_regions(images[1].id, remove=[removed.key])
    store.mark_reviewed(images[3].id)
    return images


def current(store: Store, image_id: int) -> list[tuple[np.ndarray, str | None, str | None]]:
    return [(store.load_mask(r.mask_id), r.class_name, r.caption) for r in store.label_state(image_id).regions]


def union(store: Store, image) -> np.ndarray:
    out = np.zeros((image.height, image.width), dtype=bool)
    for mask, _, _ in current(store, image.id):
        out |= mask
    return out


def files_inside(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in files)
    return files


def test_safe_names_stay_inside_the_folder(store, src, tmp_path):
    assert [safe_name(im) for im in src] == [f"cat-{src[0].id}", f"evil-{src[1].id}", f"image-{src[2].id}",
                                            f"clean_photo_-{src[3].id}"]
    odd = store.add_images("src", [NewImage(rgb=rgb(9, 4, 4), source="uploaded", original_name=name)
                                   for name in ("..", "..\\..\\x y.PNG", ".bashrc", "/etc/passwd")])
    assert [safe_name(im).rsplit("-", 1)[0] for im in odd] == ["image", "x_y", "bashrc", "passwd"]
    out = tmp_path / "out"
    summary = export_session(store, "src", "png", out, TAXONOMY, unlabelled_as_background=True)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert (out / "images" / f"evil-{src[1].id}.png").is_file()
    assert summary.files == len(files_inside(out)) == 2 * 8 + 2  # + regions.csv and splits.csv
    assert not list(tmp_path.glob(".out.export-*"))  # the staging folder is gone


def test_png_export_contents(store, src, tmp_path):
    out = tmp_path / "png"
    summary = export_session(store, "src", "png", out, TAXONOMY)
    assert (summary.fmt, summary.out_dir, summary.images, summary.regions, summary.files) == \
        ("png", str(out.resolve()), 4, 7, 10)
    assert sum(summary.splits.values()) == 4 and summary.skipped_unlabelled == summary.skipped_held_out == 0
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # not a 0700 temp dir
    for image in src:
        name = safe_name(image)
        assert (out / "images" / f"{name}.png").read_bytes() == Path(image.path).read_bytes()
        with Image.open(out / "masks" / f"{name}.png") as im:
            assert im.mode == "L" and im.size == (image.width, image.height)
            values = np.array(im)
        assert set(np.unique(values).tolist()) <= {0, 255}
        assert np.array_equal(values == 255, union(store, image))
    with open(out / "regions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "region_key", "class", "caption", "author", "x0", "y0", "x1", "y1", "area"]
    evil = [r for r in rows if r["file"] == f"{safe_name(src[1])}.png"]
    assert [(r["class"], r["caption"]) for r in evil] == [("duplication", "two noses, one blurred"), ("", "")]
    assert [int(evil[1][k]) for k in ("x0", "y0", "x1", "y1", "area")] == [10, 30, 17, 37, 64]
    assert rows[1]["caption"] == "missing ear, left side" and rows[1]["author"] == "sam-assisted"


def test_png_round_trip_gives_the_same_union_masks(store, src, tmp_path):
    out = tmp_path / "png"
    export_session(store, "src", "png", out, TAXONOMY)
    dst = add_same_images(store, "dst")
    summary = import_masks(store, "dst", "png", out)
    assert summary == ImportSummary(matched=4, regions=3, unmatched=[], size_mismatches=[])
    for a, b in zip(src, dst):
        assert np.array_equal(union(store, a), union(store, b))
        state = store.label_state(b.id)
        assert all(r.class_name is None and r.author == "human" for r in state.regions)
        assert len(state.regions) == (1 if a.id != src[3].id else 0)
        if state.regions:
            assert state.action == "import png" and state.can_undo
    # Without the images beside the masks, files match by name: "<original stem>-<old id>" finds the
    # image of the same original name; the unnamed generated image cannot be matched.
    (out / "images" / f"{safe_name(src[0])}.png").unlink()
    for p in (out / "images").iterdir():
        p.unlink()
    again = add_same_images(store, "names")
    summary = import_masks(store, "names", "png", out / "masks", author="synthetic")
    assert summary.unmatched == [f"{safe_name(src[2])}.png"] and summary.matched == 3 and summary.regions == 2
    assert np.array_equal(union(store, again[1]), union(store, src[1]))
    assert store.label_state(again[1].id).regions[0].author == "synthetic"


def test_coco_export_decodes_to_the_region_masks(store, src, tmp_path, capsys):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "coco"
    summary = export_session(store, "src", "coco", out, TAXONOMY)
    assert (summary.images, summary.regions, summary.files) == (4, 7, 6)
    data = json.loads((out / "annotations.json").read_text())
    names = [c["name"] for c in TAXONOMY]
    assert [(c["id"], c["name"]) for c in data["categories"]] == \
        list(enumerate(names, start=1)) + [(len(names) + 1, "unclassified")]
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in data["images"]] == \
        [(im.id, f"{safe_name(im)}.png", im.width, im.height) for im in src]
    assert {im["split"] for im in data["images"]} <= {"train", "val", "test"}
    expected = [(image.id, r) for image in src for r in store.label_state(image.id).regions]
    assert len(data["annotations"]) == len(expected) == 7
    category = {c["id"]: c["name"] for c in data["categories"]}
    for ann, (image_id, region) in zip(data["annotations"], expected):
        mask = store.load_mask(region.mask_id)
        assert isinstance(ann["segmentation"]["counts"], str)
        decoded = mask_utils.decode(ann["segmentation"])
        assert decoded.dtype == np.uint8 and np.array_equal(decoded.astype(bool), mask)
        x0, y0, x1, y1 = region.bbox
        assert ann["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1] and ann["area"] == int(mask.sum())
        assert ann["iscrowd"] == 0 and ann["image_id"] == image_id
        assert category[ann["category_id"]] == (region.class_name or "unclassified")
        assert (ann["caption"], ann["author"]) == (region.caption, region.author)
    coco = COCO(str(out / "annotations.json"))  # pycocotools' own reader accepts the file
    capsys.readouterr()
    assert len(coco.getAnnIds(imgIds=[src[2].id])) == 3
    assert np.array_equal(coco.annToMask(coco.loadAnns(coco.getAnnIds(imgIds=[src[0].id]))[1]).astype(bool),
                          current(store, src[0].id)[1][0])


def test_coco_unclassified_only_when_needed_and_unknown_classes_go_there(store, tmp_path):
    store.create_session("s")
    mask = box(8, 8, 1, 4, 1, 4)
    store.add_images("s", [NewImage(rgb=rgb(0, 8, 8), source="uploaded", masks=(
        NewMask(mask=mask, author="human", class_name="distortion"),))])
    export_session(store, "s", "coco", tmp_path / "a", TAXONOMY)
    cats = json.loads((tmp_path / "a" / "annotations.json").read_text())["categories"]
    assert "unclassified" not in [c["name"] for c in cats] and len(cats) == 13
    store.add_images("s", [NewImage(rgb=rgb(1, 8, 8), source="uploaded", masks=(
        NewMask(mask=mask, author="human", class_name="old-class"),))])
    export_session(store, "s", "coco", tmp_path / "b", TAXONOMY)
    data = json.loads((tmp_path / "b" / "annotations.json").read_text())
    assert data["categories"][-1] == {"id": 14, "name": "unclassified", "supercategory": "artifact"}
    assert [a["category_id"] for a in data["annotations"]] == [1, 14]


def test_coco_round_trip_keeps_each_region(store, src, tmp_path):
    out = tmp_path / "coco"
    export_session(store, "src", "coco", out, TAXONOMY)
    dst = add_same_images(store, "dst")
    summary = import_masks(store, "dst", "coco", out / "annotations.json")
    assert summary == ImportSummary(matched=4, regions=7, unmatched=[], size_mismatches=[])
    for a, b in zip(src, dst):
        before, after = current(store, a.id), current(store, b.id)
        assert len(before) == len(after)
        for (m1, c1, t1), (m2, c2, t2) in zip(before, after):
            assert np.array_equal(m1, m2) and (c1, t1) == (c2, t2)
    assert [s.action for s in map(store.label_state, (b.id for b in dst[:3]))] == ["import coco"] * 3


def test_coco_import_reads_polygons_and_uncompressed_rle(store, tmp_path):
    from pycocotools import mask as mask_utils

    images = add_same_images(store, "dst")
    cat = images[0]
    polygon = [[2, 1, 10, 1, 10, 6, 2, 6]]
    flat = box(24, 32, 12, 20, 4, 9).ravel(order="F").astype(int)  # COCO runs: column-major, 0s first
    runs = np.diff([0, *(np.flatnonzero(np.diff(flat)) + 1), flat.size]).tolist()
    data = {"images": [{"id": 7, "file_name": "photos/cat.jpg", "width": 32, "height": 24},
                       {"id": 8, "file_name": "stranger.jpg", "width": 5, "height": 5}],
            "categories": [{"id": 3, "name": "omission"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "segmentation": polygon, "caption": "gap"},
                {"id": 2, "image_id": 7, "category_id": 3, "segmentation": {"size": [24, 32], "counts": runs}},
                {"id": 3, "image_id": 8, "category_id": 3, "segmentation": [[0, 0, 4, 0, 4, 4]]}]}
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "annotations.json").write_text(json.dumps(data))
    summary = import_masks(store, "dst", "coco", tmp_path / "ext")
    assert summary == ImportSummary(matched=1, regions=2, unmatched=["stranger.jpg"], size_mismatches=[])
    got = current(store, cat.id)
    expected_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 24, 32))).astype(bool)
    assert np.array_equal(got[0][0], expected_poly) and got[0][0].sum() > 30
    assert (got[0][1], got[0][2]) == ("omission", "gap")
    assert np.array_equal(got[1][0], box(24, 32, 12, 20, 4, 9)) and got[1][2] is None


def test_hf_folder_loads_with_datasets(store, src, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    summary = export_session(store, "src", "hf", out, TAXONOMY)
    assert (summary.images, summary.regions) == (4, 7)
    assert not (out / "masks").exists() and (out / "train" / "masks").is_dir()
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))
    train = ds["train"]
    assert set(ds) == {"train"} and train.num_rows == 4
    assert {"image", "mask", "split", "family_id", "classes", "captions", "bboxes"} <= set(train.column_names)
    assert {s: n for s, n in Counter(train["split"]).items()} == {s: n for s, n in summary.splits.items() if n}
    for row, image in zip(train, src):
        regions = store.label_state(image.id).regions
        assert row["image"].size == (image.width, image.height)
        assert np.array_equal(np.array(row["image"].convert("RGB")), store.load_rgb(image.id))
        assert np.array_equal(np.array(row["mask"]) == 255, union(store, image))
        assert row["classes"] == [r.class_name for r in regions]
        assert row["captions"] == [r.caption for r in regions]
        assert row["bboxes"] == [list(r.bbox) for r in regions]


def test_synartifact_boxes_equal_region_bboxes(store, src, tmp_path):
    out = tmp_path / "syn"
    summary = export_session(store, "src", "synartifact", out, TAXONOMY)
    assert summary.files == 9
    for image in src:
        name = safe_name(image)
        doc = json.loads((out / "annotations" / f"{name}.json").read_text())
        assert (doc["image"], doc["width"], doc["height"]) == (f"{name}.png", image.width, image.height)
        assert (out / "images" / doc["image"]).is_file()
        regions = store.label_state(image.id).regions
        assert doc["Artifacts annotation"] == [
            {"rect_start": list(r.bbox[:2]), "rect_end": list(r.bbox[2:]), "class": r.class_name,
             "artifacts_caption": r.caption} for r in regions]


def test_mmseg_export_split_labels_and_config(store, src, tmp_path):
    from mmengine import Config

    from studio.datasets.splits import plan_split

    out = tmp_path / "mmseg"
    summary = export_session(store, "src", "mmseg", out, TAXONOMY, val_fraction=0.25, test_fraction=0.25, seed=3)
    listing = {split: sorted(p.name for p in (out / "img_dir" / split).iterdir()) for split in ("train", "val", "test")}
    # 3 images have human labels only (the generated one has a detector-authored region): 1 val, 1 test family
    assert {k: len(v) for k, v in listing.items()} == {"train": 2, "val": 1, "test": 1}
    assert summary.files == 2 * 4 + 2
    by_name = {f"{safe_name(im)}.png": im for im in src}
    assert listing["train"].count(f"{safe_name(src[2])}.png") == 1  # pseudo labels never in a held-out split
    plan = plan_split(store, "src", val_fraction=0.25, test_fraction=0.25, seed=3)  # the one split function
    for split, names in listing.items():
        assert sorted(p.name for p in (out / "ann_dir" / split).iterdir()) == names
        assert sorted(by_name[n].id for n in names) == plan.ids(split)
        for name in names:
            with Image.open(out / "ann_dir" / split / name) as im:
                assert im.mode == "L"
                label = np.array(im)
            assert set(np.unique(label).tolist()) <= {0, 1}
            assert np.array_equal(label == 1, union(store, by_name[name]))
    with open(out / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"]: r["split"] for r in rows} == {n: s for s, names in listing.items() for n in names}

    cfg = Config.fromfile(str(out / "upernet_artifact_config.py"))
    assert cfg.dataset_type == "BaseSegDataset" and cfg.data_root == str(out.resolve())
    assert cfg.metainfo["classes"] == ("background", "artifact")
    assert cfg.model.decode_head.num_classes == 2 and cfg.model.auxiliary_head.num_classes == 2
    assert cfg.model.decode_head.type == "UPerHead" and cfg.norm_cfg == {"type": "BN", "requires_grad": True}
    assert cfg.optim_wrapper.optimizer == {"type": "AdamW", "lr": 6e-05, "betas": (0.9, 0.999), "weight_decay": 0.01}
    assert cfg.train_cfg.max_iters == 10000  # the paper's detector schedule
    assert cfg.train_dataloader.dataset.img_suffix == cfg.train_dataloader.dataset.seg_map_suffix == ".png"
    assert cfg.val_dataloader.dataset.data_prefix.seg_map_path == "ann_dir/val"
    assert cfg.test_dataloader.dataset.data_prefix.seg_map_path == "ann_dir/test"


def _mmcv_ops_stand_in() -> types.ModuleType:
    """mmcv-lite has no compiled ops, and mmseg imports `mmcv.ops.point_sample`/`sigmoid_focal_loss` at import
    time (used only by heads we never build): a stand-in for this test only, as in test_mmseg_convert.py."""
    ops = types.ModuleType("mmcv.ops")

    def unavailable(*args, **kwargs):
        raise RuntimeError("mmcv.ops is a test stand-in (mmcv-lite).")

    def missing(name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs the compiled mmcv (mmcv-lite is installed).")

    ops.point_sample = ops.sigmoid_focal_loss = unavailable
    ops.__getattr__ = missing
    return ops


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mmseg_config_builds_its_datasets_and_model(store, src, tmp_path, monkeypatch):
    """The exported config as mmsegmentation reads it: both splits load with 0/1 labels, the UperNet builds
    and gives finite losses on one batch (crop shrunk to 64x64 so the Swin-T forward is quick on CPU)."""
    pytest.importorskip("mmseg")
    from mmengine import Config
    from mmengine.dataset import pseudo_collate

    if importlib.util.find_spec("mmcv._ext") is None:
        monkeypatch.setitem(sys.modules, "mmcv.ops", _mmcv_ops_stand_in())
    import torch
    from mmseg.registry import DATASETS, MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    out = tmp_path / "mmseg"
    export_session(store, "src", "mmseg", out, TAXONOMY, val_fraction=0.5, seed=0)
    cfg = Config.fromfile(str(out / "upernet_artifact_config.py"))
    assert len(DATASETS.build(cfg.val_dataloader.dataset)) == 2
    small = (64, 64)
    cfg.model.data_preprocessor.size = small
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.type == "RandomResize":
            step.scale = small
        if step.type == "RandomCrop":
            step.crop_size = small
    train = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(train) == 2 and train.metainfo["classes"] == ("background", "artifact")
    samples = [train[0], train[1]]
    for sample in samples:
        assert set(np.unique(sample["data_samples"].gt_sem_seg.data.numpy()).tolist()) <= {0, 1}
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == "SwinTransformer" and model.decode_head.num_classes == 2
    with torch.no_grad():
        losses = model(**model.data_preprocessor(pseudo_collate(samples), True), mode="loss")
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(losses)
    assert all(torch.isfinite(losses[k]) for k in ("decode.loss_ce", "aux.loss_ce"))


def test_single_image_mmseg_config_has_no_validation(store, tmp_path):
    from mmengine import Config

    store.create_session("one")
    (only,) = store.add_images("one", [NewImage(rgb=rgb(0, 8, 8), source="uploaded")])
    with pytest.raises(ValueError, match="no labelled images"):
        export_session(store, "one", "mmseg", tmp_path / "m", TAXONOMY)
    store.mark_reviewed(only.id)
    export_session(store, "one", "mmseg", tmp_path / "m", TAXONOMY)
    assert len(list((tmp_path / "m" / "img_dir" / "train").iterdir())) == 1
    cfg = Config.fromfile(str(tmp_path / "m" / "upernet_artifact_config.py"))
    assert cfg.val_dataloader is None and cfg.val_cfg is None and cfg.val_evaluator is None


def test_export_refuses_bad_requests(store, src, tmp_path):
    with pytest.raises(ValueError, match="choose one of: png, coco, hf, synartifact, mmseg"):
        export_session(store, "src", "yolo", tmp_path / "x", TAXONOMY)
    store.create_session("empty")
    with pytest.raises(ValueError, match="no images"):
        export_session(store, "empty", "png", tmp_path / "x", TAXONOMY)
    with pytest.raises(ValueError, match="taxonomy"):
        export_session(store, "src", "coco", tmp_path / "x", [{"definition": "no name"}])
    with pytest.raises(ValueError, match="val_fraction"):
        export_session(store, "src", "mmseg", tmp_path / "x", TAXONOMY, val_fraction=1.0)
    assert not (tmp_path / "x").exists()
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "regions.csv").write_text("stale")
    with pytest.raises(ValueError, match="not empty"):
        export_session(store, "src", "png", out, TAXONOMY)
    assert (out / "regions.csv").read_text() == "stale"
    export_session(store, "src", "png", out, TAXONOMY, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "regions.csv").read_text().startswith("file,")
    (tmp_path / "empty-dir").mkdir()
    assert export_session(store, "src", "synartifact", tmp_path / "empty-dir", TAXONOMY).images == 4
    assert set(EXPORT_FORMATS) == {"png", "coco", "hf", "synartifact", "mmseg", "vlm"}


def test_size_mismatched_mask_is_reported_not_stretched(store, tmp_path):
    dst = add_same_images(store, "dst")
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(folder / "cat.png")
    Image.fromarray((box(40, 20, 1, 5, 1, 5) * 255).astype(np.uint8)).save(folder / "evil.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "nobody.png")
    summary = import_masks(store, "dst", "png", folder)
    assert summary.size_mismatches == [("cat.png", (10, 10), (24, 32))]
    assert summary.unmatched == ["nobody.png"] and (summary.matched, summary.regions) == (1, 1)
    assert store.label_state(dst[0].id).seq == 0 and store.label_state(dst[0].id).regions == ()
    assert np.array_equal(union(store, dst[1]), box(40, 20, 1, 5, 1, 5))


def test_a_bad_file_fails_before_anything_is_written(store, tmp_path):
    dst = add_same_images(store, "dst")
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray((box(24, 32, 1, 5, 1, 5) * 255).astype(np.uint8)).save(folder / "cat.png")
    grey = np.zeros((40, 20), np.uint8)
    grey[3:9, 3:9] = 128
    Image.fromarray(grey).save(folder / "evil.png")
    with pytest.raises(ValueError, match=r"evil\.png is not a binary mask"):
        import_masks(store, "dst", "png", folder)
    (folder / "evil.png").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png is not a readable image"):
        import_masks(store, "dst", "png", folder)
    coco = {"images": [{"id": 1, "file_name": "cat.png", "width": 32, "height": 24}],
            "categories": [{"id": 1, "name": "distortion"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]},
                            {"id": 2, "image_id": 1, "category_id": 1,
                             "segmentation": {"size": [24, 32], "counts": "!!bad"}}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotations\.json: annotation 2: the RLE counts"):
        import_masks(store, "dst", "coco", tmp_path / "annotations.json")
    coco["annotations"][1] = {"id": 2, "image_id": 1, "category_id": 9, "segmentation": [[0, 0, 5, 0, 5, 5]]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category_id 9"):
        import_masks(store, "dst", "coco", tmp_path)
    with pytest.raises(ValueError, match="choose one of: png, coco"):
        import_masks(store, "dst", "hf", tmp_path)
    with pytest.raises(ValueError, match="author"):
        import_masks(store, "dst", "png", folder, author="robot")
    assert all(store.label_state(im.id).seq == 0 for im in dst)
    assert all(store.list_masks(im.id) == [] for im in dst)


def test_ambiguous_names_are_refused(store, tmp_path):
    store.create_session("twins")
    store.add_images("twins", [NewImage(rgb=rgb(i, 6, 6), source="uploaded", original_name="shot.png")
                               for i in range(2)])
    folder = tmp_path / "masks"
    folder.mkdir()
    Image.fromarray(np.full((6, 6), 255, np.uint8)).save(folder / "shot.png")
    with pytest.raises(ValueError, match=r"shot\.png matches 2 images"):
        import_masks(store, "twins", "png", folder)
