"""Corrupt tab handlers, called directly (no browser): the caption box, the preset, the label and
confinement figures in the status, and what Add to dataset stores."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from studio.services import Services
from studio.store.records import NewImage
from studio.web.tabs import corrupt
from studio.web.tabs.common import PerBrowser, Shared


def request(name: str = "browser-1"):
    return SimpleNamespace(session_hash=name)


def run_preview(services, shared, sid, *form):
    """The Preview button as the page sees it: a server task, then the timer's tick shows its grid."""
    corrupt.start_preview(services, shared, False, sid, *form, client="browser-1", request=request())
    task = services.tasks.tasks("browser-1", "corrupt")[0]
    assert services.tasks.wait(task.id, 600).status == "done", task.error
    items, keep, status, timer = corrupt.poll_preview(services, shared, client="browser-1", request=request())
    assert timer.active is False
    return items, keep, status


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def services(tmp_path, demo_dir):
    shutil.copytree(demo_dir, tmp_path / "data" / "models" / "demo-sd")
    svc = Services.open(tmp_path / "data")
    yield svc
    svc.tasks.close()
    svc.close()


@pytest.fixture
def picked(services):
    from PIL import Image
    from skimage import data

    shared = Shared(session=None, browser_session=None, per_browser=PerBrowser())
    sid = services.store.create_session("corrupt-tab").id
    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.LANCZOS))
    (rec,) = services.store.add_images(sid, [NewImage(rgb=rgb, source="uploaded")])
    status, caption = corrupt.pick_image(services, shared, sid, SimpleNamespace(index=0), request=request())
    assert f"#{rec.id}" in status and caption == ""
    return shared, sid, rec.id


def test_the_caption_box_saves_to_the_store_and_comes_back_on_pick(services, picked):
    shared, sid, image_id = picked
    assert "saved" in corrupt.store_caption(services, shared, "an astronaut", request=request())
    assert services.store.get_image(image_id).caption == "an astronaut"
    _, caption = corrupt.pick_image(services, shared, sid, SimpleNamespace(index=0), request=request())
    assert caption == "an astronaut"


def test_preview_uses_the_caption_and_preset_and_add_stores_them_with_the_figures(services, picked):
    shared, sid, image_id = picked
    items, _, status = run_preview(services, shared, sid, "random blobs", "", 0.5, "renoise", 10, 2, 1.0, 1,
                                   "0,1", 64, False, "renoise-fast", 3, "an astronaut")
    assert len(items) == 6  # per seed: original, corrupted, |difference to the uncorrupted resample|
    assert "preset renoise-fast" in status and "IoU with the requested region" in status
    assert "against the uncorrupted resample" in status and "'an astronaut'" in status
    view = corrupt._view(shared, request())
    result = view.results[0]
    assert (result.params.prompt, result.params.preset, result.params.num_reg_steps) == ("an astronaut", "renoise-fast", 0)
    diff = np.abs(result.image.astype(int) - result.uncorrupted.astype(int)).max(axis=2)
    assert np.array_equal(items[2][0][..., 0], diff.astype(np.uint8))

    assert "Added 1" in corrupt.add_to_dataset(services, shared, sid, ["1"], request=request())
    child = [r for r in services.store.list_images(sid) if r.source == "corrupted"][0]
    assert child.parent_id == image_id and child.caption == "an astronaut"
    assert child.params["preset"] == "renoise-fast" and child.params["seed"] == 1
    assert child.params["region_iou"] == view.results[1].region_iou
    assert "confinement_vs_resample" in child.params and "confinement_vs_input" in child.params
    (mask,) = services.store.list_masks(child.id)
    assert np.array_equal(services.store.load_mask(mask.id), view.results[1].mask)
