"""Sessions tab: list, create, rename, switch and delete sessions; browse and upload images."""
from __future__ import annotations

import gradio as gr

from engines.images import load_image
from studio.store.records import NewImage
from studio.web.tabs import classifier_panels
from studio.web.tabs.common import (Shared, bind, gallery_items, require_session, session_choices, user_errors, user_message,
                                wire)

TABLE_HEADERS = ["id", "name", "images", "updated (UTC)"]


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; `tab.select` refreshes it (other tabs may have changed the session)."""
    with gr.Row():
        with gr.Column(scale=2):
            table = gr.Dataframe(headers=TABLE_HEADERS, value=session_rows(services), interactive=False,
                                 label="Sessions", elem_id="sessions-table")
            name = gr.Textbox(label="Session name", placeholder="hands-study", elem_id="sessions-name")
            with gr.Row():
                create = gr.Button("New session", elem_id="sessions-new")
                rename = gr.Button("Rename current", elem_id="sessions-rename")
                delete = gr.Button("Delete current…", variant="stop", elem_id="sessions-delete")
            with gr.Row(visible=False) as confirm_row:
                confirm_text = gr.Markdown()
                confirm = gr.Button("Yes, delete it and its images", variant="stop", elem_id="sessions-confirm-delete")
                cancel = gr.Button("Cancel")
            upload = gr.File(label="Upload images into the current session", file_count="multiple",
                             file_types=["image"], elem_id="sessions-upload")
            with gr.Accordion("Export labels", open=False):
                with gr.Row():
                    export_format = gr.Dropdown(["png", "coco", "hf", "synartifact", "mmseg", "vlm"], value="coco",
                                                label="Format")
                    export_dir = gr.Textbox(label="Folder (new or empty, inside the exports folder)",
                                            placeholder="hands-coco", elem_id="sessions-export-dir")
                export_background = gr.Checkbox(label="Also export never-labelled images (as all background)",
                                                value=False, elem_id="sessions-export-background")
                export = gr.Button("Export current session", elem_id="sessions-export")
            message = gr.Markdown(elem_id="sessions-message")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images in this session", columns=4, height=520, elem_id="sessions-gallery",
                                 interactive=False)
            provenance = gr.JSON(label="Provenance of the selected image")
            class_counts = classifier_panels.sessions_counts_panel()

    session = shared.session
    wire(create.click, bind(create_session, services), inputs=[name], outputs=[session, table, message], status=message)
    wire(rename.click, bind(rename_session, services), inputs=[session, name], outputs=[session, table, message],
         status=message)
    wire(delete.click, ask_delete, inputs=[session, name], outputs=[confirm_row, confirm_text, message], status=message)
    wire(cancel.click, hide_confirm, outputs=[confirm_row])
    wire(confirm.click, bind(delete_session, services), inputs=[session],
         outputs=[session, table, message, confirm_row], status=message)
    wire(upload.upload, bind(upload_images, services), inputs=[session, upload],
         outputs=[gallery, table, message, upload], status=message)
    wire(session.change, bind(show_session, services), inputs=[session], outputs=[gallery, table, provenance])
    wire(tab.select, bind(show_session, services), inputs=[session], outputs=[gallery, table, provenance])
    wire(tab.select, bind(refresh_choices, services), inputs=[session], outputs=[session])
    wire(gallery.select, bind(show_provenance, services), inputs=[session], outputs=[provenance])
    wire(export.click, bind(export_labels, services), inputs=[session, export_format, export_dir, export_background], outputs=[message],
         status=message)
    classifier_panels.wire_sessions_counts(services, shared, class_counts, tab)


def refresh_choices(services, session_id):
    """Sessions made elsewhere (another page, the API, the CLI) become choosable without a reload."""
    choices = session_choices(services)
    value = session_id if session_id in [v for _, v in choices] else (choices[0][1] if choices else None)
    return gr.Dropdown(choices=choices, value=value)


def session_rows(services) -> list[list]:
    return [[s.id, s.name, s.image_count, s.updated_at[:19].replace("T", " ")] for s in services.store.list_sessions()]


@user_errors
def create_session(services, name: str):
    info = services.store.create_session(name)
    return (gr.Dropdown(choices=session_choices(services), value=info.id), session_rows(services),
            f"Created session **{info.name}**.")


@user_errors
def rename_session(services, session_id, name: str):
    info = services.store.rename_session(require_session(session_id), name)
    return (gr.Dropdown(choices=session_choices(services), value=info.id), session_rows(services),
            f"Renamed to **{info.name}**.")


@user_errors
def ask_delete(session_id, _name: str):
    require_session(session_id)
    return (gr.Row(visible=True), "Delete the current session with all its images and masks? This cannot be undone.",
            gr.skip())


def hide_confirm():
    return gr.Row(visible=False)


@user_errors
def delete_session(services, session_id):
    sid = require_session(session_id)
    name = services.store.get_session(sid).name
    services.store.delete_session(sid)
    choices = session_choices(services)
    return (gr.Dropdown(choices=choices, value=choices[0][1] if choices else None), session_rows(services),
            f"Deleted session **{name}**.", gr.Row(visible=False))


@user_errors
def upload_images(services, session_id, files):
    """Import every uploaded file, all or nothing: one bad file names itself and nothing is stored."""
    sid = require_session(session_id)
    services.store.get_session(sid)
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        raise ValueError("No files were uploaded.")
    items = []
    for path in paths:
        label = path.rsplit("/", 1)[-1]
        try:
            rgb = load_image(path, name=label)
        except ValueError as exc:
            raise ValueError(f"{user_message(exc)} Nothing was imported.") from None
        items.append(NewImage(rgb=rgb, source="uploaded", original_name=label))
    records = services.store.add_images(sid, items)
    return (gallery_items(services.store.list_images(sid)), session_rows(services),
            f"Imported {len(records)} image(s).", None)


def show_session(services, session_id):
    if session_id in (None, ""):
        return [], session_rows(services), None
    return gallery_items(services.store.list_images(int(session_id))), session_rows(services), None


def show_provenance(services, session_id, evt: gr.SelectData):
    if session_id in (None, "") or evt is None or evt.index is None:
        return None
    records = services.store.list_images(int(session_id))
    index = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= index < len(records):
        return None
    rec = records[index]
    return {"id": rec.id, "source": rec.source, "parent_id": rec.parent_id, "model_id": rec.model_id,
            "generation_id": rec.generation_id, "size": f"{rec.width}x{rec.height}", "sha256": rec.sha256,
            "original_name": rec.original_name, "created_at": rec.created_at, "params": rec.params}


@user_errors
def export_labels(services, session_id, fmt: str, folder: str, unlabelled_as_background: bool = False) -> str:
    """Export the current session's labels into a folder inside `services.exports_dir` (split by image
    family, studio.datasets.splits); never-labelled images only when `unlabelled_as_background`."""
    from studio.datasets.export import export_session

    sid = require_session(session_id)
    out = export_folder(services, folder)
    summary = export_session(services.store, sid, fmt, out, services.taxonomy(sid),
                             unlabelled_as_background=bool(unlabelled_as_background))
    return f"Exported {summary.images} image(s) and {summary.regions} region(s) as **{fmt}** to `{summary.out_dir}`."


def export_folder(services, folder: str):
    """The export folder as a Path, inside <data-dir>/exports or `serve --export-root` (Services.export_path)."""
    return services.export_path(folder)
