"""Loading models from a local path or hub id, and the offline demo set.

`LoadedModel` says what a loaded model is and where it came from; `load_text2image` takes a spec
(``"demo"``, a local folder or a hub id). The one registry of every model kind (text-to-image,
detector, segmenter, classifier) is `engines.registry.LOADERS`, which imports this module (never the reverse). The demo set is a tiny
Stable-Diffusion-shaped pipeline built from configs with a fixed seed, saved once with
`save_pretrained` and then loaded through the very same `from_pretrained` path as real models.
Nothing here reads the environment or touches the network at import time.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO = "demo"
DEMO_SEED = 0
DEMO_MARKER = "artifact_studio_demo.json"
DEMO_SIZE = 128  # the demo text-to-image model was trained on 128x128 images (UNet sample_size 16)
DEMO_LATENT_SCALE = 2.0  # 1 / std of the demo VAE's latent means on the training photos (0.50)
DEMO_PARTS = ("vae", "unet", "text_encoder")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEMO_WEIGHTS = {  # trained demo weights shipped in assets/ (each made by the script beside it)
    "vae": ASSETS_DIR / "demo_vae" / "diffusion_pytorch_model.safetensors",
    "unet": ASSETS_DIR / "demo_t2i" / "unet.safetensors",
    "text_encoder": ASSETS_DIR / "demo_t2i" / "text_encoder.safetensors",
}
DEMO_NOTE = ("Demo model: a tiny text-to-image model (~1M parameters, 128x128) trained offline on 15 bundled "
             "public-domain/CC0 photos (assets/demo_photos.json). Prompts naming a photo ('a cat', 'an astronaut', "
             "'a cup of coffee') give blurry versions of it; anything else gives blends. Not a general image "
             "generator: load a real pipeline with --model PATH_OR_HUB_ID.")
DEMO_UNTRAINED_NOTE = ("Demo model: tiny random weights built offline from a config; its images are noise-like "
                       "patterns, not meaningful pictures. Load a real pipeline with --model PATH_OR_HUB_ID.")


class ModelNotFoundError(ValueError):
    """A model spec that is neither a usable local folder nor a reachable/cached hub id."""


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from. `model` is e.g. a diffusers pipeline."""

    model: Any
    kind: str
    model_id: str  # the spec as given ("demo", a path, or a hub id)
    path: str | None  # local folder it was loaded from, when known
    is_demo: bool
    device: str
    note: str = ""
    extra: Any = None  # kind-specific description, e.g. a DetectorSpec


def pick_device() -> str:
    """Return "cuda" if a CUDA GPU is usable, else "mps" on Apple silicon, else "cpu".

    On a machine with no accelerator device at all (no /dev/nvidia*, /dev/kfd or /dev/dxg, not macOS) the
    answer is "cpu" without importing torch, which keeps start-up and light commands fast."""
    if not accelerator_possible():
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def accelerator_possible() -> bool:
    """False only where torch cannot see a GPU: Linux without NVIDIA (/dev/nvidia*), ROCm (/dev/kfd) or WSL
    (/dev/dxg) device nodes. macOS (MPS) and other systems answer True (torch decides)."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return any(dev.glob("nvidia*")) or (dev / "kfd").exists() or (dev / "dxg").exists()


def check_device(device: str) -> str:
    """`device` ("cpu", "cuda", "cuda:N", "mps") if this machine has it; else ValueError in one sentence."""
    import torch

    text = str(device or "").strip()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ValueError(f"Unknown device '{device}'; use cpu, cuda, cuda:N or mps.")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device '{text}' was asked for but torch sees no CUDA GPU on this machine; use cpu "
                             "(or leave the device out to use the best one present).")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"Device '{text}' does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("Device 'mps' was asked for but Apple's MPS is not available here; use cpu.")
    return text


# ----------------------------------------------------------------------------------------------
# The demo set

def demo_dir(data_dir: str | os.PathLike) -> Path:
    """Folder under the data directory that holds the saved demo pipeline."""
    return Path(data_dir) / "models" / "demo-sd"


def ensure_demo_pipeline(data_dir: str | os.PathLike, seed: int = DEMO_SEED) -> Path:
    """Build and save the tiny demo pipeline under `data_dir` unless it is already there.

    Same seed (and the same shipped demo weights) in a fresh folder gives bit-identical weight
    files. The marker records which parts carry trained weights and a digest of those weights; a
    folder saved from other weights (an older release) is rebuilt. The folder is written to a
    temporary sibling and renamed, so a killed build never leaves a half-written model.
    """
    target = demo_dir(data_dir)
    marker = {"demo": True, "seed": seed, "trained": demo_trained_parts(), "weights": _demo_weights_digest()}
    if (target / DEMO_MARKER).is_file() and _read_marker(target).get("weights") == marker["weights"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    remove_tree(tmp)
    pipe = build_demo_pipeline(seed)
    pipe.save_pretrained(tmp, safe_serialization=True)
    marker["note"] = demo_note(marker["trained"])
    (tmp / DEMO_MARKER).write_text(json.dumps(marker, indent=2))
    if target.exists():  # a stale folder without its marker: an earlier build was interrupted
        remove_tree(target)
    os.replace(tmp, target)
    return target


def demo_trained_parts() -> list[str]:
    """The demo pipeline parts whose trained weights are shipped (see DEMO_WEIGHTS)."""
    return [part for part in DEMO_PARTS if DEMO_WEIGHTS[part].is_file()]


def demo_note(trained: list[str] | tuple[str, ...] | None = None) -> str:
    """What the demo pipeline is: DEMO_NOTE when its UNet and text encoder are the trained ones."""
    trained = demo_trained_parts() if trained is None else trained
    return DEMO_NOTE if {"unet", "text_encoder"} <= set(trained) else DEMO_UNTRAINED_NOTE


def build_demo_pipeline(seed: int = DEMO_SEED, trained: tuple[str, ...] | None = DEMO_PARTS):
    """Tiny StableDiffusionPipeline from configs: 8x VAE, (32, 64) UNet, 2-layer CLIP text encoder.

    Each part named in `trained` takes its weights shipped in assets/ when the file is there
    (DEMO_WEIGHTS; each made by the training script beside it): the VAE trained on the sample photos
    (~24 dB PSNR), and the UNet and text encoder trained on the captioned photos of
    assets/demo_photos.json at DEMO_SIZE. `trained=()` gives the all-random config-built pipeline.
    The latent scaling factor is DEMO_LATENT_SCALE; the UNet's sample_size makes DEMO_SIZE the default
    image size.

    Every component is created right after `torch.manual_seed(seed + k)`, so untrained weights depend
    on the seed alone. ~1.2M parameters; a 128x128 image with 20 steps takes a fraction of a second on CPU.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    trained = tuple(trained or ())
    unknown = set(trained) - set(DEMO_PARTS)
    if unknown:
        raise ValueError(f"Unknown demo parts {sorted(unknown)}; use some of {', '.join(DEMO_PARTS)}.")
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=DEMO_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, scaling_factor=DEMO_LATENT_SCALE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    for part, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        if part in trained and DEMO_WEIGHTS[part].is_file():
            from safetensors.torch import load_file

            module.load_state_dict(load_file(str(DEMO_WEIGHTS[part])), strict=True)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _demo_weights_digest() -> str:
    """sha256 over the shipped demo weight files (name + bytes); "" when none is shipped."""
    import hashlib

    digest = hashlib.sha256()
    for part in demo_trained_parts():
        digest.update(part.encode() + b"|" + DEMO_WEIGHTS[part].read_bytes())
    return digest.hexdigest() if demo_trained_parts() else ""


