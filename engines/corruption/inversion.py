"""Inverting an image part of the way for region corruption: the DDIM schedule, DDIM / ReNoise
inversion, DDIM resampling and the inversion cache.

`LatentInverter` owns the pipeline, its model calls and the cache; `RegionCorruptor`
(engines/corruption/corrupt.py) is built on it and adds the corruption. Requests are `CorruptParams`
(read by attribute; this module does not import corrupt.py). Images RGB uint8 HWC (sides multiples
of 8), latents float32 [B, C, h, w] on the model's device. Imports engines/corruption/renoise.py.

The schedule. The DDIM schedule of the pipeline's scheduler config, `DDIMScheduler.set_timesteps(N)`:
sampling timesteps T[0] > ... > T[N-1]; the state after the last step is the clean latent, whose
alpha is the scheduler's `final_alpha_cumprod`. The state before sampling step i has timestep T[i];
a DDIM step (eta 0) from T[i] goes to T[i+1] (to the clean state after T[N-1]); this is exactly
`DDIMScheduler.step` for "leading" spacing (SD 1.x/2.x; other spacings get this consistent list
schedule), without clipping x0 (SD configs turn clip_sample off). Inversion runs the same steps
backwards.

Inversion of z0 = vae.encode(image).latent_dist.mean * scaling_factor (the mean, not a sample,
so the same pixels always give the same z0; the ReNoise reference samples), with the prompt's
embedding (the image's caption if known, else ""). By default the inversion uses the conditional
prediction only (`inversion_guidance_scale` 1.0, as the reference's guidance_scale 0.0; above 1,
classifier-free guidance with `negative_prompt`). The k lowest-noise steps are inverted, giving
z_t at t = T[N-k] ("corrupt at step N-k": N=50, k=10 -> step 40 of the sampling loop); k is
`inversion_steps` for the proposed method and `baseline_steps` (20) for the resampled baselines.
Every inverted step feeds the UNet the step's TARGET timestep (the noisier one), as diffusers'
DDIMInverseScheduler and ReNoise do; the clean z0 has no timestep of its own.
- "ddim": plain DDIM inversion, z' = inverse_step(z, eps(z, t')).
- "renoise" (Garibi et al. 2024): the official implementation's step for SD + DDIM, described and
  implemented in engines/corruption/renoise.py: renoise iterations re-estimate eps at the next latent; for
  timesteps below 250 the average covers the first DDIM estimate and the renoise ones
  (`average_first_step_range` (0, 5)), above it `average_step_range` (8, 10); noise
  regularisation (patch KL to eps(z0), weight lambda_kl 0.065, and autocorrelation over 5 random
  rolls, weight lambda_ac 20, 4 rounds) is applied in the reference's order. The rolls use a
  fixed seed (0), so an inversion is a pure function of its cache key.
`preset` names the ReNoise settings and is recorded with every result: "renoise-sd" (default:
the reference's SD configuration, src/config.py + examples/inversion_example_sd.py, 1 renoise
iteration, regularisation on), "renoise-fast" (the same with regularisation off: interactive
previews) or "custom" (any values; the named presets refuse settings that differ from them).

Inversion cache. An inversion is keyed by sha256 over (image shape + pixels, model key, prompt,
N, the inverted steps, inversion method, every ReNoise setting, inversion guidance and its
negative prompt, dtype); the model key hashes the model id, the scheduler config and a strided
sample of every UNet, VAE and text-encoder weight tensor, taken when the corruptor is made (make
a new corruptor after changing weights in place). Entries live in an LRU in memory (25, as
ReNoise's demo) and, with `cache_dir`, on disk as `<cache_dir>/<key>.safetensors` (z0, z_t;
written to a temporary sibling and renamed; an unreadable or mismatching file is recomputed;
never size-limited). The uncorrupted resample of an inversion (z_t resampled with the request's
guidance and negative prompt, decoded) is cached beside it, in memory and as
`<key>.resample-<rkey>.safetensors`. Another mask, seed or baseline sharing a cached inversion
costs only the resampling: its steps x (2 if guidance_scale > 1) UNet evaluations per seed.

UNet evaluations (`unet_calls`) count latents passed through the UNet: one per latent per forward,
so a classifier-free-guided step counts 2 and a batch of 3 seeds counts 3 per step.
Everything runs under `torch.inference_mode()` except the noise regularisation. Nothing happens at
import time; torch is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.generation.generate import Cancelled, to_uint8
from engines.images import image_digest
from engines.models import LoadedModel
from engines.corruption.renoise import inverse_step, renoise_step

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]

CACHE_FORMAT = "artifact-studio-inversion-v2"
DEFAULT_MEMORY_ENTRIES = 25
REG_SEED = 0  # fixed seed of the regularisation's random rolls


@dataclass(frozen=True, eq=False)
class Inversion:
    """An inverted image: z0 and z_t (float32 [1, C, h, w] on the model's device) at `timestep`.

    `timesteps` are the sampling timesteps still to run from z_t (T[N-k:]); `alpha_t` is abar at
    `timestep`; `unet_calls` is what computing it cost; `source` is "computed", "memory" or "disk".
    """

    key: str
    z0: Any
    zt: Any
    timestep: int
    step_index: int  # N - k
    timesteps: tuple[int, ...]
    alpha_t: float
    image_size: tuple[int, int]  # (H, W) of the pixels
    method: str
    unet_calls: int
    source: str = "computed"


class Steps:
    """progress(step, total) and should_stop() around the loops."""

    def __init__(self, total: int, progress: ProgressFn | None, should_stop: StopFn | None):
        self.total, self.done, self.progress, self.should_stop = total, 0, progress, should_stop

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("Corruption was stopped.")

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()


class LatentInverter:
    """The inversion half of `RegionCorruptor`: the pipeline's schedule and model calls, inversion,
    DDIM resampling and the inversion cache (see the module docstring). `params` is a `CorruptParams`.

    Counters: `unet_calls` (all UNet evaluations), `inversions_computed`, `cache_hits`
    (= `memory_hits` + `disk_hits`, inversions only); `cache_problems` lists unreadable cache files
    and failed writes. Not thread-safe.
    """

    def __init__(self, loaded: LoadedModel, cache_dir: str | os.PathLike | None = None,
                 memory_entries: int = DEFAULT_MEMORY_ENTRIES):
        import torch
        from diffusers import DDIMScheduler

        pipe = loaded.model
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise ValueError(f"Region corruption needs a Stable-Diffusion-style pipeline; {type(pipe).__name__} has no {part}.")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(f"Region corruption supports one-text-encoder pipelines (SD 1.x/2.x); {type(pipe).__name__} is not supported.")
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"Region corruption supports epsilon or v prediction, not '{prediction}'.")
        if int(memory_entries) < 0:
            raise ValueError(f"memory_entries must be 0 or more, got {memory_entries}.")
        self.loaded = loaded
        self.pipe = pipe
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.prediction_type = prediction
        self.factor = int(getattr(pipe, "vae_scale_factor", 8))
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        self.final_alpha = float(self.scheduler.final_alpha_cumprod)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_entries = int(memory_entries)
        self.model_key = _model_key(loaded, pipe)
        self.unet_calls = 0
        self.inversions_computed = 0
        self.memory_hits = 0
        self.disk_hits = 0
        self.cache_problems: list[str] = []
        self._memory: OrderedDict[str, Inversion] = OrderedDict()
        self._resampled: OrderedDict[str, tuple[Any, np.ndarray]] = OrderedDict()  # uncorrupted resamples

    @property
    def cache_hits(self) -> int:
        return self.memory_hits + self.disk_hits

    # -- cache keys
    def cache_key(self, rgb: np.ndarray, params) -> str:
        """sha256 over everything the inversion of `rgb` depends on (see the module docstring)."""
        fields: dict[str, Any] = {
            "format": CACHE_FORMAT, "image": image_digest(rgb), "model": self.model_key,
            "prompt": params.prompt, "steps": int(params.num_inference_steps), "k": params.corruption_steps,
            "method": params.inversion_method, "guidance": float(params.inversion_guidance_scale),
            "dtype": str(self.dtype),
        }
        if params.inversion_guidance_scale > 1:
            fields["negative_prompt"] = params.negative_prompt
        if params.inversion_method == "renoise":
            fields["renoise"] = {name: list(v) if isinstance(v, tuple) else v for name, v in params.renoise_settings().items()}
            fields["reg_seed"] = REG_SEED
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def resample_key(self, params) -> str:
        """What the uncorrupted resample adds to its inversion's key: resampling guidance and prompts."""
        fields = {"guidance": float(params.guidance_scale), "prompt": params.prompt,
                  "negative_prompt": params.negative_prompt if params.guidance_scale > 1 else ""}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    # -- the schedule
    def _schedule(self, n: int) -> list[int]:
        self.scheduler.set_timesteps(n)
        return [int(t) for t in self.scheduler.timesteps]

    def _alpha(self, timestep: int | None) -> float:
        """abar at a timestep; None is the clean state after the last sampling step."""
        return self.final_alpha if timestep is None else float(self.alphas_cumprod[timestep])

    # -- model calls
    def _embeddings(self, prompt: str, negative_prompt: str, guided: bool):
        """Prompt embedding [1, L, D]; with guidance [2, L, D] = (negative, prompt)."""
        import torch

        cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, guided, negative_prompt if guided else None)
        return torch.cat([uncond, cond]) if guided else cond

    def _eps(self, latents, timestep: int, embeddings, guidance: float):
        """Noise prediction for a batch of latents (float32), with classifier-free guidance when > 1."""
        import torch

        guided = guidance > 1
        batch = latents.shape[0]
        model_in = torch.cat([latents, latents]) if guided else latents
        if guided:
            uncond, cond = embeddings.chunk(2)
            emb = torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
        else:
            emb = embeddings.expand(batch, -1, -1)
        t = torch.tensor(timestep, device=self.device)
        out = self.pipe.unet(model_in.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample.float()
        self.unet_calls += model_in.shape[0]
        if self.prediction_type == "v_prediction":
            a = self._alpha(timestep)
            out = math.sqrt(a) * out + math.sqrt(1 - a) * model_in.float()
        if guided:
            uncond_eps, cond_eps = out.chunk(2)
            return uncond_eps + guidance * (cond_eps - uncond_eps)
        return out

    def _encode(self, rgb: np.ndarray):
        import torch

        x = torch.tensor(rgb, device=self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        vae = self.pipe.vae
        return vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * float(vae.config.scaling_factor)

    def decode(self, latents) -> list[np.ndarray]:
        """Latents [B, C, h, w] -> B images, RGB uint8 HWC."""
        vae = self.pipe.vae
        images = vae.decode((latents / float(vae.config.scaling_factor)).to(vae.dtype)).sample.float()
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return to_uint8(images)

    # -- inversion and resampling
    def compute_inversion(self, rgb: np.ndarray, params, key: str, steps: Steps) -> Inversion:
        """Invert `rgb` (no cache lookup) and remember the result under `key`, in memory and on disk."""
        import functools

        import torch

        before = self.unet_calls
        n, k = int(params.num_inference_steps), params.corruption_steps
        timesteps = self._schedule(n)
        guidance = float(params.inversion_guidance_scale)
        with torch.inference_mode():
            z0 = self._encode(rgb)
            emb = self._embeddings(params.prompt, params.negative_prompt, guidance > 1)
            generator = torch.Generator(device="cpu").manual_seed(REG_SEED) if params.regularised else None
            z = z0
            for j in range(k):
                index = n - 1 - j  # sampling step being inverted: from T[index + 1] (or clean) to T[index]
                t = timesteps[index]  # the TARGET timestep: every UNet call of this step sees t
                a_cur = self._alpha(timesteps[index + 1] if index + 1 < n else None)
                a_next = self._alpha(t)
                eps_fn = functools.partial(self._eps, timestep=t, embeddings=emb, guidance=guidance)
                if params.inversion_method == "renoise":
                    z = renoise_step(eps_fn, z, z0, t, a_cur, a_next, params, generator)
                else:
                    z = inverse_step(z, eps_fn(z), a_cur, a_next)
                steps.advance()
        t = timesteps[n - k]
        inversion = Inversion(key=key, z0=z0, zt=z, timestep=t, step_index=n - k, timesteps=tuple(timesteps[n - k:]),
                              alpha_t=self._alpha(t), image_size=(rgb.shape[0], rgb.shape[1]),
                              method=params.inversion_method, unet_calls=self.unet_calls - before)
        self.inversions_computed += 1
        self._remember(inversion)
        self._disk_put(inversion)
        return inversion

    def resample(self, latents, inversion: Inversion, params, steps: Steps):
        """DDIM (eta 0) from `inversion.timestep` to the clean latent; `latents` [B, C, h, w], float32 out."""
        import torch

        guidance = float(params.guidance_scale)
        emb = self._embeddings(params.prompt, params.negative_prompt, guidance > 1)
        z = latents
        timesteps = inversion.timesteps
        for i, t in enumerate(timesteps):
            eps = self._eps(z, t, emb, guidance)
            a_prev = self._alpha(timesteps[i + 1] if i + 1 < len(timesteps) else None)
            z = _sample_step(z, eps, self._alpha(t), a_prev)
            steps.advance()
        return z.to(torch.float32)

    def uncorrupted(self, key: str, inversion: Inversion, params, steps: Steps):
        """Resample z_t with no corruption (alone, so the result never depends on what it was batched
        with), decode it and cache both: (latent [1, C, h, w], image uint8 [H, W, 3])."""
        latent = self.resample(inversion.zt, inversion, params, steps)
        (image,) = self.decode(latent)
        self._resampled_put(key, params, latent, image)
        return latent, image

    def direct_inversion(self, rgb: np.ndarray, params) -> Inversion:
        """z0 and abar_t only (no UNet): what the direct methods need."""
        n, k = int(params.num_inference_steps), params.corruption_steps
        timesteps = self._schedule(n)
        z0 = self._encode(rgb)
        t = timesteps[n - k]
        return Inversion(key="", z0=z0, zt=z0, timestep=t, step_index=n - k, timesteps=tuple(timesteps[n - k:]),
                         alpha_t=self._alpha(t), image_size=(rgb.shape[0], rgb.shape[1]), method="none", unet_calls=0)

    # -- the cache
    def lookup(self, key: str, size: tuple[int, int]) -> Inversion | None:
        """The cached inversion under `key` (memory, then disk) of an image of `size` (H, W), or None."""
        found = self._memory.get(key)
        if found is not None:
            self._memory.move_to_end(key)
            self.memory_hits += 1
            return replace(found, source="memory")
        found = self._disk_get(key, size)
        if found is not None:
            self.disk_hits += 1
            self._remember(found)
        return found

    def _remember(self, inversion: Inversion) -> None:
        _bounded_put(self._memory, inversion.key, inversion, self.memory_entries)

    def _latent_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        return (1, int(self.pipe.vae.config.latent_channels), size[0] // self.factor, size[1] // self.factor)

    def _disk_get(self, key: str, size: tuple[int, int]) -> Inversion | None:
        path = self.cache_path(key)
        loaded = self._read_entry(path, key)
        if loaded is None:
            return None
        meta, tensors = loaded
        try:
            info = json.loads(meta.get("info", "{}"))
        except ValueError:
            info = None
        expected = self._latent_shape(size)
        z0, zt = tensors.get("z0"), tensors.get("zt")
        problem = None
        if z0 is None or zt is None or tuple(z0.shape) != expected or tuple(zt.shape) != expected:
            problem = "latents are missing or have the wrong shape"
        elif not (bool(z0.isfinite().all()) and bool(zt.isfinite().all())):
            problem = "latents are not finite"
        elif not isinstance(info, dict) or not {"timestep", "step_index", "timesteps", "alpha_t", "method", "unet_calls"} <= set(info):
            problem = "description is incomplete"
        if problem:
            self.cache_problems.append(f"{path.name}: {problem}; recomputed.")
            return None
        return Inversion(key=key, z0=z0.to(self.device, z0.dtype), zt=zt.to(self.device, zt.dtype),
                         timestep=int(info["timestep"]), step_index=int(info["step_index"]),
                         timesteps=tuple(int(t) for t in info["timesteps"]), alpha_t=float(info["alpha_t"]),
                         image_size=(int(size[0]), int(size[1])), method=str(info["method"]),
                         unet_calls=int(info["unet_calls"]), source="disk")

    def _disk_put(self, inversion: Inversion) -> None:
        info = {"timestep": inversion.timestep, "step_index": inversion.step_index, "timesteps": list(inversion.timesteps),
                "alpha_t": inversion.alpha_t, "method": inversion.method, "unet_calls": inversion.unet_calls}
        self._write_entry(self.cache_path(inversion.key), inversion.key,
                          {"z0": inversion.z0.detach().float().cpu().contiguous(),
                           "zt": inversion.zt.detach().float().cpu().contiguous()},
                          {"info": json.dumps(info)})

    def _resampled_path(self, key: str, params) -> tuple[str, Path | None]:
        name = f"{key}.resample-{self.resample_key(params)}"
        return name, None if self.cache_dir is None else self.cache_dir / f"{name}.safetensors"

    def resampled_get(self, key: str, params, size: tuple[int, int]):
        """(latent [1, C, h, w], image uint8 [H, W, 3]) of the uncorrupted resample, or None."""
        name, path = self._resampled_path(key, params)
        found = self._resampled.get(name)
        if found is not None:
            self._resampled.move_to_end(name)
            return found
        loaded = self._read_entry(path, name)
        if loaded is None:
            return None
        latent, image = loaded[1].get("latent"), loaded[1].get("image")
        if (latent is None or image is None or tuple(latent.shape) != self._latent_shape(size)
                or tuple(image.shape) != (size[0], size[1], 3) or str(image.dtype) != "torch.uint8"):
            self.cache_problems.append(f"{path.name}: the resample is missing or has the wrong shape; recomputed.")
            return None
        found = (latent.to(self.device, latent.dtype), np.ascontiguousarray(image.numpy()))
        _bounded_put(self._resampled, name, found, self.memory_entries)
        return found

    def _resampled_put(self, key: str, params, latent, image: np.ndarray) -> None:
        import torch

        name, path = self._resampled_path(key, params)
        _bounded_put(self._resampled, name, (latent, image), self.memory_entries)
        self._write_entry(path, name, {"latent": latent.detach().float().cpu().contiguous(),
                                       "image": torch.from_numpy(np.ascontiguousarray(image))}, {})

    def _read_entry(self, path: Path | None, key: str):
        """(metadata, tensors) of a cache file written for `key`, or None (problems are recorded)."""
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            self.cache_problems.append(f"{path.name}: unreadable ({_first_line(exc)}); recomputed.")
            return None
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            self.cache_problems.append(f"{path.name}: metadata does not match this key; recomputed.")
            return None
        return meta, tensors

    def _write_entry(self, path: Path | None, key: str, tensors: dict, meta: dict) -> None:
        """Write to a temporary sibling, then rename; a full or read-only disk costs a recompute later."""
        if path is None:
            return
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        meta = {"format": CACHE_FORMAT, "key": key, "model_id": self.loaded.model_id, **meta}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        except OSError as exc:
            self.cache_problems.append(f"{path.name}: not written ({_first_line(exc)}).")
        finally:
            if tmp.exists():
                tmp.unlink()


def _bounded_put(memory: OrderedDict, key: str, value, limit: int) -> None:
    """Put `value` last in an LRU dict holding at most `limit` entries (0: keep nothing)."""
    if limit == 0:
        return
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


def _sample_step(z, eps, a_t: float, a_prev: float):
    """DDIM step (eta 0) from abar a_t to a_prev: DDIMScheduler.step with epsilon prediction, no clipping."""
    x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def _model_key(loaded: LoadedModel, pipe) -> str:
    """sha256 of the model id, the scheduler config and a strided sample of every weight tensor of the
    UNet, VAE and text encoder (16 values per tensor, so fine-tunes and fused LoRAs change it)."""
    import torch

    digest = hashlib.sha256(f"{loaded.model_id}|{type(pipe).__name__}|".encode())
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for part in ("unet", "vae", "text_encoder"):
            named = list(getattr(pipe, part).named_parameters())
            digest.update(f"{part}|{[(n, tuple(p.shape)) for n, p in named]}|".encode())
            if named:
                samples = [p.detach().reshape(-1)[:: max(1, p.numel() // 16)][:16].to(torch.float32) for _, p in named]
                digest.update(np.ascontiguousarray(torch.cat(samples).cpu().numpy()).tobytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
