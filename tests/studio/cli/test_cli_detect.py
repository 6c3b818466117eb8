"""`artifact-studio detect` and `evaluate` (app.main in-process) against a real store and the demo detector."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from studio.store.store import Store


# ------------------------------------------------------------------ helpers
def cli(capsys, *argv) -> tuple[int, str, list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.splitlines()


def one_error_line(err: list[str], *words: str) -> str:
    lines = [line for line in err if not line.startswith("note:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("artifact-studio:") and "Traceback" not in line, line
    for word in words:
        assert word in line, (word, line)
    return line


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def count(data: Path, table: str) -> int:
    conn = sqlite3.connect(data / "studio.db")
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def reference(tmp_path):
    """The demo detector loaded directly, to compare the CLI's numbers with."""
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector

    return ArtifactDetector(load_detector("demo", data_dir=tmp_path / "ref"))


# ------------------------------------------------------------------ detect
@pytest.mark.slow
def test_detect_session_samples_writes_files_and_stores_heatmaps(capsys, tmp_path, reference):
    from studio.services import SAMPLES_SESSION, Services

    data = tmp_path / "data"
    services = Services.open(data)
    try:
        services.ensure_samples()
        records = services.store.list_images(SAMPLES_SESSION)
    finally:
        services.close()
    assert len(records) == 5
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "detect", "--data-dir", data, "--session", SAMPLES_SESSION, "--out", out,
                          "--threshold", "0.6")
    assert rc == 0, err
    assert any("not a real-world artifact detector" in line for line in err)  # the demo note
    lines = stdout.splitlines()
    assert len(lines) == 5 and all("% artifact" in line for line in lines)

    assert count(data, "heatmaps") == len(records) and count(data, "detector_runs") == 1
    report = json.loads((out / "regions.json").read_text())
    assert (report["detector"], report["demo"], report["threshold"]) == ("demo", True, 0.6)
    assert len(report["images"]) == 5
    with Store(data) as store:
        for rec, row in zip(records, report["images"]):
            name = f"{Path(rec.original_name).stem}-{rec.id}"
            assert row["name"] == name and (row["width"], row["height"]) == (rec.width, rec.height)
            heat_png, overlay_png = out / f"{name}_heatmap.png", out / f"{name}_overlay.png"
            with Image.open(heat_png) as h, Image.open(overlay_png) as o:
                assert h.size == o.size == (rec.width, rec.height)
                assert o.mode == "RGB"
            (hrec,) = store.list_heatmaps(rec.id)
            stored = store.load_heatmap(hrec.id)
            expected = reference.predict([store.load_rgb(rec.id)])[0].scores
            assert np.abs(stored - expected).max() <= 1 / 65535 + 1e-6
            assert np.abs(grey(heat_png) / 255.0 - stored).max() <= 0.5 / 255 + 1e-6
            assert row["max_score"] == pytest.approx(float(stored.max()), abs=1e-6)
            assert row["artifact_percent"] == pytest.approx(100 * float((stored >= 0.6).mean()), abs=1e-4)
            assert sum(r["area"] for r in row["regions"]) == int((stored >= 0.6).sum())


