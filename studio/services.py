"""What the UI and the CLI share: the data directory, the store, and lazily built engines.

`Services` is created once per process (by app.py or the CLI). Engines are built on first use and
kept; a lock makes sure two browser tabs never build or run the same model twice at once.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engines.models import DEMO, demo_note
from studio.store.records import NewImage
from studio.store.store import Store
from studio.tasks import TaskRegistry, Timings

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SAMPLES_SESSION = "Samples"
MASK_SOURCES = ("label regions", "detector regions", "region selector", "random blobs")
TRAJECTORY = "trajectory"
TRAJECTORY_NOTE = ("Experimental, training-free: how much the predicted clean image changed between late "
                   "denoising steps (after Menn et al., WACV 2025); not a trained detector.")


def quiet_libraries(now: bool = True) -> None:
    """Process-wide: no hub/diffusers/transformers progress bars or info logs on the console.

    Called by the composition roots (CLI commands, `serve`), never at import time. The environment
    variables act whenever the libraries are first imported; `now=False` stops there (no import: `serve`
    calls it so before the page is up, then again with `now=True` on a background thread).
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not now:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


_LIBRARIES_READY = threading.Event()
_LIBRARIES_READY.set()  # nothing to wait for unless warm_up_libraries() is running


def warm_up_libraries() -> threading.Thread:
    """Import torch, diffusers and transformers (quieted) on a background thread; `serve` calls it once the
    page is up. Until it ends, `wait_for_libraries()` blocks: two threads importing these packages at once
    can each see the other's half-initialised module (diffusers' lazy module raised "cannot import name
    'AutoPipelineForText2Image'"), so every UI event and API call waits for the warm-up first."""
    _LIBRARIES_READY.clear()

    def run() -> None:
        try:
            quiet_libraries()
        except Exception:  # noqa: BLE001 - the first real use reports an import problem in one sentence
            pass
        finally:
            _LIBRARIES_READY.set()

    thread = threading.Thread(target=run, name="warm-up", daemon=True)
    thread.start()
    return thread


def wait_for_libraries() -> None:
    """Return once no warm-up import is running (at once when none was started)."""
    _LIBRARIES_READY.wait()


