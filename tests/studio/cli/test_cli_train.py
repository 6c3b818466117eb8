"""`train-detector`, `export` and `evaluate --session` (app.main in-process): recipes resolved and printed,
the device checked before a job exists, the family split shared by training, export and evaluation,
and the test set reported with the artifact-class IoU as the headline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from studio.store.records import NewImage, NewMask
from studio.store.store import Store


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


def one_error_line(err: list[str], *words: str) -> None:
    assert len(err) == 1 and err[0].startswith("artifact-studio:") and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])


@pytest.fixture
def data(tmp_path) -> Path:
    """Session "s": 6 human-labelled 32x32 images (a magenta square each) and one corrupted child."""
    folder = tmp_path / "data"
    with Store(folder) as store:
        store.create_session("s")
        rng = np.random.default_rng(0)
        items = []
        for i in range(6):
            rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            mask = np.zeros((32, 32), bool)
            mask[4 + i:14 + i, 8:18] = True
            rgb[mask] = (255, 0, 255)
            items.append(NewImage(rgb=rgb, source="uploaded", original_name=f"h{i}.png",
                                  masks=(NewMask(mask=mask, author="human"),)))
        images = store.add_images("s", items)
        store.add_images("s", [NewImage(rgb=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), source="corrupted",
                                        parent_id=images[0].id, original_name="h0-c.png",
                                        masks=(NewMask(mask=np.eye(32, dtype=bool), author="synthetic"),))])
    return folder


def test_device_the_machine_lacks_and_a_bad_test_folder_change_nothing(capsys, data, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = cli(capsys, "train-detector", "--data-dir", data, "--session", "s", "--device", "cuda", "--detach")
    assert rc == 1 and out == []
    one_error_line(err, "cuda", "no CUDA GPU")
    (tmp_path / "ti").mkdir(), (tmp_path / "tm").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ti" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "tm" / "b.png")
    rc, out, err = cli(capsys, "train-detector", "--data-dir", data, "--session", "s", "--test-images",
                       tmp_path / "ti", "--test-masks", tmp_path / "tm", "--detach")
    assert rc == 1
    one_error_line(err, "test masks do not match", "nothing was changed")
    rc, out, err = cli(capsys, "train-detector", "--data-dir", data, "--session", "s", "--recipe", "paper",
                       "--color-jitter", "3", "--detach")
    assert rc == 1
    one_error_line(err, "Colour jitter")
    with Store(data) as store:
        assert store.list_jobs() == []


@pytest.mark.slow
def test_train_export_and_evaluate_share_the_split_and_report_the_test_set(capsys, data, tmp_path):
    rc, out, err = cli(capsys, "train-detector", "--data-dir", data, "--session", "s", "--recipe", "paper",
                       "--arch", "tiny", "--steps", "4", "--batch-size", "2", "--crop", "32", "--eval-every", "2",
                       "--val-fraction", "0.2", "--test-fraction", "0.2", "--split-seed", "3", "--device", "cpu")
    assert rc == 0, err
    text = "\n".join(err)
    assert "recipe 'paper' resolved (cpu, 1 process(es))" in text and "sampling            = uniform" in text
    assert "artifact_weight     = 1.0" in text and "lr                  = 0.003" in text
    assert any(line.startswith("test set (1 images): artifact_iou ") and "2-class mIoU" in line for line in out), out
    with Store(data) as store:
        (job,) = store.list_jobs()
        assert job.params["device"] == "cpu" and job.params["config"]["recipe"] == "paper"
        best = Path(job.result["best_dir"])
        assert job.result["headline_metric"] == "artifact_iou" and job.result["test"]["num_images"] == 1
        summary = job.result["data"]
        assert (summary["val_human"], summary["test_human"]) == (1, 1)
        # the corrupted child trains as synthetic unless its parent is held out (then it is used nowhere)
        assert summary["synthetic"] + summary["split"]["counts"].get("excluded/synthetic", 0) == 1
    meta = json.loads((best / "detector.json").read_text())["provenance"]
    assert meta["recipe"] == "paper" and meta["split"]["seed"] == 3 and meta["device"] == "cpu"

    rc, out, err = cli(capsys, "evaluate", "--data-dir", data, "--session", "s", "--detector", best, "--json")
    assert rc == 0, err
    report = json.loads("\n".join(out))
    assert report["split"] == "test" and report["split_seed"] == 3 and report["headline_metric"] == "artifact_iou"
    assert report["artifact_iou"] == pytest.approx(job.result["test"]["artifact_iou"])
    test_name = report["images"][0]["name"]

    rc, out, err = cli(capsys, "export", "--data-dir", data, "--session", "s", "--format", "mmseg",
                       "--out", tmp_path / "mm", "--val-fraction", "0.2", "--test-fraction", "0.2", "--split-seed", "3")
    assert rc == 0, err
    assert [p.stem.rsplit("-", 1)[0] for p in (tmp_path / "mm" / "img_dir" / "test").iterdir()] == \
        [Path(test_name).stem]
    assert any(line.startswith("split by family: train") for line in out)
