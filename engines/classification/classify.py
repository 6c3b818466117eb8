"""Artifact classes and captions (SynArtifact): a vision-language model, a light head, or the demo.

`ArtifactClassifier(loaded).classify(images, regions=None)` returns one `Classification` per image (or,
with `regions`, per region): a probability per class, the predicted classes and a caption per predicted
artifact. Images are RGB uint8 HWC; a region is a bbox ``(x0, y0, x1, y1)`` of inclusive pixel indices.

Classifier specs (`load_classifier`, CLI ``--classifier``):
    "demo"                     the bundled head (assets/demo_classifier): a tiny CNN trained on procedurally
                               corrupted public-domain photos; real, but not trained on diffusion artifacts
    "head:FOLDER"              a head checkpoint: classifier.json + model.safetensors (what train-classifier writes)
    "vlm:FOLDER_OR_HUB_ID"     any transformers image-text-to-text model (AutoModelForImageTextToText +
                               AutoProcessor: LLaVA-1.5/NeXT, Qwen2-VL/2.5-VL, PaliGemma, Idefics3/SmolVLM)
    FOLDER                     a checkpoint folder written by train-classifier (classifier.json names its family)
Options follow a '#': "vlm:/m/llava#lora=/runs/7/lora,scoring=letter,region=box,threshold=0.4".

The VLM is prompted with SynArtifact's question-answer template built from the taxonomy (`build_question`):
the options (a letter, the class name and its one-line definition) and a reference answer format (JSON
``{"artifacts": [{"option", "class", "caption"}], "other": ...}``). Class probabilities are scored,
never parsed from free text (`scoring`):
- "yesno" (default; multi-label): per class, the question plus "does the image show option X (NAME)?
  Answer yes or no."; with the next-token distribution q after the assistant prompt,
  p(class) = q(yes) / (q(yes) + q(no)), where q(yes) sums the probability of the first token of each
  spelling of yes ("yes", " yes", "Yes", " Yes"; likewise no; first tokens shared by a yes and a no
  spelling are dropped).
- "letter" (single-label): the assistant answer is started as ``{"artifacts": [{"option": "`` and the
  probabilities are the softmax over the option letters' first tokens (same spelling rule).
The caption of each predicted class is generated (greedy) by continuing the reference answer
``{"artifacts": [{"option": "C", "class": "NAME", "caption": "`` up to the closing quote.
Region mode (`region`): "crop" (default) classifies the bbox grown by `context` (0.5 of its size on each
side, at least 32 px) as its own image; "box" draws the bbox in red on the whole image and the question
names the outlined region. Real models run in bfloat16 (float16 where bf16 is unsupported) on CUDA.

The head family classifies crops (the region with context, or the whole image) resized to
`input_size` with a small CNN (`CropNet`) and a sigmoid per class; its captions are a sentence built from
the class name and the region's place in the image (a head does not write text; it says so).

Siblings it imports: `prompts` (the template), `crops` (regions), `vlm` (the VLM wrapper, option scoring).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from engines.classification.crops import BBox, check_bbox, crop_with_context, draw_box, place_phrase, resize_rgb
from engines.classification.prompts import (ANSWER_PREFIX, LETTERS, NO_SPELLINGS, YES_SPELLINGS, build_question,
                                            caption_prefix, check_taxonomy, cut_caption, yesno_question)
from engines.classification.vlm import Vlm, option_probabilities
from engines.models import DEMO, LoadedModel, ModelNotFoundError, first_line, local_folder, remove_tree
from engines.progress import Cancelled, ProgressFn, StopFn

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "model.safetensors"
DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo_classifier"
DEMO_NOTE = ("Demo classifier: a tiny CNN trained on public-domain photos with procedurally made artifacts "
             "(blur, colour, texture, warps, clones, erasures, glyphs, light); it is real but has never seen "
             "diffusion-model artifacts, and 3 of the 13 classes had no training examples.")
SCORINGS = ("yesno", "letter")
REGION_MODES = ("crop", "box")


@dataclass(frozen=True)
class Prediction:
    """One predicted artifact: its class, probability and a caption."""

    class_name: str
    probability: float
    caption: str


@dataclass(frozen=True)
class Classification:
    """What a classifier says about one image (bbox None) or one region of it.

    `probabilities`: (class name, probability) in the classifier's class order; `predicted`: the classes
    at or above the threshold (yes/no and head) or the top class (letter scoring), most probable first.
    """

    image_index: int
    bbox: BBox | None
    probabilities: tuple[tuple[str, float], ...]
    predicted: tuple[Prediction, ...]
    classifier_id: str = ""
    is_demo: bool = False

    @property
    def artifact_probability(self) -> float:
        """The largest class probability: how sure the classifier is that some artifact is there."""
        return max((p for _, p in self.probabilities), default=0.0)

    def probability(self, class_name: str) -> float:
        return dict(self.probabilities)[class_name]

    def to_json(self) -> dict:
        return {"image_index": self.image_index, "bbox": None if self.bbox is None else list(self.bbox),
                "probabilities": {k: round(v, 6) for k, v in self.probabilities},
                "predicted": [asdict(p) for p in self.predicted], "classifier": self.classifier_id,
                "demo": self.is_demo}


@dataclass(frozen=True)
class ClassifierSpec:
    """How a classifier runs. `classes`: [{"name", "definition"}] (a head's are fixed by its weights)."""

    family: str  # "vlm" or "head"
    classes: tuple[dict, ...] = ()
    scoring: str = "yesno"
    region: str = "crop"
    context: float = 0.5
    threshold: float = 0.5
    input_size: int = 64
    max_caption_tokens: int = 40
    note: str = ""

    def validate(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"Unknown scoring '{self.scoring}'; use {' or '.join(SCORINGS)}.")
        if self.region not in REGION_MODES:
            raise ValueError(f"Unknown region mode '{self.region}'; use {' or '.join(REGION_MODES)}.")
        if not 0.0 <= float(self.context) <= 4.0:
            raise ValueError(f"Region context must be between 0 and 4 (a fraction of the box size), got {self.context}.")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"Classifier threshold must be strictly between 0 and 1, got {self.threshold}.")
        if not 16 <= int(self.input_size) <= 1024:
            raise ValueError(f"Head input size must be between 16 and 1024, got {self.input_size}.")