def resolve_data_dir(cli_value: str | None) -> Path:
    """--data-dir, else $ARTIFACT_STUDIO_HOME, else $XDG_DATA_HOME/artifact-studio (~/.local/share)."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    env = os.environ.get("ARTIFACT_STUDIO_HOME")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "artifact-studio").resolve()


@dataclass
class Services:
    """Process-wide state: store plus engines built on demand. Not a dataclass of the UI."""

    data_dir: Path
    store: Store
    model_spec: str = DEMO
    device: str = "cpu"
    segmenter_spec: str = "superpixel"
    active_detector: str = DEMO  # the Inspect tab's default detector ("Use this checkpoint" in Train sets it)
    active_lora: str | None = None  # a LoRA folder offered in Generate
    active_classifier: str | None = None  # the Label/Inspect default classifier ("Use this checkpoint" in Train)
    export_root: Path | None = None  # where the UI may export to (serve --export-root); None: <data_dir>/exports
    _text2image: object | None = field(default=None, repr=False)
    _detectors: dict = field(default_factory=dict, repr=False)
    _classifiers: dict = field(default_factory=dict, repr=False)
    _corruptor: object | None = field(default=None, repr=False)
    _applied_lora: str | None = field(default=None, repr=False)
    _segmenter: object | None = field(default=None, repr=False)  # the shared segmenter backend (one model)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    gpu_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    tasks: TaskRegistry = field(default_factory=TaskRegistry, repr=False)  # long work owned by the server
    timings: Timings = field(default_factory=Timings, repr=False)  # measured speeds, for estimates

    @classmethod
    def open(cls, data_dir: Path, model_spec: str | None = None, device: str = "cpu",
             segmenter_spec: str | None = None) -> "Services":
        return cls(data_dir=data_dir, store=Store(data_dir), model_spec=model_spec or DEMO, device=device,
                   segmenter_spec=segmenter_spec or "superpixel",
                   timings=Timings(data_dir / "cache" / "timings.json"))

    @property
    def uses_demo_model(self) -> bool:
        return self.model_spec == DEMO

    @property
    def exports_dir(self) -> Path:
        """The folder UI exports must stay inside: --export-root, else <data-dir>/exports."""
        return Path(self.export_root or self.data_dir / "exports").resolve()

    def export_path(self, folder: str) -> Path:
        """Where a UI export named `folder` goes: a folder inside `exports_dir` (a relative name is placed
        there; an absolute path must lie inside it). Anything else is refused in one sentence."""
        if not (folder or "").strip():
            raise ValueError("Folder: empty; give a name for the export folder, such as hands-coco.")
        root = self.exports_dir
        out = (root / Path(folder.strip()).expanduser()).resolve()  # an absolute folder replaces root here
        if root not in out.parents:
            raise ValueError(f"Folder: exports go into a new folder inside {root}; give a name such as hands-coco "
                             "(start the server with --export-root DIR to export elsewhere).")
        return out

    def model_note(self) -> str:
        if self.uses_demo_model:
            return demo_note()
        return f"Model: {self.model_spec} on {self.device}."

    def demo_header(self) -> str:
        """Markdown for the UI header: what the demo models are, what they were trained on, how to use real ones."""
        from engines.detection.detectors import DEMO_DETECTOR_ASSETS, DETECTOR_WEIGHTS

        lines = []
        if self.uses_demo_model:
            note = demo_note().removeprefix("Demo model: ")
            lines.append(f"**Demo model in use.** {note[:1].upper()}{note[1:]}")
        if self.active_detector == DEMO:
            lines.append("**Detector `demo`** — demo detector: " + (
                "trained on synthetic corruptions of the sample photos, not a real-world artifact detector "
                "(a 0.43M-parameter UperNet; 11 of the 15 photos, their blob regions corrupted by the studio's own "
                "pipeline with the paper's *direct* corruption — noise put into the latent; the 4 others held out). "
                "It finds such corrupted regions; it knows nothing of real generator artifacts."
                if (DEMO_DETECTOR_ASSETS / DETECTOR_WEIGHTS).is_file()
                else "a tiny untrained UperNet; its heatmaps are not meaningful."))
        if lines:
            lines.append("Real weights: `--model PATH_OR_HUB_ID` (a diffusers pipeline), `--sam sam:/path/sam_vit_b_01ec64.pth`, "
                         "and a detector SPEC in Inspect or the Models tab (e.g. `diffdoctor:/path/ad_pytorch_model.bin` or a "
                         "checkpoint folder).")
        return "  \n".join(lines)

    def text2image(self):
        """The TextToImage engine for the configured model (loaded once; raises ModelNotFoundError)."""
        from engines.generation.generate import TextToImage
        from engines.models import load_text2image

        with self._lock:
            if self._text2image is None:
                dtype = "float16" if self.device == "cuda" and not self.uses_demo_model else "float32"
                loaded = load_text2image(self.model_spec, data_dir=self.data_dir, device=self.device, dtype=dtype)
                self._text2image = TextToImage(loaded)
            return self._text2image

    def new_masker(self):
        """A SAM-shaped masker for one browser (its own current image; embeddings cached on disk) over
        the one segmenter model this process holds."""
        from engines.segmentation.segment import SamMasker

        return SamMasker(self.segmenter_backend(), cache_dir=self.data_dir / "cache" / "segment")

    def segmenter_backend(self):
        """The segmenter model (an engines.segmentation.segment backend), loaded once; a masker over another one is stale."""
        from engines.segmentation.segment import load_segmenter

        with self._lock:
            if self._segmenter is None:
                self._segmenter = load_segmenter(self.segmenter_spec, cache_dir=None, device=self.device).backend
            return self._segmenter

    # -- switching models in place (the Models panel); a failed load keeps the previous model
    def switch_text2image(self, spec: str) -> str:
        """Load `spec` as the text-to-image model, replacing the current one only if it loads.

        On a GPU the current pipeline is parked on the CPU while the new one loads and goes back if
        loading fails. Waits for a running generation (gpu_lock). Returns one sentence."""
        import gc

        from engines.generation.generate import TextToImage
        from engines.models import first_line, load_text2image

        spec = (spec or DEMO).strip()
        with self.gpu_lock, self._lock:
            old, old_spec = self._text2image, self.model_spec
            parked = old is not None and self.device != "cpu"
            if parked:
                old.pipe.to("cpu")
                _empty_device_cache(self.device)
            try:
                dtype = "float16" if self.device == "cuda" and spec != DEMO else "float32"
                loaded = load_text2image(spec, data_dir=self.data_dir, device=self.device, dtype=dtype)
            except Exception as exc:  # noqa: BLE001 - any failure (missing file, out of memory) rolls back
                if parked:
                    old.pipe.to(self.device)
                reason = first_line(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first_line(exc)}"
                raise ValueError(f"Could not load '{spec}' ({reason}); still using '{old_spec}'.") from None
            self._text2image, self.model_spec = TextToImage(loaded), spec
            self._corruptor, self._applied_lora = None, None
        del old
        gc.collect()
        _empty_device_cache(self.device)
        return f"Text-to-image model is now '{spec}' on {self.device}" + (f". {demo_note()}" if loaded.is_demo else ".")

    def switch_segmenter(self, spec: str) -> str:
        """Load `spec` as the Label tab's segmenter (pages pick it up at their next image); a failure keeps the old one."""
        from engines.models import first_line
        from engines.segmentation.segment import load_segmenter

        spec = (spec or "superpixel").strip()
        try:
            backend = load_segmenter(spec, cache_dir=None, device=self.device).backend
        except Exception as exc:  # noqa: BLE001
            reason = first_line(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first_line(exc)}"
            raise ValueError(f"Could not load segmenter '{spec}' ({reason}); still using '{self.segmenter_spec}'.") from None
        with self._lock:
            self._segmenter, self.segmenter_spec = backend, spec
        return f"Segmenter is now '{spec}'" + (" (approximate superpixels)." if getattr(backend, "approximate", False)
                                               else f" on {self.device}.")

    def switch_detector(self, spec: str) -> str:
        """Make `spec` the default detector (Inspect, repair) if it loads; a failure keeps the old default."""
        from engines.models import first_line

        spec = (spec or DEMO).strip()
        try:
            detector = self.detector(spec)
        except Exception as exc:  # noqa: BLE001
            reason = first_line(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {first_line(exc)}"
            raise ValueError(f"Could not load detector '{spec}' ({reason}); still using '{self.active_detector}'.") from None
        self.active_detector = spec
        if not detector.spec.trained:
            return f"Default detector is now '{spec}' ({detector.spec.family}, untrained: heatmaps are not meaningful)."
        return f"Default detector is now '{spec}' ({detector.spec.family})." + (
            f" {detector.loaded.note}" if detector.loaded.is_demo else "")

    def loaded_models(self) -> list[dict]:
        """What this process holds: [{"role", "spec", "device", "parameters", "memory_mb", "note"}]."""
        rows = []
        with self._lock:
            engine = self._text2image
            rows.append({"role": "text-to-image", "spec": self.model_spec, "device": self.device,
                         **_module_size(getattr(engine, "pipe", None)),
                         "note": "loaded" if engine is not None else "loads on first use"})
            if self._applied_lora:
                rows.append({"role": "LoRA", "spec": self._applied_lora, "device": self.device, "parameters": None,
                             "memory_mb": None, "note": "applied to the text-to-image model"})
            backend = self._segmenter
            rows.append({"role": "segmenter", "spec": self.segmenter_spec, "device": self.device,
                         **_module_size(getattr(backend, "model", None)),
                         "note": "loaded" if backend is not None else "loads when Label opens an image"})
            for spec, detector in self._detectors.items():
                rows.append({"role": "detector" + (" (default)" if spec == self.active_detector else ""), "spec": spec,
                             "device": detector.loaded.device, **_module_size(detector.loaded.model),
                             "note": ("untrained" if not detector.spec.trained else
                                      "demo: synthetic corruptions of the sample photos" if detector.loaded.is_demo
                                      else "loaded")})
            if self.active_detector not in self._detectors:
                rows.append({"role": "detector (default)", "spec": self.active_detector, "device": self.device,
                             "parameters": None, "memory_mb": None, "note": "loads on first use"})
            for spec, classifier in self._classifiers.items():
                module = classifier.loaded.model
                rows.append({"role": "classifier" + (" (default)" if spec == (self.active_classifier or DEMO) else ""),
                             "spec": spec, "device": classifier.loaded.device,
                             **_module_size(getattr(module, "model", module)),
                             "note": "demo" if classifier.loaded.is_demo else "loaded"})
        return rows

    def taxonomy(self, session_id: int) -> list[dict]:
        """The session's artifact classes [{"name", "definition"}] (assets/taxonomy.json unless edited)."""
        return self.store.session_taxonomy(session_id, default_taxonomy())

    def detector(self, spec: str | None = None):
        """An ArtifactDetector for `spec` ("demo" when empty), loaded once and kept (at most 2)."""
        from engines.detection.detect import ArtifactDetector
        from engines.detection.detectors import load_detector

        key = (spec or DEMO).strip()
        with self._lock:
            if key not in self._detectors:
                while len(self._detectors) >= 2:
                    self._detectors.pop(next(iter(self._detectors)))
                self._detectors[key] = ArtifactDetector(load_detector(key, data_dir=self.data_dir, device=self.device))
            return self._detectors[key]

    def classifier(self, spec: str | None = None, taxonomy: list[dict] | None = None):
        """An ArtifactClassifier for `spec` ("demo" when empty), loaded once and kept (at most 2). `taxonomy`
        is what a VLM is asked about by default (per call, `classify(..., taxonomy=...)` overrides it)."""
        from engines.classification.classify import ArtifactClassifier, load_classifier

        key = (spec or DEMO).strip()
        with self._lock:
            if key not in self._classifiers:
                while len(self._classifiers) >= 2:
                    self._classifiers.pop(next(iter(self._classifiers)))
                self._classifiers[key] = ArtifactClassifier(load_classifier(key, device=self.device, taxonomy=taxonomy))
            return self._classifiers[key]

    def suggest(self, image_id: int, region_key: str, spec: str | None = None, top: int = 3) -> dict:
        """What a classifier says about one Label region, without writing anything: {"classes": [(name, p)]
        (the `top` most probable), "caption", "class_name" (the best class), "note"}. Accepting it is the
        caller's explicit, separate edit (author "classifier-assisted")."""
        state = self.store.label_state(image_id)
        region = next((r for r in state.regions if r.key == region_key), None)
        if region is None or region.bbox is None:
            raise ValueError(f"Region {region_key!r} does not exist on image {image_id} or is empty; select a region.")
        session_id = self.store.get_image(image_id).session_id
        taxonomy = self.taxonomy(session_id)
        classifier = self.classifier(spec, taxonomy)
        with self.gpu_lock:
            (result,) = classifier.classify([self.store.load_rgb(image_id)], [[tuple(region.bbox)]], taxonomy=taxonomy)
        ranked = sorted(result.probabilities, key=lambda kv: -kv[1])[:max(1, int(top))]
        best = result.predicted[0] if result.predicted else None
        caption = best.caption if best else ""
        return {"classes": ranked, "class_name": ranked[0][0], "caption": caption,
                "note": classifier.loaded.note, "classifier": classifier.classifier_id}

    def detect_images(self, image_ids: list[int], spec: str | None = None, *, mode: str = "resize",
                      progress=None, should_stop=None, before_store=None) -> list[tuple[int, int]]:
        """Run a detector on stored images and store one run + a heatmap per image.

        Returns [(image_id, heatmap_id)]. Heatmaps are stored only after all images are done, so a
        stopped run stores nothing. `before_store`: a context manager factory entered around the
        store (a task's `committing`, which refuses once a stop was asked for).
        """
        import contextlib

        detector = self.detector(spec)
        images = [self.store.load_rgb(i) for i in image_ids]
        with self.gpu_lock:
            heatmaps = detector.predict(images, mode=mode, progress=progress, should_stop=should_stop)
        with (before_store() if before_store is not None else contextlib.nullcontext()):
            ids = self.store_detection(detector, image_ids, [h.scores for h in heatmaps], mode)
        return list(zip(image_ids, ids))

    def store_detection(self, detector, image_ids: list[int], scores: list[np.ndarray], mode: str) -> list[int]:
        """Store one detector run with a heatmap per image (float32 [H, W]); returns the heatmap ids."""
        _, ids = self.store.add_detector_run(
            detector.detector_id, detector.spec.family, detector.loaded.is_demo,
            {"mode": mode, "spec": _spec_json(detector.spec)}, heatmaps=list(zip(image_ids, scores)))
        return ids

    def use_lora(self, lora_dir: str | None) -> None:
        """Switch the text-to-image model's LoRA on (a folder) or off (None); reloads only on change.
        Call under `gpu_lock` when a generation may be running."""
        from engines.training.lora import apply_lora

        lora_dir = (lora_dir or "").strip() or None
        engine = self.text2image()
        with self._lock:
            if lora_dir != self._applied_lora:
                apply_lora(engine.pipe, lora_dir)
                self._applied_lora = lora_dir

    def repair(self, image: np.ndarray, detector_spec: str, params, *, mask: np.ndarray | None = None,
               progress=None, should_stop=None):
        """engines.generation.repair.repair with this studio's detector and text-to-image (or inpainting) model."""
        from engines.generation.repair import repair

        return repair(image, self.detector(detector_spec), self.text2image().loaded, params, mask=mask,
                      progress=progress, should_stop=should_stop)

    def compare_models(self, prompts: list[str], seeds: list[int], lora_dir: str, detector_spec: str, *,
                       num_inference_steps: int = 20, threshold: float = 0.5, progress=None,
                       should_stop=None) -> list[dict]:
        """The same prompt x seed set generated with the base model and with a LoRA, each scored by the
        detector: rows {prompt, seed, base, tuned, base_heatmap, tuned_heatmap, base_area, tuned_area}.
        `should_stop()` true -> Cancelled before the next image (the LoRA is taken off either way)."""
        from engines.generation.generate import GenerateParams
        from engines.progress import Cancelled

        if not prompts or not seeds:
            raise ValueError("Give at least one prompt and one seed.")
        engine, detector = self.text2image(), self.detector(detector_spec)
        rows, total, done = [], 2 * len(prompts) * len(seeds), 0
        with self.gpu_lock:
            try:
                for lora in (None, lora_dir):
                    self.use_lora(lora)
                    for prompt in prompts:
                        for seed in seeds:
                            if should_stop is not None and should_stop():
                                raise Cancelled("The comparison was stopped.")
                            params = GenerateParams(prompt=prompt, seed=seed, num_inference_steps=num_inference_steps)
                            image = engine.generate(params).images[0].rgb
                            heat = detector.predict([image])[0].scores
                            key = "base" if lora is None else "tuned"
                            if lora is None:
                                rows.append({"prompt": prompt, "seed": seed})
                            row = next(r for r in rows if r["prompt"] == prompt and r["seed"] == seed)
                            row.update({key: image, f"{key}_heatmap": heat,
                                        f"{key}_area": float((heat >= threshold).mean())})
                            done += 1
                            if progress:
                                progress(done, total)
            finally:
                self.use_lora(None)
        return rows

    def corruptor(self):
        """The RegionCorruptor over the configured text-to-image model (inversions cached on disk)."""
        from engines.corruption.corrupt import RegionCorruptor

        engine = self.text2image()
        with self._lock:
            if self._corruptor is None:
                self._corruptor = RegionCorruptor(engine.loaded, cache_dir=self.data_dir / "cache" / "inversions")
            return self._corruptor

    def corruption_mask(self, image_id: int, source: str, *, detector: str | None = None, threshold: float = 0.5,
                        seed: int = 0) -> np.ndarray:
        """A region to corrupt, bool[H, W] at the image's size, from one of MASK_SOURCES."""
        from engines.corruption.metrics import random_blob_mask

        store = self.store
        image = store.get_image(image_id)
        if source == "label regions":
            regions = store.label_state(image_id).regions
            if not regions:
                raise ValueError("This image has no labelled regions; label one, or choose another mask source.")
            mask = np.zeros((image.height, image.width), bool)
            for region in regions:
                mask |= store.load_mask(region.mask_id)
        elif source == "detector regions":
            maps = [h for h in store.list_heatmaps(image_id) if h.family != TRAJECTORY]
            if not maps:
                raise ValueError("This image has no detector heatmap; run a detector in Inspect first.")
            mask = store.load_heatmap(maps[0].id) >= threshold
        elif source == "region selector":
            if not detector:
                raise ValueError("Give the region-selection model (a checkpoint folder trained in the Train tab).")
            mask = self.detector(detector).predict([store.load_rgb(image_id)])[0].scores >= threshold
        elif source == "random blobs":
            mask = random_blob_mask(image.height, image.width, seed)
        else:
            raise ValueError(f"Unknown mask source '{source}'; use one of {', '.join(MASK_SOURCES)}.")
        if not mask.any():
            raise ValueError(f"The {source} mask is empty at threshold {threshold:.2f}; lower the threshold.")
        return mask

    def save_generation(self, session_id: int, result, lora: str | None = None) -> list:
        """Store a GenerationResult: one `generations` row and one image row per output, atomically;
        trajectory maps, when recorded, become a detector run named "trajectory"."""
        params = result.params.to_json()
        base = {k: v for k, v in params.items() if k not in ("num_images", "record_trajectory")}
        if lora:
            base["lora"] = lora
        images = [NewImage(rgb=img.rgb, source="generated", model_id=result.model_id,
                           params={**base, "seed": img.seed, "index": img.index, "width": result.width,
                                   "height": result.height, "demo": result.is_demo})
                  for img in result.images]
        generation = {**{k: v for k, v in base.items() if k != "lora"}, "count": params["num_images"], "model_id": result.model_id,
                      "width": result.width, "height": result.height, "duration_s": round(result.duration_s, 3),
                      "params": {"demo": result.is_demo, "device": self.device, "lora": lora}}
        with self.store.transaction():  # images and trajectory maps: all or nothing
            records = self.store.add_images(session_id, images, generation=generation)
            maps = [(rec.id, img.trajectory) for rec, img in zip(records, result.images) if img.trajectory is not None]
            if maps:
                self.store.add_detector_run(TRAJECTORY, TRAJECTORY, result.is_demo,
                                            {"model_id": result.model_id, "note": TRAJECTORY_NOTE}, heatmaps=maps)
        return records

    def ensure_samples(self) -> None:
        """Create the "Samples" session with the bundled public-domain photos, once per data dir."""
        marker = self.data_dir / ".samples-created"
        if marker.exists():
            return
        from skimage import data as skdata

        items = []
        for entry in json.loads((ASSETS_DIR / "samples.json").read_text())["samples"]:
            rgb = getattr(skdata, entry["loader"])()
            items.append(NewImage(rgb=rgb[..., :3], source="sample", original_name=entry["name"],
                                  params={"licence": entry["licence"], "credit": entry["credit"]}))
        with self.store.transaction():  # the session and its images, or nothing
            session = self.store.ensure_session(SAMPLES_SESSION)
            if not self.store.list_images(session.id):
                self.store.add_images(session.id, items)
        marker.write_text("The Samples session was created; delete this file to create it again.\n")

    def close(self) -> None:
        self.store.close()


def _module_size(module) -> dict:
    """{"parameters", "memory_mb"} of a torch module or a diffusers pipeline (its modules summed); Nones if unknown."""
    if module is None:
        return {"parameters": None, "memory_mb": None}
    parts = list(module.components.values()) if hasattr(module, "components") else [module]
    count = size = 0
    for part in parts:
        for tensor in [*getattr(part, "parameters", lambda: [])(), *getattr(part, "buffers", lambda: [])()]:
            count += tensor.numel()
            size += tensor.numel() * tensor.element_size()
    return {"parameters": count or None, "memory_mb": round(size / 2**20, 1) if size else None}


def _empty_device_cache(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _spec_json(spec) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}


def default_taxonomy() -> list[dict]:
    """The 13 default artifact classes shipped in assets/taxonomy.json."""
    return json.loads((ASSETS_DIR / "taxonomy.json").read_text())["classes"]


def fit_pair(rgb: np.ndarray, mask: np.ndarray, max_side: int | None, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Resize (image Lanczos, mask nearest) so the longer side is at most `max_side`, then centre-crop
    both to multiples of `multiple` — the same geometry as engines.corruption.metrics.prepare_image."""
    from PIL import Image

    from engines.corruption.metrics import prepare_image

    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"Mask size {mask.shape[::-1]} does not match image size {rgb.shape[1::-1]}.")
    out = prepare_image(rgb, multiple=multiple, max_side=max_side)
    m = mask
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        scale = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) >= 128
    top, left = (m.shape[0] - out.shape[0]) // 2, (m.shape[1] - out.shape[1]) // 2
    return out, np.ascontiguousarray(m[top:top + out.shape[0], left:left + out.shape[1]])
