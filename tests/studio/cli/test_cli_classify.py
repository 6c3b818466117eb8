"""`classify`, `train-classifier`, `export --format vlm`, `tune --feedback` (app.main in-process) and Services.suggest."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from engines.classification import classify as C
from engines.classification.prompts import build_question, parse_answer
from engines.classification.vlm import save_tiny_vlm
from studio.services import Services, default_taxonomy
from studio.store.records import NewImage, NewMask
from studio.store.store import Store

TAX = [{"name": "red", "definition": "a red blob"}, {"name": "blue", "definition": "a blue blob"}]


def cli(capsys, *argv) -> tuple[int, str, list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.splitlines()


def one_error_line(err: list[str], *words: str) -> str:
    lines = [line for line in err if not line.startswith("note:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("artifact-studio:") and "Traceback" not in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def blob(kind: str | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 160, (40, 40, 3)).astype(np.uint8)
    mask = np.zeros((40, 40), bool)
    y, x = rng.integers(2, 24, 2)
    mask[y:y + 12, x:x + 12] = True
    if kind:
        img[mask] = (230, 30, 30) if kind == "red" else (30, 30, 230)
    return img, mask


@pytest.fixture()
def session(tmp_path) -> tuple[Path, int]:
    """A session with the red/blue taxonomy: 8 labelled images (a corrupted child shares its parent's family)."""
    data = tmp_path / "data"
    with Store(data) as store:
        s = store.create_session("blobs")
        store.set_session_taxonomy(s.id, TAX)
        items = []
        for i in range(8):
            kind = ("red", "blue")[i % 2]
            img, mask = blob(kind, i)
            items.append(NewImage(rgb=img, source="uploaded", original_name=f"b{i}.png",
                                  masks=(NewMask(mask=mask, author="human", class_name=kind, caption=f"{kind} square"),)))
        records = store.add_images(s.id, items)
        img, mask = blob("red", 99)
        store.add_images(s.id, [NewImage(rgb=img, source="corrupted", parent_id=records[0].id, original_name="child.png",
                                         masks=(NewMask(mask=mask, author="synthetic", class_name="red"),))])
    return data, s.id


@pytest.fixture()
def head_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    spec = C.ClassifierSpec(family="head", classes=tuple(TAX), input_size=32)
    return C.save_head(C.build_crop_net(2, 8), spec, tmp_path / "head", width=8)


def db_rows(data: Path) -> dict:
    conn = sqlite3.connect(data / "studio.db")
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("masks", "label_states", "images")}
    finally:
        conn.close()


