"""Experiments tab: the paper-protocol runs of this data directory, their progress per step, tables and plots.

Runs are started from the command line (`artifact-studio experiment run CONFIG.toml`); each step is a job,
so this tab only reads run folders and the `jobs` table, and re-attaches after reloads and restarts.
"""
from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from studio.web.tabs.common import Shared, bind, wire

STEP_HEADERS = ["step", "state", "units done", "job", "current unit", "seconds"]
HINT = ("Start a run from a terminal: `artifact-studio experiment run tiny` (minutes on CPU, synthetic data) or "
        "`artifact-studio experiment run assets/experiments/paper.toml --device cuda` (the paper's protocol; "
        "see the README). Runs under `<data-dir>/experiments/` and every folder an experiment job names appear here.")


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; a timer refreshes the shown run every 3 s while the tab is open."""
    gr.Markdown(HINT)
    with gr.Row():
        run = gr.Dropdown([], label="Run", scale=4, elem_id="experiments-run")
        refresh_button = gr.Button("Refresh", scale=1, elem_id="experiments-refresh")
    summary = gr.Markdown(elem_id="experiments-summary")
    steps = gr.Dataframe(headers=STEP_HEADERS, interactive=False, label="Steps", elem_id="experiments-steps")
    results = gr.Markdown(elem_id="experiments-results")
    plots = gr.Gallery(label="Plots", columns=2, height="auto", elem_id="experiments-plots")
    timer = gr.Timer(3.0, active=True)

    view = [run, summary, steps, results, plots]
    wire(tab.select, bind(refresh, services), inputs=[run], outputs=view)
    wire(refresh_button.click, bind(refresh, services), inputs=[run], outputs=view)
    wire(run.input, bind(refresh, services), inputs=[run], outputs=view)
    wire(timer.tick, bind(refresh_progress, services), inputs=[run], outputs=[summary, steps], queue=False,
         show_progress="hidden")


def run_choices(services) -> list[tuple[str, str]]:
    """(label, run folder) for every run of this data directory, newest first."""
    from studio.experiments.runner import list_runs

    choices = []
    for folder in list_runs(services.data_dir, services.store):
        choices.append((f"{folder.name}  ({folder})", str(folder)))
    return choices


def refresh(services, run_dir: str | None):
    """Runs list, and for the chosen run: summary, step table, results (tables) and plots."""
    choices = run_choices(services)
    values = [value for _, value in choices]
    if run_dir not in values:
        run_dir = values[0] if values else None
    dropdown = gr.Dropdown(choices=choices, value=run_dir)
    if run_dir is None:
        return dropdown, "No experiment runs yet.", [], "", []
    summary, rows = progress_view(services, run_dir)
    return dropdown, summary, rows, results_view(run_dir), plot_images(run_dir)


def refresh_progress(services, run_dir: str | None):
    """Only the summary and the step table (cheap; called by the timer)."""
    if not run_dir:
        return gr.Markdown(), gr.Dataframe()
    return progress_view(services, run_dir)


def progress_view(services, run_dir: str) -> tuple[str, list[list]]:
    from studio.experiments.runner import run_status

    try:
        status = run_status(Path(run_dir), services.store)
    except (ValueError, OSError) as exc:
        return f"Cannot read this run: {' '.join(str(exc).split())}", []
    rows = []
    for s in status["steps"]:
        current = f"{s['current']['unit']}: {s['current']['done']}/{s['current']['total']}" if s["current"] else ""
        rows.append([s["title"], s["state"], f"{s['units_done']}/{s['units_total']}",
                     "" if s["job_id"] is None else s["job_id"], current, s["seconds"]])
    done = sum(s["state"] == "done" for s in status["steps"])
    state = "finished" if status["finished"] else f"{done} of {len(status['steps'])} steps done"
    summary = (f"**{status['name']}** (profile {status['profile']}, device `{status['device']}`): {state}. "
               f"Folder `{status['run_dir']}`.")
    return summary, rows


def results_view(run_dir: str) -> str:
    """results.md without its image lines (the plots are shown in the gallery)."""
    file = Path(run_dir) / "results.md"
    if not file.is_file():
        return "_No report yet: it is written when the last step finishes (or by `artifact-studio experiment report DIR`)._"
    text = file.read_text()
    return re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$", "", text, flags=re.MULTILINE)


def plot_images(run_dir: str) -> list:
    """(PIL image, caption) for every plot of the run (read here, so no folder has to be served)."""
    from PIL import Image

    folder = Path(run_dir) / "plots"
    if not folder.is_dir():
        return []
    items = []
    for file in sorted(folder.glob("*.png")):
        with Image.open(file) as image:
            items.append((image.convert("RGB"), file.stem.replace("_", " ")))
    return items
