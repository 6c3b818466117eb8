"""The artifact classifier (SynArtifact) inside other tabs: Label "Suggest", Inspect "Classify regions",
Sessions per-class counts, Train "LoRA with classifier feedback".

Each panel is built inside its host tab's layout (`*_panel()` returns the components) and wired once
the host's components exist (`wire_*`). A classifier never writes to a region by itself: Suggest only
shows classes and a caption; Accept (one click, or the `a` key) is the person's edit, and the region's
author becomes "classifier-assisted".
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.web.tabs import inspect_view
from studio.web.tabs.label_screen import need_image, screen, selected_region
from studio.web.tabs.common import GPU, Shared, bind, number, require_session, user_errors, wire

SUGGESTION_KEY = "label-suggestion"
CLASS_HEADERS = ["region", "class", "probability", "caption"]


@dataclass
class Suggestion:
    """The last suggestion shown in one browser: for which region (key and mask version) and what."""

    image_id: int | None = None
    key: str | None = None
    mask_id: int | None = None
    class_name: str | None = None
    caption: str = ""


# ---------------------------------------------------------------------------------------------- Label

@dataclass(frozen=True)
class LabelSuggestPanel:
    spec: gr.Textbox
    suggest: gr.Button
    accept: gr.Button
    text: gr.Markdown


def label_suggest_panel(services) -> LabelSuggestPanel:
    """Suggest / Accept stay visible (their s and a keys act only on visible buttons); the classifier
    choice folds away."""
    with gr.Row():
        suggest = gr.Button("Suggest a class (s)", elem_id="label-suggest")
        accept = gr.Button("Accept suggestion (a)", elem_id="label-accept-suggestion")
    text = gr.Markdown(elem_id="label-suggestion")
    with gr.Accordion("Artifact classifier for suggestions", open=False):
        spec = gr.Textbox(label="Classifier", value=getattr(services, "active_classifier", None) or "demo",
                          elem_id="label-classifier", info="demo, head:FOLDER, vlm:FOLDER_OR_HUB_ID or a trained folder")
    return LabelSuggestPanel(spec, suggest, accept, text)


def wire_label_suggest(services, shared: Shared, panel: LabelSuggestPanel, screen: list, status) -> None:
    """`screen`: the Label tab's screen outputs; `status`: its status line (where Accept's errors show)."""
    wire(panel.suggest.click, bind(suggest_region, services, shared), inputs=[shared.session, panel.spec],
         outputs=[panel.text], status=panel.text, concurrency_id=GPU, concurrency_limit=1)
    wire(panel.accept.click, bind(accept_suggestion, services, shared), inputs=[shared.session],
         outputs=[*screen, panel.text], status=status)


@user_errors
def suggest_region(services, shared: Shared, session_id, spec: str, request: gr.Request = None) -> str:
    """Top classes and a caption for the selected region; nothing is written."""
    require_session(session_id)
    view = need_image(shared, request)
    region = selected_region(services, view)
    out = services.suggest(view.image_id, region.key, (spec or "demo").strip())
    shared.per_browser.get(request, SUGGESTION_KEY, Suggestion).__dict__.update(
        image_id=view.image_id, key=region.key, mask_id=region.mask_id, class_name=out["class_name"],
        caption=out["caption"] or "")
    ranked = " · ".join(f"**{name}** {p:.2f}" if i == 0 else f"{name} {p:.2f}" for i, (name, p) in enumerate(out["classes"]))
    lines = [f"{region.key}: {ranked}"]
    if out["caption"]:
        lines.append(f"caption: *{out['caption']}*")
    lines.append("Accept (a) sets the class (and the caption if the region has none); the region becomes "
                 "classifier-assisted.")
    if out["note"]:
        lines.append(f"⚠️ {out['note']}")
    return "  \n".join(lines)


@user_errors
def accept_suggestion(services, shared: Shared, session_id, request: gr.Request = None):
    """Apply the shown suggestion to its region: one undoable edit, author "classifier-assisted"."""
    sid = require_session(session_id)
    view = need_image(shared, request)
    s = shared.per_browser.get(request, SUGGESTION_KEY, Suggestion)
    if s.key is None or s.image_id != view.image_id:
        raise ValueError("Ask for a suggestion first (Suggest, or the s key).")
    region = next((r for r in services.store.label_state(view.image_id).regions if r.key == s.key), None)
    if region is None or region.mask_id != s.mask_id:
        raise ValueError("The region changed since the suggestion was made; ask for a new suggestion.")
    if s.class_name not in [c["name"] for c in services.taxonomy(sid)]:
        raise ValueError(f"The suggested class {s.class_name!r} is not in this session's taxonomy; pick a class by hand "
                         "or use a classifier trained on these classes.")
    services.store.edit_regions(view.image_id, update={region.key: {
        "class_name": s.class_name, "caption": region.caption or s.caption or None, "author": "classifier-assisted"}},
        action=f"accept classifier suggestion ({s.class_name})")
    view.selected = region.key
    name = s.class_name
    s.__dict__.update(Suggestion().__dict__)
    return (*screen(services, view, f"Accepted: {region.key} is {name} (classifier-assisted)."), "")


# ---------------------------------------------------------------------------------------------- Inspect

@dataclass(frozen=True)
class InspectClassifyPanel:
    spec: gr.Textbox
    run: gr.Button
    table: gr.Dataframe
    note: gr.Markdown


def inspect_classify_panel(services) -> InspectClassifyPanel:
    with gr.Accordion("Classify the regions (artifact classifier)", open=False):
        with gr.Row():
            spec = gr.Textbox(label="Classifier", value=getattr(services, "active_classifier", None) or "demo",
                              elem_id="inspect-classifier", scale=3)
            run = gr.Button("Classify regions", elem_id="inspect-classify", scale=1)
        table = gr.Dataframe(headers=CLASS_HEADERS, interactive=False, elem_id="inspect-classes",
                             label="Class of each region (same names as the regions table)")
        note = gr.Markdown(elem_id="inspect-classify-note")
    return InspectClassifyPanel(spec, run, table, note)


def wire_inspect_classify(services, shared: Shared, panel: InspectClassifyPanel, threshold) -> None:
    wire(panel.run.click, bind(classify_regions, services, shared), inputs=[shared.session, panel.spec, threshold],
         outputs=[panel.table, panel.note], status=panel.note, concurrency_id=GPU, concurrency_limit=1)


@user_errors
def classify_regions(services, shared: Shared, session_id, spec: str, threshold, request: gr.Request = None):
    """The detector regions of the open image (at the threshold), each with its most probable class."""
    from engines.detection.detect import find_regions

    view = inspect_view.view_of(shared, request)
    if view.rgb is None or view.scores is None:
        raise ValueError("Open an image with a heatmap first (Detect this image).")
    found, _ = find_regions(view.scores, float(threshold))
    if not found:
        return [], f"No region at threshold {float(threshold):.2f}."
    found = found[:50]
    image = services.store.get_image(view.image_id) if view.image_id is not None else None
    taxonomy = services.taxonomy(image.session_id) if image is not None else None
    classifier = services.classifier((spec or "demo").strip(), taxonomy)
    with services.gpu_lock:
        results = classifier.classify([view.rgb], [[r.bbox for r in found]], taxonomy=taxonomy)
    rows = []
    for region, result in zip(found, results):
        name, p = max(result.probabilities, key=lambda kv: kv[1])
        caption = result.predicted[0].caption if result.predicted else ""
        rows.append([f"R{region.label}", name, round(p, 3), caption])
    note = f"`{classifier.classifier_id}`" + (f" · ⚠️ {classifier.loaded.note}" if classifier.loaded.note else "")
    return rows, note


# ---------------------------------------------------------------------------------------------- Sessions

def sessions_counts_panel() -> gr.Dataframe:
    return gr.Dataframe(headers=["class", "regions"], interactive=False, label="Regions per class (current labels)",
                        elem_id="sessions-class-counts")


def wire_sessions_counts(services, shared: Shared, table: gr.Dataframe, tab: gr.Tab) -> None:
    wire(shared.session.change, bind(class_counts, services), inputs=[shared.session], outputs=[table])
    wire(tab.select, bind(class_counts, services), inputs=[shared.session], outputs=[table])


@user_errors
def class_counts(services, session_id) -> list[list]:
    if session_id in (None, ""):
        return []
    counts = services.store.class_counts(int(session_id))
    return [[name if name is not None else "unclassified", n] for name, n in counts.items()]


# ---------------------------------------------------------------------------------------------- Train

@dataclass(frozen=True)
class FeedbackPanel:
    prompts: gr.Textbox
    classifier: gr.Textbox
    detector: gr.Textbox
    steps: gr.Number
    launch: gr.Button
    message: gr.Markdown


def feedback_panel(services) -> FeedbackPanel:
    with gr.Accordion("Diffusion LoRA with classifier feedback (DDPO)", open=False):
        prompts = gr.Textbox(label="Prompts (one per line; a seeded quarter is held out for the before/after report)",
                             lines=4, value="a photo of a hand holding a cup\na portrait of a pianist\n"
                                            "a street sign in the rain\na cat on a sofa", elem_id="train-feedback-prompts")
        with gr.Row():
            classifier = gr.Textbox(label="Classifier (the reward)", value=getattr(services, "active_classifier", None)
                                    or "demo", elem_id="train-feedback-classifier")
            detector = gr.Textbox(label="Pixel detector (report only)", value="demo")
            steps = gr.Number(label="Steps", value=20, precision=0, minimum=1)
        launch = gr.Button("Launch feedback tuning", elem_id="train-feedback-launch")
        message = gr.Markdown(elem_id="train-feedback-message")
    return FeedbackPanel(prompts, classifier, detector, steps, launch, message)


def wire_feedback(services, panel: FeedbackPanel) -> None:
    wire(panel.launch.click, bind(launch_feedback, services),
         inputs=[panel.prompts, panel.classifier, panel.detector, panel.steps], outputs=[panel.message],
         status=panel.message)


@user_errors
def launch_feedback(services, prompts_text: str, classifier: str, detector: str, steps) -> str:
    from engines.training.tune_eval import split_prompts
    from engines.training.feedback import FeedbackConfig
    from studio.jobs import JobManager

    lines = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
    if not lines:
        raise ValueError("Give at least one prompt (one per line).")
    split = split_prompts(lines, None, fraction=0.25 if len(set(lines)) >= 2 else 0.0, seed=0)
    train, held_out = list(split.train), list(split.evaluate)
    config = {"steps": number(steps, "Steps", minimum=1, whole=True), "seed": 0}
    FeedbackConfig(**config).validate()
    from engines.classification.classify import check_classifier

    check_classifier(classifier)  # a missing or non-VLM model is one sentence now, not a failed job later
    job = JobManager(services.store).launch("lora-feedback", {
        "config": config, "prompts": train, "eval_prompts": held_out, "classifier": (classifier or "demo").strip(),
        "detector": (detector or "demo").strip(), "model": services.model_spec})
    return (f"Job {job.id} ({job.kind}) {job.status}: DDPO on {len(train)} prompt(s), report on {len(held_out)} "
            "held-out prompt(s). Follow it in the jobs table.")