def test_detect_images_folder_with_json(capsys, tmp_path, reference):
    images = tmp_path / "imgs"
    a, b = noise(40, 70, 0), noise(33, 21, 1)
    write_png(images / "a.png", a)
    write_png(images / "b.png", b)
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "detect", "--data-dir", tmp_path / "data", "--images", images, "--out", out,
                          "--json", "--mode", "sliding")
    assert rc == 0, err
    report = json.loads(stdout)
    assert [r["name"] for r in report["images"]] == ["a", "b"] and report["demo"] is True
    for rgb, row in zip((a, b), report["images"]):
        expected = reference.predict([rgb], mode="sliding")[0].scores
        assert row["max_score"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert (row["width"], row["height"]) == (rgb.shape[1], rgb.shape[0])
        for region in row["regions"]:
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 <= x1 < rgb.shape[1] and 0 <= y0 <= y1 < rgb.shape[0] and region["area"] >= 1
        heat = grey(out / f"{row['name']}_heatmap.png")
        assert heat.shape == rgb.shape[:2]
        assert np.abs(heat / 255.0 - expected).max() <= 0.5 / 255 + 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["a_heatmap.png", "a_overlay.png", "b_heatmap.png",
                                                     "b_overlay.png", "regions.json"]


def test_detect_images_without_out_is_one_line(capsys, tmp_path):
    write_png(tmp_path / "imgs" / "a.png", noise(8, 8, 0))
    rc, stdout, err = cli(capsys, "detect", "--data-dir", tmp_path / "data", "--images", tmp_path / "imgs")
    assert rc == 1 and stdout == ""
    one_error_line(err, "--out")


@pytest.mark.parametrize("threshold", ["-0.1", "1.5"])
def test_detect_threshold_out_of_range(capsys, tmp_path, threshold):
    write_png(tmp_path / "imgs" / "a.png", noise(8, 8, 0))
    rc, _, err = cli(capsys, "detect", "--data-dir", tmp_path / "data", "--images", tmp_path / "imgs",
                     "--out", tmp_path / "out", "--threshold", threshold)
    assert rc == 1
    one_error_line(err, "--threshold")
    assert not (tmp_path / "out").exists()


def test_detect_unknown_session_and_bad_detector(capsys, tmp_path):
    data = tmp_path / "data"
    with Store(data) as store:
        store.create_session("empty")
    rc, _, err = cli(capsys, "detect", "--data-dir", data, "--session", "nope")
    assert rc == 1
    one_error_line(err, "nope")
    rc, _, err = cli(capsys, "detect", "--data-dir", data, "--session", "empty")
    assert rc == 1
    one_error_line(err, "no images")
    rc, _, err = cli(capsys, "detect", "--data-dir", data, "--session", "empty", "--detector", "bogus:x")
    assert rc == 1
    one_error_line(err, "Unknown detector")
    assert count(data, "detector_runs") == 0


def test_detect_images_with_the_same_stem_does_not_overwrite(capsys, tmp_path):
    images = tmp_path / "imgs"
    write_png(images / "cat.png", noise(10, 10, 0))
    Image.fromarray(noise(20, 30, 1)).save(images / "cat.jpg")
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "detect", "--data-dir", tmp_path / "data", "--images", images, "--out", out)
    if rc == 1:  # refusing with one line is fine too
        one_error_line(err)
        return
    report = json.loads((out / "regions.json").read_text())
    names = [row["name"] for row in report["images"]]
    assert len(set(names)) == 2
    assert len(list(out.glob("*_heatmap.png"))) == 2


# ------------------------------------------------------------------ evaluate
def make_eval_case(root: Path) -> tuple[Path, Path]:
    """Masks a, b, c (c has no prediction); 8-bit grey predictions a, b."""
    masks, preds = root / "masks", root / "preds"
    ma = np.zeros((4, 4), np.uint8)
    ma[0, 1:] = 255
    ma[3, 3] = 255
    pa = np.zeros((4, 4), np.uint8)
    pa[0, :] = 200            # >= 0.5
    pa[1, 0] = 128            # 128/255 = 0.502 >= 0.5
    pa[2, 0] = 127            # 0.498 < 0.5
    write_png(masks / "a.png", ma)
    write_png(preds / "a.png", pa)
    write_png(masks / "b.png", np.zeros((4, 4), np.uint8))
    write_png(preds / "b.png", np.zeros((4, 4), np.uint8))
    write_png(masks / "c.png", np.full((4, 4), 255, np.uint8))
    return preds, masks


