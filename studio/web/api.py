"""The studio's scripting API: one named, typed endpoint per thing a script does (gradio_client).

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    sid = client.predict("hands", api_name="/create_session")["id"]
    images = client.predict(sid, "a hand holding a cup", api_name="/generate")

Every endpoint takes plain JSON values (a session by id or by name) and returns plain JSON (ids,
file paths on the studio's machine, numbers). UI events are not part of the API. Long work
(generate, detect, corrupt_preview, repair) runs as server tasks like the UI's: `list_tasks` and
`cancel_task` see and stop them. A mistake raises one sentence (gradio_client: AppError).

This module deliberately does not use `from __future__ import annotations`: Gradio reads the type hints
to describe each endpoint.
"""
import functools
import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np

from studio.services import wait_for_libraries
from studio.web.tabs.common import GPU, user_message

API_OWNER = "api"


def _api_errors(fn: Callable) -> Callable:
    """A user mistake (ValueError) becomes gr.Error with its one sentence (the client sees it as AppError)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wait_for_libraries()  # never import torch/diffusers beside the start-up warm-up thread
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise gr.Error(user_message(exc), print_exception=False) from None

    return wrapper


class StudioAPI:
    """The endpoints; `register` publishes each method under its own name."""

    ENDPOINTS = ("list_sessions", "create_session", "rename_session", "delete_session", "list_images", "add_images",
                 "generate", "detect", "label_regions", "export", "corrupt_preview", "repair", "list_tasks",
                 "cancel_task", "list_models", "switch_model", "class_counts", "suggest_class")
    LONG = ("generate", "detect", "corrupt_preview", "repair", "switch_model")  # run models: one GPU lane

    def __init__(self, services):
        self.services = services

    # -- sessions and images
    def list_sessions(self) -> list[dict]:
        """Every session, most recently updated first: {id, name, images, created_at, updated_at}."""
        return [_session(s) for s in self.services.store.list_sessions()]

    def create_session(self, name: str) -> dict:
        """Create a session; ids are never reused, even after a delete. Returns {id, name, ...}."""
        return _session(self.services.store.create_session(name))

    def rename_session(self, session: int | str, name: str) -> dict:
        """Rename a session given by id or name."""
        return _session(self.services.store.rename_session(session, name))

    def delete_session(self, session: int | str) -> dict:
        """Delete a session (by id or name) with its images, masks and labels. Returns what was deleted."""
        info = self.services.store.get_session(session)
        self.services.store.delete_session(info.id)
        return _session(info)

    def list_images(self, session: int | str) -> list[dict]:
        """The session's images: {id, file (a PNG path on the studio's machine), width, height, source, params}."""
        return [_image(r) for r in self.services.store.list_images(session)]

    def add_images(self, session: int | str, files: list[gr.FileData]) -> list[dict]:
        """Add images to the session (gradio_client: `handle_file(path)` for each); all or nothing: one
        unreadable file adds none. Returns the new images like list_images."""
        from engines.images import load_image
        from studio.store.records import NewImage

        sid = self.services.store.get_session(session).id
        items = []
        for f in files or []:
            path = f.get("path") if isinstance(f, dict) else getattr(f, "path", f)
            name = (f.get("orig_name") if isinstance(f, dict) else getattr(f, "orig_name", None)) or Path(str(path)).name
            try:
                items.append(NewImage(rgb=load_image(str(path), name=name), source="uploaded", original_name=name))
            except ValueError as exc:
                raise ValueError(f"{user_message(exc)} Nothing was added.") from None
        if not items:
            raise ValueError("files: give at least one image file.")
        return [_image(r) for r in self.services.store.add_images(sid, items)]

    # -- generate
    def generate(self, session: int | str, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 20,
                 guidance_scale: float = 7.5, width: int = 0, height: int = 0, count: int = 1, lora: str = "",
                 record_trajectory: bool = False) -> list[dict]:
        """Generate `count` images (seeds seed, seed+1, ...) into the session and return them like list_images.
        width/height 0 = the model's default size. Waits until done; cancel_task stops it (nothing saved)."""
        from studio.web.tabs.generate import generation_params, submit_generation

        sid = self.services.store.get_session(session).id
        if not width or not height:
            default = self.services.text2image().default_size
            width, height = width or default[0], height or default[1]
        params = generation_params(prompt, negative_prompt, seed, steps, guidance_scale, width, height, count,
                                   record_trajectory)
        task = submit_generation(self.services, sid, params, (lora or "").strip() or None, owner=API_OWNER,
                                 keep_running=True)
        result = self._finished(task)
        return [_image(r) for r in result["records"]]

    # -- detect and labels
    def detect(self, session: int | str, detector: str = "", image_ids: list[int] | None = None,
               mode: str = "resize", threshold: float = 0.5) -> list[dict]:
        """Run a detector ("" = the studio's default) on the session's images (all, or `image_ids`); store
        and return per image {image_id, heatmap_id, artifact_area, regions: [{area_percent, max_score, bbox}]}."""
        from engines.detection.detect import find_regions
        from studio.web.tabs.inspect import submit_detection

        sid = self.services.store.get_session(session).id
        ids = [r.id for r in self.services.store.list_images(sid)]
        if image_ids:
            missing = sorted(set(image_ids) - set(ids))
            if missing:
                raise ValueError(f"image_ids: {missing} are not images of session {sid}.")
            ids = [int(i) for i in image_ids]
        if not ids:
            raise ValueError(f"Session {sid} has no images.")
        if mode not in ("resize", "sliding"):
            raise ValueError(f"mode: '{mode}' is not one of resize, sliding.")
        spec = (detector or "").strip() or self.services.active_detector
        task = submit_detection(self.services, ids, spec, mode, owner=API_OWNER, keep_running=True)
        out = []
        for image_id, heatmap_id in self._finished(task):
            scores = self.services.store.load_heatmap(heatmap_id)
            found, _ = find_regions(scores, float(threshold))
            out.append({"image_id": image_id, "heatmap_id": heatmap_id,
                        "artifact_area": float((scores >= float(threshold)).mean()),
                        "regions": [{"area_percent": r.area_percent, "max_score": r.max_score,
                                     "mean_score": r.mean_score, "bbox": list(r.bbox)} for r in found]})
        return out

    def label_regions(self, image_id: int) -> list[dict]:
        """The image's current labelled regions: {key, class_name, caption, author, bbox, mask_file}."""
        store = self.services.store
        masks = {m.id: m for m in store.list_masks(int(image_id))}
        return [{"key": r.key, "class_name": r.class_name, "caption": r.caption, "author": r.author,
                 "bbox": list(r.bbox) if r.bbox else None,
                 "mask_file": masks[r.mask_id].path if r.mask_id in masks else None}
                for r in store.label_state(int(image_id)).regions]

    def export(self, session: int | str, format: str = "coco", folder: str = "",  # noqa: A002
               unlabelled_as_background: bool = False) -> dict:
        """Export the session's labels (png, coco, hf, synartifact, mmseg, vlm) to a new or empty folder inside
        <data-dir>/exports (or `serve --export-root`), split by image family; never-labelled images only
        with `unlabelled_as_background`. Returns {format, out_dir, images, regions, files}."""
        from studio.datasets.export import export_session
        from studio.web.tabs.sessions import export_folder

        info = self.services.store.get_session(session)
        out = export_folder(self.services, folder)
        summary = export_session(self.services.store, info.id, format, out, self.services.taxonomy(info.id),
                                 unlabelled_as_background=bool(unlabelled_as_background))
        return {"format": summary.fmt, "out_dir": summary.out_dir, "images": summary.images,
                "regions": summary.regions, "files": summary.files}

    # -- artifact classes (SynArtifact)
    def class_counts(self, session: int | str) -> dict:
        """Current label regions of the session per class: {class name (or "unclassified"): count}."""
        counts = self.services.store.class_counts(session)
        return {name if name is not None else "unclassified": int(n) for name, n in counts.items()}

    def suggest_class(self, image_id: int, region: str, classifier: str = "", top: int = 3) -> dict:
        """What a classifier (default: the studio's, else "demo") says about one label region (its key, as in
        label_regions); nothing is written. Returns {classes: [[name, probability]] (the `top` best),
        class_name, caption, note, classifier}."""
        spec = (classifier or "").strip() or self.services.active_classifier or None
        out = self.services.suggest(int(image_id), str(region), spec, top=int(top))
        return {**out, "classes": [[name, float(p)] for name, p in out["classes"]]}

    # -- corrupt and repair
    def corrupt_preview(self, image_id: int, source: str = "random blobs", method: str = "renoise", steps: int = 50,
                        inversion_steps: int = 10, guidance_scale: float = 1.0, preset: str = "renoise-sd",
                        renoise_iterations: int = 1, baseline_steps: int = 20, seeds: list[int] | None = None,
                        max_side: int = 256, threshold: float = 0.5, selector: str = "", caption: str | None = None,
                        add_to_dataset: bool = False) -> list[dict]:
        """Corrupt a region of a stored image once per seed (renoise_iterations applies to preset "custom";
        caption None = the image's caption). Returns per seed {seed, file, mask_file, confinement,
        confinement_vs_resample, region_iou, image_id (when added to the dataset)}; previews not added are PNG
        files in a temporary folder."""
        from studio.web.tabs.corrupt import corruption_request, submit_preview

        image = self.services.store.get_image(int(image_id))
        seeds_text = ",".join(str(int(s)) for s in (seeds or [0]))
        rgb, mask, params, seed_list = corruption_request(
            self.services, image.id, source, selector, threshold, method, steps, inversion_steps, guidance_scale,
            renoise_iterations, seeds_text, max_side, False, preset, baseline_steps, caption)
        task = submit_preview(self.services, image.id, rgb, mask, source, params, seed_list, owner=API_OWNER,
                              keep_running=True)
        result = self._finished(task)
        folder = Path(tempfile.mkdtemp(prefix=f"corrupt-{image.id}-", dir=self._scratch()))
        out = []
        for seed, r in result["results"].items():
            row = {"seed": seed, "file": _png(folder / f"seed-{seed}.png", r.image),
                   "mask_file": _png(folder / f"seed-{seed}-mask.png", r.mask), "confinement": _finite(r.confinement),
                   "confinement_vs_resample": _finite(r.confinement_vs_resample), "region_iou": r.region_iou,
                   "inside_change": r.inside_change, "outside_change": r.outside_change, "image_id": None}
            out.append(row)
        if add_to_dataset:
            from studio.web.tabs.corrupt import CorruptView, store_corrupted

            view = CorruptView(image_id=image.id, rgb=rgb, mask=mask, source=source, results=result["results"])
            records = store_corrupted(self.services, image.session_id, view, [str(s) for s in result["results"]])
            for row, rec in zip(out, records):
                row["image_id"], row["file"] = rec.id, rec.path
        return out

    def repair(self, image_id: int, detector: str = "", seeds: list[int] | None = None, steps: int = 20,
               strength: float = 0.75, grow: int = 8, feather: float = 4.0, threshold: float = 0.5,
               prompt: str = "", keep_best: bool = False) -> list[dict]:
        """Detect, mask everything above the threshold, inpaint one candidate per seed, re-score. Returns
        candidates best first: {seed, file, artifact_area_before, artifact_area_after, image_id (kept)}."""
        from studio.web.tabs.inspect import repair_request, submit_repair

        image = self.services.store.get_image(int(image_id))
        rgb = self.services.store.load_rgb(image.id)
        spec = (detector or "").strip() or self.services.active_detector
        scores = self.services.detector(spec).predict([rgb])[0].scores
        params, mask = repair_request(self.services, image.id, scores, [], threshold, grow, feather, strength,
                                      list(seeds or [0, 1, 2]), steps, prompt)
        task = submit_repair(self.services, image.id, rgb, spec, params, mask, owner=API_OWNER, keep_running=True)
        result = self._finished(task)["repair"]
        folder = Path(tempfile.mkdtemp(prefix=f"repair-{image.id}-", dir=self._scratch()))
        out = [{"seed": c.seed, "file": _png(folder / f"seed-{c.seed}.png", c.image),
                "artifact_area_before": c.artifact_area_before, "artifact_area_after": c.artifact_area_after,
                "outside_max_change": c.outside_max_change, "image_id": None} for c in result.candidates]
        if keep_best and result.candidates:
            from studio.store.records import NewImage

            best = result.candidates[0]
            rec = self.services.store.add_images(image.session_id, [NewImage(
                rgb=best.image, source="repaired", parent_id=image.id, model_id=self.services.model_spec,
                params={"seed": best.seed, "artifact_area_before": best.artifact_area_before,
                        "artifact_area_after": best.artifact_area_after})])[0]
            out[0]["image_id"], out[0]["file"] = rec.id, rec.path
        return out

    # -- tasks and models
    def list_tasks(self) -> list[dict]:
        """Recent server tasks (every browser's and the API's): {id, kind, owner, status, step, total, label, error}."""
        return [{"id": t.id, "kind": t.kind, "owner": "api" if t.owner == API_OWNER else "browser", "status": t.status,
                 "step": t.step, "total": t.total, "label": t.label, "error": t.error,
                 "keep_running": t.keep_running} for t in self.services.tasks.tasks()]

    def cancel_task(self, task_id: int) -> str:
        """Stop a task; what it made is not saved. Returns one sentence."""
        return self.services.tasks.cancel(int(task_id), reason="stopped through the API")

    def list_models(self) -> dict:
        """{"loaded": [{role, spec, device, parameters, memory_mb, note}], "available": [{kind, spec, where, note}]}."""
        from studio.web.catalog import scan

        return {"loaded": self.services.loaded_models(),
                "available": [{"kind": a.kind, "spec": a.spec, "where": a.where, "note": a.note}
                              for a in scan(self.services.data_dir)]}

    def switch_model(self, kind: str, spec: str) -> str:
        """Switch the text2image model, the segmenter or the default detector in place (kind: text2image,
        segmenter, detector); a model that fails to load leaves the previous one in use."""
        switch = {"text2image": self.services.switch_text2image, "segmenter": self.services.switch_segmenter,
                  "detector": self.services.switch_detector}.get(kind)
        if switch is None:
            raise ValueError(f"kind: '{kind}' is not one of text2image, segmenter, detector.")
        return switch(spec)

    # -- helpers
    def _finished(self, task):
        task = self.services.tasks.wait(task.id)
        if task.status == "cancelled":
            raise ValueError(f"Task {task.id} ({task.kind}) was stopped; nothing was saved.")
        if task.status == "failed":
            raise ValueError(task.error or f"Task {task.id} failed.")
        return task.result

    def _scratch(self) -> Path:
        """`<data-dir>/cache/api`, where previews not added to a session are written; result folders older
        than SCRATCH_KEEP_S are removed first, so the folder does not grow without bound."""
        folder = self.services.data_dir / "cache" / "api"
        folder.mkdir(parents=True, exist_ok=True)
        prune_scratch(folder, SCRATCH_KEEP_S)
        return folder