# ----------------------------------------------------------------------------------------------
# The classifier


def _items(images: Sequence[np.ndarray], regions) -> list[tuple[int, BBox | None]]:
    from engines.detection.detect import check_rgb

    for i, img in enumerate(images):
        check_rgb(img, f"image {i}")
    if regions is None:
        return [(i, None) for i in range(len(images))]
    if len(regions) != len(images):
        raise ValueError(f"Give one list of regions per image: {len(images)} image(s) but {len(regions)} region list(s).")
    items = []
    for i, (img, boxes) in enumerate(zip(images, regions)):
        for box in boxes:
            items.append((i, check_bbox(box, img.shape[1], img.shape[0])))
    return items


class ArtifactClassifier:
    """Runs a loaded classifier (`load_classifier`) on RGB uint8 images. Inference only; thread-compatible
    (the caller serialises access to the device)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.spec: ClassifierSpec = loaded.extra
        self.spec.validate()

    @property
    def classifier_id(self) -> str:
        return self.loaded.model_id

    @property
    def fixed_classes(self) -> bool:
        """True for a head: its classes are its weights'; a VLM asks about any taxonomy."""
        return self.spec.family == "head"

    def classes(self, taxonomy=None) -> list[dict]:
        if self.fixed_classes or taxonomy is None:
            return list(self.spec.classes)
        return check_taxonomy(taxonomy)

    def classify(self, images: Sequence[np.ndarray], regions: Sequence[Sequence[BBox]] | None = None, *,
                 taxonomy=None, captions: bool = True, batch_size: int = 8, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> list[Classification]:
        """One Classification per image, or per region when `regions` (one bbox list per image) is given,
        in input order. `taxonomy` (a VLM's classes; a head ignores it) defaults to the spec's classes.
        `progress(done, total)` counts items; `should_stop()` is checked between batches (raises Cancelled)."""
        import torch

        if int(batch_size) < 1:
            raise ValueError("Batch size must be at least 1.")
        items = _items(images, regions)
        classes = self.classes(taxonomy)
        if not classes:
            raise ValueError("This classifier has no classes; give a taxonomy.")
        run = self._head_scores if self.spec.family == "head" else self._vlm_scores
        out: list[Classification] = []
        with torch.inference_mode():
            for start in range(0, len(items), int(batch_size)):
                _stop(should_stop)
                chunk = items[start:start + int(batch_size)]
                probs = run(images, chunk, classes)
                for (index, bbox), p in zip(chunk, probs):
                    out.append(self._classification(images, index, bbox, classes, p, captions))
                if progress is not None:
                    progress(len(out), len(items))
        return out

    # -------------------------------------------------------------- results
    def _classification(self, images, index: int, bbox, classes, probs: np.ndarray, captions: bool) -> Classification:
        names = [c["name"] for c in classes]
        pairs = tuple((n, float(p)) for n, p in zip(names, probs))
        if self.spec.family == "vlm" and self.spec.scoring == "letter":
            chosen = [int(np.argmax(probs))]
        else:
            chosen = [int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= self.spec.threshold]
        preds = []
        for i in chosen:
            text = self._caption(images, index, bbox, classes, i) if captions else ""
            preds.append(Prediction(class_name=names[i], probability=float(probs[i]), caption=text))
        return Classification(image_index=index, bbox=bbox, probabilities=pairs, predicted=tuple(preds),
                              classifier_id=self.classifier_id, is_demo=self.loaded.is_demo)

    def _caption(self, images, index: int, bbox, classes, i: int) -> str:
        image = images[index]
        if self.spec.family == "head":
            return f"{classes[i]['name']} {place_phrase(bbox, image.shape[1], image.shape[0])} (head classifier; no free-text caption)."
        vlm: Vlm = self.loaded.model
        picture = self._view(image, bbox)
        prompt = vlm.prompt(build_question(classes, self._region(bbox))) + caption_prefix(classes, i)
        text = vlm.generate([prompt], [picture], self.spec.max_caption_tokens)[0]
        return cut_caption(text)

    # -------------------------------------------------------------- head
    def _head_scores(self, images, chunk, classes) -> list[np.ndarray]:
        import torch

        model = self.loaded.model
        size = int(self.spec.input_size)
        crops = [self._view(images[i], b, for_head=True) for i, b in chunk]
        x = torch.from_numpy(np.stack([resize_rgb(c, size, size) for c in crops])).permute(0, 3, 1, 2)
        x = x.to(self.loaded.device, torch.float32) / 127.5 - 1.0
        return list(torch.sigmoid(model(x)).float().cpu().numpy())

    # -------------------------------------------------------------- VLM
    def _region(self, bbox) -> str | None:
        return None if bbox is None else self.spec.region

    def _view(self, image: np.ndarray, bbox, for_head: bool = False) -> np.ndarray:
        if bbox is None:
            return image
        if for_head or self.spec.region == "crop":
            return crop_with_context(image, bbox, self.spec.context)
        return draw_box(image, bbox)

    def _vlm_scores(self, images, chunk, classes) -> list[np.ndarray]:
        vlm: Vlm = self.loaded.model
        if self.spec.scoring == "letter":
            prompts = [vlm.prompt(build_question(classes, self._region(b))) + ANSWER_PREFIX for _, b in chunk]
            pictures = [self._view(images[i], b) for i, b in chunk]
            logp = vlm.next_token_logprobs(prompts, pictures)
            groups = [[letter, " " + letter] for letter in LETTERS[:len(classes)]]
            return [np.asarray(option_probabilities(row, vlm.first_tokens(groups))) for row in logp]
        yes_no = vlm.first_tokens([list(YES_SPELLINGS), list(NO_SPELLINGS)])
        if vlm.shared_prefix:  # one forward of the shared question per picture, then the C short questions
            out = []
            for i, b in chunk:
                prompts = [vlm.prompt(yesno_question(classes, k, self._region(b))) for k in range(len(classes))]
                logp = vlm.shared_prefix_logprobs(prompts, self._view(images[i], b))
                out.append(np.array([option_probabilities(row, yes_no)[0] for row in logp]))
            return out
        prompts, pictures = [], []
        for i, b in chunk:
            picture = self._view(images[i], b)
            for k in range(len(classes)):
                prompts.append(vlm.prompt(yesno_question(classes, k, self._region(b))))
                pictures.append(picture)
        logp = vlm.next_token_logprobs(prompts, pictures)
        probs = np.array([option_probabilities(row, yes_no)[0] for row in logp])
        return list(probs.reshape(len(chunk), len(classes)))


def _stop(should_stop: StopFn | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("Stopped; nothing was classified after the stop.")


# ----------------------------------------------------------------------------------------------
# The head


def build_crop_net(num_classes: int, width: int = 16):
    """CropNet: 4 conv blocks (3x3, stride 2, GroupNorm, SiLU; width x 1/2/4/6 channels), global average
    pooling and a linear layer to one logit per class. ~60k parameters at width 16."""
    from torch import nn

    chans = [3, width, width * 2, width * 4, width * 6]
    layers: list = []
    for cin, cout in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                   nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], int(num_classes)))