def test_evaluate_predictions_json_matches_hand_computed(capsys, tmp_path):
    preds, masks = make_eval_case(tmp_path)
    rc, stdout, err = cli(capsys, "evaluate", "--data-dir", tmp_path / "data", "--predictions", preds,
                          "--masks", masks, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    # a: tp 3, fp 2, fn 1, tn 10; b: all 16 background
    assert report["artifact_iou"] == pytest.approx(3 / 6)
    assert report["background_iou"] == pytest.approx(26 / 29)
    assert report["miou"] == pytest.approx((3 / 6 + 26 / 29) / 2)
    assert report["mean_image_iou"] == pytest.approx(0.75)
    assert (report["precision"], report["recall"]) == (pytest.approx(0.6), pytest.approx(0.75))
    assert report["num_images"] == 2 and report["threshold"] == 0.5
    assert report["images"] == [{"name": "a", "iou": 0.5, "tp": 3, "fp": 2, "fn": 1, "tn": 10},
                                {"name": "b", "iou": 1.0, "tp": 0, "fp": 0, "fn": 0, "tn": 16}]
    assert report["unmatched_masks"] == ["c"]


def test_evaluate_text_output_reports_unmatched(capsys, tmp_path):
    preds, masks = make_eval_case(tmp_path)
    rc, stdout, _ = cli(capsys, "evaluate", "--data-dir", tmp_path / "data", "--predictions", preds, "--masks", masks)
    assert rc == 0
    assert "masks without prediction: 1" in stdout
    assert any(line.split() == ["artifact_iou:", "0.5000"] for line in stdout.splitlines())


def test_evaluate_reads_16_bit_predictions_over_65535(capsys, tmp_path):
    masks, preds = tmp_path / "masks", tmp_path / "preds"
    truth = np.zeros((2, 2), np.uint8)
    truth[0, :] = 255
    write_png(masks / "x.png", truth)
    # at threshold 0.499: 32735 / 65535 = 0.49950 is artifact, 32700 / 65535 = 0.49897 is not;
    # read as 8 bits both would be 127 / 255 = 0.498 (not artifact)
    values = np.array([[32735, 32735], [32700, 0]], np.uint16)
    write_png(preds / "x.png", values)
    with Image.open(preds / "x.png") as im:
        assert im.mode.startswith("I")
    rc, stdout, err = cli(capsys, "evaluate", "--data-dir", tmp_path / "data", "--predictions", preds,
                          "--masks", masks, "--threshold", "0.499", "--json")
    assert rc == 0, err
    (row,) = json.loads(stdout)["images"]
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (2, 0, 0, 2)


def test_evaluate_with_the_demo_detector(capsys, tmp_path, reference):
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    rgbs = {"p": noise(30, 40, 0), "q": noise(50, 20, 1)}
    truths = {}
    for i, (name, rgb) in enumerate(rgbs.items()):
        write_png(images / f"{name}.png", rgb)
        truth = np.zeros(rgb.shape[:2], np.uint8)
        truth[: rgb.shape[0] // 2] = 255
        truths[name] = truth > 0
        write_png(masks / f"{name}.png", truth)
    write_png(masks / "zzz.png", np.zeros((5, 5), np.uint8))  # no image for it
    write_png(images / "other.png", noise(5, 5, 3))  # no mask for it: ignored
    rc, stdout, err = cli(capsys, "evaluate", "--data-dir", tmp_path / "data", "--detector", "demo",
                          "--images", images, "--masks", masks, "--json")
    assert rc == 0, err
    report = json.loads(stdout)
    assert [r["name"] for r in report["images"]] == ["p", "q"] and report["unmatched_masks"] == ["zzz"]
    tp = fp = fn = 0
    for name, rgb in rgbs.items():
        pred = reference.predict([rgb])[0].scores >= 0.5
        tp += int((pred & truths[name]).sum())
        fp += int((pred & ~truths[name]).sum())
        fn += int((~pred & truths[name]).sum())
    assert report["artifact_iou"] == pytest.approx(tp / (tp + fp + fn))


def test_evaluate_user_errors_are_one_line(capsys, tmp_path):
    preds, masks = make_eval_case(tmp_path)
    data = tmp_path / "data"
    for argv, word in [
        (["--predictions", preds, "--masks", masks, "--threshold", "1.2"], "--threshold"),
        (["--detector", "demo", "--masks", masks], "--images"),
        (["--predictions", tmp_path / "nothing-here", "--masks", masks], "no such file"),
        (["--predictions", masks / "..", "--masks", tmp_path / "empty"], ""),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        rc, stdout, err = cli(capsys, "evaluate", "--data-dir", data, *argv)
        assert rc == 1 and stdout == "", (argv, stdout)
        one_error_line(err, word)


def test_evaluate_size_mismatch_names_the_image(capsys, tmp_path):
    write_png(tmp_path / "masks" / "cat.png", np.zeros((4, 6), np.uint8))
    write_png(tmp_path / "preds" / "cat.png", np.zeros((6, 4), np.uint8))
    rc, _, err = cli(capsys, "evaluate", "--data-dir", tmp_path / "data", "--predictions", tmp_path / "preds",
                     "--masks", tmp_path / "masks")
    assert rc == 1
    one_error_line(err, "cat")
