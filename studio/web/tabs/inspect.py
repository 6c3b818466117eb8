"""Inspect tab: run artifact detectors on session images, read heatmap overlays and regions.

Every run is stored, so re-opening an image shows its last heatmap without recomputing; the
overlay controls (alpha, threshold, colormap, contours) re-render from the cached heatmap only.
Detection and repair are server-owned tasks (studio.tasks): a reloaded page re-attaches to them.
"""
from __future__ import annotations

import time


import gradio as gr
import numpy as np

from engines.detection.detect import COLORMAPS, find_regions, mask_edges, render_overlay
from studio.store.records import NewImage
from studio.web.tabs import classifier_panels
from studio.web.tabs.common import (GPU, Shared, ask_first, bind, browser_state, confirm_box, gallery_items,
                                keep_running_box, number, owner_of, page_of, remember_open, require_session,
                                task_text, user_errors, user_message, wire)
from studio.tasks import duration_text
from studio.web.tabs.inspect_view import View, view_of

KINDS = ("detect", "repair")
REGION_HEADERS = ["region", "area %", "max score", "mean score", "bbox (x0, y0, x1, y1)"]
CANDIDATE_HEADERS = ["candidate", "seed", "artifact area before %", "after %", "mean score after", "outside change"]


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes it (other tabs may have changed the session)."""
    with gr.Row():
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Session images (click one)", columns=4, height=300, elem_id="inspect-gallery",
                                 interactive=False)
            upload = gr.File(label="Add images to the session", file_count="multiple", file_types=["image"])
            spec = gr.Textbox(label="Detector", value="demo", elem_id="inspect-detector",
                              info="demo, a checkpoint folder, or FAMILY:PATH — e.g. diffdoctor:/x/ad_pytorch_model.bin, "
                                   "torchscript:/x/end2end.pt, mmseg-upernet-swin-tiny:/x/iter_10000.pth")
            load = gr.Button("Load detector")
            detector_info = gr.Markdown(elem_id="inspect-detector-info")
            mode = gr.Radio(["resize", "sliding"], value="resize", label="Large images",
                            info="resize: whole image at the detector's input size; sliding: overlapping windows at native size")
            keep_running = keep_running_box("inspect-keep-running")
            with gr.Row():
                run_one = gr.Button("Detect this image", variant="primary", elem_id="inspect-run")
                run_all = gr.Button("Detect all images", elem_id="inspect-run-all")
                stop = gr.Button("Stop", variant="stop", elem_id="inspect-stop")
            confirm_group, confirm_text, confirm, cancel = confirm_box("inspect")
            status = gr.Markdown(elem_id="inspect-status")
        with gr.Column(scale=3):
            heatmap_choice = gr.Dropdown(label="Heatmap shown", choices=[], elem_id="inspect-heatmap-choice")
            slider = gr.ImageSlider(label="Original | heatmap overlay", type="numpy", elem_id="inspect-slider",
                                    height=520)
            with gr.Row():
                alpha = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Alpha")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Threshold", elem_id="inspect-threshold")
            with gr.Row():
                colormap = gr.Radio(list(COLORMAPS), value="jet", label="Colormap")
                only_above = gr.Checkbox(value=False, label="Colour only above threshold")
                contours = gr.Checkbox(value=True, label="Region contours")
            regions = gr.Dataframe(headers=REGION_HEADERS, label="Regions (highest score first)", interactive=False,
                                   elem_id="inspect-regions")
            chosen = gr.CheckboxGroup(label="Regions to send or repair (none ticked = all above the threshold)",
                                      choices=[], elem_id="inspect-chosen")
            send = gr.Button("Send chosen regions to Label as draft masks", elem_id="inspect-send")
            send_status = gr.Markdown(elem_id="inspect-send-status")
            classify_panel = classifier_panels.inspect_classify_panel(services)
            with gr.Accordion("Repair: detect → mask → inpaint → re-score", open=False,
                              elem_id="inspect-repair-box") as repair_box:
                with gr.Row():
                    grow = gr.Slider(0, 64, value=8, step=1, label="Grow mask (px)")
                    feather = gr.Slider(0, 32, value=4, step=1, label="Feather (px)")
                    strength = gr.Slider(0.1, 1.0, value=0.75, step=0.05, label="Strength")
                with gr.Row():
                    repair_seeds = gr.Textbox(value="0,1,2", label="Seeds", elem_id="inspect-repair-seeds")
                    repair_steps = gr.Slider(2, 100, value=20, step=1, label="Steps")
                    repair_prompt = gr.Textbox(label="Prompt (default: the image's prompt)")
                repair = gr.Button("Repair", variant="primary", elem_id="inspect-repair")
                repair_confirm_group, repair_confirm_text, repair_confirm, repair_cancel = confirm_box("inspect-repair")
                candidates = gr.Gallery(label="Candidates (best first; scores in the table below)", columns=3,
                                        height=300, elem_id="inspect-candidates", interactive=False)
                scores = gr.Dataframe(headers=CANDIDATE_HEADERS, label="Candidate scores (best first)",
                                      interactive=False, elem_id="inspect-candidate-scores")
                pick = gr.Radio([], label="Candidate", elem_id="inspect-candidate")
                heat_sides = gr.Checkbox(value=False, label="Show heatmaps on both sides")
                repair_slider = gr.ImageSlider(label="Before | after", type="numpy", elem_id="inspect-repair-slider",
                                               height=420)
                keep = gr.Button("Keep this candidate", elem_id="inspect-keep")
                repair_status = gr.Markdown(elem_id="inspect-repair-status")
    timer = gr.Timer(1.0, active=False)
    remembered = browser_state(shared, None, "inspect-image")

    look = [alpha, threshold, colormap, only_above, contours]
    shown = [slider, regions, chosen]
    repaired = [candidates, scores, pick, repair_slider]
    sess = shared.session
    wire(sess.change, bind(show_images, services), inputs=[sess], outputs=[gallery])
    wire(tab.select, bind(show_images, services), inputs=[sess], outputs=[gallery])
    wire(tab.select, bind(active_detector, services), outputs=[spec])
    opened = [heatmap_choice, *shown, status, remembered]
    wire(gallery.select, bind(open_image, services, shared), inputs=[sess, *look], outputs=opened, status=status)
    wire(tab.select, bind(reopen_image, services, shared), inputs=[sess, remembered, *look], outputs=opened)
    wire(upload.upload, bind(upload_images, services), inputs=[sess, upload], outputs=[gallery, status, upload],
         status=status)
    wire(load.click, bind(load_detector, services), inputs=[spec], outputs=[detector_info], status=detector_info,
         concurrency_id=GPU, concurrency_limit=1)
    started = [status, timer, confirm_group, confirm_text]
    form = [sess, spec, mode, keep_running, shared.client]
    wire(run_one.click, bind(start_detection, services, shared, False, False), inputs=form, outputs=started,
         status=status)
    wire(run_all.click, bind(start_detection, services, shared, True, False), inputs=form, outputs=started,
         status=status)
    wire(confirm.click, bind(start_detection, services, shared, True, True), inputs=form, outputs=started,
         status=status)
    wire(cancel.click, hide_confirm, outputs=[confirm_group, status], queue=False)
    wire(stop.click, bind(stop_task, services), inputs=[shared.client], outputs=[status], status=status)
    polled = [gallery, heatmap_choice, *shown, status, detector_info, *repaired, repair_status, remembered, timer]
    wire(timer.tick, bind(poll_inspect, services, shared), inputs=[sess, shared.client, *look, heat_sides],
         outputs=polled, show_progress="hidden")
    if shared.demo is not None:
        wire(shared.demo.load, bind(attach_inspect, services), inputs=[shared.client], outputs=[status, timer])
    wire(heatmap_choice.input, bind(choose_heatmap, services, shared), inputs=[heatmap_choice, *look], outputs=shown)
    for control in look:
        wire(control.change, bind(rerender, services, shared), inputs=look, outputs=shown, queue=False)
    wire(send.click, bind(send_to_label, services, shared), inputs=[chosen, threshold], outputs=[send_status],
         status=send_status)
    repair_form = [chosen, threshold, grow, feather, strength, repair_seeds, repair_steps, repair_prompt, keep_running,
                   shared.client]
    repair_started = [repair_status, timer, repair_confirm_group, repair_confirm_text]
    wire(repair.click, bind(start_repair, services, shared, False), inputs=repair_form, outputs=repair_started,
         status=repair_status)
    wire(repair_confirm.click, bind(start_repair, services, shared, True), inputs=repair_form,
         outputs=repair_started, status=repair_status)
    wire(repair_cancel.click, hide_confirm, outputs=[repair_confirm_group, repair_status], queue=False)
    wire(pick.input, bind(show_candidate, shared), inputs=[pick, heat_sides], outputs=[repair_slider])
    wire(heat_sides.change, bind(show_candidate, shared), inputs=[pick, heat_sides], outputs=[repair_slider])
    wire(keep.click, bind(keep_candidate, services, shared), inputs=[sess, pick], outputs=[repair_status, gallery],
         status=repair_status)
    classifier_panels.wire_inspect_classify(services, shared, classify_panel, threshold)
    remember_open(shared, "inspect", {"repair": repair_box})


def show_images(services, session_id):
    if session_id in (None, ""):
        return []
    return gallery_items(services.store.list_images(int(session_id)))


@user_errors
def upload_images(services, session_id, files):
    from engines.images import load_image

    sid = require_session(session_id)
    items = []
    for path in [f if isinstance(f, str) else f.name for f in (files or [])]:
        label = path.rsplit("/", 1)[-1]
        try:
            items.append(NewImage(rgb=load_image(path, name=label), source="uploaded", original_name=label))
        except ValueError as exc:
            raise ValueError(f"{user_message(exc)} Nothing was imported.") from None
    if not items:
        raise ValueError("No files were uploaded.")
    services.store.add_images(sid, items)
    return show_images(services, sid), f"Imported {len(items)} image(s).", None


@user_errors
def open_image(services, shared: Shared, session_id, alpha, threshold, colormap, only_above, contours,
               evt: gr.SelectData, request: gr.Request = None):
    """Show the clicked image with its newest stored heatmap (no inference); remember it for reloads."""
    sid = require_session(session_id)
    records = services.store.list_images(sid)
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(records):
        raise ValueError("That image is no longer in the session; reload the page.")
    return _show_image(services, view_of(shared, request), records[index].id, alpha, threshold, colormap, only_above,
                       contours)


def reopen_image(services, shared: Shared, session_id, remembered, alpha, threshold, colormap, only_above, contours,
                 request: gr.Request = None):
    """Tab shown: the image this browser had open (kept across reloads), if it is in the current session."""
    view = view_of(shared, request)
    if session_id in (None, "") or remembered in (None, "") or view.image_id is not None:
        return (gr.skip(),) * 6
    try:
        image = services.store.get_image(int(remembered))
    except (ValueError, TypeError):
        return (gr.skip(),) * 6
    if image.session_id != int(session_id):
        return (gr.skip(),) * 6
    return _show_image(services, view, image.id, alpha, threshold, colormap, only_above, contours)


def _show_image(services, view: View, image_id: int, alpha, threshold, colormap, only_above, contours):
    view.image_id, view.rgb = image_id, services.store.load_rgb(image_id)
    heatmaps = services.store.list_heatmaps(view.image_id)
    view.heatmap_id = heatmaps[0].id if heatmaps else None
    view.scores = services.store.load_heatmap(view.heatmap_id) if heatmaps else None
    note = "" if heatmaps else " No heatmap yet: click **Detect this image**."
    return (_heatmap_dropdown(services, view), *_render(view, alpha, threshold, colormap, only_above, contours),
            f"Image #{view.image_id} ({view.rgb.shape[1]}x{view.rgb.shape[0]}).{note}", view.image_id)


def active_detector(services) -> str:
    """The detector spec last loaded here or chosen in Train ("Use this checkpoint") or the Models tab."""
    return services.active_detector


@user_errors
def load_detector(services, spec: str, progress=gr.Progress()) -> str:
    progress(0, desc="Loading detector")
    info = _detector_info(services.detector(spec))
    services.active_detector = (spec or "demo").strip()
    return info


# ---------------------------------------------------------------------------------------------- detection task

def submit_detection(services, image_ids: list[int], spec: str, mode: str = "resize", *, owner: str,
                     page: str | None = None, keep_running: bool = False, params: dict | None = None):
    """Queue a detection task over stored images; heatmaps are stored only if it is not stopped."""
    spec = (spec or "demo").strip()

    def work(task):
        task.progress(0, len(image_ids), "Loading detector")
        services.detector(spec)
        start = time.perf_counter()

        def report(done: int, total: int) -> None:
            task.progress(done, total, "Detecting")

        pairs = services.detect_images(image_ids, spec, mode=mode, progress=report, should_stop=task.should_stop,
                                       before_store=task.committing)
        services.timings.record("detect", f"{spec}|{mode}", time.perf_counter() - start, len(image_ids))
        return pairs

    return services.tasks.submit("detect", owner, work, label=f"{len(image_ids)} image(s) with detector {spec}",
                                 page=page, keep_running=keep_running, params={"spec": spec, **(params or {})})


@user_errors
def start_detection(services, shared: Shared, all_images: bool, confirmed: bool, session_id, spec: str, mode: str,
                    keep_running: bool = False, client=None, request: gr.Request = None):
    """Queue detection of the open image (or all session images); the timer shows progress and result."""
    sid = require_session(session_id)
    view = view_of(shared, request)
    if all_images:
        ids = [r.id for r in services.store.list_images(sid)]
        if not ids:
            raise ValueError("This session has no images.")
    else:
        if view.image_id is None:
            raise ValueError("Click an image in the gallery first.")
        ids = [view.image_id]
    owner = owner_of(client, request)
    _refuse_if_busy(services, owner)
    spec = (spec or "demo").strip()
    seconds = services.timings.estimate("detect", f"{spec}|{mode}", len(ids))
    if ask_first(shared, request, "detect", repr((spec, mode, ids)), seconds, confirmed,
                 unmeasured_is_long=len(ids) > 50):
        about = (f"about **{duration_text(seconds)}** here (measured)" if seconds is not None
                 else "an unknown time (no speed measured yet for this detector)")
        return "", gr.Timer(active=False), gr.Group(visible=True), f"Detecting {len(ids)} image(s) takes {about}. Run it?"
    task = submit_detection(services, ids, spec, mode, owner=owner, page=page_of(request),
                            keep_running=bool(keep_running), params={"focus": view.image_id})
    return task_text(task, services.tasks), gr.Timer(active=True), gr.Group(visible=False), ""


def hide_confirm():
    return gr.Group(visible=False), "Not started."


def _refuse_if_busy(services, owner: str) -> None:
    busy = [t for t in services.tasks.tasks(owner) if t.live and t.kind in KINDS]
    if busy:
        raise ValueError(f"A {busy[0].kind} task of this browser is already {busy[0].status} ({busy[0].label}); "
                         "stop it first.")


@user_errors
def stop_task(services, client=None, request: gr.Request = None) -> str:
    """Stop this browser's detection or repair (from any of its pages); nothing of it is stored."""
    task = services.tasks.current(owner_of(client, request), KINDS)
    if task is None or not task.live:
        raise ValueError("No detection or repair of this browser is running.")
    return services.tasks.cancel(task.id)


