"""The two SAM backends of `SamMasker` and loading official SAM checkpoints.

`SegmentAnythingBackend` runs Meta's `segment-anything` package (official sam_vit_{b,l,h}_*.pth files,
loaded with weights_only=True, or an already-built `Sam` module); `TransformersSamBackend` runs
transformers' `SamModel` + `SamProcessor` from a local folder or hub id. Both implement the backend
members of engines/segmentation/backend.py; images RGB uint8 HWC, masks bool[H, W] at the image's
size. Imports engines/segmentation/backend.py and embedding_cache.py (fingerprints); torch,
segment_anything and transformers are imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.models import ModelNotFoundError, first_line, local_folder
from engines.segmentation.backend import ImageEmbedding, MaskProposal
from engines.segmentation.embedding_cache import file_fingerprint, folder_fingerprint, module_fingerprint

SAM_TYPES = ("vit_b", "vit_l", "vit_h")


def sam_type_from_name(path: str | os.PathLike) -> str | None:
    """'vit_b' for 'sam_vit_b_01ec64.pth' (also 'vit-b'); None when the name does not say."""
    found = re.search(r"vit[-_]?([blh])(?![a-z])", Path(path).name.lower())
    return f"vit_{found.group(1)}" if found else None


def load_sam_checkpoint(path: str | os.PathLike, *, model_type: str | None = None,
                        builder: Callable[[], Any] | None = None):
    """Official SAM checkpoint -> (Sam in eval mode, model id, file fingerprint).

    The architecture comes from `builder` (a no-argument callable returning an untrained `Sam`,
    e.g. for custom sizes) or from `segment_anything.sam_model_registry[model_type]` built WITHOUT a
    checkpoint; `model_type` defaults to the one in the file name. The file is read with
    `torch.load(weights_only=True)` (pickles that need code are refused), its keys and shapes are
    compared with the architecture (built on the meta device first, so a wrong file fails fast),
    then loaded strictly.
    """
    import torch

    from engines.checkpoints import safe_torch_load

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"SAM checkpoint '{path}' does not exist; download sam_vit_b_01ec64.pth (or vit_l/vit_h) "
                                 "from the segment-anything releases and pass its path.")
    if builder is None:
        from segment_anything import sam_model_registry

        model_type = model_type or sam_type_from_name(path)
        if model_type not in SAM_TYPES:
            raise ValueError(f"Cannot tell the SAM model type of '{path.name}'; name it like sam_vit_b_01ec64.pth "
                             f"or use sam-vit_b:PATH (types: {', '.join(SAM_TYPES)}).")
        builder, model_id = sam_model_registry[model_type], model_type
    else:
        model_id = f"custom:{model_type or getattr(builder, '__name__', 'builder')}"
    raw = safe_torch_load(path)
    state = raw
    for wrapper in ("model", "state_dict"):
        if not any(k.startswith("image_encoder.") for k in state) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    with torch.device("meta"):
        skeleton = builder()
    check_state_fits(skeleton.state_dict(), state, path.name, model_id)
    sam = builder()
    sam.load_state_dict(state, strict=True)
    return sam.eval(), model_id, file_fingerprint(path)


def check_state_fits(own: dict, state: dict, name: str, model_id: str) -> None:
    """Raise one-sentence ValueError naming missing / unexpected / wrong-shape keys."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise ValueError(f"'{name}' is not a SAM {model_id} checkpoint: {'; '.join(parts)}.")


# ----------------------------------------------------------------------------------------------
# Backend a: Meta's segment-anything

