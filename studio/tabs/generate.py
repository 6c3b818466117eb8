"""Generate tab: prompt and parameters in, images of the current session out (newest first)."""
from __future__ import annotations

import threading

import gradio as gr

from engines.generate import Cancelled, GenerateParams
from studio.tabs.common import GPU, Shared, bind, gallery_items, require_session, user_errors

STOP_KEY = "generate-stop"


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes it (other tabs may have changed the session)."""
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a portrait photo of a pianist's hands",
                                elem_id="generate-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2)
            with gr.Accordion("Parameters", open=True):
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                    count = gr.Slider(label="Images", minimum=1, maximum=8, step=1, value=1)
                with gr.Row():
                    steps = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=20)
                    guidance = gr.Slider(label="Guidance scale", minimum=0.0, maximum=20.0, step=0.5, value=7.5)
                default_w, default_h = _default_size(services)
                trajectory = gr.Checkbox(value=False, label="Record trajectory map (experimental, shown in Inspect)")
                with gr.Row():
                    use_lora = gr.Checkbox(value=False, label="Use LoRA", elem_id="generate-use-lora")
                    lora = gr.Textbox(label="LoRA folder (Train: 'Use this checkpoint' fills it)", scale=3,
                                      elem_id="generate-lora")
                with gr.Row():
                    width = gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=default_w)
                    height = gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=default_h)
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                stop = gr.Button("Stop", variant="stop", elem_id="generate-stop")
            status = gr.Markdown(elem_id="generate-status")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Generated in this session (newest first)", columns=3, height=560,
                                 elem_id="generate-gallery", interactive=False)
            with gr.Accordion("Compare models: base vs tuned LoRA", open=False):
                cmp_prompts = gr.Textbox(label="Prompts (one per line)", lines=3,
                                         value="a photo of a hand holding a cup\na portrait of a pianist")
                with gr.Row():
                    cmp_seeds = gr.Textbox(label="Seeds", value="0,1")
                    cmp_detector = gr.Textbox(label="Detector", value="demo")
                    cmp_steps = gr.Slider(2, 50, value=20, step=1, label="Steps")
                compare = gr.Button("Compare", elem_id="generate-compare")
                cmp_totals = gr.Markdown(elem_id="generate-compare-totals")
                cmp_gallery = gr.Gallery(label="Per prompt x seed: base · base heatmap · tuned · tuned heatmap",
                                         columns=4, height=420, interactive=False)

    inputs = [shared.session, prompt, negative, seed, steps, guidance, width, height, count, trajectory, use_lora, lora]
    run.click(bind(generate_images, services, shared), inputs=inputs, outputs=[gallery, status],
              concurrency_id=GPU, concurrency_limit=1)
    stop.click(bind(stop_generation, shared), inputs=None, outputs=[status], queue=False)
    compare.click(bind(compare_models, services), inputs=[cmp_prompts, cmp_seeds, lora, cmp_detector, cmp_steps],
                  outputs=[cmp_totals, cmp_gallery], concurrency_id=GPU, concurrency_limit=1)
    shared.session.change(bind(show_generated, services), inputs=[shared.session], outputs=[gallery])
    tab.select(bind(show_generated, services), inputs=[shared.session], outputs=[gallery])
    tab.select(bind(active_lora, services), inputs=[lora], outputs=[lora])


@user_errors
def generate_images(services, shared: Shared, session_id, prompt: str, negative_prompt: str, seed, steps,
                    guidance, width, height, count, record_trajectory: bool = False, use_lora: bool = False,
                    lora_dir: str = "", request: gr.Request = None,
                    progress=gr.Progress()):
    """Run the engine, store every image with its parameters, return the session's gallery."""
    sid = require_session(session_id)
    services.store.get_session(sid)  # unknown session -> one sentence before any work
    params = GenerateParams(prompt=prompt or "", negative_prompt=negative_prompt or "", seed=int(seed or 0),
                            num_inference_steps=int(steps), guidance_scale=float(guidance),
                            width=int(width), height=int(height), num_images=int(count),
                            record_trajectory=bool(record_trajectory))
    params.validate()
    stop_flag: threading.Event = shared.per_browser.get(request, STOP_KEY, threading.Event)
    stop_flag.clear()
    progress(0, desc="Loading model")
    engine = services.text2image()

    def report(step: int, total: int) -> None:
        progress((step, total), desc="Denoising", unit="steps")

    lora_dir = (lora_dir or "").strip() if use_lora else ""
    if use_lora and not lora_dir:
        raise ValueError("Give the LoRA folder, or untick Use LoRA.")
    try:
        with services.gpu_lock:
            services.use_lora(lora_dir or None)
            result = engine.generate(params, progress=report, should_stop=stop_flag.is_set)
    except Cancelled:
        return show_generated(services, sid), "Stopped; nothing was saved."
    records = services.save_generation(sid, result, lora=lora_dir or None)
    note = " (demo model: a tiny model trained on 15 bundled photos, not a general generator)" if result.is_demo else ""
    status = f"Saved {len(records)} image(s) in {result.duration_s:.1f} s{note}."
    return show_generated(services, sid), status


@user_errors
def compare_models(services, prompts_text: str, seeds_text: str, lora_dir: str, detector: str, steps,
                   progress=gr.Progress()):
    """Base vs LoRA on the same prompt x seed set, each with its heatmap and artifact area; totals on top."""
    from engines.detect import render_overlay

    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
    try:
        seeds = [int(x) for x in (seeds_text or "").replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"Seeds must be whole numbers separated by commas, got '{seeds_text}'.") from None
    if not (lora_dir or "").strip():
        raise ValueError("Give the LoRA folder to compare against (Parameters → LoRA folder).")

    def report(done: int, total: int) -> None:
        progress((done, total), desc="Generating and scoring")

    rows = services.compare_models(prompts, seeds, lora_dir.strip(), (detector or "demo").strip(),
                                   num_inference_steps=int(steps), progress=report)
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


def stop_generation(shared: Shared, request: gr.Request = None) -> str:
    """Ask the running generation of this browser to stop after the current step."""
    shared.per_browser.get(request, STOP_KEY, threading.Event).set()
    return "Stopping after the current step…"


def show_generated(services, session_id) -> list:
    if session_id in (None, ""):
        return []
    records = [r for r in services.store.list_images(int(session_id)) if r.source == "generated"]
    return gallery_items(list(reversed(records)))


def _default_size(services) -> tuple[int, int]:
    # The demo pipeline makes 256x256; real SD-style pipelines default to 512 (SDXL: 1024).
    return (256, 256) if services.uses_demo_model else (512, 512)