def attach_inspect(services, client=None, request: gr.Request = None):
    live = services.tasks.attach_owner(owner_of(client, request), page_of(request))
    task = next((t for t in live if t.kind in KINDS), None)
    if task is None:
        return gr.skip(), gr.Timer(active=False)
    return task_text(task, services.tasks), gr.Timer(active=True)


def poll_inspect(services, shared: Shared, session_id, client, alpha, threshold, colormap, only_above, contours,
                 heat_sides, request: gr.Request = None):
    """Timer tick: progress of this browser's detection or repair; when it ended, its result on this page.
    Outputs: gallery, heatmap choice, slider, regions, chosen, status, detector info, candidates, scores,
    pick, repair slider, repair status, remembered image, timer."""
    skip = gr.skip()
    registry, page = services.tasks, page_of(request)
    task = registry.current(owner_of(client, request), KINDS, page)
    if task is None:
        return (skip,) * 13 + (gr.Timer(active=False),)
    registry.attach(task, page)
    line = 5 if task.kind == "detect" else 11
    out = [skip] * 13 + [gr.Timer(active=task.live)]
    if task.live or task.status != "done":
        out[line] = task_text(task, registry)
        if not task.live:
            registry.mark_seen(task, page)
        return tuple(out)
    registry.mark_seen(task, page)
    view = view_of(shared, request)
    if task.kind == "detect":
        pairs = dict(task.result)
        focus = view.image_id if view.image_id in pairs else task.params.get("focus")
        focus = focus if focus in pairs else next(iter(pairs))
        if view.image_id != focus or view.rgb is None:
            view.image_id, view.rgb = focus, services.store.load_rgb(focus)
        view.heatmap_id = pairs[focus]
        view.scores = services.store.load_heatmap(view.heatmap_id)
        out[1:5] = [_heatmap_dropdown(services, view), *_render(view, alpha, threshold, colormap, only_above, contours)]
        out[5] = f"Stored {len(pairs)} heatmap(s)."
        out[6] = _detector_info(services.detector(task.params["spec"]))
        out[12] = view.image_id
        if session_id not in (None, ""):
            out[0] = show_images(services, session_id)
        return tuple(out)
    result = task.result
    view.repair, view.repair_image_id, view.repair_rgb = result["repair"], result["image_id"], result["rgb"]
    out[7:11] = _candidate_outputs(view, heat_sides)
    out[11] = result["status"]
    return tuple(out)


