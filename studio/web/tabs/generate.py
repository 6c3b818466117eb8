"""Generate tab: prompt and parameters in, images of the current session out (newest first).

A generation is a server-owned task (studio.tasks): the page submits it and polls its progress, so a
reload or a second page of the same browser re-attaches to it and can stop it; a stopped run saves nothing.
"""
from __future__ import annotations

import gradio as gr

from engines.generation.generate import GenerateParams
from studio.web.tabs.common import (Shared, ask_first, bind, confirm_box, gallery_items, keep_running_box, number,
                                owner_of, page_of, remember_open, require_session, task_text, user_errors, wire)
from studio.tasks import duration_text

KINDS = ("generate",)
UNMEASURED_LONG_UNITS = 40.0
"""Before any speed was measured, a run of more than this many megapixel-steps asks first (2048x2048 x 10 steps)."""


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes it (other tabs may have changed the session)."""
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a portrait photo of a pianist's hands",
                                elem_id="generate-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2)
            with gr.Accordion("Parameters", open=True, elem_id="generate-parameters") as params_box:
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="generate-seed")
                    count = gr.Slider(label="Images", minimum=1, maximum=8, step=1, value=1, elem_id="generate-count")
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=20, elem_id="generate-steps")
                    guidance = gr.Slider(label="Guidance scale", minimum=0.0, maximum=20.0, step=0.5, value=7.5)
                default_w, default_h = _default_size(services)
                trajectory = gr.Checkbox(value=False, label="Record trajectory map (experimental, shown in Inspect)")
                with gr.Row():
                    use_lora = gr.Checkbox(value=False, label="Use LoRA", elem_id="generate-use-lora")
                    lora = gr.Textbox(label="LoRA folder (Train: 'Use this checkpoint' fills it)", scale=3,
                                      elem_id="generate-lora")
                with gr.Row():
                    width = gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=default_w,
                                      elem_id="generate-width")
                    height = gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=default_h,
                                       elem_id="generate-height")
            keep = keep_running_box("generate-keep-running")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
            confirm_group, confirm_text, confirm, cancel = confirm_box("generate")
            status = gr.Markdown(elem_id="generate-status")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Generated in this session (newest first)", columns=3, height=560,
                                 elem_id="generate-gallery", interactive=False)
            with gr.Accordion("Compare models: base vs tuned LoRA", open=False, elem_id="generate-compare-box") as cmp_box:
                cmp_prompts = gr.Textbox(label="Prompts (one per line)", lines=3,
                                         value="a photo of a hand holding a cup\na portrait of a pianist")
                with gr.Row():
                    cmp_seeds = gr.Textbox(label="Seeds", value="0,1")
                    cmp_detector = gr.Textbox(label="Detector", value="demo")
                    cmp_steps = gr.Slider(2, 50, value=20, step=1, label="Steps")
                with gr.Row():
                    compare = gr.Button("Compare", elem_id="generate-compare")
                    cmp_stop = gr.Button("Stop", variant="stop", elem_id="generate-compare-stop")
                cmp_totals = gr.Markdown(elem_id="generate-compare-totals")
                cmp_gallery = gr.Gallery(label="Per prompt x seed: base · base heatmap · tuned · tuned heatmap",
                                         columns=4, height=420, interactive=False)
    timer = gr.Timer(1.0, active=False)
    cmp_timer = gr.Timer(1.0, active=False)

    form = [shared.session, prompt, negative, seed, steps, guidance, width, height, count, trajectory, use_lora, lora,
            keep, shared.client]
    started = [status, timer, confirm_group, confirm_text]
    wire(run.click, bind(start_generation, services, shared, False), inputs=form, outputs=started, status=status)
    wire(confirm.click, bind(start_generation, services, shared, True), inputs=form, outputs=started, status=status)
    wire(cancel.click, hide_confirm, outputs=[confirm_group, status], queue=False)
    wire(stop.click, bind(stop_generation, services), inputs=[shared.client], outputs=[status], status=status)
    wire(timer.tick, bind(poll_generation, services), inputs=[shared.session, shared.client],
         outputs=[gallery, status, timer], show_progress="hidden")
    if shared.demo is not None:
        wire(shared.demo.load, bind(attach_generation, services), inputs=[shared.client], outputs=[status, timer])
    wire(compare.click, bind(start_compare, services),
         inputs=[cmp_prompts, cmp_seeds, lora, cmp_detector, cmp_steps, keep, shared.client],
         outputs=[cmp_totals, cmp_timer], status=cmp_totals)
    wire(cmp_stop.click, bind(stop_compare, services), inputs=[shared.client], outputs=[cmp_totals], status=cmp_totals)
    wire(cmp_timer.tick, bind(poll_compare, services), inputs=[shared.client], outputs=[cmp_totals, cmp_gallery, cmp_timer],
         show_progress="hidden")
    if shared.demo is not None:
        wire(shared.demo.load, bind(attach_compare, services), inputs=[shared.client], outputs=[cmp_totals, cmp_timer])
    wire(shared.session.change, bind(show_generated, services), inputs=[shared.session], outputs=[gallery])
    wire(tab.select, bind(show_generated, services), inputs=[shared.session], outputs=[gallery])
    wire(tab.select, bind(active_lora, services), inputs=[lora], outputs=[lora])
    remember_open(shared, "generate", {"parameters": params_box, "compare": cmp_box})


# ---------------------------------------------------------------------------------------------- the task

def generation_params(prompt, negative_prompt, seed, steps, guidance, width, height, count,
                      record_trajectory=False) -> GenerateParams:
    """Form values -> GenerateParams, every problem named by its field."""
    if not (prompt or "").strip():
        raise ValueError("Prompt: empty; describe the image to generate.")
    params = GenerateParams(
        prompt=prompt.strip(), negative_prompt=(negative_prompt or "").strip(),
        seed=number(seed if seed not in (None, "") else 0, "Seed", minimum=0, maximum=2**32 - 1, whole=True),
        num_inference_steps=number(steps, "Steps", minimum=1, maximum=500, whole=True),
        guidance_scale=number(guidance, "Guidance scale", minimum=0, maximum=50),
        width=_side(width, "Width"), height=_side(height, "Height"),
        num_images=number(count, "Images", minimum=1, maximum=16, whole=True),
        record_trajectory=bool(record_trajectory))
    params.validate()
    return params


def _side(value, field: str) -> int:
    side = number(value, field, minimum=64, maximum=2048, whole=True)
    if side % 8:
        raise ValueError(f"{field}: {side} is not a multiple of 8.")
    return side


def work_units(params: GenerateParams) -> float:
    """What a generation costs, in denoising steps of one image at one megapixel."""
    return params.num_inference_steps * params.num_images * (params.width or 512) * (params.height or 512) / 1e6


def estimate(services, params: GenerateParams) -> tuple[float | None, str]:
    """(seconds or None, one sentence) for this run on this machine, from measured speeds."""
    seconds = services.timings.estimate("generate", services.model_spec, work_units(params))
    size = f"{params.num_images} image(s) of {params.width}x{params.height} with {params.num_inference_steps} steps"
    if seconds is None:
        return None, f"{size}: no speed has been measured yet for this model on this machine."
    rate = services.timings.rate("generate", services.model_spec)
    return seconds, (f"{size} should take about **{duration_text(seconds)}** here (measured "
                     f"{rate:.2f} s per step per megapixel; larger images can be slower still).")


def submit_generation(services, session_id: int, params: GenerateParams, lora_dir: str | None, *, owner: str,
                      page: str | None = None, keep_running: bool = False):
    """Queue a generation task that saves its images into the session unless it is stopped."""

    def work(task):
        task.progress(0, params.num_inference_steps, "Loading model")
        engine = services.text2image()

        def report(step: int, total: int) -> None:
            task.progress(step, total, "Denoising")

        with services.gpu_lock:
            services.use_lora(lora_dir or None)
            result = engine.generate(params, progress=report, should_stop=task.should_stop)
        with task.committing():
            records = services.save_generation(session_id, result, lora=lora_dir or None)
        services.timings.record("generate", services.model_spec, result.duration_s, work_units(params))
        return {"records": records, "duration_s": result.duration_s, "is_demo": result.is_demo}

    label = (f"{params.num_images} image(s) {params.width}x{params.height}, {params.num_inference_steps} steps, "
             f"session #{session_id}")
    return services.tasks.submit("generate", owner, work, label=label, page=page, keep_running=keep_running,
                                 params={"session_id": session_id})


@user_errors
def start_generation(services, shared: Shared, confirmed: bool, session_id, prompt: str, negative_prompt: str, seed,
                     steps, guidance, width, height, count, record_trajectory: bool = False, use_lora: bool = False,
                     lora_dir: str = "", keep_running: bool = False, client=None, request: gr.Request = None):
    """Check the form, ask once before a long run, then queue the task; the timer shows its progress."""
    sid = require_session(session_id)
    services.store.get_session(sid)  # unknown session -> one sentence before any work
    params = generation_params(prompt, negative_prompt, seed, steps, guidance, width, height, count, record_trajectory)
    lora_dir = (lora_dir or "").strip() if use_lora else ""
    if use_lora and not lora_dir:
        raise ValueError("LoRA folder: empty; give the folder, or untick Use LoRA.")
    owner, page = owner_of(client, request), page_of(request)
    busy = [t for t in services.tasks.tasks(owner, "generate") if t.live]
    if busy:
        raise ValueError(f"A generation of this browser is already {busy[0].status} ({busy[0].label}); stop it first.")
    seconds, sentence = estimate(services, params)
    if ask_first(shared, request, "generate", repr((params, lora_dir)), seconds, confirmed,
                 unmeasured_is_long=work_units(params) > UNMEASURED_LONG_UNITS):
        return "", gr.Timer(active=False), gr.Group(visible=True), f"{sentence} Run it?"
    task = submit_generation(services, sid, params, lora_dir or None, owner=owner, page=page,
                             keep_running=bool(keep_running))
    return task_text(task, services.tasks), gr.Timer(active=True), gr.Group(visible=False), ""


def hide_confirm():
    return gr.Group(visible=False), "Not started."


@user_errors
def stop_generation(services, client=None, request: gr.Request = None) -> str:
    """Stop this browser's generation (from any of its pages); nothing of it is saved."""
    task = services.tasks.current(owner_of(client, request), KINDS)
    if task is None or not task.live:
        raise ValueError("No generation of this browser is running.")
    return services.tasks.cancel(task.id)


