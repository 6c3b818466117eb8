"""Text-to-image generation with seeds, progress and cancel, over any diffusers pipeline.

`TextToImage(loaded).generate(params, progress, should_stop)` returns RGB uint8 HWC images. Image
`i` of a request uses its own generator seeded with `seed + i`, so every image can be regenerated
alone. Same pipeline + same parameters give identical pixels on the same device.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from engines.models import LoadedModel
from engines.progress import Cancelled, ProgressFn, StopFn  # noqa: F401  (Cancelled is re-exported)
from engines.generation.trajectory import TrajectoryRecorder

_TrajectoryRecorder = TrajectoryRecorder  # the recorder's old name here

MAX_SEED = 2**32 - 1
MAX_SIDE = 2048
MAX_PROMPT_CHARS = 10_000
"""Longest accepted prompt or negative prompt (CLIP reads only the first 77 tokens anyway)."""


@dataclass(frozen=True)
class GenerateParams:
    """One generation request. width/height None mean the pipeline's default size."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    record_trajectory: bool = False  # also compute the experimental trajectory map (engines.detection.detect)

    def validate(self) -> None:
        """Raise ValueError with one sentence if any field is out of range."""
        if not isinstance(self.prompt, str):
            raise ValueError("The prompt must be text.")
        for what, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if isinstance(text, str) and len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"The {what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
        if not (0 <= int(self.seed) <= MAX_SEED):
            raise ValueError(f"Seed {self.seed} is out of range; use 0 to {MAX_SEED}.")
        if not (1 <= int(self.num_inference_steps) <= 500):
            raise ValueError(f"Steps must be between 1 and 500, got {self.num_inference_steps}.")
        if not (0.0 <= float(self.guidance_scale) <= 50.0):
            raise ValueError(f"Guidance scale must be between 0 and 50, got {self.guidance_scale}.")
        if not (1 <= int(self.num_images) <= 16):
            raise ValueError(f"Image count must be between 1 and 16, got {self.num_images}.")
        for name, side in (("Width", self.width), ("Height", self.height)):
            if side is not None and (side < 64 or side > MAX_SIDE or side % 8):
                raise ValueError(f"{name} must be a multiple of 8 between 64 and {MAX_SIDE}, got {side}.")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GeneratedImage:
    """One output image: `rgb` is uint8 HWC; `seed` is the seed of its own generator."""

    rgb: np.ndarray
    seed: int
    index: int
    trajectory: np.ndarray | None = None  # float32 [H, W] in [0, 1] when record_trajectory was set


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    params: GenerateParams
    model_id: str
    is_demo: bool
    width: int
    height: int
    duration_s: float


class TextToImage:
    """Wraps a loaded diffusers text-to-image pipeline (see engines.models.load_text2image)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.pipe = loaded.model

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the pipeline produces when none is given."""
        unet = self.pipe.unet
        side = int(unet.config.sample_size) * int(getattr(self.pipe, "vae_scale_factor", 8))
        return side, side

    def generate(self, params: GenerateParams, progress: ProgressFn | None = None,
                 should_stop: StopFn | None = None) -> GenerationResult:
        """Run the pipeline; `progress(step, total)` after each step; `should_stop()` cancels.

        Raises ValueError for bad parameters and Cancelled when stopped.
        """
        import torch

        params.validate()
        width, height = params.width or self.default_size[0], params.height or self.default_size[1]
        total = int(params.num_inference_steps)
        seeds = [int(params.seed) + i for i in range(params.num_images)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        recorder = TrajectoryRecorder(self.pipe.scheduler) if params.record_trajectory else None

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if recorder is not None:
                recorder.add(step, callback_kwargs["latents"])
            if progress is not None:
                progress(step + 1, total)
            if should_stop is not None and should_stop():
                raise Cancelled("Generation was stopped.")
            return callback_kwargs

        if should_stop is not None and should_stop():
            raise Cancelled("Generation was stopped.")
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(
                prompt=params.prompt, negative_prompt=params.negative_prompt or None,
                num_inference_steps=total, guidance_scale=float(params.guidance_scale),
                width=width, height=height, num_images_per_prompt=params.num_images,
                generator=generators, output_type="np", callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
        rgbs = to_uint8(out.images)
        maps = recorder.heatmaps(height, width) if recorder is not None else [None] * len(rgbs)
        images = tuple(GeneratedImage(rgb=rgb, seed=s, index=i, trajectory=m)
                       for i, (rgb, s, m) in enumerate(zip(rgbs, seeds, maps)))
        return GenerationResult(images=images, params=params, model_id=self.loaded.model_id,
                                is_demo=self.loaded.is_demo, width=width, height=height,
                                duration_s=time.perf_counter() - start)


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """float [0,1] NHWC (diffusers output_type="np") -> list of RGB uint8 HWC, rounded as diffusers does."""
    arr = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    return [np.ascontiguousarray((img * 255).round().astype(np.uint8)) for img in arr]