SCRATCH_KEEP_S = 24 * 3600
"""How long the API's preview files (corrupt_preview, repair) stay in `<data-dir>/cache/api`."""


def prune_scratch(folder: Path, max_age_s: float, now: float | None = None) -> int:
    """Remove the result folders (and stray files) in `folder` last modified more than `max_age_s` seconds
    ago; a folder another call is removing or writing is left alone. Returns how many entries went."""
    import shutil
    import time

    cutoff = (time.time() if now is None else now) - max_age_s
    removed = 0
    for entry in folder.iterdir():
        try:
            if entry.is_symlink() or entry.lstat().st_mtime >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except OSError:
            continue
    return removed


def register(services) -> StudioAPI:
    """Publish every endpoint (inside a gr.Blocks context) under its method's name."""
    api = StudioAPI(services)
    for name in StudioAPI.ENDPOINTS:
        extra = {"concurrency_limit": None} if name in StudioAPI.LONG else {}
        if name in ("switch_model", "suggest_class"):
            extra = {"concurrency_id": GPU, "concurrency_limit": 1}
        gr.api(_api_errors(getattr(api, name)), api_name=name, **extra)
    return api


def _session(info) -> dict:
    return {"id": info.id, "name": info.name, "images": info.image_count, "created_at": info.created_at,
            "updated_at": info.updated_at}


def _image(rec) -> dict:
    return {"id": rec.id, "session_id": rec.session_id, "file": str(rec.path), "width": rec.width,
            "height": rec.height, "source": rec.source, "params": rec.params}


def _finite(x: float) -> float | None:
    """JSON has no infinity: an infinite confinement (nothing changed outside) becomes None."""
    return None if not np.isfinite(x) else float(x)


def _png(path: Path, array: np.ndarray) -> str:
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array).save(path)
    return str(path)