def attach_generation(services, client=None, request: gr.Request = None):
    """Page load: show a generation this browser started before (a reload, a second page)."""
    live = services.tasks.attach_owner(owner_of(client, request), page_of(request))
    task = next((t for t in live if t.kind in KINDS), None)
    if task is None:
        return gr.skip(), gr.Timer(active=False)
    return task_text(task, services.tasks), gr.Timer(active=True)


def poll_generation(services, session_id, client=None, request: gr.Request = None):
    """Timer tick: the task's progress; when it has ended, the gallery and how it ended."""
    registry, page = services.tasks, page_of(request)
    task = registry.current(owner_of(client, request), KINDS, page)
    if task is None:
        return gr.skip(), gr.skip(), gr.Timer(active=False)
    registry.attach(task, page)
    if task.live:
        return gr.skip(), task_text(task, registry), gr.Timer(active=True)
    registry.mark_seen(task, page)
    if task.status != "done":
        return gr.skip(), task_text(task, registry), gr.Timer(active=False)
    result = task.result
    note = " (demo model: a tiny model trained on 15 bundled photos, not a general generator)" if result["is_demo"] else ""
    where = "" if str(task.params.get("session_id")) == str(session_id) else f" in session #{task.params['session_id']}"
    text = f"Saved {len(result['records'])} image(s){where} in {result['duration_s']:.1f} s{note}."
    return show_generated(services, session_id), text, gr.Timer(active=False)


