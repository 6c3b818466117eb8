"""Train tab, diffusion LoRA: held-out prompts that are training prompts and an 'independent' detector that
is the optimised one are refused before any job exists; a finished job's evaluation reads as one paragraph."""
from __future__ import annotations

import pytest
from gradio.exceptions import Error as GrError

from studio.services import Services
from studio.web.tabs import train


@pytest.fixture
def services(tmp_path):
    svc = Services.open(tmp_path / "data")
    yield svc
    svc.close()


def launch(services, prompts: str, eval_prompts: str = "", eval_detector: str = ""):
    return train.launch_job(services, None, "diffusion LoRA", "tiny", "", "", 1, 2, 32, 1e-3, 1, 0, prompts, "demo", 1,
                            eval_prompts, eval_detector)


@pytest.mark.parametrize("prompts, eval_prompts, eval_detector, words", [
    ("a cat\na red house", "a bird\nA red  house", "", "1 evaluation prompt(s) are also training prompts"),
    ("a cat\na red house", "", "demo", "is the detector tuning optimises"),
    ("a cat", "", "", "at least 2 distinct prompts"),
])
def test_bad_evaluation_settings_start_no_job(services, prompts, eval_prompts, eval_detector, words):
    with pytest.raises(GrError, match=words.replace("(", r"\(").replace(")", r"\)")):
        launch(services, prompts, eval_prompts, eval_detector)
    assert services.store.list_jobs() == []


def test_summary_names_the_evaluation_set_and_both_detectors():
    result = {"eval_set": "held-out", "eval_prompts": ["a bird", "a fish"], "eval_seeds": [0, 1, 2],
              "before": {"artifact_area": 0.25, "detector": "demo"}, "after": {"artifact_area": 0.125},
              "independent_before": {"artifact_area": 0.5, "detector": "/j"}, "independent_after": {"artifact_area": 0.5}}
    assert train._tune_summary(result) == (
        "Evaluated on 2 held-out prompts x 3 seeds, the same before and after. Artifact area (optimised detector "
        "`demo`): 25.0% → 12.5%. Artifact area (independent detector `/j`): 50.0% → 50.0%.")
