"""Train tab: launch, watch, stop and resume training jobs; use a result in the other tabs.

Jobs run as their own processes (studio.jobs); this tab only reads the `jobs` table, so it
re-attaches after a page reload or an app restart.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.jobs import JobManager
from studio.web.tabs import classifier_panels
from studio.web.tabs.common import Shared, bind, number, require_session, user_errors, wire

JOB_HEADERS = ["id", "kind", "status", "session", "created (UTC)", "result / error"]
LOG_LINES = 12
TYPES = ["detector", "region selector", "diffusion LoRA"]
RECIPES = ["balanced", "paper"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
SOURCES = ["human", "synthetic", "pseudo"]
# Recipe knobs shown in "Recipe details" (TrainConfig fields), in the order of the components.
KNOBS = ("betas", "weight_decay", "lr_schedule", "warmup_steps", "hflip", "scale_range", "color_jitter", "sampling",
         "source_weights", "balance_alpha", "negative_fraction", "p_pos", "artifact_weight", "aux_weight",
         "input_size", "min_area", "balance_clip", "artifact_weight_cap")


def build(services, shared: Shared, tab: gr.Tab) -> None:
    """Create the tab's components; a timer refreshes the job view every 2 s while it is shown."""
    with gr.Row():
        with gr.Column(scale=2):
            kind = gr.Radio(TYPES, value="detector", label="Job type", elem_id="train-kind")
            with gr.Group(visible=True) as detector_box:
                arch = gr.Dropdown(["tiny", "upernet-convnext-tiny", "upernet-swin-tiny"], value="tiny",
                                   allow_custom_value=True, label="Architecture (or a checkpoint folder to fine-tune)")
                init = gr.Textbox(label="Initialise from (ADE20K UperNet folder or hub id, optional)")
                pseudo = gr.Textbox(label="Pseudo labels from detector (optional spec)")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=300, precision=0, elem_id="train-steps")
                    batch = gr.Number(label="Batch size (>= 2)", value=4, precision=0, elem_id="train-batch")
                    crop = gr.Number(label="Crop", value=128, precision=0)
                with gr.Row():
                    lr = gr.Number(label="Learning rate (blank = the recipe's: 6e-5 pretrained, measured rate from "
                                         "scratch)", value=None)
                    eval_every = gr.Number(label="Evaluate every", value=50, precision=0, minimum=1)
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                with gr.Row():
                    recipe = gr.Radio(RECIPES, value="balanced", label="Recipe", elem_id="train-recipe",
                                      info="paper: plain CE, uniform sampling, no jitter, AdamW 6e-5; balanced: "
                                           "class-balanced sampling and loss weights")
                    device = gr.Dropdown(DEVICES, value="auto", label="Device", elem_id="train-device",
                                         info="auto: CUDA > MPS > CPU")
                    processes = gr.Number(label="Processes (data parallel)", value=1, precision=0, minimum=1)
                with gr.Accordion("Recipe details, data split", open=False):
                    knobs = recipe_knob_components(fill_recipe("balanced", "tiny", ""))
                    with gr.Row():
                        val_fraction = gr.Number(label="Val fraction (families)", value=0.2, minimum=0, maximum=0.9)
                        test_fraction = gr.Number(label="Test fraction (families)", value=0.2, minimum=0, maximum=0.9)
                        split_seed = gr.Number(label="Split seed", value=0, precision=0, minimum=0)
                    with gr.Row():
                        test_images = gr.Textbox(label="Fixed test set: image folder (optional)")
                        test_masks = gr.Textbox(label="Fixed test set: mask folder")
                    with gr.Row():
                        sources = gr.CheckboxGroup(SOURCES, value=SOURCES, label="Train on")
                        background = gr.Checkbox(label="Use never-labelled images as background", value=False)
                        pseudo_threshold = gr.Number(label="Pseudo-label threshold", value=0.5, minimum=0, maximum=1)
            with gr.Group(visible=False) as lora_box:
                prompts = gr.Textbox(label="Prompts (one per line)", lines=5,
                                     value="a photo of a hand holding a cup\na portrait of a pianist")
                lora_detector = gr.Textbox(label="Detector giving the per-pixel feedback", value="demo")
                lora_steps = gr.Number(label="Steps", value=50, precision=0)
                eval_prompts = gr.Textbox(label="Held-out evaluation prompts (one per line; empty: a quarter of the "
                                                "prompts above is held out, chosen by the seed)", lines=3)
                eval_detector = gr.Textbox(label="Independent evaluation detector (optional spec, not optimised)")
            launch = gr.Button("Launch", variant="primary", elem_id="train-launch")
            message = gr.Markdown(elem_id="train-message")
            feedback = classifier_panels.feedback_panel(services)
        with gr.Column(scale=3):
            jobs = gr.Dataframe(headers=JOB_HEADERS, interactive=False, label="Jobs (newest first)", elem_id="train-jobs")
            job = gr.Dropdown([], label="Job shown", elem_id="train-job")
            progress = gr.Markdown(elem_id="train-progress")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=220)
                miou_plot = gr.LinePlot(x="step", y="artifact_iou", title="Val artifact IoU (headline)", height=220)
            log = gr.Textbox(label=f"Log (last {LOG_LINES} lines)", lines=LOG_LINES, max_lines=LOG_LINES, autoscroll=True,
                             elem_id="train-log")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
                use = gr.Button("Use this checkpoint", elem_id="train-use")
    timer = gr.Timer(2.0, active=True)

    view = [jobs, job, progress, loss_plot, miou_plot, log]
    wire(kind.change, show_fields, inputs=[kind], outputs=[detector_box, lora_box])
    wire(recipe.change, fill_recipe, inputs=[recipe, arch, init], outputs=knobs)
    wire(launch.click, bind(launch_job, services), inputs=[shared.session, kind, arch, init, pseudo, steps, batch, crop,
                                                          lr, eval_every, seed, prompts, lora_detector, lora_steps,
                                                          eval_prompts, eval_detector, recipe, device, processes,
                                                          val_fraction, test_fraction, split_seed, test_images,
                                                          test_masks, sources, background, pseudo_threshold, *knobs],
         outputs=[message, job], status=message)
    wire(timer.tick, bind(refresh, services), inputs=[job], outputs=view, queue=False, show_progress="hidden")
    wire(tab.select, bind(refresh, services), inputs=[job], outputs=view)
    wire(job.input, bind(refresh, services), inputs=[job], outputs=view)
    wire(stop.click, bind(stop_job, services), inputs=[job], outputs=[message], status=message)
    wire(resume.click, bind(resume_job, services), inputs=[job], outputs=[message], status=message)
    wire(use.click, bind(use_checkpoint, services), inputs=[job], outputs=[message], status=message)
    classifier_panels.wire_feedback(services, feedback)


