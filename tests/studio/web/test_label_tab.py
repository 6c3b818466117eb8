"""Label tab handlers, called directly (no browser): queue, SAM-style clicks with the superpixel masker,
regions with class and caption, brush strokes at native size, undo/redo, detector drafts and heatmaps,
the agreement view and the session taxonomy."""
from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from gradio.exceptions import Error as GrError

from engines.detection.detect import score_image
from studio.services import Services, default_taxonomy
from studio.store.records import NewImage
from engines.detection.detect import mask_edges
from studio.web.tabs import label, label_screen
from studio.web.tabs.common import PerBrowser, Shared

H, W = 40, 48
SQUARE = (slice(10, 26), slice(14, 34))  # rows, cols of the bright square in every image


def picture(seed: int) -> np.ndarray:
    """A dark, slightly noisy background with a bright orange square: superpixels find the square."""
    rng = np.random.default_rng(seed)
    rgb = np.full((H, W, 3), (30, 40, 60), np.uint8) + rng.integers(0, 6, (H, W, 3), dtype=np.uint8)
    rgb[SQUARE] = (240, 150, 30)
    rgb[0, 0] = (seed, seed, seed)  # distinct sha256 per image
    return rgb


def request(name: str = "browser-1"):
    return SimpleNamespace(session_hash=name)


def select(x: int, y: int):
    """The part of gr.SelectData the click handler reads."""
    return SimpleNamespace(index=(x, y))


def choices(update) -> list:
    return [c[0] if isinstance(c, (tuple, list)) else c for c in update.choices]


@pytest.fixture
def services(tmp_path):
    svc = Services.open(tmp_path / "data")
    yield svc
    svc.close()


@pytest.fixture
def shared():
    shared = Shared(session=None, browser_session=None, per_browser=PerBrowser())
    yield shared
    for slot in shared.per_browser._items.values():  # stop prefetch workers before tmp_path goes away
        view = slot.get(label_screen.VIEW_KEY)
        if view is not None and view.masker is not None:
            view.masker.close()
            view.masker.wait_prefetch(10)


@pytest.fixture
def session(services):
    info = services.store.create_session("label-tab")
    recs = services.store.add_images(info.id, [NewImage(rgb=picture(i), source="uploaded") for i in range(3)])
    return info.id, [r.id for r in recs]


def view_of(shared, req) -> label.LabelView:
    return label.view_of(shared, req)


def state(services, image_id):
    return services.store.label_state(image_id)


def opened(services, shared, sid, req, order="session order"):
    out = label.open_first(services, shared, sid, order, None, request=req)
    assert len(out) == 13
    return out


# ------------------------------------------------------------------ opening and the queue
def test_open_first_opens_the_first_unlabelled_image(services, shared, session):
    sid, (a, b, c) = session
    services.store.mark_reviewed(a)  # labelled -> goes to the back of "unlabelled first"
    assert label.queue(services, sid, "unlabelled first") == [b, c, a]
    req = request()
    out = label.open_first(services, shared, sid, "unlabelled first", None, request=req)
    assert len(out) == 13 and out[-1] == b
    canvas = out[0]
    assert canvas.shape == (H, W, 3) and canvas.dtype == np.uint8
    assert np.array_equal(canvas, picture(1))  # no regions, no clicks: the image itself
    assert json.loads(out[11]) == default_taxonomy()
    assert "1 of 3 labelled" in out[6]
    view = view_of(shared, req)
    assert view.image_id == b and view.masker is not None and view.masker.approximate
    assert "Approximate" in out[8]
    # the same browser keeps its image; a remembered image is reopened for a new browser
    assert label.open_first(services, shared, sid, "session order", None, request=req)[-1] == b
    assert label.open_first(services, shared, sid, "unlabelled first", c, request=request("other"))[-1] == c
    # no session selected: blank outputs, same arity, the remembered place stays
    blank = label.open_first(services, shared, None, "unlabelled first", None, request=request("x"))
    assert len(blank) == 13 and blank[0] is None and blank[-1] == gr.skip()
    # a session change while the page loads (the browser's place not read yet) never overwrites the place
    out = label.open_for_session(services, shared, sid, "session order", None, request=request("loading"))
    assert out[-1] == gr.skip() and view_of(shared, request("loading")).image_id == a
    assert label.open_for_session(services, shared, sid, "session order", c, request=request("loaded"))[-1] == c


