"""`artifact-studio tune`: a real tuning job (subprocess) on the demo pipeline, evaluated on held-out prompts
(a file, or a seeded split of the prompt file) and, when asked, by a second detector that is not optimised;
the figures reach the job's result, the JSON and the text output. Bad evaluation input is one stderr line
before any job exists."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import app
from studio.store.store import Store

FAST = ["--inference-steps", "2", "--guidance-scale", "1", "--size", "64"]
TRAIN = ["a cat on a sofa", "a red house"]
HELD_OUT = ["a bowl of fruit", "a dog in the snow"]


@pytest.fixture
def data(tmp_path, demo_dir) -> Path:
    """A fresh data dir that already holds the demo pipeline (copied, so no test rebuilds it)."""
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target / "models" / "demo-sd")
    return target


@pytest.fixture
def judge(tmp_path) -> Path:
    """A tiny config-built UperNet (seed 7) saved in our detector format: a detector tuning does not optimise."""
    import torch
    from transformers import UperNetForSemanticSegmentation

    from engines.detection.detectors import DEMO_LOGIT_SCALE, DetectorSpec, save_detector, tiny_upernet_config

    torch.manual_seed(7)
    model = UperNetForSemanticSegmentation(tiny_upernet_config())
    with torch.no_grad():
        model.decode_head.classifier.weight.mul_(DEMO_LOGIT_SCALE)
    return save_detector(model, DetectorSpec(family="upernet", input_size=128, trained=False), tmp_path / "judge")


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


def lines_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_tune_json_reports_held_out_prompts_and_the_independent_detector(capsys, data, judge, tmp_path):
    prompts, held_out = lines_file(tmp_path / "p.txt", TRAIN), lines_file(tmp_path / "e.txt", HELD_OUT)
    rc, out, err = cli(capsys, "tune", "--data-dir", data, "--prompts", prompts, "--detector", "demo",
                       "--eval-prompts", held_out, "--eval-detector", judge, "--steps", 2, "--eval-seeds", "0,1",
                       "--lr", "3e-3", *FAST, "--json")
    assert rc == 0, (out, err)
    assert err[0] == (f"tune: 2 training prompt(s); evaluation on 2 held-out prompt(s) from --eval-prompts x 2 seed(s), "
                      f"also judged by {judge}")
    report = json.loads("\n".join(out))
    assert report["status"] == "succeeded"
    result = report["result"]
    assert result["eval_set"] == "held-out" and result["eval_prompts"] == HELD_OUT and result["train_prompts"] == TRAIN
    assert result["eval_seeds"] == [0, 1] and result["steps_done"] == 2
    for before, after, change, detector in ((result["before"], result["after"], result["change"], "demo"),
                                            (result["independent_before"], result["independent_after"],
                                             result["independent_change"], str(judge))):
        assert before["detector"] == after["detector"] == detector
        assert before["images"] == after["images"] == len(HELD_OUT) * 2
        assert change["artifact_area"] == pytest.approx(after["artifact_area"] - before["artifact_area"])
        assert change["lower"] + change["higher"] + change["same"] == 4
    with Store(data) as store:
        (job,) = store.list_jobs()
        assert job.params["eval_prompts"] == HELD_OUT and job.params["eval_detector"] == str(judge)
        assert job.result["independent_after"]["detector"] == str(judge)


@pytest.mark.slow
def test_tune_text_output_with_a_seeded_split(capsys, data, tmp_path):
    prompts = lines_file(tmp_path / "p.txt", TRAIN + HELD_OUT)
    rc, out, err = cli(capsys, "tune", "--data-dir", data, "--prompts", prompts, "--detector", "demo",
                       "--eval-fraction", "0.5", "--steps", 1, "--eval-seeds", "3", *FAST)
    assert rc == 0, (out, err)
    assert err[0] == ("tune: 2 training prompt(s); evaluation on 2 held-out prompt(s) (a seeded share of --prompts, "
                      "never trained on) x 1 seed(s)")
    text = "\n".join(out)
    assert out[0].endswith("succeeded") and "steps: 1" in text
    assert ("evaluation: 2 held-out prompt(s) (a seeded share of --prompts, never trained on) x 1 seed(s) [3], "
            "the same prompts and seeds before and after; 2 training prompt(s)") in text
    assert "optimised detector demo: artifact area " in text and "% -> " in text and "images lower" in text
    assert "independent detector" not in text and "history" not in text
    with Store(data) as store:
        (job,) = store.list_jobs()
        assert not set(job.result["eval_prompts"]) & set(job.result["train_prompts"])


@pytest.mark.parametrize("case, words", [
    ("overlap", "1 evaluation prompt(s) are also training prompts (first: 'A Red house')"),  # one line: spaces joined
    ("same detector", "is the detector tuning optimises"),
    ("one prompt", "at least 2 distinct prompts, got 1"),
    ("file and fraction", "Give --eval-prompts or --eval-fraction, not both."),
    ("bad seeds", "Evaluation seeds must be comma-separated integers, got '0,x'."),
    ("bad loss", "Unknown loss mode 'max'"),
    ("missing file", "Evaluation prompt file"),
])
def test_bad_evaluation_input_is_one_line_and_starts_no_job(capsys, data, tmp_path, case, words):
    prompts = lines_file(tmp_path / "p.txt", TRAIN)
    args = ["tune", "--data-dir", data, "--prompts", prompts, "--detector", "demo", "--steps", 1, *FAST]
    args += {  # (every entry is built, so each writes its own file)
             "overlap": ["--eval-prompts", lines_file(tmp_path / "overlap.txt", ["a bird", "A  Red house"])],
             "same detector": ["--eval-detector", " demo"],
             "one prompt": ["--prompts", lines_file(tmp_path / "one.txt", ["a cat"])],
             "file and fraction": ["--eval-prompts", lines_file(tmp_path / "e.txt", HELD_OUT), "--eval-fraction", "0.5"],
             "bad seeds": ["--eval-seeds", "0,x"],
             "bad loss": ["--loss", "max"],
             "missing file": ["--eval-prompts", tmp_path / "nope.txt"]}[case]
    rc, out, err = cli(capsys, *args)
    assert rc == 1 and out == []
    assert len(err) == 1 and err[0].startswith("artifact-studio:") and words in err[0], err
    assert not (data / "studio.db").exists() or not Store(data).list_jobs()