def show_fields(kind: str):
    lora = kind == "diffusion LoRA"
    return gr.Group(visible=not lora), gr.Group(visible=lora)


def recipe_knob_components(values: tuple) -> list:
    """The "Recipe details" controls (one per KNOBS entry), filled with `values`."""
    v = dict(zip(KNOBS, values))
    with gr.Row():
        betas = gr.Textbox(label="AdamW betas", value=v["betas"])
        weight_decay = gr.Number(label="Weight decay", value=v["weight_decay"], minimum=0)
        lr_schedule = gr.Dropdown(["poly", "constant"], value=v["lr_schedule"], label="LR schedule")
        warmup = gr.Number(label="Warm-up steps", value=v["warmup_steps"], precision=0, minimum=0)
    with gr.Row():
        hflip = gr.Checkbox(label="Horizontal flip", value=v["hflip"])
        scale_range = gr.Textbox(label="Scale range", value=v["scale_range"])
        color_jitter = gr.Number(label="Colour jitter (0 = none)", value=v["color_jitter"], minimum=0, maximum=0.99)
        sampling = gr.Dropdown(["balanced", "uniform"], value=v["sampling"], label="Sampling")
    with gr.Row():
        source_weights = gr.Textbox(label="Source weights (blank = per image)", value=v["source_weights"],
                                    placeholder="human=1,synthetic=0.5")
        balance_alpha = gr.Number(label="Balance alpha", value=v["balance_alpha"], minimum=0)
        negative_fraction = gr.Number(label="Negative fraction (blank = natural)", value=v["negative_fraction"])
        p_pos = gr.Number(label="P(crop on artifact)", value=v["p_pos"], minimum=0, maximum=1)
    with gr.Row():
        artifact_weight = gr.Textbox(label="Artifact class weight (auto or a number; 1 = plain CE)",
                                     value=v["artifact_weight"])
        aux_weight = gr.Number(label="Auxiliary head loss weight", value=v["aux_weight"], minimum=0)
        artifact_weight_cap = gr.Number(label="Cap of the automatic artifact weight", value=v["artifact_weight_cap"],
                                        minimum=1)
    with gr.Row():
        input_size = gr.Number(label="Detector input size (blank = the crop)", value=v["input_size"], precision=0)
        min_area = gr.Number(label="Balanced sampling: min area", value=v["min_area"], minimum=0, maximum=1)
        balance_clip = gr.Number(label="Balanced sampling: max factor", value=v["balance_clip"], minimum=1)
    return [betas, weight_decay, lr_schedule, warmup, hflip, scale_range, color_jitter, sampling, source_weights,
            balance_alpha, negative_fraction, p_pos, artifact_weight, aux_weight, input_size, min_area, balance_clip,
            artifact_weight_cap]


