"""What models this machine can use, found on disk: for the Models panel (no loading, just looking).

Looked at: `<data-dir>/models` (anything a user copied there), `<data-dir>/jobs/*/out` (detectors and
LoRAs trained here) and the Hugging Face cache (diffusers pipelines and SAM models downloaded once).
Each find is an `Available` whose `spec` is exactly what the loaders take (engines.registry).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 4
MAX_ENTRIES = 5000  # a scan never walks a huge tree for long


@dataclass(frozen=True)
class Available:
    kind: str  # "text2image", "segmenter", "detector" or "lora"
    spec: str  # what the loader takes: "demo", a folder, "sam:/path.pth", a hub id, ...
    where: str  # "built in", "data dir", "job 3", "Hugging Face cache"
    note: str = ""


def scan(data_dir: str | os.PathLike, *, hf_cache: bool = True) -> list[Available]:
    """Every usable model found; built-in choices first. Never raises for unreadable folders."""
    data_dir = Path(data_dir)
    found = [Available("text2image", "demo", "built in", _demo_t2i_note()),
             Available("segmenter", "superpixel", "built in", "approximate, no weights"),
             Available("detector", "demo", "built in", _demo_detector_note())]
    models = data_dir / "models"
    demo_folder, demo_detector = models / "demo-sd", models / "demo-detector"  # both are "demo" above
    for path in _walk(models):
        if path.is_dir() and (path / "model_index.json").is_file() and path != demo_folder:
            found.append(Available("text2image", str(path), "data dir", _pipeline_class(path)))
        elif path.is_file() and path.suffix == ".pth" and "sam" in path.name.lower():
            found.append(Available("segmenter", f"sam:{path}", "data dir", "segment-anything checkpoint"))
        elif path.is_dir() and _config_type(path) == "sam":
            found.append(Available("segmenter", f"hf-sam:{path}", "data dir", "transformers SamModel"))
        elif path.is_dir() and (path / "detector.json").is_file() and path != demo_detector:
            found.append(Available("detector", str(path), "data dir", "our detector format"))
        elif path.is_file() and path.name == "ad_pytorch_model.bin":
            found.append(Available("detector", f"diffdoctor:{path}", "data dir", "DiffDoctor SegFormer"))
        elif path.is_file() and path.suffix == ".pt" and "end2end" in path.name:
            found.append(Available("detector", f"torchscript:{path}", "data dir", "TorchScript model"))
        elif path.is_dir() and _has_lora(path):
            found.append(Available("lora", str(path), "data dir", "diffusers LoRA"))
    jobs = data_dir / "jobs"
    for job in sorted((p for p in _children(jobs) if p.is_dir() and p.name.isdecimal()), key=lambda p: -int(p.name)):
        for path in _walk(job / "out", depth=3):
            if path.is_dir() and (path / "detector.json").is_file():
                found.append(Available("detector", str(path), f"job {job.name}", f"trained here ({path.name})"))
            elif path.is_dir() and _has_lora(path):
                found.append(Available("lora", str(path), f"job {job.name}", "tuned here"))
    if hf_cache:
        found += _hf_cache()
    return found


def _demo_t2i_note() -> str:
    from engines.models import demo_trained_parts

    if {"unet", "text_encoder"} <= set(demo_trained_parts()):
        return "tiny demo model trained on the 15 bundled photos (128 px): not a general generator"
    return "tiny random pipeline: not meaningful images"


def _demo_detector_note() -> str:
    from engines.detection.detectors import DEMO_DETECTOR_ASSETS, DETECTOR_WEIGHTS

    if (DEMO_DETECTOR_ASSETS / DETECTOR_WEIGHTS).is_file():
        return "demo detector: trained on synthetic corruptions of the sample photos, not a real-world artifact detector"
    return "tiny untrained UperNet: not meaningful heatmaps"


def _hf_cache() -> list[Available]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache, unreadable cache: nothing to list
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        if "model_index.json" in files:
            found.append(Available("text2image", repo.repo_id, "Hugging Face cache", "diffusers pipeline"))
        elif "sam" in repo.repo_id.lower() and "config.json" in files:
            found.append(Available("segmenter", f"hf-sam:{repo.repo_id}", "Hugging Face cache", "transformers SamModel"))
    return found


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _walk(root: Path, depth: int = MAX_DEPTH):
    """Paths under `root` breadth-first up to `depth` levels, not into model folders or hidden ones."""
    level, seen = [root], 0
    for _ in range(depth):
        nxt = []
        for folder in level:
            for path in _children(folder):
                if path.name.startswith("."):
                    continue
                seen += 1
                if seen > MAX_ENTRIES:
                    return
                yield path
                if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "detector.json").is_file():
                    nxt.append(path)
        level = nxt


def _pipeline_class(folder: Path) -> str:
    try:
        return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", "diffusers pipeline"))
    except (OSError, ValueError, AttributeError):
        return "diffusers pipeline"


def _config_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _has_lora(folder: Path) -> bool:
    return (folder / "pytorch_lora_weights.safetensors").is_file()