def _read_marker(folder: Path) -> dict:
    try:
        value = json.loads((folder / DEMO_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def build_byte_tokenizer():
    """A CLIP BPE tokenizer over single bytes (514 tokens, no merges), created offline.

    It tokenises any text deterministically (one token per byte, word ends marked ``</w>``); it
    stands in for CLIP's 49,408-token vocabulary, which no offline package ships by default.
    """
    import tempfile

    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")
    return tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


# ----------------------------------------------------------------------------------------------
# Loaders

def load_text2image(spec: str | None, *, data_dir: str | os.PathLike, device: str = "cpu",
                    dtype: str = "float32", local_files_only: bool = False) -> LoadedModel:
    """Load a diffusers text-to-image pipeline from "demo", a local folder, or a hub id.

    A local folder must contain `model_index.json`. A hub id works when it is in the Hugging Face
    cache or the network is reachable. Anything else raises ModelNotFoundError with one sentence
    saying how to supply the model.
    """
    import torch
    from diffusers import AutoPipelineForText2Image

    spec = (spec or DEMO).strip()
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"Unknown dtype '{dtype}'; use float32, float16 or bfloat16.")
    is_demo = spec == DEMO
    if is_demo:
        folder: Path | None = ensure_demo_pipeline(data_dir)
        torch_dtype = torch.float32
    else:
        folder = local_folder(spec)
    source = str(folder) if folder is not None else spec
    if folder is not None and not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"Model folder '{spec}' has no model_index.json; give a diffusers pipeline folder "
            "(as written by save_pretrained) or a hub id.")
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_files_only or folder is not None)
    except (OSError, ValueError, EnvironmentError) as exc:
        if folder is not None:
            raise ModelNotFoundError(f"Model folder '{spec}' could not be loaded as a diffusers pipeline: {first_line(exc)}") from None
        raise ModelNotFoundError(
            f"Model '{spec}' was not found: it is not a local folder and is not in the Hugging Face cache "
            "(and the hub is unreachable); download it once or pass a local pipeline folder with --model PATH.") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(model=pipe, kind="text2image", model_id=spec, path=str(folder) if folder else None,
                       is_demo=is_demo or _is_demo_folder(folder), device=device,
                       note=_read_marker(folder).get("note", DEMO_NOTE) if is_demo or _is_demo_folder(folder) else "")


def local_folder(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"Model '{spec}' is a file; give the pipeline folder (with model_index.json), not a single checkpoint file.")
        return path.resolve()
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"Model folder '{spec}' does not exist.")
    return None


def _is_demo_folder(folder: Path | None) -> bool:
    return folder is not None and (folder / DEMO_MARKER).is_file()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
