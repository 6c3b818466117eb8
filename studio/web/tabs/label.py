"""Label tab: paint and fix artifact masks with SAM help, a class and caption per region.

Every edit is one undoable state in the store (undo/redo survive reloads and restarts). Masks are
bool[H, W] at the image's native resolution; clicks arrive in native pixel coordinates.
"""
from __future__ import annotations

import json

import gradio as gr
import numpy as np

from engines.detection.detect import score_image
from studio.store.records import NewMask
from studio.web.tabs import classifier_panels
from studio.web.tabs.label_screen import (LabelView, definition, need_image, pending_drafts, render,
                                          screen, selected_region, view_of)
from studio.web.tabs.common import GPU, Shared, bind, browser_state, remember_open, require_session, user_errors, wire

ORDERS = ["unlabelled first", "detector uncertainty", "session order"]
CLICK_MODES = ["positive", "negative", "box"]
KEYBOARD_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target; if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const ids = {n: 'label-next', ArrowRight: 'label-next', p: 'label-prev', ArrowLeft: 'label-prev',
               u: 'label-undo', y: 'label-redo', s: 'label-suggest', a: 'label-accept-suggestion'};
  const id = ids[e.key]; if (!id) return;
  const b = document.getElementById(id); if (b && b.offsetParent !== null) { b.click(); e.preventDefault(); }
});
</script>
"""
"""Keyboard shortcuts of the Label tab (n/→ next, p/← previous, u undo, y redo, s suggest a class, a accept
the suggestion), injected via launch(head=)."""


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes it (other tabs may have changed the session)."""
    with gr.Row():
        order = gr.Radio(ORDERS, value="unlabelled first", label="Queue order", scale=3, elem_id="label-order")
        prev = gr.Button("◀ Previous (p)", elem_id="label-prev", scale=1)
        nxt = gr.Button("Next (n) ▶", elem_id="label-next", scale=1)
        progress_md = gr.Markdown(elem_id="label-progress")
    with gr.Row():
        with gr.Column(scale=3):
            canvas = gr.Image(label="Click to prompt SAM (regions coloured, proposal in cyan)", type="numpy",
                              interactive=False, elem_id="label-canvas", height=560)
            with gr.Row():
                click_mode = gr.Radio(CLICK_MODES, value="positive", label="Click adds", scale=2)
                proposals = gr.Radio([], label="Proposals (best first)", elem_id="label-proposals", scale=2)
                clear = gr.Button("Clear clicks", scale=1)
            with gr.Row():
                as_new = gr.Button("New region from proposal", variant="primary", elem_id="label-new-region")
                add_to = gr.Button("Add to selected region")
                subtract = gr.Button("Subtract from selected region")
            segmenter_md = gr.Markdown(elem_id="label-segmenter")
            with gr.Accordion("Brush and eraser (native resolution)", open=False, elem_id="label-brush-box") as brush_box:
                editor = gr.ImageEditor(label="Paint strokes, then apply (existing regions are shown)", type="numpy",
                                        layers=False, transforms=(), elem_id="label-editor", height=560,
                                        brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=12),
                                        eraser=gr.Eraser(default_size=12))
                with gr.Row():
                    stroke_mode = gr.Radio(["add to selected region (or new)", "erase from selected region"],
                                           value="add to selected region (or new)", label="Strokes")
                    apply = gr.Button("Apply strokes", elem_id="label-apply-strokes")
        with gr.Column(scale=2):
            regions = gr.Radio([], label="Regions of this image", elem_id="label-regions")
            class_name = gr.Dropdown([], label="Class", allow_custom_value=False, elem_id="label-class")
            definition = gr.Markdown(elem_id="label-definition")
            caption = gr.Textbox(label="Caption", lines=2, placeholder="the left hand has six fingers",
                                 elem_id="label-caption")
            save_meta = gr.Button("Save class and caption", variant="primary", elem_id="label-save")
            with gr.Row():
                undo = gr.Button("Undo (u)", elem_id="label-undo")
                redo = gr.Button("Redo (y)", elem_id="label-redo")
                delete = gr.Button("Delete region", variant="stop")
            reviewed = gr.Button("Done: no more artifacts here", elem_id="label-reviewed")
            status = gr.Markdown(elem_id="label-status")
            with gr.Accordion("Start from the detector", open=False, elem_id="label-detector-box") as detector_box:
                drafts_md = gr.Markdown(elem_id="label-drafts")
                accept = gr.Button("Accept draft regions sent from Inspect", elem_id="label-accept-drafts")
                heat_threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Heatmap threshold")
                from_heatmap = gr.Button("Add thresholded heatmap as a region")
            with gr.Accordion("Agreement: human vs detector", open=False, elem_id="label-agreement-box") as agree_box:
                agree_threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Detector threshold")
                agree = gr.Button("Show agreement", elem_id="label-agree")
                agree_img = gr.Image(label="green = both, red = detector only, blue = human only", type="numpy",
                                     interactive=False, elem_id="label-agreement")
                agree_md = gr.Markdown(elem_id="label-agreement-iou")
            with gr.Accordion("Taxonomy of this session", open=False, elem_id="label-taxonomy-box") as taxonomy_box:
                taxonomy = gr.Code(language="json", label="Classes (name + definition)", lines=12)
                save_taxonomy = gr.Button("Save taxonomy")
            suggest_panel = classifier_panels.label_suggest_panel(services)

    remembered = browser_state(shared, None, "label-image")
    remembered_order = browser_state(shared, None, "label-order")
    screen = [canvas, regions, class_name, caption, definition, proposals, progress_md, status, segmenter_md]
    sess = shared.session
    nav_inputs = [sess, order, remembered]
    open_outputs = [*screen, editor, drafts_md, taxonomy, remembered]
    wire(sess.change, bind(open_for_session, services, shared), inputs=nav_inputs, outputs=open_outputs, status=status)
    wire(tab.select, bind(open_first, services, shared), inputs=nav_inputs, outputs=open_outputs, status=status)
    wire(order.input, bind(open_first, services, shared), inputs=nav_inputs, outputs=open_outputs, status=status)
    wire(order.input, remember_order, inputs=[order], outputs=[remembered_order], queue=False)
    if shared.demo is not None:
        wire(shared.demo.load, restore_order, inputs=[remembered_order], outputs=[order], queue=False)
    wire(nxt.click, bind(step, services, shared, +1), inputs=nav_inputs, outputs=open_outputs, status=status)
    wire(prev.click, bind(step, services, shared, -1), inputs=nav_inputs, outputs=open_outputs, status=status)
    wire(canvas.select, bind(click, services, shared), inputs=[sess, click_mode], outputs=screen, status=status,
         concurrency_id=GPU, concurrency_limit=1)
    wire(proposals.input, bind(choose_proposal, services, shared), inputs=[sess, proposals], outputs=screen, status=status)
    wire(clear.click, bind(clear_clicks, services, shared), inputs=[sess], outputs=screen, status=status)
    for button, how in ((as_new, "new"), (add_to, "add"), (subtract, "subtract")):
        wire(button.click, bind(use_proposal, services, shared, how), inputs=[sess, class_name, caption],
             outputs=[*screen, editor], status=status)
    wire(apply.click, bind(apply_strokes, services, shared), inputs=[sess, editor, stroke_mode, class_name, caption],
         outputs=[*screen, editor], status=status)
    wire(regions.input, bind(select_region, services, shared), inputs=[sess, regions], outputs=screen, status=status)
    wire(class_name.change, bind(show_definition, services), inputs=[sess, class_name], outputs=[definition])
    wire(save_meta.click, bind(save_class_caption, services, shared), inputs=[sess, class_name, caption],
         outputs=screen, status=status)
    for button, which in ((undo, "undo"), (redo, "redo")):
        wire(button.click, bind(undo_redo, services, shared, which), inputs=[sess], outputs=[*screen, editor],
             status=status)
    wire(delete.click, bind(delete_region, services, shared), inputs=[sess], outputs=[*screen, editor], status=status)
    wire(reviewed.click, bind(mark_reviewed, services, shared), inputs=[sess], outputs=screen, status=status)
    wire(accept.click, bind(accept_drafts, services, shared), inputs=[sess], outputs=[*screen, drafts_md, editor],
         status=status)
    wire(from_heatmap.click, bind(region_from_heatmap, services, shared), inputs=[sess, heat_threshold, class_name, caption],
         outputs=[*screen, editor], status=status)
    wire(agree.click, bind(agreement, services, shared), inputs=[agree_threshold], outputs=[agree_img, agree_md],
         status=agree_md)
    wire(save_taxonomy.click, bind(set_taxonomy, services, shared), inputs=[sess, taxonomy], outputs=[class_name, status],
         status=status)
    remember_open(shared, "label", {"brush": brush_box, "detector": detector_box, "agreement": agree_box,
                                    "taxonomy": taxonomy_box})
    classifier_panels.wire_label_suggest(services, shared, suggest_panel, screen, status)


