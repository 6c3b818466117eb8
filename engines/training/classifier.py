"""Fine-tuning an artifact classifier on labelled regions, and the metrics SynArtifact reports.

Samples (`ClassifierSample`) are whole images or regions of them (a bbox) with their true classes (an
empty tuple is a clean example) and captions. Two trainers, one result shape (`ClassifierTrainResult`):

- `train_head`: the CropNet head of engines.classification.classify on crops (the region grown by the spec's context,
  with a random context in [0.5, 1.5] x that and a random horizontal flip while training), resized to
  the input size, scaled to [-1, 1]; multi-label BCE-with-logits (positives weighted by `pos_weight`),
  AdamW, constant lr. Initialised from
  a head (its backbone; its last layer too when the classes are the same) or from scratch (seeded).
- `train_vlm`: an image-text-to-text model on SynArtifact's question-answer pairs rendered from the
  samples (`vlm_pairs`): per sample, the template question with the reference-format JSON answer
  (its classes and captions) and one yes/no question (a true class, or a random absent one, 50/50),
  so that both the scored yes/no probabilities and the generated captions are trained. Cross-entropy
  on the answer tokens only (prompt and padding are -100). LoRA (peft; rank/alpha on the q/k/v/o
  projections of the language model, not the vision tower) or, without LoRA, every language-model
  weight (the vision tower stays frozen).

Both evaluate on the held-out samples before training (the zero-shot / initial classifier) and every
`eval_every` steps; the best checkpoint (micro F1) is kept in out/best, the latest in out/last with the
optimizer state and step (resume continues from it). `classification_metrics` gives per-class
precision/recall/F1 and support, micro and macro F1 (macro over classes with support in the truth)
and exact-match accuracy (the predicted set of classes equals the true set).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engines.classification.classify import CLASSIFIER_CONFIG, ArtifactClassifier, ClassifierSpec, build_crop_net, save_head
from engines.classification.crops import crop_with_context, resize_rgb
from engines.classification.prompts import build_question, check_taxonomy, render_answer, yesno_question
from engines.models import LoadedModel, remove_tree
from engines.progress import StopFn

LogFn = Callable[[dict], None]
BBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class ClassifierSample:
    """One training/evaluation item: an RGB uint8 image, a region of it (None = the whole image), its
    true classes (() = no artifact), one caption per class ("" when none), and its split family."""

    image: np.ndarray
    bbox: BBox | None
    classes: tuple[str, ...]
    captions: tuple[str, ...] = ()
    family: str = ""
    name: str = ""


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Settings of one classifier fine-tuning run."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3  # head; VLM LoRA typically 1e-4, full fine-tuning 1e-5
    weight_decay: float = 0.01
    eval_every: int = 50
    seed: int = 0
    lora: bool = True  # VLM: LoRA adapters (True) or all language-model weights (False)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    width: int = 16  # head: CropNet width when trained from scratch
    input_size: int = 64  # head input side
    threshold: float = 0.5
    pos_weight: float = 1.0  # head: weight of positive targets in the BCE (rare classes: > 1)

    def validate(self) -> None:
        if not 1 <= int(self.steps) <= 1_000_000:
            raise ValueError(f"Training steps must be between 1 and 1000000, got {self.steps}.")
        if not 1 <= int(self.batch_size) <= 4096:
            raise ValueError(f"Batch size must be between 1 and 4096, got {self.batch_size}.")
        if not 0 < float(self.lr) <= 1:
            raise ValueError(f"Learning rate must be in (0, 1], got {self.lr}.")
        if not 1 <= int(self.eval_every):
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}.")
        if not 1 <= int(self.lora_rank) <= 512:
            raise ValueError(f"LoRA rank must be between 1 and 512, got {self.lora_rank}.")
        if not 0 < float(self.threshold) < 1:
            raise ValueError(f"Threshold must be strictly between 0 and 1, got {self.threshold}.")
        if not 0 <= int(self.seed) <= 2**32 - 1:
            raise ValueError(f"Seed {self.seed} is out of range; use 0 to {2**32 - 1}.")
        if not 0 < float(self.pos_weight) <= 1000:
            raise ValueError(f"pos_weight must be in (0, 1000], got {self.pos_weight}.")


@dataclass(frozen=True)
class ClassifierTrainResult:
    """`zero_shot`/`tuned`: `classification_metrics` on the held-out samples before training and of the best
    checkpoint (`tuned` is empty when stopped before any evaluation)."""

    best_dir: str
    last_dir: str
    steps_done: int
    stopped: bool
    zero_shot: dict
    tuned: dict
    history: tuple[dict, ...] = field(default=())
    duration_s: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["history"] = list(self.history)
        return data


# ----------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(truth: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]],
                           class_names: Sequence[str]) -> dict:
    """Per-class precision/recall/F1/support, micro and macro F1, exact-match accuracy (see module doc).

    A class never predicted has precision 0 (0/0 counted as 0); macro F1 averages the classes with
    support > 0 (null when there is none)."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted must have one entry per sample.")
    names = list(class_names)
    tp, fp, fn = ({n: 0 for n in names} for _ in range(3))
    exact = 0
    for t, p in zip(truth, predicted):
        t, p = set(t) & set(names), set(p) & set(names)
        exact += t == p
        for n in p & t:
            tp[n] += 1
        for n in p - t:
            fp[n] += 1
        for n in t - p:
            fn[n] += 1
    per_class = {}
    for n in names:
        precision = tp[n] / (tp[n] + fp[n]) if tp[n] + fp[n] else 0.0
        recall = tp[n] / (tp[n] + fn[n]) if tp[n] + fn[n] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[n] = {"precision": precision, "recall": recall, "f1": f1, "support": tp[n] + fn[n]}
    TP, FP, FN = sum(tp.values()), sum(fp.values()), sum(fn.values())
    micro_p = TP / (TP + FP) if TP + FP else 0.0
    micro_r = TP / (TP + FN) if TP + FN else 0.0
    supported = [per_class[n]["f1"] for n in names if per_class[n]["support"] > 0]
    return {"per_class": per_class, "micro_precision": micro_p, "micro_recall": micro_r,
            "micro_f1": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
            "macro_f1": float(np.mean(supported)) if supported else None,
            "exact_match": exact / len(truth) if truth else None, "samples": len(truth)}


