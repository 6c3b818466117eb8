"""Corrupt tab: inject a realistic artifact into a chosen region (latent inversion + masked noise +
resampling) and keep the pair as a pixel-labelled training example.

The inversion is cached per image and settings, so trying other masks, seeds or baselines costs
only the resampling; the status line says when the cached inversion is reused. The picked image's
caption (editable here, saved to the store) is the prompt of inversion and resampling. Each seed
shows the corrupted image with its label outlined and its difference to the uncorrupted resample of
the same inversion; the status reports the IoU of the requested and the corrupted area and the
confinement against that resample and against the input. A preview is a server-owned task
(studio.tasks): a reloaded page re-attaches to it and can stop it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import gradio as gr
import numpy as np

from engines.corruption.corrupt import METHODS, PRESETS, CorruptParams
from engines.detection.detect import mask_edges
from studio.datasets.captions import caption_for
from studio.services import MASK_SOURCES, fit_pair
from studio.store.records import NewImage, NewMask
from studio.web.tabs.common import (Shared, ask_first, bind, confirm_box, gallery_items, keep_running_box, number, owner_of,
                                page_of, require_session, task_text, user_errors, wire)
from studio.tasks import duration_text

VIEW_KEY = "corrupt-view"
KINDS = ("corrupt",)
CONFINEMENT_NOTE = ("Confinement = mean pixel change inside the label ÷ outside it: higher is better (the "
                    "artifact stays in its label).")


@dataclass
class CorruptView:
    """One browser's corruption preview: the fitted image, its mask and the results by seed."""

    image_id: int | None = None
    rgb: np.ndarray | None = None
    mask: np.ndarray | None = None
    source: str = ""
    results: dict = field(default_factory=dict)


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes the session gallery."""
    with gr.Row():
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Session images (click one)", columns=4, height=260, elem_id="corrupt-gallery",
                                 interactive=False)
            source = gr.Radio(list(MASK_SOURCES), value="random blobs", label="Region to corrupt",
                              elem_id="corrupt-source")
            with gr.Row():
                selector = gr.Textbox(label="Region-selection model (for 'region selector')", scale=2)
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="Threshold / tau", scale=1)
            with gr.Row():
                caption = gr.Textbox(label="Caption of the picked image (the prompt of inversion and resampling)",
                                     scale=4, elem_id="corrupt-caption")
                save_caption = gr.Button("Save caption", scale=1, elem_id="corrupt-save-caption")
            method = gr.Dropdown(list(METHODS), value="renoise", label="Method (renoise, ddim, or a baseline)")
            with gr.Row():
                steps = gr.Slider(4, 100, value=50, step=1, label="DDIM steps N")
                inv_steps = gr.Slider(1, 50, value=10, step=1, label="Inversion steps k (corrupt at step N-k)")
                baseline_steps = gr.Slider(1, 50, value=20, step=1,
                                           label="Baseline steps (blur/rotate/gaussian/downscale; paper: 20)")
            with gr.Row():
                preset = gr.Dropdown(list(PRESETS), value="renoise-sd", elem_id="corrupt-preset",
                                     label="Inversion preset (renoise-sd: the reference's SD settings; "
                                           "renoise-fast: no noise regularisation)")
                guidance = gr.Slider(0.0, 15.0, value=1.0, step=0.5, label="Guidance (resampling)")
                renoise = gr.Slider(1, 10, value=1, step=1, label="ReNoise iterations (preset custom)")
            with gr.Row():
                seeds = gr.Textbox(value="0,1,2", label="Seeds", elem_id="corrupt-seeds")
                paste_back = gr.Checkbox(value=False, label="Paste back outside the mask")
            max_side = gr.Slider(64, 1024, value=256, step=8, label="Work size (longer side, px)",
                                 elem_id="corrupt-max-side")
            keep_running = keep_running_box("corrupt-keep-running")
            with gr.Row():
                run = gr.Button("Preview", variant="primary", elem_id="corrupt-run")
                stop = gr.Button("Stop", variant="stop", elem_id="corrupt-stop")
            confirm_group, confirm_text, confirm, cancel = confirm_box("corrupt")
            status = gr.Markdown(elem_id="corrupt-status")
        with gr.Column(scale=3):
            grid = gr.Gallery(label="Per seed: original · corrupted (label outlined) · |difference to the uncorrupted "
                                    "resample|", columns=3,
                              height=560, elem_id="corrupt-grid", interactive=False)
            gr.Markdown(CONFINEMENT_NOTE)
            with gr.Row():
                keep = gr.CheckboxGroup([], label="Seeds to keep", elem_id="corrupt-keep")
                add = gr.Button("Add to dataset", elem_id="corrupt-add")

    timer = gr.Timer(1.0, active=False)

    sess = shared.session
    wire(tab.select, bind(show_images, services), inputs=[sess], outputs=[gallery])
    wire(sess.change, bind(show_images, services), inputs=[sess], outputs=[gallery])
    wire(gallery.select, bind(pick_image, services, shared), inputs=[sess], outputs=[status, caption], status=status)
    wire(save_caption.click, bind(store_caption, services, shared), inputs=[caption], outputs=[status], status=status)
    form = [sess, source, selector, threshold, method, steps, inv_steps, guidance, renoise, seeds, max_side, paste_back,
            preset, baseline_steps, caption, keep_running, shared.client]
    started = [status, timer, confirm_group, confirm_text]
    wire(run.click, bind(start_preview, services, shared, False), inputs=form, outputs=started, status=status)
    wire(confirm.click, bind(start_preview, services, shared, True), inputs=form, outputs=started, status=status)
    wire(cancel.click, hide_confirm, outputs=[confirm_group, status], queue=False)
    wire(stop.click, bind(stop_preview, services), inputs=[shared.client], outputs=[status], status=status)
    wire(timer.tick, bind(poll_preview, services, shared), inputs=[shared.client], outputs=[grid, keep, status, timer],
         show_progress="hidden")
    if shared.demo is not None:
        wire(shared.demo.load, bind(attach_preview, services), inputs=[shared.client], outputs=[status, timer])
    wire(add.click, bind(add_to_dataset, services, shared), inputs=[sess, keep], outputs=[status], status=status)


def show_images(services, session_id):
    if session_id in (None, ""):
        return []
    return gallery_items(services.store.list_images(int(session_id)))


@user_errors
def pick_image(services, shared: Shared, session_id, evt: gr.SelectData, request: gr.Request = None):
    """Remember the clicked image; show its caption (or the prompt it was generated with)."""
    records = services.store.list_images(require_session(session_id))
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(records):
        raise ValueError("That image is no longer in the session; reload the page.")
    view = _view(shared, request)
    view.image_id, view.results = records[index].id, {}
    rec = records[index]
    return f"Image #{rec.id} ({rec.width}x{rec.height}) chosen.", caption_for(rec)


@user_errors
def store_caption(services, shared: Shared, text, request: gr.Request = None) -> str:
    """Save the caption box as the picked image's caption."""
    view = _view(shared, request)
    if view.image_id is None:
        raise ValueError("Click an image in the gallery first.")
    rec = services.store.set_caption(view.image_id, text or "")
    return f"Caption of image #{rec.id} saved." if rec.caption else f"Caption of image #{rec.id} cleared."