def remember_order(order: str) -> str:
    return order


def restore_order(remembered):
    """Page load: the queue order this browser chose last (its change re-opens the remembered image)."""
    return gr.Radio(value=remembered) if remembered in ORDERS else gr.skip()


# ---------------------------------------------------------------------------------------------- queue

def queue(services, session_id: int, order: str) -> list[int]:
    """Image ids of the session in the chosen order."""
    records = services.store.list_images(session_id)
    ids = [r.id for r in records]
    if order == "unlabelled first":
        return sorted(ids, key=lambda i: (services.store.is_labelled(i), i))
    if order == "detector uncertainty":
        def uncertainty(image_id: int) -> float:
            maps = [h for h in services.store.list_heatmaps(image_id) if h.family != "trajectory"]
            if not maps:
                return -1.0
            scores = services.store.load_heatmap(maps[0].id)
            return float(np.mean(1.0 - np.abs(2.0 * scores - 1.0)))  # 1 = all pixels at 0.5, 0 = all certain
        return sorted(ids, key=lambda i: (-uncertainty(i), i))
    return ids


@user_errors
def open_first(services, shared: Shared, session_id, order, remembered=None, request: gr.Request = None):
    """Open the image this browser had open (kept across reloads), else the first of the queue."""
    if session_id in (None, ""):
        return _blank()
    sid = int(session_id)
    ids = queue(services, sid, order)
    view = view_of(shared, request)
    if not ids:
        view.image_id, view.rgb = None, None
        return _blank("This session has no images yet.")
    target = remembered if remembered in ids else (view.image_id if view.image_id in ids else ids[0])
    if target != view.image_id or view.rgb is None:
        _open(services, view, target, _upcoming(ids, target))
    return _open_outputs(services, view, sid)