# ---------------------------------------------------------------------------------------------- compare

COMPARE = ("compare",)


@user_errors
def start_compare(services, prompts_text: str, seeds_text: str, lora_dir: str, detector: str, steps,
                  keep_running: bool = False, client=None, request: gr.Request = None):
    """Queue base vs LoRA on the same prompt x seed set as a server task (progress, Stop, re-attach)."""
    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
    try:
        seeds = [int(x) for x in (seeds_text or "").replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"Seeds: '{seeds_text}' is not whole numbers separated by commas.") from None
    if not prompts or not seeds:
        raise ValueError("Prompts and Seeds: give at least one prompt and one seed.")
    if not (lora_dir or "").strip():
        raise ValueError("LoRA folder: empty; give the LoRA to compare against (Parameters → LoRA folder).")
    steps = number(steps, "Steps", minimum=2, maximum=50, whole=True)
    detector = (detector or "demo").strip()
    owner = owner_of(client, request)
    busy = [t for t in services.tasks.tasks(owner, "compare") if t.live]
    if busy:
        raise ValueError(f"A comparison of this browser is already {busy[0].status}; stop it first.")

    def work(task):
        def report(done: int, total: int) -> None:
            task.progress(done, total, "Generating and scoring")

        rows = services.compare_models(prompts, seeds, lora_dir.strip(), detector, num_inference_steps=steps,
                                       progress=report, should_stop=task.should_stop)
        return {"rows": rows, "detector": detector}

    task = services.tasks.submit("compare", owner, work, page=page_of(request), keep_running=bool(keep_running),
                                 label=f"{len(prompts)} prompt(s) x {len(seeds)} seed(s), base and LoRA")
    return task_text(task, services.tasks), gr.Timer(active=True)


