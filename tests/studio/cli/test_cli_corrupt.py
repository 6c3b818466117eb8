"""`artifact-studio corrupt` and `import --captions` against a real store and the demo pipeline.

Test-sized schedules: N=10 steps, k=2 (renoise) and 3 (baselines), 64x64 images.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from studio.store.store import Store

FAST = ["--num-inference-steps", "10", "--inversion-steps", "2", "--baseline-steps", "3", "--max-side", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path, demo_dir) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target / "models" / "demo-sd")
    return target


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two 64x64 photos-like images and, for each, a 24x24 box mask at (13, 13) (not 8-aligned)."""
    from skimage import data as samples

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name, sample in (("astronaut", samples.astronaut()), ("coffee", samples.coffee())):
        Image.fromarray(sample).resize((64, 64), Image.LANCZOS).save(images / f"{name}.png")
        box = np.zeros((64, 64), np.uint8)
        box[13:37, 13:37] = 255
        Image.fromarray(box).save(masks / f"{name}.png")
    return tmp_path


def cli(capsys, *argv):
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


def one_error_line(err: list[str], *words: str) -> None:
    assert len(err) == 1 and err[0].startswith("artifact-studio:") and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], (word, err[0])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def corrupted_cells_of_the_box() -> np.ndarray:
    """The 'area' latent cells of the (13, 13) 24x24 box at pixel resolution: cells 2..4 x 2..4 but (4, 4)."""
    expected = np.zeros((64, 64), bool)
    expected[16:40, 16:40] = True
    expected[32:40, 32:40] = False
    return expected


def test_corrupt_folder_with_captions_labels_metrics_and_resume(capsys, data, folder):
    captions = folder / "captions.jsonl"
    captions.write_text('{"file_name": "astronaut.png", "caption": "an astronaut"}\n'
                        '{"file_name": "coffee", "caption": "a cup of coffee"}\n')
    out = folder / "out"
    args = ["corrupt", "--data-dir", data, "--images", folder / "images", "--masks", folder / "masks",
            "--captions", captions, "--out", out, "--seeds", "0", *FAST]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    rows = {row["item"]: row for row in manifest(out)}
    assert set(rows) == {"astronaut-renoise-s0", "coffee-renoise-s0"}
    row = rows["astronaut-renoise-s0"]
    assert (row["caption"], row["params"]["prompt"]) == ("an astronaut", "an astronaut")
    assert rows["coffee-renoise-s0"]["caption"] == "a cup of coffee"
    assert (row["preset"], row["params"]["preset"], row["label"]) == ("renoise-sd", "renoise-sd", "corrupted")
    assert row["params"]["lambda_ac"] == 20.0 and row["params"]["average_first_step_range"] == [0, 5]
    assert row["region_iou"] == pytest.approx(416 / 672)  # see corrupted_cells_of_the_box
    for key in ("inside_change_vs_input", "outside_change_vs_input", "confinement_vs_input",
                "inside_change_vs_resample", "outside_change_vs_resample", "confinement_vs_resample"):
        assert isinstance(row[key], float), key
    assert row["outside_change_vs_resample"] != row["outside_change_vs_input"]
    # SD preset at k=2 (timesteps 1, 101): 3 UNet rows per step; then the seed and the uncorrupted z_t
    assert row["unet_calls"] == 2 * 3 + 2 + 2
    label = np.asarray(Image.open(out / row["mask"])) > 0
    assert np.array_equal(label, corrupted_cells_of_the_box())

    rc, _, err = cli(capsys, *args)  # a rerun resumes: nothing left to do
    assert rc == 0 and "2 item(s) already done, 0 to do" in "\n".join(err)
    rc, _, err = cli(capsys, *args, "--preset", "renoise-fast")  # other settings would mix two datasets
    assert rc == 1
    one_error_line(err, "other settings")
    assert len(manifest(out)) == 2


def test_requested_label_fast_preset_and_baseline_steps_are_recorded(capsys, data, folder):
    out = folder / "out"
    rc, _, err = cli(capsys, "corrupt", "--data-dir", data, "--images", folder / "images", "--masks", folder / "masks",
                     "--out", out, "--seeds", "1", "--method", "rotate", "--preset", "renoise-fast",
                     "--label", "requested", *FAST)
    assert rc == 0, err
    row = manifest(out)[0]
    assert (row["preset"], row["params"]["num_reg_steps"], row["params"]["baseline_steps"]) == ("renoise-fast", 0, 3)
    assert row["caption"] == "" and row["label"] == "requested"
    assert row["unet_calls"] == 3 * 2 + 3 + 3  # 3 inverted steps x 2 rows, then 3 steps for the seed and z_t
    label = np.asarray(Image.open(out / row["mask"])) > 0
    box = np.zeros((64, 64), bool)
    box[13:37, 13:37] = True
    assert np.array_equal(label, box)


def test_bad_caption_files_and_flags_change_nothing(capsys, data, folder):
    ghost = folder / "ghost.csv"
    ghost.write_text("file_name,caption\nastronaut.png,an astronaut\nghost.png,a ghost\n")
    out = folder / "out"
    cases = [
        (["--images", folder / "images", "--captions", ghost], ("ghost.csv names 1 image(s)", "'ghost.png'")),
        (["--session", "s", "--captions", ghost], ("--captions goes with --images",)),
        (["--images", folder / "images", "--renoise-iterations", "3"], ("--renoise-iterations goes with --preset custom",)),
        (["--images", folder / "images", "--method", "blur", "--baseline-steps", "10"], ("baseline_steps",)),
    ]
    for extra, words in cases:
        rc, _, err = cli(capsys, "corrupt", "--data-dir", data, "--out", out, "--num-inference-steps", "10",
                         "--inversion-steps", "2", *extra)
        assert rc == 1
        one_error_line(err, *words)
        assert not out.exists()


def test_import_captions_then_corrupt_the_session_with_them(capsys, data, folder):
    captions = folder / "captions.csv"
    captions.write_text("image,text\nastronaut.png,an astronaut\n")
    rc, _, err = cli(capsys, "import", "--data-dir", data, "--session", "s", "--create-session",
                     "--captions", captions, folder / "images")
    assert rc == 0, err
    with Store(data) as store:
        assert [(r.original_name, r.caption) for r in store.list_images("s")] == \
            [("astronaut.png", "an astronaut"), ("coffee.png", None)]
    out = folder / "out"
    rc, _, err = cli(capsys, "corrupt", "--data-dir", data, "--session", "s", "--out", out, "--seeds", "0",
                     "--preset", "renoise-fast", *FAST)
    assert rc == 0, err
    assert sorted((row["item"].split("-")[0], row["caption"]) for row in manifest(out)) == \
        [("astronaut", "an astronaut"), ("coffee", "")]


def test_import_captions_naming_unknown_images_imports_nothing(capsys, data, folder):
    captions = folder / "captions.jsonl"
    captions.write_text('{"file_name": "astronaut.png", "caption": "a"}\n{"file_name": "zebra.png", "caption": "z"}\n')
    rc, _, err = cli(capsys, "import", "--data-dir", data, "--session", "s", "--create-session",
                     "--captions", captions, folder / "images")
    assert rc == 1
    one_error_line(err, "captions.jsonl names 1 image(s)", "'zebra.png'", "nothing was changed")
    assert not (data / "studio.db").exists() and not (data / "files").exists()