def test_step_wraps_around_both_ways(services, shared, session):
    sid, ids = session
    req = request()
    assert opened(services, shared, sid, req)[-1] == ids[0]
    seen = [label.step(services, shared, +1, sid, "session order", None, request=req)[-1] for _ in range(3)]
    assert seen == [ids[1], ids[2], ids[0]]
    back = [label.step(services, shared, -1, sid, "session order", None, request=req)[-1] for _ in range(3)]
    assert back == [ids[2], ids[1], ids[0]]
    assert view_of(shared, req).image_id == ids[0]
    with pytest.raises(GrError, match="No session"):
        label.step(services, shared, +1, None, "session order", None, request=req)


def test_detector_uncertainty_puts_the_most_uncertain_first_and_unscored_last(services, shared, session):
    sid, (a, b, c) = session
    services.store.add_detector_run("demo", "upernet", True, heatmaps=[(a, np.full((H, W), 0.9, np.float32)),
                                                                      (b, np.full((H, W), 0.55, np.float32))])
    # a newer trajectory map of a at 0.5 is not a detector heatmap and must not count
    services.store.add_detector_run("trajectory", "trajectory", True, heatmaps=[(a, np.full((H, W), 0.5, np.float32))])
    assert label.queue(services, sid, "detector uncertainty") == [b, a, c]
    assert label.queue(services, sid, "session order") == [a, b, c]
    out = label.open_first(services, shared, sid, "detector uncertainty", None, request=request("fresh"))
    assert out[-1] == b


# ------------------------------------------------------------------ clicks, proposals, regions
def test_click_proposals_and_a_new_region(services, shared, session):
    sid, ids = session
    req = request()
    opened(services, shared, sid, req)
    image_id = ids[0]
    with pytest.raises(GrError, match="Click the image first"):
        label.use_proposal(services, shared, "new", sid, None, "", request=req)
    screen = label.click(services, shared, sid, "positive", select(20, 15), request=req)
    assert len(screen) == 9
    view = view_of(shared, req)
    assert 1 <= len(view.proposals) <= 3 and view.points == [(20, 15)] and view.labels == [1]
    best = view.proposals[0].mask
    assert best.shape == (H, W) and best.dtype == np.bool_ and best[15, 20]
    assert len(choices(screen[5])) == len(view.proposals)
    assert tuple(screen[0][15, 20]) != tuple(picture(0)[15, 20])  # proposal drawn (cyan tint / dot)
    assert state(services, image_id).regions == ()

    screen = label.use_proposal(services, shared, "new", sid, "blur", "a smear", request=req)
    (region,) = state(services, image_id).regions
    assert (region.author, region.class_name, region.caption) == ("human", "blur", "a smear")  # superpixels: approximate
    assert np.array_equal(services.store.load_mask(region.mask_id), best)
    assert view.selected == region.key and view.proposals == [] and view.points == []
    assert screen[1].value.split(" ")[0] == region.key and screen[7] == "Saved."
    assert services.store.is_labelled(image_id)


def expected_strokes(layer: np.ndarray) -> np.ndarray:
    return layer[..., 3] > 0