def save_head(model, spec: ClassifierSpec, folder: str | os.PathLike, *, width: int, provenance: dict | None = None,
              metrics: dict | None = None) -> Path:
    """Write a head checkpoint: model.safetensors + classifier.json (family, classes, sizes, provenance), atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_tree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / CLASSIFIER_WEIGHTS))
    meta = {"format": "artifact-studio-classifier/1", "family": "head", "arch": "CropNet", "width": int(width),
            "classes": list(spec.classes), "input_size": spec.input_size, "context": spec.context,
            "threshold": spec.threshold, "note": spec.note, "provenance": provenance or {}, "metrics": metrics or {}}
    (tmp / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    remove_tree(folder)
    os.replace(tmp, folder)
    return folder


def _load_head(folder: Path, device: str):
    import torch
    from engines.checkpoints import read_safetensors

    meta_path, weights = folder / CLASSIFIER_CONFIG, folder / CLASSIFIER_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ModelNotFoundError(f"Classifier folder '{folder}' needs {CLASSIFIER_CONFIG} and {CLASSIFIER_WEIGHTS}.")
    try:
        meta = json.loads(meta_path.read_text())
        classes = tuple(check_taxonomy(meta["classes"]))
        spec = ClassifierSpec(family="head", classes=classes, input_size=int(meta.get("input_size", 64)),
                              context=float(meta.get("context", 0.5)), threshold=float(meta.get("threshold", 0.5)),
                              note=str(meta.get("note", "")))
        width = int(meta.get("width", 16))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"Classifier folder '{folder}': {CLASSIFIER_CONFIG} is not a valid head config ({first_line(exc)}).") from None
    model = build_crop_net(len(classes), width)
    state = read_safetensors(weights)
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"'{weights.name}' in '{folder}' does not fit a CropNet of width {width} with {len(classes)} "
                         f"classes ({len(bad)} mismatched keys, e.g. {bad[0]}).")
    model.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"Classifier '{folder}' has NaN or infinite weights (first in {name}); the file is damaged.")
    return model.to(device).eval(), spec


# ----------------------------------------------------------------------------------------------
# Loading


def load_classifier(spec: str | None, *, device: str = "cpu", taxonomy=None, local_files_only: bool = False) -> LoadedModel:
    """Load a classifier from a spec string (see the module docstring). `taxonomy`: the classes a VLM is
    asked about by default (a head's classes come from its checkpoint). Returns LoadedModel whose `extra`
    is the ClassifierSpec and whose `model` is an nn.Module (head) or the VLM wrapper."""
    text = (spec or DEMO).strip()
    body, _, options = text.partition("#")
    family, sep, path = body.partition(":")
    if sep and len(family) == 1 and path.startswith(("\\", "/")):  # a Windows drive letter
        family, path, sep = body, "", ""
    if not sep:
        family, path = body, ""
    opts = _options(options)
    _apply(ClassifierSpec(family="vlm"), {k: v for k, v in opts.items() if k != "lora"})  # bad options fail first
    if family == DEMO:
        if not (DEMO_DIR / CLASSIFIER_WEIGHTS).is_file():
            raise ModelNotFoundError(f"The demo classifier's weights are missing from {DEMO_DIR}; run "
                                     "assets/demo_classifier/train_demo_classifier.py to make them.")
        model, cspec = _load_head(DEMO_DIR, device)
        cspec = _apply(replace(cspec, note=DEMO_NOTE), opts)
        return LoadedModel(model=model, kind="classifier", model_id=DEMO, path=str(DEMO_DIR), is_demo=True,
                           device=device, note=DEMO_NOTE, extra=cspec)
    if family == "head" or (not sep and Path(family).expanduser().is_dir()):
        folder = Path(path if family == "head" else family).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(f"Classifier folder '{folder}' does not exist.")
        meta = _read_meta(folder)
        if meta.get("family") == "vlm":
            base = str(meta.get("base") or "")
            merged = {k: v for k, v in meta.get("options", {}).items() if k in ("scoring", "region", "threshold", "context")}
            if meta.get("adapter"):
                merged["lora"] = str(folder / str(meta["adapter"]))
            return _load_vlm(base, {**merged, **opts}, device, meta.get("classes") or taxonomy, text, local_files_only)
        model, cspec = _load_head(folder.resolve(), device)
        cspec = _apply(cspec, opts)
        return LoadedModel(model=model, kind="classifier", model_id=text, path=str(folder.resolve()), is_demo=False,
                           device=device, note=cspec.note, extra=cspec)
    if family == "vlm":
        if not path:
            raise ValueError("The vlm classifier needs a model: vlm:/path/to/model-folder or vlm:HUB_ID.")
        return _load_vlm(path, opts, device, taxonomy, text, local_files_only)
    if not sep and ("/" in family or family.startswith(".")):
        raise ModelNotFoundError(f"Classifier folder '{family}' does not exist.")
    raise ValueError(f"Unknown classifier '{text}'; use demo, head:FOLDER, vlm:FOLDER_OR_HUB_ID or a checkpoint folder.")


def load_classifier_model(spec: str | None, *, data_dir: str | os.PathLike | None = None, device: str = "cpu",
                          **kwargs) -> LoadedModel:
    """`load_classifier` in the shape of `engines.registry.LOADERS` (a classifier keeps nothing under data_dir)."""
    return load_classifier(spec, device=device, **kwargs)


def _read_meta(folder: Path) -> dict:
    meta_path = folder / CLASSIFIER_CONFIG
    if not meta_path.is_file():
        raise ModelNotFoundError(f"Classifier folder '{folder}' has no {CLASSIFIER_CONFIG}; give a folder written by "
                                 "train-classifier (or vlm:FOLDER for a transformers model).")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"'{meta_path}' is not valid JSON ({first_line(exc)}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"'{meta_path}' must hold a JSON object.")
    return meta


def check_classifier(spec: str | None, *, local_files_only: bool = False) -> None:
    """Cheap check of a spec before a job is launched: a head (or the demo) is loaded (it is small); for a
    VLM only its config is read (folder or hub cache) and its kind checked. Raises what loading would."""
    text = (spec or DEMO).strip()
    body, _, options = text.partition("#")
    family, sep, path = body.partition(":")
    if family == "vlm" and sep and path:
        opts = _options(options)
        _apply(ClassifierSpec(family="vlm"), {k: v for k, v in opts.items() if k != "lora"})
        if opts.get("lora") and not Path(str(opts["lora"])).is_dir():
            raise ModelNotFoundError(f"LoRA folder '{opts['lora']}' does not exist.")
        _vlm_config(path, local_files_only)
        return
    folder = Path(body).expanduser()
    if not sep and folder.is_dir() and (folder / CLASSIFIER_CONFIG).is_file():
        meta = _read_meta(folder)
        if meta.get("family") == "vlm":
            _vlm_config(str(meta.get("base") or ""), local_files_only)
            return
    load_classifier(text, local_files_only=local_files_only)


def _vlm_config(source: str, local_files_only: bool):
    """(folder or None, where to load from, offline, config) of a VLM source; one sentence if it is missing,
    unreadable, or not an image-text-to-text model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if not source:
        raise ValueError("The vlm classifier needs a model: vlm:/path/to/model-folder or vlm:HUB_ID.")
    folder = local_folder(source)
    if folder is not None and not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"Model folder '{source}' has no config.json; give a transformers model folder "
                                 "(as written by save_pretrained) or a hub id.")
    where = str(folder) if folder is not None else source
    offline = local_files_only or folder is not None
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline)
    except (OSError, ValueError) as exc:
        if folder is not None:
            raise ModelNotFoundError(f"Model folder '{source}' could not be read: {first_line(exc)}") from None
        raise ModelNotFoundError(f"Model '{source}' was not found: it is not a local folder and is not in the Hugging Face "
                                 "cache (and the hub is unreachable); download it once or pass vlm:/path/to/folder.") from None
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise ValueError(f"'{source}' is a {getattr(config, 'model_type', type(config).__name__)} model, not an "
                         "image-text-to-text model (AutoModelForImageTextToText), so it cannot classify images; give a "
                         "VLM such as LLaVA, Qwen2-VL, PaliGemma or SmolVLM.")
    return folder, where, offline, config