# ---------------------------------------------------------------------------------------------- heatmaps

@user_errors
def choose_heatmap(services, shared: Shared, heatmap_id, alpha, threshold, colormap, only_above, contours,
                   request: gr.Request = None):
    view = view_of(shared, request)
    if heatmap_id in (None, ""):
        return gr.skip(), gr.skip(), gr.skip()
    view.heatmap_id = int(heatmap_id)
    view.scores = services.store.load_heatmap(view.heatmap_id)
    return _render(view, alpha, threshold, colormap, only_above, contours)


@user_errors
def rerender(services, shared: Shared, alpha, threshold, colormap, only_above, contours, request: gr.Request = None):
    """Overlay controls changed: re-render from the cached heatmap, never re-run the detector."""
    return _render(view_of(shared, request), alpha, threshold, colormap, only_above, contours)


@user_errors
def send_to_label(services, shared: Shared, chosen: list, threshold, request: gr.Request = None) -> str:
    """Store the ticked regions (none ticked: every region above the threshold) as draft masks (author
    "detector") for the Label tab."""
    view = view_of(shared, request)
    if view.scores is None or view.image_id is None:
        raise ValueError("Open an image with a heatmap first.")
    found, labels = find_regions(view.scores, float(threshold))
    if not found:
        raise ValueError(f"No region reaches the threshold {float(threshold):.2f}; lower it.")
    by_name = {f"R{r.label}": r for r in found}
    names = [str(name).split(" ")[0] for name in (chosen or [])] or list(by_name)
    heatmap = next((h for h in services.store.list_heatmaps(view.image_id) if h.id == view.heatmap_id), None)
    sent = 0
    for name in names:
        region = by_name.get(name)
        if region is None:
            continue
        services.store.add_mask(view.image_id, labels == region.label, "detector", status="draft",
                                params={"heatmap_id": view.heatmap_id, "threshold": float(threshold),
                                        "detector_id": heatmap.detector_id if heatmap else None,
                                        "max_score": region.max_score, "mean_score": region.mean_score})
        sent += 1
    if not sent:
        raise ValueError("The ticked regions changed with the threshold; tick them again.")
    which = "ticked" if chosen else "above the threshold"
    return f"Sent {sent} region(s) {which} of image #{view.image_id} to Label as draft masks."