def evaluate(classifier: ArtifactClassifier, samples: Sequence[ClassifierSample], taxonomy=None,
             batch_size: int = 8) -> dict:
    """`classification_metrics` of a classifier's predicted classes on samples (captions not generated)."""
    if not samples:
        return {}
    names = [c["name"] for c in classifier.classes(taxonomy)]
    preds: dict[int, list[str]] = {}
    whole = [i for i, s in enumerate(samples) if s.bbox is None]
    parts = [i for i, s in enumerate(samples) if s.bbox is not None]
    for ids, regions in ((whole, None), (parts, [[samples[i].bbox] for i in parts])):
        if ids:
            results = classifier.classify([samples[i].image for i in ids], regions, taxonomy=taxonomy, captions=False,
                                          batch_size=batch_size)
            preds.update({i: [p.class_name for p in r.predicted] for i, r in zip(ids, results)})
    return classification_metrics([s.classes for s in samples], [preds[i] for i in range(len(samples))], names)


# ----------------------------------------------------------------------------------------------
# The head


def head_batch(samples: Sequence[ClassifierSample], names: Sequence[str], size: int, context: float,
               rng: np.random.Generator | None = None):
    """(x float32 N x 3 x S x S in [-1, 1], y float32 N x C multi-hot); `rng` turns on the augmentation."""
    import torch

    xs, ys = [], []
    index = {n: i for i, n in enumerate(names)}
    for s in samples:
        ctx = context if rng is None else context * float(rng.uniform(0.5, 1.5))
        crop = s.image if s.bbox is None else crop_with_context(s.image, s.bbox, ctx)
        crop = resize_rgb(crop, size, size)
        if rng is not None and rng.random() < 0.5:
            crop = crop[:, ::-1]
        xs.append(np.ascontiguousarray(crop))
        y = np.zeros(len(names), np.float32)
        for c in s.classes:
            if c in index:
                y[index[c]] = 1.0
        ys.append(y)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.from_numpy(np.stack(ys))