def corruption_request(services, image_id: int, source, selector, threshold, method, steps, inv_steps, guidance,
                       renoise, seeds_text, max_side, paste_back, preset="renoise-sd", baseline_steps=20, caption=None):
    """Form values -> (fitted rgb, mask, CorruptParams, seeds), every problem named by its field.
    The prompt is `caption` (None: the image's stored caption)."""
    seeds = _parse_seeds(seeds_text)
    if preset not in PRESETS:
        raise ValueError(f"Inversion preset: '{preset}' is not one of {', '.join(PRESETS)}.")
    prompt = caption_for(services.store.get_image(image_id)) if caption is None else str(caption)
    extra = ({"renoise_iterations": number(renoise, "ReNoise iterations", minimum=1, maximum=50, whole=True)}
             if preset == "custom" else {})
    params = CorruptParams.from_preset(
        preset, num_inference_steps=number(steps, "DDIM steps N", minimum=2, maximum=1000, whole=True),
        inversion_steps=number(inv_steps, "Inversion steps k", minimum=1, maximum=1000, whole=True),
        baseline_steps=number(baseline_steps, "Baseline steps", minimum=1, maximum=1000, whole=True), method=method,
        seed=seeds[0], guidance_scale=number(guidance, "Guidance", minimum=0, maximum=50), paste_back=bool(paste_back),
        prompt=prompt, **extra)
    params.validate()
    threshold = number(threshold, "Threshold / tau", minimum=0, maximum=1)
    mask = services.corruption_mask(image_id, source, detector=(selector or "").strip() or None,
                                    threshold=threshold, seed=seeds[0])
    work_side = number(max_side, "Work size", minimum=64, maximum=4096, whole=True)
    rgb, mask = fit_pair(services.store.load_rgb(image_id), mask, work_side)
    if not mask.any():
        raise ValueError("The region vanished when the image was fitted to the work size; choose a larger region.")
    return rgb, mask, params, seeds