# ---------------------------------------------------------------------------------------------- repair task

def repair_request(services, image_id: int, scores: np.ndarray, chosen, threshold, grow, feather, strength,
                   seeds_text, steps, prompt):
    """Form values -> (RepairParams, mask to repair, detector spec), every problem named by its field."""
    from engines.generation.repair import RepairParams

    threshold = number(threshold, "Threshold", minimum=0, maximum=1)
    found, labels = find_regions(scores, threshold)
    names = {str(c).split(" ")[0] for c in (chosen or [])}
    mask = np.isin(labels, [r.label for r in found if f"R{r.label}" in names]) if names else labels > 0
    if not mask.any():
        raise ValueError("No region to repair at this threshold; lower it or tick regions.")
    text = seeds_text if isinstance(seeds_text, str) else ",".join(str(s) for s in (seeds_text or [0]))
    try:
        seeds = tuple(int(x) for x in (text or "0").replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"Seeds: '{seeds_text}' is not whole numbers separated by commas.") from None
    record = services.store.get_image(image_id)
    params = RepairParams(threshold=threshold, grow=number(grow, "Grow", minimum=0, maximum=512, whole=True),
                          feather=number(feather, "Feather", minimum=0, maximum=128), seeds=seeds,
                          num_inference_steps=number(steps, "Steps", minimum=2, maximum=500, whole=True),
                          strength=number(strength, "Strength", minimum=0.01, maximum=1),
                          prompt=(prompt or "").strip() or str(record.params.get("prompt", "") or ""))
    params.validate()
    return params, mask