def open_for_session(services, shared: Shared, session_id, order, remembered=None, request: gr.Request = None):
    """The current session changed (also while the page loads, when the browser's remembered place may not
    have been read yet): open its image like `open_first`, but an unknown place is never overwritten."""
    out = open_first(services, shared, session_id, order, remembered, request=request)
    return (*out[:-1], gr.skip()) if remembered in (None, "") else out


@user_errors
def step(services, shared: Shared, delta: int, session_id, order, remembered=None, request: gr.Request = None):
    sid = require_session(session_id)
    ids = queue(services, sid, order)
    if not ids:
        return _blank("This session has no images yet.")
    view = view_of(shared, request)
    pos = ids.index(view.image_id) if view.image_id in ids else -delta
    target = ids[(pos + delta) % len(ids)]
    _open(services, view, target, _upcoming(ids, target))
    return _open_outputs(services, view, sid)


def _upcoming(ids: list[int], current: int, n: int = 2) -> list[int]:
    i = ids.index(current)
    return [ids[(i + k) % len(ids)] for k in range(1, n + 1) if ids[(i + k) % len(ids)] != current]


def _open(services, view: LabelView, image_id: int, upcoming: list[int] = ()) -> None:
    """Open an image: its embedding is computed (or read from cache) now; the next images of the
    queue are embedded in the background so moving on is instant."""
    view.image_id, view.rgb = image_id, services.store.load_rgb(image_id)
    view.points, view.labels, view.box_corner, view.box, view.proposals, view.chosen = [], [], None, None, [], 0
    state = services.store.label_state(image_id)
    view.selected = state.regions[0].key if state.regions else None
    if view.masker is not None and view.masker.backend is not services.segmenter_backend():
        view.masker.close()  # the segmenter was switched in the Models tab
        view.masker = None
    if view.masker is None:
        view.masker = services.new_masker()
    view.masker.set_image(view.rgb)
    if upcoming:
        view.masker.prefetch([services.store.load_rgb(i) for i in upcoming])