def test_save_class_caption_apply_strokes_undo_redo_and_delete(services, shared, session):
    sid, ids = session
    req = request()
    opened(services, shared, sid, req)
    image_id = ids[0]
    label.click(services, shared, sid, "positive", select(20, 15), request=req)
    label.use_proposal(services, shared, "new", sid, None, "", request=req)
    (region,) = state(services, image_id).regions
    first_mask = services.store.load_mask(region.mask_id)
    assert (region.class_name, region.caption) == (None, None)

    screen = label.save_class_caption(services, shared, sid, "Localized Blur", "  six fingers  ", request=req)
    (r,) = state(services, image_id).regions
    assert (r.key, r.mask_id, r.class_name, r.caption) == (region.key, region.mask_id, "Localized Blur", "six fingers")
    assert screen[3] == "six fingers" and screen[2].value == "Localized Blur"
    assert screen[4].startswith("*Localized Blur*:")  # the class definition stays shown after saving

    # brush strokes at native size are added to the selected region as a new mask version
    layer = np.zeros((H, W, 4), np.uint8)
    layer[30:35, 2:8] = (255, 48, 48, 255)
    out = label.apply_strokes(services, shared, sid, {"background": picture(0), "layers": [layer], "composite": None},
                              "add to selected region (or new)", "Localized Blur", "", request=req)
    assert len(out) == 10 and out[-1]["layers"] == []
    background = out[-1]["background"]  # the brush canvas shows the image with its regions drawn on it
    assert background.shape == picture(0).shape
    assert not np.array_equal(background[first_mask], picture(0)[first_mask])
    assert np.array_equal(background[~mask_edges(first_mask) & ~first_mask & ~expected_strokes(layer)],
                          picture(0)[~mask_edges(first_mask) & ~first_mask & ~expected_strokes(layer)])
    (r2,) = state(services, image_id).regions
    expected = first_mask.copy()
    expected[30:35, 2:8] = True
    assert r2.key == region.key and r2.mask_id > region.mask_id and (r2.class_name, r2.caption) == ("Localized Blur", "six fingers")
    assert np.array_equal(services.store.load_mask(r2.mask_id), expected)
    ys, xs = np.nonzero(expected)
    assert r2.bbox == (xs.min(), ys.min(), xs.max(), ys.max())

    # a layer at another size is refused and nothing is applied
    before = state(services, image_id)
    n_masks = len(services.store.list_masks(image_id))
    small = np.zeros((H // 2, W // 2, 4), np.uint8)
    small[1:4, 1:4, 3] = 255
    with pytest.raises(GrError) as err:
        label.apply_strokes(services, shared, sid, {"layers": [small]}, "add to selected region (or new)", None, "",
                            request=req)
    assert "nothing was applied" in err.value.message
    assert state(services, image_id) == before and len(services.store.list_masks(image_id)) == n_masks
    with pytest.raises(GrError, match="Paint on the image first"):
        label.apply_strokes(services, shared, sid, {"layers": [np.zeros((H, W, 4), np.uint8)]},
                            "add to selected region (or new)", None, "", request=req)

    # erasing the strokes again
    label.apply_strokes(services, shared, sid, {"layers": [layer]}, "erase from selected region", None, "",
                        request=req)
    (r3,) = state(services, image_id).regions
    assert r3.key == region.key and r3.mask_id > r2.mask_id
    assert np.array_equal(services.store.load_mask(r3.mask_id), first_mask & ~(layer[..., 3] > 0))

    # undo twice: back to before the strokes; redo once: strokes again
    screen = label.undo_redo(services, shared, "undo", sid, request=req)
    assert state(services, image_id).regions[0].mask_id == r2.mask_id and screen[7] == "Undo: brush subtract."
    label.undo_redo(services, shared, "undo", sid, request=req)
    assert state(services, image_id).regions == (r,)
    screen = label.undo_redo(services, shared, "redo", sid, request=req)
    assert state(services, image_id).regions == (r2,) and screen[7] == "Redo: brush add."
    label.undo_redo(services, shared, "redo", sid, request=req)
    assert label.undo_redo(services, shared, "redo", sid, request=req)[7] == "Nothing to redo."

    screen = label.delete_region(services, shared, sid, request=req)
    assert state(services, image_id).regions == () and view_of(shared, req).selected is None
    assert choices(screen[1]) == []
    with pytest.raises(GrError, match="Select a region"):
        label.delete_region(services, shared, sid, request=req)
    label.undo_redo(services, shared, "undo", sid, request=req)
    assert [x.key for x in state(services, image_id).regions] == [region.key]
    assert view_of(shared, req).selected == region.key


def test_strokes_without_a_selected_region_make_a_new_human_region(services, shared, session):
    sid, ids = session
    req = request()
    opened(services, shared, sid, req)
    layer = np.zeros((H, W, 4), np.uint8)
    layer[5:9, 40:46, 3] = 200
    label.apply_strokes(services, shared, sid, {"layers": [layer]}, "add to selected region (or new)", "blur", "x",
                        request=req)
    (r,) = state(services, ids[0]).regions
    assert (r.author, r.class_name, r.caption, r.bbox) == ("human", "blur", "x", (40, 5, 45, 8))


def test_handlers_need_an_open_image(services, shared, session):
    sid, _ = session
    with pytest.raises(GrError, match="Open an image first"):
        label.click(services, shared, sid, "positive", select(1, 1), request=request("nobody"))
    with pytest.raises(GrError, match="Open an image first"):
        label.undo_redo(services, shared, "undo", sid, request=request("nobody"))


def test_undo_of_the_first_region_removes_it(services, shared, session):
    sid, ids = session
    req = request()
    opened(services, shared, sid, req)
    label.click(services, shared, sid, "positive", select(20, 15), request=req)
    label.use_proposal(services, shared, "new", sid, None, "", request=req)
    label.undo_redo(services, shared, "undo", sid, request=req)
    assert state(services, ids[0]).regions == ()


# ------------------------------------------------------------------ detector drafts and heatmaps
def test_accept_drafts_then_none_left(services, shared, session):
    sid, ids = session
    image_id = ids[0]
    draft = np.zeros((H, W), bool)
    draft[2:7, 3:12] = True
    services.store.add_mask(image_id, draft, "detector", "blur", "from inspect", status="draft")
    req = request()
    out = opened(services, shared, sid, req)
    assert out[10] == "1 draft region(s) from Inspect waiting."
    assert "1 draft region(s) from Inspect waiting" in out[6]  # also on the always-visible progress line
    assert state(services, image_id).regions == ()  # drafts are not regions
    out = label.accept_drafts(services, shared, sid, request=req)
    assert len(out) == 11 and out[9] == "No drafts from Inspect for this image." and "draft" not in out[6]
    (r,) = state(services, image_id).regions
    assert (r.author, r.class_name, r.caption, r.bbox) == ("detector", "blur", "from inspect", (3, 2, 11, 6))
    assert np.array_equal(services.store.load_mask(r.mask_id), draft)
    assert view_of(shared, req).selected == r.key
    with pytest.raises(GrError, match="No draft regions"):
        label.accept_drafts(services, shared, sid, request=req)
    assert len(state(services, image_id).regions) == 1


def test_region_from_the_latest_non_trajectory_heatmap(services, shared, session):
    sid, ids = session
    image_id = ids[0]
    req = request()
    opened(services, shared, sid, req)
    with pytest.raises(GrError, match="no detector heatmap"):
        label.region_from_heatmap(services, shared, sid, 0.5, None, "", request=req)
    old = np.full((H, W), 0.1, np.float32)
    old[:, :10] = 0.9
    latest = np.full((H, W), 0.2, np.float32)
    latest[20:30, 5:25] = 0.8
    trajectory = np.full((H, W), 0.95, np.float32)
    services.store.add_detector_run("demo", "upernet", True, heatmaps=[(image_id, old)])
    services.store.add_detector_run("demo", "upernet", True, heatmaps=[(image_id, latest)])
    services.store.add_detector_run("trajectory", "trajectory", True, heatmaps=[(image_id, trajectory)])
    with pytest.raises(GrError, match="lower the threshold"):
        label.region_from_heatmap(services, shared, sid, 0.85, None, "", request=req)
    label.region_from_heatmap(services, shared, sid, 0.5, "texture", "smeared", request=req)
    (r,) = state(services, image_id).regions
    assert (r.author, r.class_name, r.caption, r.bbox) == ("detector", "texture", "smeared", (5, 20, 24, 29))
    assert np.array_equal(services.store.load_mask(r.mask_id), latest >= 0.5)


def test_agreement_image_and_iou_match_score_image(services, shared, session):
    sid, ids = session
    image_id = ids[0]
    req = request()
    opened(services, shared, sid, req)
    heat = np.full((H, W), 0.1, np.float32)
    heat[10:30, 10:30] = 0.7
    services.store.add_detector_run("demo", "upernet", True, heatmaps=[(image_id, heat)])
    layer = np.zeros((H, W, 4), np.uint8)
    layer[20:38, 20:40, 3] = 255
    label.apply_strokes(services, shared, sid, {"layers": [layer]}, "add to selected region (or new)", None, "",
                        request=req)
    layer2 = np.zeros((H, W, 4), np.uint8)
    layer2[0:4, 0:4, 3] = 255
    view_of(shared, req).selected = None  # a second, separate region
    label.apply_strokes(services, shared, sid, {"layers": [layer2]}, "add to selected region (or new)", None, "",
                        request=req)
    assert len(state(services, image_id).regions) == 2
    img, text = label.agreement(services, shared, 0.5, request=req)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    detector = heat >= 0.5
    human = (layer[..., 3] > 0) | (layer2[..., 3] > 0)
    score = score_image(detector, human)
    assert (score.tp, score.fp, score.fn) == (100, 300, 276)
    assert f"IoU **{score.iou:.3f}**" in text and "IoU **0.148**" in text
    assert f"both {score.tp} px" in text and f"detector only {score.fp} px" in text and f"human only {score.fn} px" in text
    assert tuple(img[25, 25]) == (40, 220, 60) and tuple(img[12, 12]) == (235, 50, 50)
    assert tuple(img[35, 35]) == (60, 120, 255) and tuple(img[1, 1]) == (60, 120, 255)
    np.testing.assert_array_equal(img[39, 0], (picture(0)[39, 0].astype(np.float32) * 0.45).astype(np.uint8))
    # a threshold above every score: IoU 0 with everything "human only"
    _, text = label.agreement(services, shared, 0.99, request=req)
    assert "IoU **0.000**" in text and f"human only {int(human.sum())} px" in text


# ------------------------------------------------------------------ taxonomy
def test_set_taxonomy_validates_and_updates_the_class_choices(services, shared, session):
    sid, _ = session
    other = services.store.create_session("other").id
    with pytest.raises(GrError, match="not valid JSON"):
        label.set_taxonomy(services, shared, sid, '[{"name": "blur",')
    with pytest.raises(GrError, match="must be a JSON list"):
        label.set_taxonomy(services, shared, sid, '{"name": "blur"}')
    with pytest.raises(GrError, match="unique, non-empty name"):
        label.set_taxonomy(services, shared, sid, '[{"name": "a"}, {"name": "a"}]')
    assert services.taxonomy(sid) == default_taxonomy()
    dropdown, message = label.set_taxonomy(services, shared, sid, json.dumps(
        [{"name": "hands", "definition": "wrong fingers"}, {"name": "text", "definition": "garbled"}]))
    assert isinstance(dropdown, gr.Dropdown) and choices(dropdown) == ["hands", "text"]
    assert message == "Saved a taxonomy of 2 classes."
    assert [c["name"] for c in services.taxonomy(sid)] == ["hands", "text"]
    assert services.taxonomy(other) == default_taxonomy()
    assert label.show_definition(services, sid, "hands") == "*hands*: wrong fingers"
    # the class dropdown of the open image follows the new taxonomy
    out = opened(services, shared, sid, request())
    assert choices(out[2]) == ["hands", "text"] and json.loads(out[11])[0]["name"] == "hands"
