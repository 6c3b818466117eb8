"""Models tab: what is loaded (device, memory), what is usable on disk, and switching in place.

Switching the text-to-image model, the segmenter or the default detector needs no restart; a model
that fails to load leaves the previous one in use (studio.services `switch_*`).
"""
from __future__ import annotations

import gradio as gr

from studio.web.catalog import scan
from studio.web.tabs.common import GPU, Shared, bind, user_errors, wire

LOADED_HEADERS = ["role", "model", "device", "parameters", "memory (MB)", "state"]
AVAILABLE_HEADERS = ["kind", "spec (what to load)", "where", "note"]
KINDS = {"text-to-image": "text2image", "segmenter": "segmenter", "detector": "detector", "LoRA": "lora"}


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` rescans the disk and refreshes what is loaded."""
    with gr.Row():
        with gr.Column(scale=3):
            loaded = gr.Dataframe(headers=LOADED_HEADERS, label="Loaded in this studio", interactive=False,
                                  elem_id="models-loaded")
            available = gr.Dataframe(headers=AVAILABLE_HEADERS, label="Usable on this machine (data dir, jobs, "
                                     "Hugging Face cache)", interactive=False, elem_id="models-available")
            rescan = gr.Button("Rescan", elem_id="models-rescan")
        with gr.Column(scale=2):
            kind = gr.Radio(list(KINDS), value="text-to-image", label="Switch", elem_id="models-kind")
            spec = gr.Dropdown([], label="Model (pick one found, or type a path / hub id / FAMILY:PATH)",
                               allow_custom_value=True, elem_id="models-spec")
            switch = gr.Button("Load and switch", variant="primary", elem_id="models-switch")
            status = gr.Markdown(elem_id="models-status")
            gr.Markdown("A model that fails to load leaves the previous one in use. The segmenter applies to the "
                        "Label tab's next image; a LoRA is offered in Generate.")

    shown = [loaded, available, spec]
    wire(tab.select, bind(refresh, services), inputs=[kind], outputs=shown)
    wire(rescan.click, bind(refresh, services), inputs=[kind], outputs=shown)
    wire(kind.change, bind(refresh, services), inputs=[kind], outputs=shown)
    wire(switch.click, bind(switch_model, services), inputs=[kind, spec], outputs=[status, loaded], status=status,
         concurrency_id=GPU, concurrency_limit=1)


def refresh(services, kind: str):
    """Loaded models, usable models, and the choices for the chosen kind (the current one selected)."""
    found = scan(services.data_dir)
    rows = [[a.kind, a.spec, a.where, a.note] for a in found]
    wanted = KINDS.get(kind, "text2image")
    choices = list(dict.fromkeys(a.spec for a in found if a.kind == wanted))
    current = {"text2image": services.model_spec, "segmenter": services.segmenter_spec,
               "detector": services.active_detector, "lora": services.active_lora}[wanted]
    if current and current not in choices:
        choices.insert(0, current)
    return loaded_rows(services), rows, gr.Dropdown(choices=choices, value=current or None)


def loaded_rows(services) -> list[list]:
    return [[r["role"], r["spec"], r["device"], _count(r["parameters"]), r["memory_mb"], r["note"]]
            for r in services.loaded_models()]


@user_errors
def switch_model(services, kind: str, spec: str, progress=gr.Progress()):
    """Load `spec` for `kind` and switch to it; a failure keeps the current model and says why."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("Model: empty; pick one from the list or type a path or hub id.")
    progress(0, desc=f"Loading {spec}")
    wanted = KINDS.get(kind)
    if wanted == "text2image":
        message = services.switch_text2image(spec)
    elif wanted == "segmenter":
        message = services.switch_segmenter(spec)
    elif wanted == "detector":
        message = services.switch_detector(spec)
    elif wanted == "lora":
        from pathlib import Path

        if not Path(spec).expanduser().is_dir():
            raise ValueError(f"Model: LoRA folder '{spec}' does not exist.")
        services.active_lora = str(Path(spec).expanduser())
        message = f"LoRA '{spec}' is offered in Generate (tick Use LoRA there)."
    else:
        raise ValueError(f"Switch: unknown kind '{kind}'; choose one of {', '.join(KINDS)}.")
    gr.Info(message)
    return message, loaded_rows(services)


def _count(n) -> str:
    if not n:
        return ""
    return f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)