# ---------------------------------------------------------------------------------------------- SAM prompts

@user_errors
def click(services, shared: Shared, session_id, mode: str, evt: gr.SelectData, request: gr.Request = None):
    """A click on the image: a positive/negative point or a box corner; proposals update at once."""
    view = need_image(shared, request)
    x, y = int(evt.index[0]), int(evt.index[1])
    if mode == "box":
        if view.box_corner is None:
            view.box_corner = (x, y)
            return screen(services, view, "Box: click the opposite corner.")
        (x0, y0), view.box_corner = view.box_corner, None
        view.box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
    else:
        view.points.append((x, y))
        view.labels.append(1 if mode == "positive" else 0)
    with services.gpu_lock:
        view.proposals = view.masker.predict(view.points or None, view.labels or None, box=view.box)
    view.chosen = 0
    return screen(services, view, f"{len(view.proposals)} proposal(s).")


@user_errors
def choose_proposal(services, shared: Shared, session_id, choice, request: gr.Request = None):
    view = need_image(shared, request)
    if choice:
        view.chosen = int(str(choice).split(" ")[0]) - 1
    return screen(services, view)


@user_errors
def clear_clicks(services, shared: Shared, session_id, request: gr.Request = None):
    view = need_image(shared, request)
    view.points, view.labels, view.box_corner, view.box, view.proposals = [], [], None, None, []
    return screen(services, view, "Clicks cleared.")


@user_errors
def use_proposal(services, shared: Shared, how: str, session_id, class_name, caption, request: gr.Request = None):
    """Turn the chosen proposal into a new region, or add it to / subtract it from the selected one."""
    view = need_image(shared, request)
    if not view.proposals:
        raise ValueError("Click the image first to get a proposal.")
    mask = view.proposals[min(view.chosen, len(view.proposals) - 1)].mask
    author = "human" if getattr(view.masker, "approximate", False) else "sam-assisted"
    _apply_mask(services, view, mask, how, author, class_name, caption, f"{how} SAM proposal")
    view.points, view.labels, view.box, view.proposals = [], [], None, []
    return (*screen(services, view, "Saved."), _editor_value(services, view))


def _apply_mask(services, view: LabelView, mask: np.ndarray, how: str, author: str, class_name, caption,
                action: str) -> None:
    store = services.store
    if how == "new" or view.selected is None:
        if how == "subtract":
            raise ValueError("Select a region to subtract from.")
        state = store.edit_regions(view.image_id, add=[NewMask(mask=mask, author=author, class_name=class_name or None,
                                                               caption=caption or None)], action=action)
        view.selected = state.regions[-1].key
        return
    region = selected_region(services, view)
    current = store.load_mask(region.mask_id)
    new = current | mask if how == "add" else current & ~mask
    if not new.any():
        store.edit_regions(view.image_id, remove=[region.key], action=f"{action} (region emptied)")
        view.selected = None
        return
    store.edit_regions(view.image_id, update={region.key: {"mask": new, "author": author}}, action=action)


