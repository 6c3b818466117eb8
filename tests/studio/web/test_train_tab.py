"""Train tab: the recipe fills its knobs, every knob reaches the job's config, the device is recorded and a
device the machine lacks creates no job."""
from __future__ import annotations

import time

import gradio as gr
import numpy as np
import pytest

from studio.jobs import JobManager
from studio.services import Services
from studio.store.records import NewImage, NewMask
from studio.web.tabs import train as tab


@pytest.fixture
def services(tmp_path):
    s = Services.open(tmp_path / "data")
    s.store.create_session("t")
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        mask = np.zeros((32, 32), bool)
        mask[4:12, 4 + i:12 + i] = True
        items.append(NewImage(rgb=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), source="uploaded",
                              original_name=f"{i}.png", masks=(NewMask(mask=mask, author="human"),)))
    s.store.add_images("t", items)
    yield s
    manager = JobManager(s.store)
    for job in s.store.list_jobs("running"):
        manager.kill(job.id)
    s.close()


def test_the_tab_builds_and_a_recipe_fills_its_knobs():
    with gr.Blocks():
        with gr.Tab("Train") as t:
            from studio.web.tabs.common import PerBrowser, Shared

            session = gr.Dropdown([], value=None)
            tab.build(None, Shared(session=session, browser_session=gr.BrowserState(), per_browser=PerBrowser()), t)
    paper = dict(zip(tab.KNOBS, tab.fill_recipe("paper", "tiny", "")))
    assert paper["sampling"] == "uniform" and paper["artifact_weight"] == "1" and paper["color_jitter"] == 0.0
    assert paper["betas"] == "0.9,0.999" and paper["aux_weight"] == 0.4
    balanced = dict(zip(tab.KNOBS, tab.fill_recipe("balanced", "not/a/folder", "")))  # a half-typed arch
    assert balanced["sampling"] == "balanced" and balanced["artifact_weight"] == "auto"


@pytest.mark.slow
def test_launch_passes_every_knob_and_the_device(services, monkeypatch):
    import torch

    sid = services.store.get_session("t").id
    knobs = list(tab.fill_recipe("paper", "tiny", ""))
    knobs[tab.KNOBS.index("color_jitter")] = 0.1
    knobs[tab.KNOBS.index("source_weights")] = "human=2"
    args = dict(kind="detector", arch="tiny", init="", pseudo="", steps=2, batch=2, crop=32, lr=None, eval_every=1,
                seed=0, prompts="", lora_detector="demo", lora_steps=1, eval_prompts="", eval_detector="")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gr.Error, match="no CUDA GPU"):
        tab.launch_job(services, sid, *args.values(), "paper", "cuda", 1, 0.25, 0.0, 0, "", "", ["human"], False,
                       0.5, *knobs)
    assert services.store.list_jobs() == []
    message, _ = tab.launch_job(services, sid, *args.values(), "paper", "auto", 1, 0.25, 0.0, 0, "", "", ["human"],
                                False, 0.5, *knobs)
    (job,) = services.store.list_jobs()
    assert "on cpu" in message and job.params["device"] == "cpu"
    cfg = job.params["config"]
    assert cfg["recipe"] == "paper" and cfg["sampling"] == "uniform" and cfg["artifact_weight"] == 1.0
    assert cfg["color_jitter"] == 0.1 and cfg["source_weights"] == {"human": 2.0} and cfg["steps"] == 2
    assert cfg["lr"] == 3e-3  # blank lr: the recipe's from-scratch rate for tiny
    assert job.params["val_fraction"] == 0.25 and job.params["sources"] == ["human"]
    deadline = time.time() + 900
    while services.store.get_job(job.id).status in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    assert services.store.get_job(job.id).status == "succeeded", services.store.get_job(job.id).error
