"""Loading artifact detectors of every published family into one shape: an nn.Module + DetectorSpec.

A detector spec string is one of:
    "demo"                         the demo detector shipped in assets/demo_detector (a small UperNet trained on synthetic
                                   corruptions of the sample photos), copied once under the data directory; a tiny
                                   config-built untrained UperNet (fixed seed) when that folder is absent
    FOLDER                         our checkpoint: detector.json + model.safetensors
    "upernet-convnext-tiny" / "upernet-swin-tiny"            random init (untrained)
    "upernet-convnext-tiny:SRC" / "upernet-swin-tiny:SRC"    init from an ADE20K UperNet (folder or hub id)
    "mmseg-upernet-convnext-tiny:FILE" / "mmseg-upernet-swin-tiny:FILE"   an mmsegmentation checkpoint
    "diffdoctor:FILE"             DiffDoctor's ad_pytorch_model.bin (SegFormer MiT-B5, 1-channel head)
    "torchscript:FILE"            a TorchScript model mapping normalised 1x3xHxW to logits
Options may follow a '#': "torchscript:/x/end2end.pt#size=512,channel=1,activation=softmax,norm=imagenet".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engines.checkpoints import read_safetensors, safe_torch_load
from engines.models import DEMO, DEMO_SEED, LoadedModel, ModelNotFoundError, first_line, local_folder, remove_tree

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTOR_CONFIG = "detector.json"
DETECTOR_WEIGHTS = "model.safetensors"
DEMO_LOGIT_SCALE = 800.0
DEMO_DETECTOR_NOTE = ("Demo detector: trained on synthetic corruptions of the sample photos, not a real-world artifact "
                      "detector. Load a real one with a detector SPEC (e.g. diffdoctor:FILE or a checkpoint folder).")
DEMO_UNTRAINED_DETECTOR_NOTE = "Demo detector: a tiny untrained UperNet with random weights; its heatmaps are not meaningful."
DEMO_DETECTOR_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo_detector"
DEMO_DETECTOR_MARKER = "artifact_studio_demo.json"


@dataclass(frozen=True)
class DetectorSpec:
    """How a detector sees images. Inputs are scaled to [0,1], then (x - mean) / std.

    activation "sigmoid": channel `channel` of the logits is the artifact logit;
    "softmax": softmax over channels, probability of channel `channel`.
    """

    family: str
    input_size: int = 512
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    activation: str = "softmax"
    channel: int = 1
    trained: bool = True


def demo_detector_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models" / "demo-detector"


def tiny_upernet_config(num_labels: int = 2, seed_note: str = ""):
    """A toy UperNet (ConvNeXt backbone 8/16/32/64 channels, ~0.1M params) for the demo and tests."""
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, num_labels=num_labels, hidden_size=16,
                         use_auxiliary_head=False, pool_scales=[1, 2, 3, 6])


def upernet_config(backbone: str, num_labels: int = 2):
    """UperNet with a ConvNeXt-T or Swin-T backbone, as in the synthetic-artifact paper (mmseg-equivalent)."""
    from transformers import ConvNextConfig, SwinConfig, UperNetConfig

    stages = ["stage1", "stage2", "stage3", "stage4"]
    if backbone == "convnext-tiny":
        cfg = ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], drop_path_rate=0.0, out_features=stages)
    elif backbone == "swin-tiny":
        cfg = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages)
    else:
        raise ValueError(f"Unknown UperNet backbone '{backbone}'; use convnext-tiny or swin-tiny.")
    return UperNetConfig(backbone_config=cfg, num_labels=num_labels, hidden_size=512, use_auxiliary_head=False,
                         pool_scales=[1, 2, 3, 6])


def save_detector(model, spec: DetectorSpec, folder: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write our checkpoint format: model.safetensors + detector.json (family, classes, size, norm, arch, provenance).

    Written into a temporary sibling and renamed, so a reader never sees half a checkpoint.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    remove_tree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / DETECTOR_WEIGHTS))
    meta = {"format": "artifact-studio-detector/1", "spec": _spec_dict(spec), "arch": "UperNetForSemanticSegmentation",
            "config": model.config.to_dict(), "provenance": provenance or {}}
    (tmp / DETECTOR_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    remove_tree(folder)
    os.replace(tmp, folder)
    return folder


def ensure_demo_detector(data_dir: str | os.PathLike, seed: int = DEMO_SEED) -> Path:
    """Put the demo detector under `data_dir` once and return its folder.

    The trained demo detector (assets/demo_detector: model.safetensors + detector.json, made by the
    script beside them) is copied; a folder copied from other weights (an older release) is replaced.
    Without the shipped files a tiny untrained UperNet is built from `seed` (same seed -> same bytes).
    """
    import hashlib
    import shutil

    target = demo_detector_dir(data_dir)
    shipped = [DEMO_DETECTOR_ASSETS / DETECTOR_CONFIG, DEMO_DETECTOR_ASSETS / DETECTOR_WEIGHTS]
    if all(p.is_file() for p in shipped):
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in shipped)).hexdigest()
        marker = target / DEMO_DETECTOR_MARKER
        if marker.is_file() and (target / DETECTOR_CONFIG).is_file() and marker.read_text().strip() == digest:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        remove_tree(tmp)
        tmp.mkdir()
        for path in shipped:
            shutil.copyfile(path, tmp / path.name)
        (tmp / DEMO_DETECTOR_MARKER).write_text(digest + "\n")
        remove_tree(target)
        os.replace(tmp, target)
        return target
    return _ensure_untrained_demo_detector(target, seed)


def _ensure_untrained_demo_detector(target: Path, seed: int) -> Path:
    if (target / DETECTOR_CONFIG).is_file() and not (target / DEMO_DETECTOR_MARKER).is_file():
        return target
    return save_untrained_demo_detector(target, seed)


def save_untrained_demo_detector(folder: str | os.PathLike, seed: int = DEMO_SEED) -> Path:
    """The tiny config-built UperNet (input 256, random weights from `seed`, logits spread so its heatmap
    spans [0, 1]) saved in our checkpoint format: the demo detector when no trained one is shipped,
    and a fast stand-in for tests of the detection mechanics. Same seed -> same bytes."""
    import torch
    from transformers import UperNetForSemanticSegmentation

    torch.manual_seed(seed)
    model = UperNetForSemanticSegmentation(tiny_upernet_config())
    with torch.no_grad():  # spread the random logits so the untrained heatmap spans [0, 1] visibly
        model.decode_head.classifier.weight.mul_(DEMO_LOGIT_SCALE)
    spec = DetectorSpec(family="upernet", input_size=256, trained=False)
    return save_detector(model, spec, Path(folder), {"demo": True, "seed": seed, "note": DEMO_UNTRAINED_DETECTOR_NOTE})


def load_detector(spec: str | None, *, data_dir: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load an artifact detector from a spec string (see the table above). Returns LoadedModel whose
    `model` is an `nn.Module` in eval mode and whose `extra` holds the DetectorSpec."""
    text = (spec or DEMO).strip()
    body, _, options = text.partition("#")
    family, sep, path = body.partition(":")
    if sep and len(family) == 1 and path.startswith(("\\", "/")):  # a Windows drive letter, not a family
        family, path, sep = body, "", ""
    if not sep:
        family, path = body, ""
    is_demo = family == DEMO
    if is_demo:
        folder = ensure_demo_detector(data_dir)
        module, dspec, note = _load_own_detector(folder)
        module_id, note = DEMO, DEMO_DETECTOR_NOTE if dspec.trained else DEMO_UNTRAINED_DETECTOR_NOTE
    elif not sep and Path(family).expanduser().is_dir():
        folder = Path(family).expanduser().resolve()
        module, dspec, note = _load_own_detector(folder)
        module_id = str(folder)
    elif family in DETECTOR_FAMILIES:
        module, dspec, note = DETECTOR_FAMILIES[family](path)
        module_id = text
    else:
        if not sep and ("/" in family or family.startswith(".")):
            raise ModelNotFoundError(f"Detector folder '{family}' does not exist.")
        raise ValueError(f"Unknown detector '{text}'; use demo, a checkpoint folder, or FAMILY:PATH with FAMILY one of "
                         f"{', '.join(sorted(DETECTOR_FAMILIES))}.")
    dspec = _apply_options(dspec, options)
    _check_finite(module, text)
    module = module.to(device).eval()
    return LoadedModel(model=module, kind="detector", model_id=module_id, path=path or None, is_demo=is_demo,
                       device=device, note=note, extra=dspec)