def submit_repair(services, image_id: int, rgb: np.ndarray, spec: str, params, mask: np.ndarray, *, owner: str,
                  page: str | None = None, keep_running: bool = False):
    """Queue a repair task: candidates in memory (nothing is stored until one is kept)."""

    def work(task):
        def report(step: int, total: int) -> None:
            task.progress(step, total, "Inpainting candidates")

        task.progress(0, 1, "Loading models")
        start = time.perf_counter()
        with services.gpu_lock:
            result = services.repair(rgb, spec, params, mask=mask, progress=report, should_stop=task.should_stop)
        services.timings.record("repair", services.model_spec, time.perf_counter() - start, _repair_units(rgb, params))
        best = result.candidates[0]
        status = (f"Detector `{spec}`: artifact area in the region {100 * best.artifact_area_before:.1f}% before, "
                  f"{100 * best.artifact_area_after:.1f}% after (best, seed {best.seed}); pixels outside the grown "
                  f"mask changed by at most {best.outside_max_change}.")
        if services.uses_demo_model:
            status += " Demo models: inpainted by the tiny demo model, scored by the demo detector."
        return {"repair": result, "image_id": image_id, "rgb": rgb, "spec": spec, "status": status}

    return services.tasks.submit("repair", owner, work, label=f"{len(params.seeds)} candidate(s) for image #{image_id}",
                                 page=page, keep_running=keep_running, params={"image_id": image_id})