@user_errors
def stop_compare(services, client=None, request: gr.Request = None) -> str:
    task = services.tasks.current(owner_of(client, request), COMPARE)
    if task is None or not task.live:
        raise ValueError("No comparison of this browser is running.")
    return services.tasks.cancel(task.id)


def attach_compare(services, client=None, request: gr.Request = None):
    live = services.tasks.attach_owner(owner_of(client, request), page_of(request))
    task = next((t for t in live if t.kind in COMPARE), None)
    if task is None:
        return gr.skip(), gr.Timer(active=False)
    return task_text(task, services.tasks), gr.Timer(active=True)


def poll_compare(services, client=None, request: gr.Request = None):
    """Timer tick: the comparison's progress; when done, the totals and the gallery."""
    registry, page = services.tasks, page_of(request)
    task = registry.current(owner_of(client, request), COMPARE, page)
    if task is None:
        return gr.skip(), gr.skip(), gr.Timer(active=False)
    registry.attach(task, page)
    if task.live:
        return task_text(task, registry), gr.skip(), gr.Timer(active=True)
    registry.mark_seen(task, page)
    if task.status != "done":
        return task_text(task, registry), gr.skip(), gr.Timer(active=False)
    totals, items = compare_view(task.result["rows"], task.result["detector"])
    return totals, items, gr.Timer(active=False)


def compare_view(rows: list[dict], detector: str) -> tuple[str, list]:
    """(totals line, gallery items: per prompt x seed base · base heatmap · tuned · tuned heatmap)."""
    from engines.detection.detect import render_overlay

    items = []
    for r in rows:
        label = f"{r['prompt'][:40]} · seed {r['seed']}"
        items += [(r["base"], f"base · {label}"),
                  (render_overlay(r["base"], r["base_heatmap"]), f"base artifact area {100 * r['base_area']:.1f}%"),
                  (r["tuned"], f"tuned · {label}"),
                  (render_overlay(r["tuned"], r["tuned_heatmap"]), f"tuned artifact area {100 * r['tuned_area']:.1f}%")]
    base = sum(r["base_area"] for r in rows) / len(rows)
    tuned = sum(r["tuned_area"] for r in rows) / len(rows)
    totals = (f"**Mean artifact area** (detector `{detector}`, threshold 0.5) over {len(rows)} images: base "
              f"**{100 * base:.2f}%**, tuned **{100 * tuned:.2f}%** ({100 * (tuned - base):+.2f} points)")
    return totals, items


def active_lora(services, current: str) -> str:
    """Keep what the user typed; otherwise offer the LoRA chosen in Train."""
    return current or services.active_lora or ""


def show_generated(services, session_id) -> list:
    if session_id in (None, ""):
        return []
    records = [r for r in services.store.list_images(int(session_id)) if r.source == "generated"]
    return gallery_items(list(reversed(records)))


def _default_size(services) -> tuple[int, int]:
    # The demo pipeline was trained at 128x128 (DEMO_SIZE); real SD-style pipelines default to 512 (SDXL: 1024).
    from engines.models import DEMO_SIZE

    return (DEMO_SIZE, DEMO_SIZE) if services.uses_demo_model else (512, 512)