def _load_own_detector(folder: Path):
    import torch
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    meta_path, weights = folder / DETECTOR_CONFIG, folder / DETECTOR_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ModelNotFoundError(f"Detector folder '{folder}' needs {DETECTOR_CONFIG} and {DETECTOR_WEIGHTS}.")
    try:
        meta = json.loads(meta_path.read_text())
        dspec = DetectorSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
        config = UperNetConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"Detector folder '{folder}': {DETECTOR_CONFIG} is not a valid detector config ({exc}).") from None
    with torch.device("cpu"):
        model = UperNetForSemanticSegmentation(config)
    _load_state(model, read_safetensors(weights), str(weights))
    note = "" if dspec.trained else "Untrained detector: heatmaps are not meaningful."
    return model, dspec, note


def _upernet_family(backbone: str):
    def build(source: str):
        import torch
        from transformers import UperNetForSemanticSegmentation

        if not source:
            torch.manual_seed(DEMO_SEED)
            model = UperNetForSemanticSegmentation(upernet_config(backbone))
            return model, DetectorSpec(family=f"upernet-{backbone}", trained=False), \
                f"Untrained upernet-{backbone} (random init): heatmaps are not meaningful."
        folder = local_folder(source)
        try:
            model = UperNetForSemanticSegmentation.from_pretrained(
                str(folder) if folder else source, num_labels=2, ignore_mismatched_sizes=True,
                local_files_only=folder is not None)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"UperNet checkpoint '{source}' could not be loaded: {first_line(exc)}") from None
        return model, DetectorSpec(family=f"upernet-{backbone}", trained=False), \
            f"upernet-{backbone} initialised from '{source}' (ADE20K); its 2-class head is untrained until fine-tuned."
    return build