def _repair_units(rgb: np.ndarray, params) -> float:
    return len(params.seeds) * params.num_inference_steps * params.strength * rgb.shape[0] * rgb.shape[1] / 1e6


@user_errors
def start_repair(services, shared: Shared, confirmed: bool, chosen: list, threshold, grow, feather, strength,
                 seeds_text, steps, prompt, keep_running: bool = False, client=None, request: gr.Request = None):
    """Repair the chosen regions (or everything above the threshold) of the open image; rank by the detector.
    A run estimated (from measured repairs of this model) to take long asks once first."""
    view = view_of(shared, request)
    if view.image_id is None or view.scores is None:
        raise ValueError("Open an image and run a detector first.")
    params, mask = repair_request(services, view.image_id, view.scores, chosen, threshold, grow, feather, strength,
                                  seeds_text, steps, prompt)
    heatmap = next((h for h in services.store.list_heatmaps(view.image_id) if h.id == view.heatmap_id), None)
    spec = heatmap.detector_id if heatmap is not None and heatmap.family != "trajectory" else services.active_detector
    owner = owner_of(client, request)
    _refuse_if_busy(services, owner)
    seconds = services.timings.estimate("repair", services.model_spec, _repair_units(view.rgb, params))
    if ask_first(shared, request, "repair", repr((view.image_id, spec, params, int(mask.sum()))), seconds, confirmed):
        return ("", gr.Timer(active=False), gr.Group(visible=True),
                f"{len(params.seeds)} repair candidate(s) at {view.rgb.shape[1]}x{view.rgb.shape[0]} should take about "
                f"**{duration_text(seconds)}** here (measured). Run it?")
    task = submit_repair(services, view.image_id, view.rgb, spec, params, mask, owner=owner, page=page_of(request),
                         keep_running=bool(keep_running))
    return task_text(task, services.tasks), gr.Timer(active=True), gr.Group(visible=False), ""