def fill_recipe(recipe: str, arch: str, init: str) -> tuple:
    """The recipe's values of the KNOBS controls (text fields as text)."""
    from engines.training.recipes import resolve_recipe

    try:
        cfg = resolve_recipe(recipe or "balanced", arch=(arch or "tiny").strip(), init=(init or "").strip() or None)
    except ValueError:  # e.g. a half-typed checkpoint folder: fill in the tiny model's values
        cfg = resolve_recipe(recipe or "balanced", arch="tiny")
    weights = ",".join(f"{k}={w:g}" for k, w in (cfg.source_weights or {}).items())
    return (f"{cfg.betas[0]:g},{cfg.betas[1]:g}", cfg.weight_decay, cfg.lr_schedule, cfg.warmup_steps, cfg.hflip,
            f"{cfg.scale_range[0]:g},{cfg.scale_range[1]:g}", cfg.color_jitter, cfg.sampling, weights,
            cfg.balance_alpha, cfg.negative_fraction,
            cfg.p_pos, "auto" if cfg.artifact_weight is None else f"{cfg.artifact_weight:g}", cfg.aux_weight,
            cfg.input_size, cfg.min_area, cfg.balance_clip, cfg.artifact_weight_cap)


def knob_overrides(values) -> tuple[dict, bool]:
    """(TrainConfig overrides, artifact weight "auto" asked) from the KNOBS controls' values (text parsed;
    blank = the recipe's value)."""
    v = dict(zip(KNOBS, values))
    out = {}
    for key in ("betas", "scale_range"):
        text = str(v[key] or "").strip()
        if text:
            try:
                out[key] = tuple(float(p) for p in text.split(","))
            except ValueError:
                raise ValueError(f"{key.replace('_', ' ').capitalize()} must be two numbers like 0.9,0.999.") from None
    text = str(v["source_weights"] or "").strip()
    if text:
        try:
            out["source_weights"] = {k.strip(): float(w) for k, _, w in (p.partition("=") for p in text.split(","))}
        except ValueError:
            raise ValueError("Source weights must look like human=1,synthetic=0.5.") from None
    text = str(v["artifact_weight"] or "").strip().lower()
    if text and text != "auto":
        try:
            out["artifact_weight"] = float(text)
        except ValueError:
            raise ValueError("The artifact class weight must be auto or a number.") from None
    for key in ("weight_decay", "color_jitter", "balance_alpha", "p_pos", "aux_weight", "min_area", "balance_clip",
                "artifact_weight_cap"):
        if v[key] is not None:
            out[key] = float(v[key])
    if v["input_size"] not in (None, ""):
        out["input_size"] = int(v["input_size"])
    if v["warmup_steps"] is not None:
        out["warmup_steps"] = int(v["warmup_steps"])
    if v["negative_fraction"] is not None:
        out["negative_fraction"] = float(v["negative_fraction"])
    out.update(lr_schedule=v["lr_schedule"], hflip=bool(v["hflip"]), sampling=v["sampling"])
    return out, text == "auto"


