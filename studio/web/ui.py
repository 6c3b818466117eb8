"""build_ui(services) -> gr.Blocks: the header, the shared session selector, one call per tab, the API."""
from __future__ import annotations

import uuid

import gradio as gr

from studio.web import api
from studio.web.tabs import corrupt, experiments, generate, inspect, label, models, sessions, train
from studio.web.tabs.common import STATE_SECRET, PerBrowser, Shared, bind, page_of, session_choices, wire

SESSION_STORAGE_KEY = "artifact-studio-current-session"
CLIENT_STORAGE_KEY = "artifact-studio-client"
HEAD = label.KEYBOARD_JS
"""HTML for launch(head=...): the Label tab's keyboard shortcuts."""


def build_ui(services) -> gr.Blocks:
    per_browser = PerBrowser()
    with gr.Blocks(title="Artifact Studio") as demo:
        api.register(services)  # first, so the API's names are taken before any UI event's
        header = gr.Markdown(header_text(services), elem_id="header")
        with gr.Row():
            session = gr.Dropdown(label="Current session", choices=session_choices(services), value=None,
                                  interactive=True, scale=3, elem_id="current-session")
        browser_session = gr.BrowserState(None, storage_key=SESSION_STORAGE_KEY, secret=STATE_SECRET)
        client = gr.BrowserState(None, storage_key=CLIENT_STORAGE_KEY, secret=STATE_SECRET)
        shared = Shared(session=session, browser_session=browser_session, per_browser=per_browser, client=client,
                        demo=demo)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate") as tab:
                generate.build(services, shared, tab)
            with gr.Tab("Inspect", id="inspect") as tab:
                inspect.build(services, shared, tab)
            with gr.Tab("Label", id="label") as tab:
                label.build(services, shared, tab)
            with gr.Tab("Corrupt", id="corrupt") as tab:
                corrupt.build(services, shared, tab)
            with gr.Tab("Train", id="train") as tab:
                train.build(services, shared, tab)
            with gr.Tab("Experiments", id="experiments") as tab:
                experiments.build(services, shared, tab)
            with gr.Tab("Sessions", id="sessions") as tab:
                sessions.build(services, shared, tab)
            with gr.Tab("Models", id="models") as tab:
                models.build(services, shared, tab)
        for component in shared.deferred:  # browser states: mounted at once, outside the tabs
            component.render()
        wire(session.change, remember_session, inputs=[session], outputs=[browser_session], queue=False)
        wire(demo.load, bind(restore_session, services), inputs=[browser_session], outputs=[session])
        wire(demo.load, browser_id, inputs=[client], outputs=[client], queue=False)
        wire(demo.load, bind(header_text, services), outputs=[header], queue=False)  # the model may have changed
        demo.unload(bind(page_closed, services, per_browser))
    return demo


def restore_session(services, remembered) -> gr.Dropdown:
    """On page load: the session this browser used last, else the most recently updated one."""
    choices = session_choices(services)
    ids = [value for _, value in choices]
    try:
        value = int(remembered) if remembered is not None else None
    except (TypeError, ValueError):
        value = None
    if value not in ids:
        value = ids[0] if ids else None
    return gr.Dropdown(choices=choices, value=value)


def remember_session(session_id):
    return session_id


def browser_id(current):
    """This browser's id (kept in localStorage): the owner of the tasks its pages start."""
    return current if isinstance(current, str) and current else uuid.uuid4().hex


def page_closed(services, per_browser: PerBrowser, request: gr.Request = None) -> None:
    """demo.unload: free the page's heavy objects; its tasks stop unless watched again soon or kept running."""
    services.tasks.page_closed(page_of(request))
    per_browser.free(request)


def header_text(services) -> str:
    return f"## Artifact Studio\n{_header(services)}"


def _header(services) -> str:
    lines = [] if services.uses_demo_model else [f"Model: `{services.model_spec}` on `{services.device}`."]
    lines += [services.demo_header()] if services.demo_header() else []
    return "  \n".join(lines + [f"Data directory: `{services.data_dir}`"])