def _diffdoctor(source: str):
    from torch import nn
    from transformers import SegformerForSemanticSegmentation

    if not source:
        raise ValueError("The diffdoctor detector needs its file: diffdoctor:/path/to/ad_pytorch_model.bin.")
    state = safe_torch_load(source)
    config = diffdoctor_config()
    model = SegformerForSemanticSegmentation(config)
    model.decode_head.classifier = nn.Conv2d(model.config.decoder_hidden_size, 1, kernel_size=1)
    if any(k.startswith(("segformer.encoder.block.", "decode_head.linear_c.")) for k in state):
        # the released file uses transformers-4 key names: let transformers' own renaming map them
        model = _load_renamed(SegformerForSemanticSegmentation, config, state, source)
    else:
        _load_state(model, state, source)
    return model, DetectorSpec(family="diffdoctor", input_size=512, activation="sigmoid", channel=0), ""


def _load_renamed(model_cls, config, state: dict, source: str):
    """Load a state dict saved under older transformers key names via from_pretrained's key renaming;
    missing, unexpected or mismatched keys are reported by name."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in state.items() if hasattr(v, "contiguous")},
                  str(Path(folder) / "model.safetensors"))
        try:
            model, info = model_cls.from_pretrained(folder, output_loading_info=True, local_files_only=True,
                                                    ignore_mismatched_sizes=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"'{Path(source).name}' does not fit this detector architecture: {first_line(exc)}") from None
    parts = []
    for label, keys in (("missing", info.get("missing_keys", [])), ("unexpected", info.get("unexpected_keys", [])),
                        ("wrong shape", [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])])):
        keys = sorted(keys)
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    if parts:
        raise ValueError(f"'{Path(source).name}' does not fit this detector architecture: {'; '.join(parts)}.")
    return model


def diffdoctor_config(**overrides):
    """SegFormer MiT-B5 configuration (nvidia/mit-b5), built offline."""
    from transformers import SegformerConfig

    kwargs = dict(num_channels=3, num_encoder_blocks=4, depths=[3, 6, 40, 3], sr_ratios=[8, 4, 2, 1],
                  hidden_sizes=[64, 128, 320, 512], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                  num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=768,
                  num_labels=1, semantic_loss_ignore_index=255)
    kwargs.update(overrides)
    return SegformerConfig(**kwargs)


def _torchscript(source: str):
    import torch

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"TorchScript file '{source}' does not exist.")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        reason = first_line(exc).split(". ")[0].rstrip(".")
        raise ValueError(f"'{source}' is not a TorchScript model ({reason}).") from None
    dspec = DetectorSpec(family="torchscript")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        dspec = _apply_options(dspec, ",".join(f"{k}={v}" for k, v in json.loads(sidecar.read_text()).items()))
    return model, dspec, ""


def _mmseg_family(backbone: str):
    def build(source: str):
        from transformers import UperNetForSemanticSegmentation

        from engines.detection.mmseg_convert import convert_mmseg_upernet

        if not source:
            raise ValueError(f"mmseg-upernet-{backbone} needs a checkpoint file: mmseg-upernet-{backbone}:/path/iter_N.pth.")
        raw = safe_torch_load(source)
        state = raw.get("state_dict", raw)
        converted, num_labels = convert_mmseg_upernet(state, backbone)
        model = UperNetForSemanticSegmentation(upernet_config(backbone, num_labels=num_labels))
        _load_state(model, converted, source)
        activation, channel = ("sigmoid", 0) if num_labels == 1 else ("softmax", 1)
        return model, DetectorSpec(family=f"mmseg-upernet-{backbone}", activation=activation, channel=channel), ""
    return build


DETECTOR_FAMILIES: dict[str, Callable] = {
    "upernet-convnext-tiny": _upernet_family("convnext-tiny"),
    "upernet-swin-tiny": _upernet_family("swin-tiny"),
    "mmseg-upernet-convnext-tiny": _mmseg_family("convnext-tiny"),
    "mmseg-upernet-swin-tiny": _mmseg_family("swin-tiny"),
    "diffdoctor": _diffdoctor,
    "torchscript": _torchscript,
}
"""Family name -> builder(path) -> (nn.Module, DetectorSpec, note)."""

def _load_state(model, state: dict, source: str) -> None:
    """load_state_dict(strict) with missing/unexpected/mismatched keys reported by name."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise ValueError(f"'{Path(source).name}' does not fit this detector architecture: {'; '.join(parts)}.")
    model.load_state_dict(state, strict=True)


