"""The Label tab's screen: one browser's labelling state (`LabelView`), the canvas drawing and the values
of the tab's main outputs. Shared by studio/web/tabs/label.py and the classifier panel (Suggest / Accept),
so neither imports the other's private names. Images RGB uint8 HWC; masks bool[H, W].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from engines.detection.detect import mask_edges
from studio.web.tabs.common import Shared

VIEW_KEY = "label-view"
PALETTE = np.array([(255, 64, 64), (64, 160, 255), (255, 200, 0), (180, 80, 255), (0, 200, 120),
                    (255, 120, 200), (120, 220, 255), (255, 150, 60)], np.uint8)


@dataclass
class LabelView:
    """One browser's labelling state: the open image, SAM prompts and the chosen region."""

    image_id: int | None = None
    rgb: np.ndarray | None = None
    points: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    box_corner: tuple | None = None
    box: tuple | None = None
    proposals: list = field(default_factory=list)
    chosen: int = 0
    selected: str | None = None
    masker: object | None = None


def definition(services, session_id: int, name) -> str:
    for item in services.taxonomy(session_id) if name else []:
        if item["name"] == name:
            return f"*{item['name']}*: {item['definition']}"
    return ""


def render(services, view: LabelView, prompts: bool = True) -> np.ndarray:
    """The image with regions in palette colours (selected one stronger), proposal in cyan, clicks as dots
    (`prompts=False`: regions only, e.g. under the brush)."""
    out = view.rgb.astype(np.uint16)
    state = services.store.label_state(view.image_id)
    for i, region in enumerate(state.regions):
        mask = services.store.load_mask(region.mask_id)
        colour = PALETTE[i % len(PALETTE)].astype(np.uint16)
        a = 150 if region.key == view.selected else 90
        out[mask] = (out[mask] * (256 - a) + colour * a) >> 8
        out[mask_edges(mask)] = (255, 255, 255) if region.key == view.selected else colour
    if not prompts:
        return out.astype(np.uint8)
    if view.proposals:
        mask = view.proposals[min(view.chosen, len(view.proposals) - 1)].mask
        out[mask] = (out[mask] * 128 + np.array([0, 255, 255], np.uint16) * 128) >> 8
        out[mask_edges(mask)] = (0, 255, 255)
    img = out.astype(np.uint8)
    radius = max(3, min(img.shape[:2]) // 120)
    for (x, y), lab in zip(view.points, view.labels):
        _dot(img, x, y, radius, (0, 230, 0) if lab == 1 else (255, 0, 0))
    if view.box is not None:
        x0, y0, x1, y1 = view.box
        img[y0:y1 + 1, [x0, x1]] = (255, 255, 0)
        img[[y0, y1], x0:x1 + 1] = (255, 255, 0)
    if view.box_corner is not None:
        _dot(img, *view.box_corner, radius, (255, 255, 0))
    return img


def _dot(img: np.ndarray, x: int, y: int, r: int, colour) -> None:
    h, w = img.shape[:2]
    yy, xx = np.ogrid[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)]
    disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    img[max(0, y - r):min(h, y + r + 1), max(0, x - r):min(w, x + r + 1)][disc] = colour


def screen(services, view: LabelView, message: str = ""):
    """Values for [canvas, regions, class, caption, definition, proposals, progress, status, segmenter]."""
    state = services.store.label_state(view.image_id)
    image = services.store.get_image(view.image_id)
    total = view.rgb.shape[0] * view.rgb.shape[1]
    choices = []
    for region in state.regions:
        area = 0.0 if region.bbox is None else 100.0 * services.store.load_mask(region.mask_id).sum() / total
        choices.append(f"{region.key} · {region.class_name or 'unclassified'} · {area:.2f}% · {region.author}")
    selected = next((c for c in choices if c.split(" ")[0] == view.selected), None)
    region = next((r for r in state.regions if r.key == view.selected), None)
    names = [c["name"] for c in services.taxonomy(image.session_id)]
    done, n = services.store.label_progress(image.session_id)
    progress = (f"**{done} of {n} labelled** · image #{view.image_id} ({view.rgb.shape[1]}x{view.rgb.shape[0]})"
                f"{' · labelled' if services.store.is_labelled(view.image_id) else ''}")
    history = f" · undo: {'yes' if state.can_undo else 'no'}, redo: {'yes' if state.can_redo else 'no'}"
    prop_choices = [f"{i + 1} ({p.score:.2f})" for i, p in enumerate(view.proposals)]
    note = getattr(view.masker, "note", "")
    class_value = region.class_name if region and region.class_name in names else None
    drafts = len(pending_drafts(services, view.image_id))
    waiting = (f"  \n**{drafts} draft region(s) from Inspect waiting**: *Start from the detector* → Accept."
               if drafts else "")
    return (render(services, view), gr.Radio(choices=choices, value=selected),
            gr.Dropdown(choices=names, value=class_value), (region.caption or "") if region else "",
            definition(services, image.session_id, class_value),
            gr.Radio(choices=prop_choices, value=prop_choices[view.chosen] if prop_choices else None),
            progress + history + waiting, message, f"Segmenter: {note}" if note else "")


def pending_drafts(services, image_id: int) -> list:
    masks = services.store.list_masks(image_id)
    sha = {m.id: m.sha256 for m in masks}
    current = {sha.get(r.mask_id) for r in services.store.label_state(image_id).regions}
    return [m for m in masks if m.status == "draft" and m.sha256 not in current]


def view_of(shared: Shared, request) -> LabelView:
    return shared.per_browser.get(request, VIEW_KEY, LabelView)


def need_image(shared: Shared, request) -> LabelView:
    view = view_of(shared, request)
    if view.image_id is None:
        raise ValueError("Open an image first (choose a session, then Next).")
    return view


def selected_region(services, view: LabelView):
    region = next((r for r in services.store.label_state(view.image_id).regions if r.key == view.selected), None)
    if region is None:
        raise ValueError("Select a region first (in the list on the right).")
    return region