def test_classify_a_session_by_region_writes_nothing(capsys, session, head_dir):
    data, sid = session
    before = db_rows(data)
    rc, out, err = cli(capsys, "classify", "--data-dir", data, "--session", sid, "--classifier", f"head:{head_dir}",
                       "--regions", "labels", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert len(report["results"]) == 9 and report["demo"] is False
    row = report["results"][0]
    assert set(row["probabilities"]) == {"red", "blue"} and row["region_key"] and row["bbox"]
    assert db_rows(data) == before  # a classifier never writes to the session
    rc, out, _ = cli(capsys, "classify", "--data-dir", data, "--session", "blobs", "--classifier", f"head:{head_dir}",
                     "--threshold", "0.01")
    assert rc == 0 and out.count("red") >= 9  # every image line names its classes


def test_classify_a_folder_and_bad_input(capsys, tmp_path, head_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(blob("blue", i)[0]).save(folder / f"{i}.png")
    rc, out, err = cli(capsys, "classify", "--data-dir", tmp_path / "d", "--images", folder, "--classifier",
                       f"head:{head_dir}", "--json", "--no-captions")
    assert rc == 0, err
    assert [r["name"] for r in json.loads(out)["results"]] == ["0", "1"]
    rc, _, err = cli(capsys, "classify", "--data-dir", tmp_path / "d", "--images", folder, "--classifier", "clip:x")
    assert rc == 1 and one_error_line(err, "Unknown classifier")
    rc, _, err = cli(capsys, "classify", "--data-dir", tmp_path / "d", "--images", folder, "--regions", "labels")
    assert rc == 1 and one_error_line(err, "--regions labels needs --session")
    rc, _, err = cli(capsys, "classify", "--data-dir", tmp_path / "d", "--images", folder,
                     "--classifier", f"vlm:{head_dir}")
    assert rc == 1 and one_error_line(err, "has no config.json")


def test_export_vlm_writes_conversations_split_by_family(capsys, session, tmp_path):
    from studio.datasets.splits import plan_split

    data, sid = session
    out = tmp_path / "vlm"
    rc, _, err = cli(capsys, "export", "--data-dir", data, "--session", sid, "--format", "vlm", "--out", out,
                     "--val-fraction", "0.3", "--test-fraction", "0.2", "--split-seed", "1")
    assert rc == 0, err
    rows = {split: [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "val", "test")}
    assert rows["val"] and rows["train"] and rows["test"]
    for split, lines in rows.items():
        for row in lines:
            assert row["split"] == split
            assert (out / row["image"]).is_file() and row["images"] == [row["image"]]
            question = row["messages"][0]["content"][1]["text"]
            answer = row["messages"][1]["content"][0]["text"]
            assert row["conversations"] == [{"from": "human", "value": "<image>\n" + question},
                                            {"from": "gpt", "value": answer}]
            if row["task"] == "answer":
                assert question == build_question(TAX) and len(parse_answer(answer, TAX)) == 1
            else:
                assert answer in ("yes", "no")
    images = {split: {r["image"] for r in lines} for split, lines in rows.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"] and not images["val"] & images["test"]
    with Store(data) as store:  # the very split training uses (studio.datasets.splits), not a local one
        plan = plan_split(store, sid, val_fraction=0.3, test_fraction=0.2, seed=1)
        names = {r.id: f"images/{Path(r.original_name).stem}-{r.id}.png" for r in store.list_images(sid)}
    for split in ("train", "val", "test"):
        assert images[split] == {names[i] for i in plan.ids(split)}, split
    per_image = len(TAX) + 1
    kept = sum(s != "excluded" for s in plan.split_of.values())
    assert sum(len(v) for v in rows.values()) == kept * per_image
    child = next(i for i, n in names.items() if n.startswith("images/child"))
    parent = next(i for i, n in names.items() if n.startswith("images/b0-"))
    assert plan.family_of[child] == plan.family_of[parent]
    # a corrupted child trains with its parent, or is left out when the parent is held out
    assert plan.split_of[child] == ("train" if plan.split_of[parent] == "train" else "excluded")


@pytest.mark.slow
def test_train_classifier_runs_as_a_job_and_reports_zero_shot_vs_tuned(capsys, session, head_dir):
    data, sid = session
    rc, out, err = cli(capsys, "train-classifier", "--data-dir", data, "--session", sid, "--classifier",
                       f"head:{head_dir}", "--steps", "12", "--eval-every", "6", "--batch-size", "8", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["status"] == "succeeded" and report["kind"] == "classifier", report
    result = report["result"]
    assert result["steps_done"] == 12 and result["data"]["val"] >= 1 and result["data"]["train"] >= 1
    assert {"micro_f1", "macro_f1", "exact_match", "per_class"} <= set(result["zero_shot"]) <= set(result["tuned"])
    assert result["data"]["test"] >= 1 and result["data"]["split"]["method"] == "family"
    test = result["test"]  # held out from training and from checkpoint choice: scored before and after
    assert test["tuned"]["samples"] == test["zero_shot"]["samples"] == result["data"]["test"]
    assert C.load_classifier(result["best_dir"]).extra.family == "head"
    rc, _, err = cli(capsys, "train-classifier", "--data-dir", data, "--classifier", "demo")
    assert rc == 1 and one_error_line(err, "--session is required")
    rc, _, err = cli(capsys, "train-classifier", "--data-dir", data, "--session", sid, "--steps", "0")
    assert rc == 1 and one_error_line(err, "Training steps must be between")


def test_tune_feedback_arguments_are_checked(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    rc, _, err = cli(capsys, "tune", "--data-dir", tmp_path / "d", "--prompts", prompts, "--feedback", "demo")
    assert rc == 1 and one_error_line(err, "classifier:SPEC")
    rc, _, err = cli(capsys, "tune", "--data-dir", tmp_path / "d", "--prompts", prompts)
    assert rc == 1 and one_error_line(err, "--detector is required")
    rc, _, err = cli(capsys, "tune", "--data-dir", tmp_path / "d", "--prompts", prompts, "--feedback",
                     f"classifier:vlm:{tmp_path / 'nowhere'}")
    assert rc == 1 and one_error_line(err, "does not exist")
    assert not (tmp_path / "d" / "studio.db").exists()  # refused before the data directory was touched


def test_suggest_reads_a_region_and_writes_nothing(session, head_dir):
    data, sid = session
    services = Services.open(data)
    try:
        image = services.store.list_images(sid)[-1]
        (region,) = services.store.label_state(image.id).regions
        before = db_rows(data)
        out = services.suggest(image.id, region.key, f"head:{head_dir}", top=2)
        assert [name for name, _ in out["classes"]] and out["class_name"] in ("red", "blue")
        assert db_rows(data) == before and services.store.label_state(image.id).regions == (region,)
        with pytest.raises(ValueError, match="does not exist"):
            services.suggest(image.id, "nope", f"head:{head_dir}")
    finally:
        services.close()
    assert default_taxonomy()[0]["name"] == "Distorted and Deformated Components"


def test_the_named_api_suggests_and_counts_classes_without_writing(session, head_dir):
    from studio.web.api import StudioAPI

    data, sid = session
    services = Services.open(data)
    try:
        api = StudioAPI(services)
        assert api.class_counts(sid) == {"red": 5, "blue": 4} == api.class_counts("blobs")
        image = services.store.list_images(sid)[0]
        (region,) = api.label_regions(image.id)
        before = db_rows(data)
        out = api.suggest_class(image.id, region["key"], f"head:{head_dir}", top=1)
        assert len(out["classes"]) == 1 and out["class_name"] in ("red", "blue") and json.dumps(out)
        assert db_rows(data) == before
        (row,) = [r for r in services.loaded_models() if r["role"].startswith("classifier")]
        assert row["spec"] == f"head:{head_dir}" and row["parameters"] > 0 and row["note"] == "loaded"
        with pytest.raises(ValueError, match="does not exist"):
            api.suggest_class(image.id, "r99", f"head:{head_dir}")
    finally:
        services.close()


def test_classifier_samples_use_the_shared_family_split(session):
    from studio.datasets.classifier_data import classifier_samples
    from studio.datasets.splits import plan_split
    from studio.datasets.training_data import detector_samples

    data, sid = session
    services = Services.open(data)
    try:
        store = services.store
        records = store.list_images(sid)
        child = next(r for r in records if r.parent_id is not None)
        split = classifier_samples(store, sid, TAX, val_fraction=0.5, test_fraction=0.25, seed=3, negatives=1)
        plan = plan_split(store, sid, val_fraction=0.5, test_fraction=0.25, seed=3)
        assert split.split == plan  # the same families as export and evaluate --session
        detector = detector_samples(services, sid, {"val_fraction": 0.5, "test_fraction": 0.25, "split_seed": 3})
        assert detector.split.split_of == split.split.split_of  # ... and as detector training
        assert plan.family_of[child.id] == plan.family_of[child.parent_id]
        fam = {name: {f"family-{plan.family_of[i]}" for i in plan.ids(name)} for name in ("train", "val", "test")}
        assert fam["val"] and fam["test"] and len(fam["val"]) == 4 and len(fam["test"]) == 2  # of 8 families
        for name, samples in (("train", split.train), ("val", split.val), ("test", split.test)):
            assert {s.family for s in samples} == fam[name], name
        assert not fam["train"] & (fam["val"] | fam["test"])
        assert split.summary["val_families"] == 4 and split.summary["test_families"] == 2
        assert split.summary["excluded_images"] == (0 if plan.split_of[child.parent_id] == "train" else 1)
        assert sum(1 for s in split.train + split.val if s.classes == ()) >= 1  # clean boxes are negatives
        other = classifier_samples(store, sid, TAX, val_fraction=0.5, test_fraction=0.25, seed=4)
        assert other.split.split_of != split.split.split_of  # the seed is the split's seed
        image_level = classifier_samples(store, sid, TAX, level="image", val_fraction=0.5, test_fraction=0.25, seed=3)
        assert all(s.bbox is None and len(s.classes) == 1 for s in image_level.train + image_level.val + image_level.test)
        with pytest.raises(ValueError, match="val_fraction"):
            classifier_samples(store, sid, TAX, val_fraction=0.6, test_fraction=0.5)
    finally:
        services.close()


def test_train_classifier_checks_a_vlm_spec_before_any_job_exists(capsys, session, tmp_path):
    """A missing, unreadable or non-VLM model, a bad option or a missing LoRA is one sentence at launch, and
    no job is created; a real (tiny) VLM folder passes the check without loading its weights."""
    data, sid = session
    not_vlm = tmp_path / "not-vlm"
    not_vlm.mkdir()
    (not_vlm / "config.json").write_text(json.dumps({"model_type": "bert"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(f"vlm:{tmp_path / 'nowhere'}", "does not exist"), (f"vlm:{empty}", "has no config.json"),
             (f"vlm:{not_vlm}", "not an image-text-to-text model"),
             (f"vlm:{empty}#scoring=maybe", "scoring"), (f"vlm:{empty}#lora={tmp_path / 'no-lora'}", "LoRA folder")]
    for spec, words in cases:
        rc, _, err = cli(capsys, "train-classifier", "--data-dir", data, "--session", sid, "--classifier", spec)
        assert rc == 1 and one_error_line(err, words), (spec, err)
    with Store(data) as store:
        assert store.list_jobs() == []
    vlm = save_tiny_vlm(tmp_path / "tiny-vlm", seed=3)
    C.check_classifier(f"vlm:{vlm}")  # config read and kind checked; nothing raised