def _check_finite(module, source: str) -> None:
    import torch

    for name, tensor in list(module.state_dict().items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"Detector '{source}' has NaN or infinite weights (first in {name}); the file is damaged.")


def _spec_dict(spec: DetectorSpec) -> dict:
    from dataclasses import asdict

    return asdict(spec)


def _apply_options(spec: DetectorSpec, options: str) -> DetectorSpec:
    """Apply "size=512,channel=1,activation=softmax,norm=imagenet|none,trained=1" overrides."""
    from dataclasses import replace

    if not options.strip():
        return spec
    changes: dict = {}
    for item in options.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ValueError(f"Detector option '{item}' must look like key=value.")
        try:
            if key == "size":
                changes["input_size"] = int(value)
            elif key == "channel":
                changes["channel"] = int(value)
                if changes["channel"] < 0:
                    raise ValueError
            elif key == "activation":
                if value not in ("sigmoid", "softmax"):
                    raise ValueError
                changes["activation"] = value
            elif key == "norm":
                if value == "imagenet":
                    changes.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
                elif value == "none":
                    changes.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
                elif value == "half":
                    changes.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
                else:
                    raise ValueError
            elif key == "trained":
                changes["trained"] = value.lower() in ("1", "true", "yes")
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"Bad detector option '{item}'; known: size=N, channel=N (>= 0), activation=sigmoid|softmax, "
                             "norm=imagenet|half|none, trained=0|1.") from None
    new = replace(spec, **changes)
    if not (32 <= new.input_size <= 4096):
        raise ValueError(f"Detector input size must be between 32 and 4096, got {new.input_size}.")
    return new