@user_errors
def apply_strokes(services, shared: Shared, session_id, editor_value, mode: str, class_name, caption,
                  request: gr.Request = None):
    """Brush strokes (any opaque pixel of the paint layer) added to or erased from the selected region."""
    view = need_image(shared, request)
    strokes = painted_mask(editor_value, view.rgb.shape[:2])
    if not strokes.any():
        raise ValueError("Paint on the image first (choose the brush in the editor toolbar).")
    how = "subtract" if mode.startswith("erase") else "add"
    _apply_mask(services, view, strokes, how, "human", class_name, caption, f"brush {how}")
    return (*screen(services, view, "Strokes applied."), _editor_value(services, view))


def painted_mask(editor_value, shape: tuple[int, int]) -> np.ndarray:
    """bool[H, W] of the painted pixels of an ImageEditor value, checked to be at native size."""
    layers = (editor_value or {}).get("layers") or []
    if not layers:
        return np.zeros(shape, bool)
    painted = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        painted |= layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[2] == 4 else layer.astype(bool).reshape(layer.shape[:2])
    if painted.shape != shape:
        raise ValueError(f"The editor returned strokes at {painted.shape[1]}x{painted.shape[0]} instead of the image's "
                         f"{shape[1]}x{shape[0]}; nothing was applied. Reload the image and paint again.")
    return painted


# ---------------------------------------------------------------------------------------------- regions

@user_errors
def select_region(services, shared: Shared, session_id, key, request: gr.Request = None):
    view = need_image(shared, request)
    view.selected = str(key).split(" ")[0] if key else None
    return screen(services, view)


@user_errors
def save_class_caption(services, shared: Shared, session_id, class_name, caption, request: gr.Request = None):
    view = need_image(shared, request)
    region = selected_region(services, view)
    services.store.edit_regions(view.image_id, update={region.key: {"class_name": class_name or None,
                                                                      "caption": (caption or "").strip() or None}},
                                action="set class and caption")
    return screen(services, view, f"Saved {region.key}.")


@user_errors
def delete_region(services, shared: Shared, session_id, request: gr.Request = None):
    view = need_image(shared, request)
    region = selected_region(services, view)
    services.store.edit_regions(view.image_id, remove=[region.key], action="delete region")
    view.selected = None
    return (*screen(services, view, f"Deleted {region.key} (undo brings it back)."), _editor_value(services, view))


@user_errors
def undo_redo(services, shared: Shared, which: str, session_id, request: gr.Request = None):
    view = need_image(shared, request)
    before = services.store.label_state(view.image_id)
    state = services.store.undo(view.image_id) if which == "undo" else services.store.redo(view.image_id)
    if state.seq == before.seq:
        return (*screen(services, view, f"Nothing to {which}."), gr.skip())
    if view.selected not in {r.key for r in state.regions}:
        view.selected = state.regions[0].key if state.regions else None
    done = before.action if which == "undo" else state.action
    return (*screen(services, view, f"{which.capitalize()}: {done}."), _editor_value(services, view))


@user_errors
def mark_reviewed(services, shared: Shared, session_id, request: gr.Request = None):
    view = need_image(shared, request)
    state = services.store.mark_reviewed(view.image_id)
    return screen(services, view, f"Marked as labelled with {len(state.regions)} region(s).")


@user_errors
def accept_drafts(services, shared: Shared, session_id, request: gr.Request = None):
    view = need_image(shared, request)
    drafts = pending_drafts(services, view.image_id)
    if not drafts:
        raise ValueError("No draft regions: send regions from the Inspect tab first.")
    adds = [NewMask(mask=services.store.load_mask(m.id), author="detector", class_name=m.class_name,
                    caption=m.caption) for m in drafts]
    state = services.store.edit_regions(view.image_id, add=adds, action=f"accept {len(adds)} detector draft(s)")
    view.selected = state.regions[-1].key
    return (*screen(services, view, f"Accepted {len(adds)} draft region(s)."), _drafts_note(services, view.image_id),
            _editor_value(services, view))