class SegmentAnythingBackend:
    """`segment_anything.SamPredictor` over a `Sam` module; the embedding is the predictor's `features`."""

    approximate = False
    note = ""

    def __init__(self, sam, *, model_id: str = "custom", fingerprint: str | None = None, device: str = "cpu"):
        from segment_anything import SamPredictor

        self.model = sam.to(device).eval()
        self.device = device
        encoder, prompt = sam.image_encoder, sam.prompt_encoder
        mean = [round(float(v), 4) for v in sam.pixel_mean.flatten()]
        std = [round(float(v), 4) for v in sam.pixel_std.flatten()]
        self.model_id = f"segment-anything:{model_id}:img{encoder.img_size}:mean{mean}:std{std}"
        self.fingerprint = fingerprint or module_fingerprint(sam)
        emb_h, emb_w = prompt.image_embedding_size
        self.embedding_shape = (1, prompt.embed_dim, emb_h, emb_w)
        self.logits_shape = (1, 4 * emb_h, 4 * emb_w)
        self._predictor = SamPredictor(self.model)
        self._lock = threading.Lock()  # the predictor's image state is restored per call
        self._on_device: tuple[ImageEmbedding, Any] | None = None

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        import torch
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.model)  # a throwaway predictor: the shared one may be answering clicks
        with torch.inference_mode():
            predictor.set_image(rgb)
        return ImageEmbedding(arrays={"features": predictor.features.float().cpu().numpy()},
                              original_size=tuple(int(v) for v in predictor.original_size),
                              input_size=tuple(int(v) for v in predictor.input_size))

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        return _check_embedding(arrays, "features", self.embedding_shape, input_size, self.model.image_encoder.img_size)

    def decode(self, embedding: ImageEmbedding, points, labels, box, mask_input, multimask) -> list[MaskProposal]:
        import torch

        with self._lock, torch.inference_mode():
            predictor = self._predictor
            if self._on_device is None or self._on_device[0] is not embedding:
                dtype = next(self.model.parameters()).dtype
                features = torch.from_numpy(embedding.arrays["features"]).to(self.device, dtype)
                self._on_device = (embedding, features)
            predictor.features = self._on_device[1]
            predictor.original_size = embedding.original_size
            predictor.input_size = embedding.input_size
            predictor.is_image_set = True
            masks, scores, low_res = predictor.predict(
                point_coords=points, point_labels=labels, box=box,
                mask_input=None if mask_input is None else mask_input.reshape(1, *self.logits_shape[1:]),
                multimask_output=multimask)
        return _proposals(masks, scores, low_res)


# ----------------------------------------------------------------------------------------------
# Backend b: transformers SamModel