def _candidate_outputs(view: View, heat_sides: bool):
    """Values for [candidates gallery, scores table, candidate radio, before|after slider]."""
    cands = view.repair.candidates
    items = [(c.image, f"{i + 1} · seed {c.seed}") for i, c in enumerate(cands)]
    rows = [[i + 1, c.seed, round(100 * c.artifact_area_before, 2), round(100 * c.artifact_area_after, 2),
             round(float(c.region_score_after), 4), c.outside_max_change] for i, c in enumerate(cands)]
    choices = [f"{i + 1} (seed {c.seed}: {100 * c.artifact_area_before:.1f}% → {100 * c.artifact_area_after:.1f}%)"
               for i, c in enumerate(cands)]
    return items, rows, gr.Radio(choices=choices, value=choices[0]), _pair(view, 0, heat_sides)


@user_errors
def show_candidate(shared: Shared, choice, heat_sides, request: gr.Request = None):
    view = view_of(shared, request)
    if view.repair is None or not choice:
        return gr.skip()
    return _pair(view, int(str(choice).split(" ")[0]) - 1, heat_sides)


@user_errors
def keep_candidate(services, shared: Shared, session_id, choice, request: gr.Request = None):
    """Store the chosen candidate as a new image (provenance `repaired`, parent = the original)."""
    view = view_of(shared, request)
    if view.repair is None or not choice:
        raise ValueError("Run Repair first, then choose a candidate to keep.")
    c = view.repair.candidates[int(str(choice).split(" ")[0]) - 1]
    record = services.store.get_image(view.repair_image_id)
    rec = services.store.add_images(record.session_id, [NewImage(
        rgb=c.image, source="repaired", parent_id=record.id, model_id=services.model_spec,
        params={"seed": c.seed, "artifact_area_before": c.artifact_area_before,
                "artifact_area_after": c.artifact_area_after, "outside_max_change": c.outside_max_change})])[0]
    gallery = show_images(services, session_id) if session_id not in (None, "") else gr.skip()
    return f"Kept as image #{rec.id} (repaired from #{record.id}).", gallery


def _pair(view: View, index: int, heat_sides: bool):
    c = view.repair.candidates[index]
    if heat_sides:
        return (render_overlay(view.repair_rgb, view.repair.original_heatmap), render_overlay(c.image, c.heatmap))
    return (view.repair_rgb, c.image)


def _render(view: View, alpha, threshold, colormap, only_above, contours):
    if view.rgb is None:
        return gr.skip(), gr.skip(), gr.skip()
    if view.scores is None:
        return (view.rgb, view.rgb), [], gr.CheckboxGroup(choices=[], value=[])
    threshold = float(threshold)
    overlay = render_overlay(view.rgb, view.scores, colormap=colormap, alpha=float(alpha),
                             threshold=threshold if only_above else None)
    if contours:
        overlay[mask_edges(view.scores >= threshold)] = 255
    found, _ = find_regions(view.scores, threshold)
    rows = [[f"R{r.label}", round(r.area_percent, 3), round(r.max_score, 4), round(r.mean_score, 4), str(r.bbox)]
            for r in found]
    choices = [f"R{r.label} ({r.area_percent:.2f}%, max {r.max_score:.2f})" for r in found[:50]]
    return (view.rgb, overlay), rows, gr.CheckboxGroup(choices=choices, value=[])


def _heatmap_dropdown(services, view: View):
    if view.image_id is None:
        return gr.Dropdown(choices=[], value=None)
    choices = [(f"{h.detector_id}{' (demo)' if h.is_demo else ''} · #{h.id} · {h.created_at[:19].replace('T', ' ')}", h.id)
               for h in services.store.list_heatmaps(view.image_id)]
    return gr.Dropdown(choices=choices, value=view.heatmap_id)


def _detector_info(detector) -> str:
    spec, loaded = detector.spec, detector.loaded
    lines = [f"**{spec.family}** · `{loaded.model_id}` · input {spec.input_size}px · {spec.activation} "
             f"(channel {spec.channel}) · {loaded.device}"]
    if loaded.path:
        lines.append(f"file: `{loaded.path}`")
    if loaded.is_demo or not spec.trained:
        lines.append(f"⚠️ {loaded.note or 'Untrained detector: heatmaps are not meaningful.'}")
    return "  \n".join(lines)