def _load_vlm(source: str, opts: dict, device: str, taxonomy, model_id: str, local_files_only: bool) -> LoadedModel:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, where, offline, _ = _vlm_config(source, local_files_only)
    dtype = torch.float32
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        model = AutoModelForImageTextToText.from_pretrained(where, dtype=dtype, local_files_only=offline)
        processor = AutoProcessor.from_pretrained(where, local_files_only=offline)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"Model '{source}' could not be loaded as an image-text-to-text model: {first_line(exc)}") from None
    lora = opts.pop("lora", None)
    if lora:
        from peft import PeftModel

        if not Path(lora).is_dir():
            raise ModelNotFoundError(f"LoRA folder '{lora}' does not exist.")
        model = PeftModel.from_pretrained(model, lora)
    model = model.to(device).eval()
    classes = tuple(check_taxonomy(taxonomy)) if taxonomy else ()
    cspec = _apply(ClassifierSpec(family="vlm", classes=classes, note="" if not lora else f"LoRA: {lora}"), opts)
    return LoadedModel(model=Vlm(model, processor, device), kind="classifier", model_id=model_id,
                       path=str(folder) if folder else None, is_demo=False, device=device, note=cspec.note, extra=cspec)


def _options(options: str) -> dict:
    out: dict = {}
    for item in [o for o in options.split(",") if o.strip()]:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in ("lora", "scoring", "region", "threshold", "context"):
            raise ValueError(f"Bad classifier option '{item}'; known: lora=DIR, scoring=yesno|letter, region=crop|box, "
                             "threshold=P, context=F.")
        out[key] = value
    return out


def _apply(spec: ClassifierSpec, opts: dict) -> ClassifierSpec:
    changes: dict = {}
    try:
        for key in ("threshold", "context"):
            if key in opts:
                changes[key] = float(opts[key])
    except ValueError:
        raise ValueError("Classifier options threshold and context must be numbers.") from None
    for key in ("scoring", "region"):
        if key in opts:
            changes[key] = str(opts[key])
    new = replace(spec, **changes)
    new.validate()
    return new