class TransformersSamBackend:
    """transformers `SamModel` + `SamProcessor`: embeddings from `model.get_image_embeddings`."""

    approximate = False

    def __init__(self, model, processor, *, model_id: str, fingerprint: str | None = None, device: str = "cpu",
                 note: str = ""):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.note = note
        vision, prompt = model.config.vision_config, model.config.prompt_encoder_config
        self.image_size = int(prompt.image_size)
        longest = _processor_longest_edge(processor)
        if longest != self.image_size:
            raise ValueError(f"SAM processor resizes to {longest} px but the model expects {self.image_size} px; "
                             "save the processor that belongs to this model.")
        emb = int(prompt.image_embedding_size)
        self.embedding_shape = (1, int(vision.output_channels), emb, emb)
        self.logits_shape = (1, 4 * emb, 4 * emb)
        self.model_id = f"transformers-sam:{model_id}"
        processor_config = json.dumps(_processor_dict(processor), sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(
            f"{fingerprint or module_fingerprint(model)}\n{processor_config}".encode()).hexdigest()
        self._on_device: tuple[ImageEmbedding, Any] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str, *, device: str = "cpu") -> "TransformersSamBackend":
        from transformers import SamImageProcessor, SamModel, SamProcessor

        folder = local_folder(source)
        where = str(folder) if folder is not None else source
        try:
            model = SamModel.from_pretrained(where, local_files_only=folder is not None)
        except (OSError, ValueError) as exc:
            if folder is not None:
                raise ModelNotFoundError(f"SAM folder '{source}' could not be loaded as a transformers SamModel: "
                                         f"{first_line(exc)}") from None
            raise ModelNotFoundError(
                f"SAM model '{source}' was not found: it is not a local folder and is not in the Hugging Face cache "
                "(and the hub is unreachable); download it once or pass a folder written by save_pretrained.") from None
        note = ""
        try:
            processor = SamProcessor.from_pretrained(where, local_files_only=folder is not None)
        except (OSError, ValueError):
            size = int(model.config.prompt_encoder_config.image_size)
            processor = SamProcessor(SamImageProcessor(size={"longest_edge": size},
                                                       pad_size={"height": size, "width": size}))
            note = f"No SAM processor config next to the model; using SAM's default preprocessing at {size} px."
        fingerprint = folder_fingerprint(folder) if folder is not None else _hub_fingerprint(source)
        return cls(model, processor, model_id=source, fingerprint=fingerprint, device=device, note=note)

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=rgb, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
            features = self.model.get_image_embeddings(pixels)
        original = tuple(int(v) for v in inputs["original_sizes"][0])
        resized = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
        return ImageEmbedding(arrays={"image_embeddings": features.float().cpu().numpy()},
                              original_size=original, input_size=resized)

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        return _check_embedding(arrays, "image_embeddings", self.embedding_shape, input_size, self.image_size)

    def decode(self, embedding: ImageEmbedding, points, labels, box, mask_input, multimask) -> list[MaskProposal]:
        import torch
        import torch.nn.functional as F

        (orig_h, orig_w), (in_h, in_w) = embedding.original_size, embedding.input_size
        scale = np.array([in_w / orig_w, in_h / orig_h])
        dtype = next(self.model.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if points is not None:
            kwargs["input_points"] = torch.as_tensor(points * scale, dtype=dtype, device=self.device)[None, None]
            kwargs["input_labels"] = torch.as_tensor(labels, dtype=torch.long, device=self.device)[None, None]
        if box is not None:
            kwargs["input_boxes"] = torch.as_tensor(box * np.tile(scale, 2), dtype=dtype, device=self.device)[None, None]
        if mask_input is not None:
            kwargs["input_masks"] = torch.as_tensor(mask_input.reshape(1, *self.logits_shape), dtype=dtype,
                                                    device=self.device)
        with self._lock, torch.inference_mode():
            if self._on_device is None or self._on_device[0] is not embedding:
                features = torch.from_numpy(embedding.arrays["image_embeddings"]).to(self.device, dtype)
                self._on_device = (embedding, features)
            out = self.model(image_embeddings=self._on_device[1], multimask_output=multimask, **kwargs)
            low_res = out.pred_masks[0, 0].float()  # [C, 4E, 4E]
            scores = out.iou_scores[0, 0].float()
            full = F.interpolate(low_res[None], (self.image_size, self.image_size), mode="bilinear", align_corners=False)
            full = F.interpolate(full[..., :in_h, :in_w], (orig_h, orig_w), mode="bilinear", align_corners=False)
            masks = (full[0] > 0.0).cpu().numpy()
        return _proposals(masks, scores.cpu().numpy(), low_res.cpu().numpy())


def _processor_longest_edge(processor) -> int:
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    return int(value) if value else -1


def _processor_dict(processor) -> dict:
    image_processor = getattr(processor, "image_processor", processor)
    try:
        return image_processor.to_dict()
    except (AttributeError, TypeError):
        return {"repr": repr(image_processor)}


def _hub_fingerprint(repo_id: str) -> str | None:
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None  # falls back to hashing the loaded state dict
    return folder_fingerprint(Path(config).parent) if config else None


def _check_embedding(arrays: dict, name: str, shape: tuple, input_size: tuple[int, int], side: int) -> str | None:
    if set(arrays) != {name}:
        return f"arrays {sorted(arrays)} are not ['{name}']"
    value = arrays[name]
    if value.dtype != np.float32 or tuple(value.shape) != tuple(shape):
        return f"{name} is {value.dtype}{tuple(value.shape)}, expected float32{tuple(shape)}"
    if not (0 < input_size[0] <= side and 0 < input_size[1] <= side and max(input_size) == side):
        return f"input size {input_size} does not fit a {side}-px encoder"
    if not np.isfinite(value).all():
        return f"{name} holds NaN or infinite values"
    return None


def _proposals(masks: np.ndarray, scores: np.ndarray, low_res: np.ndarray) -> list[MaskProposal]:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [MaskProposal(mask=np.asarray(masks[i], dtype=bool), score=float(scores[i]),
                         logits=np.ascontiguousarray(low_res[i:i + 1], dtype=np.float32)) for i in order]