def _units(rgb: np.ndarray, params: CorruptParams, seeds: list[int]) -> float:
    """Expected UNet evaluations x megapixels (the inversion once, then k resampling steps per seed)."""
    k = params.inversion_steps
    return (k * params.renoise_iterations + k * len(seeds)) * rgb.shape[0] * rgb.shape[1] / 1e6


def submit_preview(services, image_id: int, rgb: np.ndarray, mask: np.ndarray, source: str, params: CorruptParams,
                   seeds: list[int], *, owner: str, page: str | None = None, keep_running: bool = False):
    """Queue a corruption preview (nothing is stored until seeds are added to the dataset)."""

    def work(task):
        task.progress(0, 1, "Loading model")
        corruptor = services.corruptor()
        hits_before = corruptor.cache_hits

        def report(step: int, total: int) -> None:
            reused = corruptor.cache_hits > hits_before
            task.progress(step, total, "Resampling (cached inversion reused)" if reused else "Inverting and resampling")

        start = time.perf_counter()
        with services.gpu_lock:
            results = corruptor.preview(rgb, mask, params, seeds, progress=report, should_stop=task.should_stop)
        seconds = time.perf_counter() - start
        unet = sum(r.unet_calls for r in results)
        services.timings.record("corrupt", services.model_spec, seconds, unet * rgb.shape[0] * rgb.shape[1] / 1e6)
        return {"image_id": image_id, "rgb": rgb, "mask": mask, "source": source, "seconds": seconds,
                "params": params, "results": dict(zip(seeds, results))}

    return services.tasks.submit("corrupt", owner, work, page=page, keep_running=keep_running,
                                 label=f"{len(seeds)} seed(s) of image #{image_id}, {params.method}",
                                 params={"image_id": image_id})


@user_errors
def start_preview(services, shared: Shared, confirmed: bool, session_id, source, selector, threshold, method, steps,
                  inv_steps, guidance, renoise, seeds_text, max_side, paste_back, preset="renoise-sd",
                  baseline_steps=20, caption=None, keep_running: bool = False, client=None,
                  request: gr.Request = None):
    """Check the form, ask once before a long run, then queue the preview; the timer shows progress and the grid."""
    require_session(session_id)
    view = _view(shared, request)
    if view.image_id is None:
        raise ValueError("Click an image in the gallery first.")
    rgb, mask, params, seeds = corruption_request(services, view.image_id, source, selector, threshold, method, steps,
                                                  inv_steps, guidance, renoise, seeds_text, max_side, paste_back,
                                                  preset, baseline_steps, caption)
    owner = owner_of(client, request)
    busy = [t for t in services.tasks.tasks(owner, "corrupt") if t.live]
    if busy:
        raise ValueError(f"A preview of this browser is already {busy[0].status} ({busy[0].label}); stop it first.")
    seconds = services.timings.estimate("corrupt", services.model_spec, _units(rgb, params, seeds))
    if ask_first(shared, request, "corrupt", repr((view.image_id, source, params, seeds, rgb.shape)), seconds,
                 confirmed):
        return ("", gr.Timer(active=False), gr.Group(visible=True),
                f"{len(seeds)} preview(s) at {rgb.shape[1]}x{rgb.shape[0]} should take about "
                f"**{duration_text(seconds)}** here (measured). Run it?")
    task = submit_preview(services, view.image_id, rgb, mask, source, params, seeds, owner=owner,
                          page=page_of(request), keep_running=bool(keep_running))
    return task_text(task, services.tasks), gr.Timer(active=True), gr.Group(visible=False), ""


def hide_confirm():
    return gr.Group(visible=False), "Not started."


@user_errors
def stop_preview(services, client=None, request: gr.Request = None) -> str:
    task = services.tasks.current(owner_of(client, request), KINDS)
    if task is None or not task.live:
        raise ValueError("No preview of this browser is running.")
    return services.tasks.cancel(task.id)


def attach_preview(services, client=None, request: gr.Request = None):
    live = services.tasks.attach_owner(owner_of(client, request), page_of(request))
    task = next((t for t in live if t.kind in KINDS), None)
    if task is None:
        return gr.skip(), gr.Timer(active=False)
    return task_text(task, services.tasks), gr.Timer(active=True)