@user_errors
def region_from_heatmap(services, shared: Shared, session_id, threshold, class_name, caption,
                        request: gr.Request = None):
    view = need_image(shared, request)
    maps = [h for h in services.store.list_heatmaps(view.image_id) if h.family != "trajectory"]
    if not maps:
        raise ValueError("This image has no detector heatmap yet; run a detector in Inspect.")
    mask = services.store.load_heatmap(maps[0].id) >= float(threshold)
    if not mask.any():
        raise ValueError(f"No pixel of the heatmap reaches {float(threshold):.2f}; lower the threshold.")
    state = services.store.edit_regions(view.image_id, add=[NewMask(mask=mask, author="detector",
                                                                    class_name=class_name or None,
                                                                    caption=caption or None)],
                                        action=f"region from heatmap >= {float(threshold):.2f}")
    view.selected = state.regions[-1].key
    return (*screen(services, view, "Added the thresholded heatmap as a region."), _editor_value(services, view))


@user_errors
def agreement(services, shared: Shared, threshold, request: gr.Request = None):
    """Human mask (union of regions) vs detector mask at the threshold: TP/FP/FN colours and IoU."""
    view = need_image(shared, request)
    maps = [h for h in services.store.list_heatmaps(view.image_id) if h.family != "trajectory"]
    if not maps:
        raise ValueError("This image has no detector heatmap yet; run a detector in Inspect.")
    human = union_mask(services, view.image_id, view.rgb.shape[:2])
    detector = services.store.load_heatmap(maps[0].id) >= float(threshold)
    score = score_image(detector, human, f"image {view.image_id}")
    out = (view.rgb.astype(np.float32) * 0.45).astype(np.uint8)
    out[detector & human] = (40, 220, 60)
    out[detector & ~human] = (235, 50, 50)
    out[~detector & human] = (60, 120, 255)
    return out, (f"IoU **{score.iou:.3f}** · both {score.tp} px · detector only {score.fp} px · human only "
                 f"{score.fn} px (detector `{maps[0].detector_id}`, threshold {float(threshold):.2f})")


@user_errors
def set_taxonomy(services, shared: Shared, session_id, text: str):
    sid = require_session(session_id)
    try:
        classes = json.loads(text or "")
    except json.JSONDecodeError as exc:
        raise ValueError(f"The taxonomy is not valid JSON (line {exc.lineno}): {exc.msg}.") from None
    if not isinstance(classes, list):
        raise ValueError('The taxonomy must be a JSON list like [{"name": "blur", "definition": "..."}].')
    services.store.set_session_taxonomy(sid, classes)
    names = [c["name"] for c in services.taxonomy(sid)]
    return gr.Dropdown(choices=names), f"Saved a taxonomy of {len(names)} classes."


@user_errors
def show_definition(services, session_id, name) -> str:
    if session_id in (None, "") or not name:
        return ""
    return definition(services, int(session_id), name)


# ---------------------------------------------------------------------------------------------- rendering

def union_mask(services, image_id: int, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for region in services.store.label_state(image_id).regions:
        mask |= services.store.load_mask(region.mask_id)
    return mask


def _open_outputs(services, view: LabelView, session_id: int):
    return (*screen(services, view), _editor_value(services, view), _drafts_note(services, view.image_id),
            json.dumps(services.taxonomy(session_id), indent=1), view.image_id)


def _editor_value(services, view: LabelView) -> dict:
    """The brush canvas: the image with its current regions drawn (strokes are read from the paint layer only)."""
    return {"background": render(services, view, prompts=False), "layers": [], "composite": None}


def _drafts_note(services, image_id: int | None) -> str:
    if image_id is None:
        return ""
    n = len(pending_drafts(services, image_id))
    return f"{n} draft region(s) from Inspect waiting." if n else "No drafts from Inspect for this image."


def _blank(message: str = "Choose a session."):
    return (None, gr.Radio(choices=[], value=None), gr.Dropdown(choices=[]), "", "", gr.Radio(choices=[], value=None),
            "", message, "", None, "", "", gr.skip())  # the remembered place stays