def train_head(config: ClassifierTrainConfig, taxonomy, train: Sequence[ClassifierSample],
               val: Sequence[ClassifierSample], out_dir: str | os.PathLike, *, init: LoadedModel | None = None,
               device: str = "cpu", should_stop: StopFn | None = None, log: LogFn | None = None,
               resume: bool = True, provenance: dict | None = None) -> ClassifierTrainResult:
    """Train a CropNet head for `taxonomy`'s classes (see the module docstring); writes out/best, out/last."""
    import torch

    config.validate()
    classes = tuple(check_taxonomy(taxonomy))
    names = [c["name"] for c in classes]
    _check_samples(train, "training")
    start_time = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width, size, context = int(config.width), int(config.input_size), 0.5
    torch.manual_seed(int(config.seed))
    if init is not None:
        if init.extra is None or init.extra.family != "head":
            raise ValueError("A head can only be initialised from another head (head:FOLDER or demo).")
        old = init.model
        width = int(old[-1].in_features) // 6
        size, context = int(init.extra.input_size), float(init.extra.context)
        model = build_crop_net(len(names), width)
        state = {k: v for k, v in old.state_dict().items()}
        same = [c["name"] for c in init.extra.classes] == names
        model.load_state_dict({k: v for k, v in state.items() if same or not k.startswith(f"{len(model) - 1}.")},
                              strict=False)
    else:
        model = build_crop_net(len(names), width)
    spec = ClassifierSpec(family="head", classes=classes, input_size=size, context=context,
                          threshold=float(config.threshold), note="Head trained on a session's labelled regions.")
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config.lr), weight_decay=float(config.weight_decay))
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    state = _load_state(last_dir) if resume else None
    step, history, best, zero_shot = 0, [], -1.0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best"])
        zero_shot, history = json.loads((last_dir / "progress.json").read_text()).values()

    def evaluate_now() -> dict:
        model.eval()
        loaded = LoadedModel(model=model, kind="classifier", model_id="training", path=None, is_demo=False,
                             device=device, extra=spec)
        metrics = evaluate(ArtifactClassifier(loaded), val, batch_size=64)
        model.train()
        return metrics

    if state is None:
        zero_shot = evaluate_now() if val else {}
        if log is not None and zero_shot:
            log({"step": 0, "micro_f1": zero_shot["micro_f1"], "exact_match": zero_shot["exact_match"]})
    rng = np.random.default_rng([int(config.seed), step])
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((len(names),), float(config.pos_weight), device=device))
    stopped = False
    model.train()
    while step < int(config.steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        batch = [train[int(i)] for i in rng.integers(len(train), size=int(config.batch_size))]
        x, y = head_batch(batch, names, size, context, rng)
        loss = loss_fn(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        row = {"step": step, "loss": float(loss.detach()), "lr": float(config.lr)}
        if step % int(config.eval_every) == 0 or step == int(config.steps):
            metrics = evaluate_now() if val else {}
            row.update({"micro_f1": metrics.get("micro_f1"), "exact_match": metrics.get("exact_match")})
            score = metrics.get("micro_f1") if metrics else -step  # no val: keep the latest
            if score is not None and score > best:
                best = score
                save_head(model, spec, best_dir, width=width, provenance={**(provenance or {}), "step": step},
                          metrics=metrics)
            _save_state(last_dir, model, optimizer, step, best, zero_shot, history + [row],
                        lambda folder: save_head(model, spec, folder, width=width, provenance=provenance or {}), True)
        history.append(row)
        if log is not None:
            log(dict(row))
    if not best_dir.exists():
        save_head(model, spec, best_dir, width=width, provenance=provenance or {})
    _save_state(last_dir, model, optimizer, step, best, zero_shot, history,
                lambda folder: save_head(model, spec, folder, width=width, provenance=provenance or {}), True)
    tuned = json.loads((best_dir / CLASSIFIER_CONFIG).read_text()).get("metrics", {}) if val else {}
    return _finish(out_dir, ClassifierTrainResult(str(best_dir), str(last_dir), step, stopped, zero_shot, tuned,
                                                  tuple(history), time.perf_counter() - start_time), config)


# ----------------------------------------------------------------------------------------------
# The VLM


def vlm_pairs(sample: ClassifierSample, taxonomy, region_mode: str, rng: np.random.Generator,
              context: float = 0.5) -> list[tuple[np.ndarray, str, str]]:
    """(picture, question, answer) pairs of one sample: the JSON question-answer and one yes/no question."""
    from engines.classification.crops import draw_box

    classes = check_taxonomy(taxonomy)
    names = [c["name"] for c in classes]
    region = None if sample.bbox is None else region_mode
    if sample.bbox is None:
        picture = sample.image
    elif region_mode == "crop":
        picture = crop_with_context(sample.image, sample.bbox, context)
    else:
        picture = draw_box(sample.image, sample.bbox)
    captions = list(sample.captions) + [""] * (len(sample.classes) - len(sample.captions))
    answer = render_answer(classes, list(zip(sample.classes, captions)))
    present = [names.index(c) for c in sample.classes if c in names]
    absent = [i for i in range(len(names)) if i not in present]
    if present and (not absent or rng.random() < 0.5):
        k, yes = int(rng.choice(present)), True
    else:
        k, yes = int(rng.choice(absent)), False
    return [(picture, build_question(classes, region), answer),
            (picture, yesno_question(classes, k, region), "yes" if yes else "no")]


def vlm_batch(vlm, pairs: Sequence[tuple[np.ndarray, str, str]]):
    """Processor inputs for prompt + answer texts, with `labels` = the answer tokens (the rest -100)."""
    texts, prompts, pictures = [], [], []
    for picture, question, answer in pairs:
        prompt, full = vlm.conversation(question, answer)
        prompts.append(prompt)
        texts.append(full)
        pictures.append(picture)
    inputs = vlm.inputs(texts, pictures)
    prompt_lengths = vlm.inputs(prompts, pictures)["attention_mask"].sum(dim=1)
    full_lengths = inputs["attention_mask"].sum(dim=1)
    labels = inputs["input_ids"].clone()
    width = labels.shape[1]
    for row, (n_full, n_prompt) in enumerate(zip(full_lengths.tolist(), prompt_lengths.tolist())):
        labels[row, :width - (n_full - n_prompt)] = -100  # left padding: the answer is the last n_full - n_prompt tokens
    inputs["labels"] = labels
    return inputs


def language_targets(model) -> list[str]:
    """Names of the q/k/v/o projections outside the vision tower (where LoRA goes)."""
    import torch

    out = [name for name, module in model.named_modules()
           if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
           and "vision" not in name and "visual" not in name]
    if not out:
        raise ValueError("The model has no q/k/v/o projections in its language model to put LoRA adapters on.")
    return out


def train_vlm(config: ClassifierTrainConfig, loaded: LoadedModel, taxonomy, train: Sequence[ClassifierSample],
              val: Sequence[ClassifierSample], out_dir: str | os.PathLike, *, base: str,
              should_stop: StopFn | None = None, log: LogFn | None = None, resume: bool = True,
              provenance: dict | None = None) -> ClassifierTrainResult:
    """Fine-tune a VLM classifier (`loaded` from load_classifier("vlm:...")) on the samples (module doc).

    `base` is the model's folder or hub id, recorded in the checkpoint's classifier.json. With LoRA the
    adapter is added to `loaded`'s model in place and removed again before returning."""
    import torch

    config.validate()
    classes = tuple(check_taxonomy(taxonomy))
    _check_samples(train, "training")
    if loaded.extra is None or loaded.extra.family != "vlm":
        raise ValueError("train_vlm needs a VLM classifier (vlm:FOLDER_OR_HUB_ID).")
    start_time = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm = loaded.model
    spec = replace(loaded.extra, classes=classes)
    classifier = ArtifactClassifier(replace(loaded, extra=spec))
    zero_shot, history, step, best = {}, [], 0, -1.0
    last_dir, best_dir = out_dir / "last", out_dir / "best"
    state = _load_state(last_dir) if resume else None
    if state is None:
        vlm.model.eval()
        zero_shot = evaluate(classifier, val) if val else {}
        if log is not None and zero_shot:
            log({"step": 0, "micro_f1": zero_shot["micro_f1"], "exact_match": zero_shot["exact_match"]})
    model = vlm.model
    original = model
    torch.manual_seed(int(config.seed))
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=int(config.lora_rank), lora_alpha=float(config.lora_alpha),
                                                 lora_dropout=0.0, target_modules=language_targets(model)))
        if state is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(last_dir / "lora" / "adapter_model.safetensors")))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    else:
        model.requires_grad_(False)
        params = [p for n, p in model.named_parameters() if "vision" not in n and "visual" not in n]
        for p in params:
            p.requires_grad_(True)
        if state is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(last_dir / "model" / "model.safetensors")), strict=False)
    vlm.model = model
    optimizer = torch.optim.AdamW(params, lr=float(config.lr), weight_decay=float(config.weight_decay))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best"])
        zero_shot, history = json.loads((last_dir / "progress.json").read_text()).values()

    def save(folder: Path, metrics: dict | None = None) -> Path:
        return _save_vlm(model, vlm.processor, spec, folder, config, base, provenance or {}, metrics or {})

    stopped = False
    try:
        rng = np.random.default_rng([int(config.seed), step])
        model.train()
        while step < int(config.steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = [train[int(i)] for i in rng.integers(len(train), size=int(config.batch_size))]
            pairs = [p for s in batch for p in vlm_pairs(s, classes, spec.region, rng, spec.context)]
            loss = model(**vlm_batch(vlm, pairs)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            row = {"step": step, "loss": float(loss.detach()), "lr": float(config.lr)}
            if step % int(config.eval_every) == 0 or step == int(config.steps):
                model.eval()
                metrics = evaluate(classifier, val) if val else {}
                model.train()
                row.update({"micro_f1": metrics.get("micro_f1"), "exact_match": metrics.get("exact_match")})
                score = metrics.get("micro_f1") if metrics else -step
                if score is not None and score > best:
                    best = score
                    save(best_dir, metrics)
                _save_state(last_dir, model, optimizer, step, best, zero_shot, history + [row], save)
            history.append(row)
            if log is not None:
                log(dict(row))
        if not best_dir.exists():
            save(best_dir)
        _save_state(last_dir, model, optimizer, step, best, zero_shot, history, save)
    finally:
        model.eval()
        if config.lora and hasattr(model, "unload"):
            vlm.model = model.unload()  # the caller's model without adapter layers
        else:
            vlm.model = original
        vlm.model.requires_grad_(False)
    tuned = json.loads((best_dir / CLASSIFIER_CONFIG).read_text()).get("metrics", {}) if val else {}
    return _finish(out_dir, ClassifierTrainResult(str(best_dir), str(last_dir), step, stopped, zero_shot, tuned,
                                                  tuple(history), time.perf_counter() - start_time), config)


def _save_vlm(model, processor, spec: ClassifierSpec, folder: Path, config: ClassifierTrainConfig, base: str,
              provenance: dict, metrics: dict) -> Path:
    """A VLM checkpoint folder: classifier.json (family vlm, base, adapter/model, classes) + lora/ or model/."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    if config.lora:
        model.save_pretrained(str(tmp / "lora"))
        meta_extra = {"base": base, "adapter": "lora"}
    else:
        model.save_pretrained(str(tmp / "model"))
        processor.save_pretrained(str(tmp / "model"))
        meta_extra = {"base": str(folder / "model"), "adapter": None}
    meta = {"format": "artifact-studio-classifier/1", "family": "vlm", **meta_extra, "classes": list(spec.classes),
            "options": {"scoring": spec.scoring, "region": spec.region, "threshold": spec.threshold,
                        "context": spec.context},
            "provenance": provenance, "metrics": metrics, "config": asdict(config)}
    (tmp / CLASSIFIER_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    remove_tree(folder)
    os.replace(tmp, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Checkpoint state, helpers


def _save_state(last_dir: Path, model, optimizer, step: int, best: float, zero_shot: dict, history: list,
                save_model: Callable[[Path], Path], keep_model: bool = False) -> None:
    """out/last: the model as a checkpoint, plus trainer_state.pt (optimizer, step, best; the model's
    state too when `keep_model`, for heads) and progress.json (zero-shot metrics, history)."""
    import torch

    save_model(last_dir)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "best": best,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()} if keep_model else {}},
               last_dir / "trainer_state.pt")
    (last_dir / "progress.json").write_text(json.dumps({"zero_shot": zero_shot, "history": history}, default=str))


def _load_state(last_dir: Path) -> dict | None:
    import torch

    path = last_dir / "trainer_state.pt"
    if not path.is_file():
        return None
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _check_samples(samples: Sequence[ClassifierSample], what: str) -> None:
    if not samples:
        raise ValueError(f"No {what} samples: label some regions with a class first.")
    for i, s in enumerate(samples):
        if not isinstance(s, ClassifierSample):
            raise ValueError(f"{what.capitalize()} sample {i} is a {type(s).__name__}, not a ClassifierSample.")


def _finish(out_dir: Path, result: ClassifierTrainResult, config: ClassifierTrainConfig) -> ClassifierTrainResult:
    (out_dir / "train_classifier.json").write_text(json.dumps({"config": asdict(config), "result": result.to_json()},
                                                              indent=2, default=str))
    return result
