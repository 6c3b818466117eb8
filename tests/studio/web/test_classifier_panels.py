"""The classifier panels (called directly, no browser): Label Suggest/Accept, Inspect classes per detector
region, Sessions per-class counts, Train feedback launch validation."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradio.exceptions import Error as GrError

from engines.classification import classify as C
from studio.services import Services
from studio.store.records import NewImage, NewMask
from studio.web.tabs import classifier_panels as P
from studio.web.tabs import inspect, label, label_screen
from studio.web.tabs.common import PerBrowser, Shared

TAX = [{"name": "red", "definition": "a red blob"}, {"name": "blue", "definition": "a blue blob"}]


def request(name: str = "browser-1"):
    return SimpleNamespace(session_hash=name)


@pytest.fixture
def services(tmp_path):
    svc = Services.open(tmp_path / "data")
    yield svc
    svc.close()


@pytest.fixture
def shared():
    shared = Shared(session=None, browser_session=None, per_browser=PerBrowser())
    yield shared
    for slot in shared.per_browser._items.values():
        view = slot.get(label_screen.VIEW_KEY)
        if view is not None and getattr(view, "masker", None) is not None:
            view.masker.close()
            view.masker.wait_prefetch(10)


@pytest.fixture
def head(tmp_path):
    torch.manual_seed(0)
    spec = C.ClassifierSpec(family="head", classes=tuple(TAX), input_size=32, threshold=0.01)
    return f"head:{C.save_head(C.build_crop_net(2, 8), spec, tmp_path / 'head', width=8)}"


@pytest.fixture
def labelled(services):
    sid = services.store.create_session("panels").id
    services.store.set_session_taxonomy(sid, TAX)
    rgb = np.full((40, 48, 3), 120, np.uint8)
    mask = np.zeros((40, 48), bool)
    mask[10:20, 10:24] = True
    rgb[mask] = (230, 30, 30)
    (rec,) = services.store.add_images(sid, [NewImage(rgb=rgb, source="uploaded", masks=(
        NewMask(mask=mask, author="human", class_name=None, caption="a patch"),))])
    return sid, rec.id


def test_suggest_writes_nothing_and_accept_sets_class_and_author(services, shared, labelled, head):
    sid, image_id = labelled
    req = request()
    label.open_first(services, shared, sid, "session order", None, request=req)
    before = services.store.label_state(image_id)
    text = P.suggest_region(services, shared, sid, head, request=req)
    assert "red" in text and "blue" in text and "classifier-assisted" in text
    assert services.store.label_state(image_id) == before  # a suggestion is not an edit
    screen = P.accept_suggestion(services, shared, sid, request=req)
    (region,) = services.store.label_state(image_id).regions
    assert region.author == "classifier-assisted" and region.class_name in ("red", "blue")
    assert region.caption == "a patch"  # a caption the person wrote is kept
    assert screen[-1] == "" and "classifier-assisted" in screen[7]
    with pytest.raises(GrError, match="Ask for a suggestion first"):
        P.accept_suggestion(services, shared, sid, request=req)  # one suggestion, one accept
    services.store.undo(image_id)
    assert services.store.label_state(image_id).regions[0].author == "human"  # undoable like any edit


def test_accept_refuses_a_changed_region(services, shared, labelled, head):
    sid, image_id = labelled
    req = request()
    label.open_first(services, shared, sid, "session order", None, request=req)
    P.suggest_region(services, shared, sid, head, request=req)
    (region,) = services.store.label_state(image_id).regions
    services.store.edit_regions(image_id, update={region.key: {"mask": np.eye(40, 48, dtype=bool)}})
    with pytest.raises(GrError, match="region changed"):
        P.accept_suggestion(services, shared, sid, request=req)
    assert services.store.label_state(image_id).regions[0].author == "human"


def test_inspect_classifies_detector_regions_and_sessions_count_classes(services, shared, labelled, head):
    sid, image_id = labelled
    req = request()
    view = inspect.view_of(shared, req)
    view.image_id, view.rgb = image_id, services.store.load_rgb(image_id)
    view.scores = np.zeros((40, 48), np.float32)
    view.scores[5:15, 5:15] = 0.9
    view.scores[25:35, 30:40] = 0.7
    rows, note = P.classify_regions(services, shared, sid, head, 0.5, request=req)
    assert [r[0] for r in rows] == ["R1", "R2"] and all(r[1] in ("red", "blue") for r in rows)
    assert head.split(":", 1)[1] in note
    assert P.class_counts(services, sid) == [["unclassified", 1]]
    (region,) = services.store.label_state(image_id).regions
    services.store.edit_regions(image_id, update={region.key: {"class_name": "red"}})
    assert P.class_counts(services, sid) == [["red", 1]]
    with pytest.raises(GrError, match="Give at least one prompt"):
        P.launch_feedback(services, "  \n", "demo", "demo", 2)
    with pytest.raises(GrError, match="does not exist"):
        P.launch_feedback(services, "a cat\na dog", "vlm:/nowhere/model", "demo", 2)
    assert services.store.list_jobs() == []  # refused before a job existed