@user_errors
def launch_job(services, session_id, kind, arch, init, pseudo, steps, batch, crop, lr, eval_every, seed,
               prompts, lora_detector, lora_steps, eval_prompts="", eval_detector="", recipe="balanced", device="auto",
               processes=1, val_fraction=0.2, test_fraction=0.2, split_seed=0, test_images="", test_masks="",
               sources=tuple(SOURCES), background=False, pseudo_threshold=0.5, *knob_values):
    manager = JobManager(services.store)
    device = None if device in (None, "", "auto") else device
    seed = number(seed if seed not in (None, "") else 0, "Seed", minimum=0, maximum=2**32 - 1, whole=True)
    if kind == "diffusion LoRA":
        from engines.training.tune import TuneConfig
        from engines.training.tune_eval import split_prompts

        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        if not lines:
            raise ValueError("Prompts: empty; give at least one prompt (one per line).")
        held_out = [p.strip() for p in (eval_prompts or "").splitlines() if p.strip()] or None
        spec, judge = (lora_detector or "demo").strip(), (eval_detector or "").strip() or None
        config = {"steps": number(lora_steps, "Steps", minimum=1, maximum=100_000, whole=True), "seed": seed}
        split_prompts(lines, held_out, fraction=TuneConfig().eval_fraction, seed=config["seed"])  # refuse overlaps now
        if judge is not None and judge == spec:
            raise ValueError(f"The evaluation detector '{judge}' is the detector tuning optimises; give another one.")
        job = manager.launch("lora", {"config": config, "prompts": lines, "eval_prompts": held_out, "detector": spec,
                                      "eval_detector": judge, "model": services.model_spec, "device": device})
    else:
        sid = require_session(session_id)
        from studio.datasets.training_data import detector_job_params

        config = {"steps": _optional(steps, "Steps", minimum=1, maximum=1_000_000, whole=True),
                  "batch_size": _optional(batch, "Batch size", minimum=2, maximum=1024, whole=True),
                  "crop": _optional(crop, "Crop", minimum=32, maximum=4096, whole=True),
                  "lr": _optional(lr, "Learning rate", minimum=0, maximum=10),
                  "eval_every": _optional(eval_every, "Evaluate every", minimum=1, maximum=1_000_000, whole=True),
                  "seed": seed}
        auto_weight = False
        if knob_values:
            overrides, auto_weight = knob_overrides(knob_values)
            config.update(overrides)
        pseudo = (pseudo or "").strip() or None
        params = detector_job_params(
            recipe or "balanced", region_selector=kind == "region selector", arch=arch, init=init, config=config,
            data={"val_fraction": number(val_fraction if val_fraction is not None else 0.2, "Val fraction",
                                         minimum=0, maximum=0.9),
                  "test_fraction": number(test_fraction if test_fraction is not None else 0.2, "Test fraction",
                                          minimum=0, maximum=0.9),
                  "split_seed": number(split_seed or 0, "Split seed", minimum=0, maximum=2**32 - 1, whole=True),
                  "test_images": (test_images or "").strip() or None,
                  "test_masks": (test_masks or "").strip() or None, "sources": list(sources or []),
                  "pseudo_detector": pseudo, "pseudo_threshold": pseudo_threshold,
                  "unlabelled_as_background": bool(background) or None},
            run={"device": device, "processes": number(processes or 1, "Processes", minimum=1, maximum=64, whole=True)})
        if auto_weight:
            params["config"]["artifact_weight"] = None
        check_training_data(services, sid, kind, pseudo)
        job = manager.launch("region-selector" if kind == "region selector" else "detector", params, sid)
    state = "started" if job.status == "running" else "queued (another job is running)"
    message = f"Launched job {job.id} ({job.kind}) on {job.params.get('device')}: {state}; its progress is on the right."
    gr.Info(message)
    return message, gr.Dropdown(choices=_job_choices(services), value=job.id)


def _optional(value, field: str, **limits):
    """None for a blank form field (the recipe's default), else `number(...)` with the field's name."""
    return None if value in (None, "") else number(value, field, **limits)


def check_training_data(services, session_id: int, kind: str, pseudo: str | None) -> None:
    """Refuse at launch (not minutes later in the job) a session that has nothing to learn from."""
    store = services.store
    name = store.get_session(session_id).name
    images = store.list_images(session_id)
    labelled = [r for r in images if store.is_labelled(r.id)]
    if kind == "region selector" and not labelled:
        raise ValueError(f"Session '{name}' has no labelled images; label some in the Label tab first.")
    if not labelled and not (pseudo and images):
        raise ValueError(f"Session '{name}' has no labelled images (and no pseudo-label detector is given); label "
                         "some in the Label tab, add corrupted images from the Corrupt tab, or give a pseudo-label "
                         "detector.")