def poll_preview(services, shared: Shared, client=None, request: gr.Request = None):
    """Timer tick: the preview's progress; when done, the grid on this page (outputs: grid, keep, status, timer)."""
    registry, page = services.tasks, page_of(request)
    task = registry.current(owner_of(client, request), KINDS, page)
    if task is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
    registry.attach(task, page)
    if task.live:
        return gr.skip(), gr.skip(), task_text(task, registry), gr.Timer(active=True)
    registry.mark_seen(task, page)
    if task.status != "done":
        return gr.skip(), gr.skip(), task_text(task, registry), gr.Timer(active=False)
    out = task.result
    view = _view(shared, request)
    view.image_id, view.rgb, view.mask, view.source = out["image_id"], out["rgb"], out["mask"], out["source"]
    view.results = out["results"]
    return (*preview_outputs(services, view, out["params"], out["seconds"]), gr.Timer(active=False))


def preview_outputs(services, view: "CorruptView", params: CorruptParams, seconds: float):
    """Values for [grid, seeds to keep, status] from a page's finished preview (`seconds`: the run's wall time)."""
    rgb, results = view.rgb, list(view.results.values())
    items = []
    for seed, r in view.results.items():
        outlined = r.image.copy()
        outlined[mask_edges(r.mask)] = (255, 255, 0)
        diff = np.abs(r.image.astype(np.int16) - r.uncorrupted.astype(np.int16)).max(axis=2).astype(np.uint8)
        items += [(rgb, f"original #{view.image_id}"),
                  (outlined, f"seed {seed} · confinement {r.confinement_vs_resample:.2f} vs resample "
                             f"({r.confinement:.2f} vs input; higher = better)"),
                  (np.stack([diff] * 3, axis=2), f"|diff to resample| in {r.inside_change_vs_resample:.1f} / "
                                                 f"out {r.outside_change_vs_resample:.1f}")]
    cached = any(r.cache_hit for r in results)
    unet = sum(r.unet_calls for r in results)
    note = "cached inversion reused" if cached else "inversion computed and cached"
    demo = " Demo model: the corruption is not a realistic artifact." if services.uses_demo_model else ""
    first = results[0]
    status = (f"{len(results)} preview(s) in {seconds:.1f} s; {note}; {unet} UNet evaluations; "
              f"preset {params.preset}; work size {rgb.shape[1]}x{rgb.shape[0]}. Label = the corrupted latent cells: "
              f"IoU with the requested region {first.region_iou:.2f}. Confinement (inside/outside change of the "
              f"label; higher = better) against the uncorrupted resample of the same inversion "
              f"{', '.join(f'{r.confinement_vs_resample:.2f}' for r in results)}; against the input "
              f"{', '.join(f'{r.confinement:.2f}' for r in results)} (includes the VAE and inversion error). "
              f"Caption: {params.prompt[:80]!r}.{demo}")
    seeds = [str(s) for s in view.results]
    return items, gr.CheckboxGroup(choices=seeds, value=seeds[:1]), status


@user_errors
def add_to_dataset(services, shared: Shared, session_id, chosen, request: gr.Request = None) -> str:
    """Store each chosen corrupted image (provenance `corrupted`, parent = the original) with its
    mask authored `synthetic`, in one transaction."""
    sid = require_session(session_id)
    view = _view(shared, request)
    if not view.results:
        raise ValueError("Run a preview first.")
    if not chosen:
        raise ValueError("Seeds to keep: none ticked; tick at least one seed.")
    records = store_corrupted(services, sid, view, chosen)
    return f"Added {len(records)} corrupted image(s) with synthetic masks to the session."


def store_corrupted(services, session_id: int, view: CorruptView, chosen) -> list:
    """The chosen seeds' corrupted images with their synthetic masks and figures, stored in one transaction."""
    items = []
    for seed_text in chosen:
        r = view.results.get(int(seed_text))
        if r is None:
            continue
        params = {**r.params.to_json(), "seed": int(seed_text), "mask_source": view.source, **_finite(r.metrics())}
        items.append(NewImage(rgb=r.image, source="corrupted", parent_id=view.image_id,
                              model_id=services.model_spec, params=params, caption=r.params.prompt,
                              masks=(NewMask(mask=r.mask, author="synthetic", class_name=None,
                                             caption=f"synthetic {r.params.method} corruption", params=params),)))
    if not items:
        raise ValueError("The chosen seeds are not in the current preview; run it again.")
    return services.store.add_images(session_id, items)


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in (text or "").replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"Seeds: '{text}' is not whole numbers separated by commas.") from None
    if not seeds or len(seeds) > 8 or any(s < 0 for s in seeds):
        raise ValueError("Seeds: give 1 to 8 non-negative whole numbers, e.g. 0,1,2.")
    return list(dict.fromkeys(seeds))


def _finite(metrics: dict) -> dict:
    """Strict JSON for the store: an infinite confinement (nothing changed outside) becomes None."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}


def _view(shared: Shared, request) -> CorruptView:
    return shared.per_browser.get(request, VIEW_KEY, CorruptView)