def refresh(services, job_id):
    """Jobs table, and for the chosen job: progress, curves and log tail (re-attaches after restarts)."""
    manager = JobManager(services.store)
    manager.recover()
    rows = []
    for j in services.store.list_jobs()[:50]:
        shown = dict(j.result)
        if isinstance(shown.get("test"), dict):
            shown["test_artifact_iou"] = shown["test"].get("artifact_iou")
        outcome = j.error or ", ".join(f"{k}={_short(v, tail=True)}" for k, v in shown.items() if k in (
            "test_artifact_iou", "best_val_artifact_iou", "best_miou", "steps_done", "device", "lora_dir", "best_dir"))
        rows.append([j.id, j.kind, j.status, j.session_id, j.created_at[:19].replace("T", " "), outcome])
    choices = _job_choices(services)
    ids = [value for _, value in choices]
    if job_id not in ids:
        job_id = ids[0] if ids else None
    if job_id is None:
        return rows, gr.Dropdown(choices=choices, value=None), "No jobs yet.", None, None, ""
    job = services.store.get_job(job_id)
    metrics = services.store.job_metrics(job.id)
    total = int(job.params.get("config", {}).get("steps", 0) or 0)
    step = max([int(m.get("step", 0)) for m in metrics] or [0])
    pct = f" · {100 * step / total:.0f}%" if total else ""
    progress = (f"**Job {job.id}** ({job.kind}) **{job.status}** · step {step} of {total or '?'}{pct}"
                f" · {job.params.get('device', 'cpu')}")
    if job.error:
        progress += f"  \n{job.error}"
    elif job.status == "succeeded":
        done = {k: v for k, v in job.result.items() if k in ("best_miou", "steps_done", "best_dir", "last_dir", "lora_dir")}
        progress += "  \n" + " · ".join(f"{k}: `{_short(v)}`" for k, v in done.items() if v is not None)
    if job.kind == "lora" and job.result.get("before"):
        progress += "  \n" + _tune_summary(job.result)
    frame = pd.DataFrame(metrics) if metrics else pd.DataFrame({"step": [], "loss": [], "artifact_iou": []})
    loss = frame[["step", "loss"]].dropna() if "loss" in frame else None
    miou = frame[["step", "artifact_iou"]].dropna() if "artifact_iou" in frame else None
    return rows, gr.Dropdown(choices=choices, value=job.id), progress, loss, miou, manager.log_tail(job.id, LOG_LINES)


@user_errors
def stop_job(services, job_id) -> str:
    if job_id in (None, ""):
        raise ValueError("Choose a job first.")
    job = JobManager(services.store).cancel(int(job_id))
    return (f"Asked job {job.id} to stop; its last checkpoint is kept." if job.status == "running"
            else f"Job {job.id} is {job.status}.")


@user_errors
def resume_job(services, job_id) -> str:
    if job_id in (None, ""):
        raise ValueError("Choose a job first.")
    job = JobManager(services.store).resume(int(job_id))
    return f"Job {job.id} {job.status}: it continues from its last checkpoint."


@user_errors
def use_checkpoint(services, job_id) -> str:
    """Make the job's best detector the Inspect default, or its LoRA the Generate LoRA."""
    if job_id in (None, ""):
        raise ValueError("Choose a job first.")
    job = services.store.get_job(int(job_id))
    if job.kind in ("lora", "lora-feedback"):
        folder = job.result.get("lora_dir")
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"Job {job.id} has no LoRA yet.")
        services.active_lora = folder
        return f"LoRA of job {job.id} is now available in Generate (`{folder}`)."
    folder = job.result.get("best_dir") or job.result.get("last_dir")
    if not folder:
        last = Path(job.out_dir or "") / "last"
        folder = str(last) if last.is_dir() else None
    if not folder or not Path(folder).is_dir():
        raise ValueError(f"Job {job.id} has no checkpoint yet.")
    if job.kind == "classifier":
        services.active_classifier = folder
        return f"Classifier of job {job.id} is now the default in Label and Inspect (`{folder}`)."
    services.active_detector = folder
    return f"Detector of job {job.id} is now the default in Inspect (`{folder}`)."


def _tune_summary(result: dict) -> str:
    """A LoRA job's evaluation in one Markdown paragraph: what was evaluated, then before -> after per detector."""
    where = {"held-out": "held-out prompts", "split": "held-out prompts (a seeded share of the prompts)",
             "training": "the TRAINING prompts (nothing held out)"}.get(result.get("eval_set"), "prompts")
    text = (f"Evaluated on {len(result.get('eval_prompts') or [])} {where} x {len(result.get('eval_seeds') or [])} "
            "seeds, the same before and after.")
    for name, before, after in (("optimised", result.get("before"), result.get("after")),
                                ("independent", result.get("independent_before"), result.get("independent_after"))):
        if before:
            arrow = f" → {100 * after['artifact_area']:.1f}%" if after else ""
            text += f" Artifact area ({name} detector `{before.get('detector')}`): {100 * before['artifact_area']:.1f}%{arrow}."
    return text


def _job_choices(services) -> list[tuple[str, int]]:
    return [(f"#{j.id} {j.kind} · {j.status}", j.id) for j in services.store.list_jobs()[:50]]


def _short(value, tail: bool = False) -> str:
    """A float with 3 decimals; with `tail`, a long path as …/last/three/parts (the full one is in the job's line)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if tail and "/" in text and len(text) > 32:
        return "…/" + "/".join(text.rstrip("/").split("/")[-3:])
    return text
