"""Detector-guided LoRA tuning of a diffusion UNet (DiffDoctor stage 2).

Siblings it imports: `lora` (the adapter: add, save, switch on/off with `apply_lora`) and `tune_eval` (prompt
splits, the loss, evaluation images and their scores).

`tune_lora(config, loaded, detector, prompts, out_dir)` adds LoRA adapters (peft, through diffusers'
PEFT integration) to the attention projections of the pipeline's UNet and trains only them so that
the frozen artifact detector sees fewer artifacts in what the model generates. Each step:

1. Pick a training prompt with a generator seeded by (seed, step); draw the initial latent from a CPU
   generator seeded by (seed, step) as well, so a run is a pure function of its config and inputs.
2. Run the denoising loop by hand with a copy of the pipeline's scheduler (`num_inference_steps`
   steps): the first N - K steps under `torch.no_grad()`, the last K = `backprop_steps` with
   gradients (classifier-free guidance with an empty negative prompt when `guidance_scale` > 1).
3. Decode with the VAE (frozen, gradients flow through its decoder) to [0, 1] RGB, resize to the
   detector's square input with `F.interpolate` (bilinear; antialiased when shrinking, like the
   PIL resize `ArtifactDetector.predict` uses), normalise with the spec's mean/std, run the frozen
   detector and take its artifact probability map p (sigmoid of channel `channel`, or softmax over
   channels, as the DetectorSpec says).
4. Loss (`loss_mode`), times `loss_scale`, on p (N pixels per image, averaged over the images):
   - "weighted" (default, DiffDoctor's): L = sum_i p_i [p_i > tau] / (sum_i [p_i > tau] + 1e-5) with
     tau = `loss_threshold` (0.1): the mean confidence over the pixels the detector flags at all, 0 when
     it flags none. Gradients reach only the flagged pixels, each weighted 1 / (number flagged), so a
     small artifact pulls as hard as a large one and the clean rest of the image is left alone.
   - "mean": L = mean_i p_i over all pixels (DiffDoctor's `mean` reduction).
   - "soft": L = mean_i p_i w_i with w = stopgrad(p) / (mean(stopgrad(p)) + 1e-6): the map itself,
     normalised to mean 1, weights each pixel's gradient (our own soft variant of "weighted"; it was
     this module's default before the default followed DiffDoctor).
   `tune_eval.artifact_loss(probs, mode, threshold)` computes these for other engines.
   Plus `regulariser_weight` times the ordinary diffusion loss on clean images (optional, against
   reward hacking): a random clean image per step (resized to the training size), VAE latent mean,
   a uniform random training timestep and Gaussian noise, MSE of the UNet's prediction (empty prompt)
   against the noise (or the velocity for v-prediction models).
5. AdamW (lr, weight_decay) on the LoRA parameters only, gradients clipped to `max_grad_norm`,
   constant learning rate. The LoRA parameters are kept in float32 even when the pipeline is half
   precision; with a float16 UNet the loss is scaled (torch.amp.GradScaler) for the backward pass.
   `gradient_checkpointing` turns on the UNet's checkpointing for the run (memory for compute).

How the loss follows DiffDoctor (Wang et al., "DiffDoctor: Diagnosing Image Diffusion Models Before
Treating", arXiv 2501.12382, ICCV 2025). Its stage 2 tunes the diffusion model "through assigning a
per-pixel confidence map for each synthesis" (the abstract): the synthesis is decoded, the frozen artifact
detector gives every pixel an artifact confidence, and the model is optimised to lower those confidences,
the gradient passing back through the detector and the VAE decoder into a LoRA (reward backpropagation as
in AlignProp, which its code builds on). The authors' released training code (github.com/ali-vilab/
DiffDoctor: `train_diffusion_model.py`, function `artifact_maps_to_loss`; `config/settings.py`, config
`ad`) offers max, sum, mean and weighted reductions of the sigmoid map and trains with the weighted one:
the sum of p over the pixels with p > 0.1, divided by their count (+1e-5), times `ad_loss_scale` = 1. Our
default "weighted" is that equation with tau = 0.1; tests/engines/training/test_tune.py recomputes it from a
generated image and fails if the default changes. (Only the paper's abstract and summaries of it could be
read offline when this was written; the equation is the authors' code.) Where we differ from their setup:
- detector input: they resize the shorter side to 512 (aspect kept) with ImageNet mean/std; we resize to
  the detector's square `input_size` with its spec's mean/std, the input `ArtifactDetector.predict` uses,
  so p is the heatmap the Inspect tab shows.
- batch: one image per step; they average the loss over 4 images (1 per device, 4 accumulation steps).
- gradient path: the last K = `backprop_steps` (default 1) denoising steps carry gradients; their FLUX runs
  backpropagate through the whole sampling loop with gradient checkpointing.
- regulariser: their optional diffusion loss on clean LAION images (weight 0.25, its own optimiser step
  every `diffusion_loss_step_freq` steps, off by default) is our `regulariser_weight` (off by default),
  added to the same step's loss.
- optimiser: AdamW lr 1e-4, weight decay 0.1, LoRA rank 8 (alpha = rank) on to_q/to_k/to_v/to_out.0 with
  Gaussian init, as theirs; we clip the gradient norm at 1.0 (theirs 5.0).
- models: Stable-Diffusion-1.x/2.x-shaped UNets (theirs: FLUX.1 and SDXL).

Guidance. The default `guidance_scale` is 7.5, what the model is sampled with in the Generate tab, so
the LoRA is tuned on the images people see; CFG doubles the UNet batch of every step (memory of the
K gradient steps). On a CPU or for the tiny demo pipeline, 1.0 (no CFG) is twice as fast.

Evaluation, on what tuning did not see. DiffDoctor shows its treated models on unseen prompts "not
involved in training", with the same seeds before and after (its project page); so do we:
- evaluation prompts: `held_out_prompts` when given (none may also be a training prompt; prompts are
  compared ignoring case and runs of white space), else a seeded split of `prompts` (`split_prompts`): of
  the n distinct prompts, round(`eval_fraction` x n) (at least 1, at most n - 1), chosen by a permutation
  drawn from `seed`, are held out and never trained on. `eval_fraction` = 0 evaluates on the training
  prompts, recorded as eval_set "training" in the result; that is never chosen silently.
- the first `eval_prompts` evaluation prompts x `eval_seeds` are generated before training (no adapter)
  and after it (adapter on) with the pipeline's own `__call__` (same size, steps and guidance; a CPU
  generator seeded with the eval seed), so before image k and after image k share prompt and initial
  noise (paired).
- `score_area`: `artifact_area` is the mean over images of the fraction of pixels with score >= 0.5,
  `mean_score` the mean score; `change` is after minus before of both, with how many images' area went
  lower / higher / stayed the same.
- `eval_detector` (optional) scores the same images: a detector that was not optimised, so a fall in its
  area is not just the LoRA learning to please the detector it was tuned against. Its figures sit beside
  the optimised detector's (`independent_before`, `independent_after`, `independent_change`).
- `tune_eval.evaluate_area(pipe, detector, prompts, seeds, ...)` runs the same generation and scoring for others.
(The `artifact_score` of a log row is the mean of p over the detector input of that step's training
image.) `outside_change` is the mean absolute pixel change (uint8 units, over channels) between the before
and after images at pixels that neither of the optimised detector's heatmaps marks (score < 0.5 in both).
A run stopped during training or the after-evaluation returns stopped=True with an empty `after` (the LoRA
is saved either way).

The caller's pipeline. Training happens in place on `loaded.model.unet` (no copy: a real UNet is
gigabytes); when `tune_lora` returns or raises, every PEFT layer is removed again (`unet.unload_lora`)
and the requires_grad flags of UNet, VAE and detector are restored, so the pipeline generates
exactly what it did before. A pipeline that already has a LoRA loaded is refused (switch it off with
`lora.apply_lora(pipe, None)` first). Supported: Stable-Diffusion-1.x/2.x-shaped pipelines (one text
encoder, a UNet without added conditioning); SDXL-style UNets are refused with a message.

Output: `out_dir/lora/pytorch_lora_weights.safetensors` in diffusers' LoRA format (with the adapter's
rank/alpha metadata), loadable with `pipe.load_lora_weights(out_dir / "lora")` or `apply_lora`, and
`out_dir/tune.json` with the config and the result.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engines.models import LoadedModel
from engines.training.lora import LORA_SUBDIR, add_lora_adapter, check_pipeline, save_lora
from engines.training.tune_eval import (EVAL_THRESHOLD, LOSS_MODES, artifact_loss, generate_eval_images, paired_change,
                                        score_area, split_prompts)

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]
LogFn = Callable[[dict], None]


@dataclass(frozen=True)
class TuneConfig:
    """Settings of one LoRA tuning run (see the module docstring for what each does)."""

    steps: int = 200
    rank: int = 8
    alpha: float = 8.0  # lora_alpha; the LoRA update is scaled by alpha / rank
    lr: float = 1e-4
    weight_decay: float = 0.1
    num_inference_steps: int = 20  # denoising steps of each training generation
    backprop_steps: int = 1  # K: the last K denoising steps carry gradients
    guidance_scale: float = 7.5
    width: int | None = None  # None: the pipeline's default size
    height: int | None = None
    loss_mode: str = "weighted"
    loss_threshold: float = 0.1  # tau of the "weighted" loss (DiffDoctor: 0.1)
    loss_scale: float = 1.0
    regulariser_weight: float = 0.0  # > 0 needs clean_images passed to tune_lora
    seed: int = 0
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    eval_prompts: int = 8  # evaluate on the first this many evaluation prompts (all when there are fewer)
    eval_fraction: float = 0.25  # without held-out prompts: the share of the prompts held out; 0: training prompts
    max_grad_norm: float = 1.0  # gradient clipping of the LoRA parameters
    gradient_checkpointing: bool = False  # trade compute for memory in the UNet (real models on small GPUs)

    def validate(self) -> None:
        """Raise ValueError with one sentence if any field is out of range."""
        if not 1 <= int(self.steps) <= 100_000:
            raise ValueError(f"Tuning steps must be between 1 and 100000, got {self.steps}.")
        if not 1 <= int(self.rank) <= 512:
            raise ValueError(f"LoRA rank must be between 1 and 512, got {self.rank}.")
        if not float(self.alpha) > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}.")
        if not 0 < float(self.lr) <= 1.0:
            raise ValueError(f"Learning rate must be in (0, 1], got {self.lr}.")
        if not float(self.max_grad_norm) > 0:
            raise ValueError(f"Max gradient norm must be positive, got {self.max_grad_norm}.")
        if not 0 <= float(self.weight_decay) <= 10:
            raise ValueError(f"Weight decay must be between 0 and 10, got {self.weight_decay}.")
        if not 1 <= int(self.num_inference_steps) <= 500:
            raise ValueError(f"Inference steps must be between 1 and 500, got {self.num_inference_steps}.")
        if not 1 <= int(self.backprop_steps) <= int(self.num_inference_steps):
            raise ValueError(f"Backprop steps must be between 1 and the inference steps ({self.num_inference_steps}), "
                             f"got {self.backprop_steps}.")
        if not 0.0 <= float(self.guidance_scale) <= 50.0:
            raise ValueError(f"Guidance scale must be between 0 and 50, got {self.guidance_scale}.")
        for name, side in (("Width", self.width), ("Height", self.height)):
            if side is not None and (int(side) < 64 or int(side) > 2048 or int(side) % 8):
                raise ValueError(f"{name} must be a multiple of 8 between 64 and 2048, got {side}.")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"Unknown loss mode '{self.loss_mode}'; use {', '.join(LOSS_MODES)}.")
        if not 0.0 <= float(self.loss_threshold) < 1.0:
            raise ValueError(f"Loss threshold must be in [0, 1), got {self.loss_threshold}.")
        if not float(self.loss_scale) > 0:
            raise ValueError(f"Loss scale must be positive, got {self.loss_scale}.")
        if not float(self.regulariser_weight) >= 0:
            raise ValueError(f"Regulariser weight must be 0 or more, got {self.regulariser_weight}.")
        if not 0 <= int(self.seed) <= 2**32 - 1:
            raise ValueError(f"Seed {self.seed} is out of range; use 0 to {2**32 - 1}.")
        if not 1 <= int(self.eval_prompts) <= 1000:
            raise ValueError(f"Evaluation prompt count (eval_prompts) must be between 1 and 1000, "
                             f"got {self.eval_prompts}.")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ValueError(f"Evaluation fraction must be in [0, 1) (0: evaluate on the training prompts), "
                             f"got {self.eval_fraction}.")
        if not self.eval_seeds or any(not 0 <= int(s) <= 2**32 - 1 for s in self.eval_seeds):
            raise ValueError("Evaluation seeds must be a non-empty list of seeds between 0 and 2**32 - 1.")

    def to_json(self) -> dict:
        data = asdict(self)
        data["eval_seeds"] = list(self.eval_seeds)
        return data


@dataclass(frozen=True)
class TuneResult:
    """What a run produced. `before`/`after`: the optimised detector's AreaScore.to_json() over the
    evaluation prompts x eval seeds (`after` is empty when stopped); `change`: paired_change of the two
    ({} without an after); `independent_*`: the same for `eval_detector` ({} when none was given);
    `outside_change` is None when there is no after. `eval_set` (one of EVAL_SETS), `train_prompts`,
    `eval_prompts` (those evaluated) and `eval_seeds` say what was evaluated.
    `before_images`/`after_images`: the evaluation images (RGB uint8 HWC, prompt-major: image
    i * len(eval_seeds) + j is prompt i with eval seed j); not part of `to_json`."""

    lora_dir: str
    steps_done: int
    stopped: bool
    before: dict
    after: dict
    outside_change: float | None
    history: tuple[dict, ...] = field(default=())
    duration_s: float = 0.0
    before_images: tuple[np.ndarray, ...] = field(default=(), repr=False)
    after_images: tuple[np.ndarray, ...] = field(default=(), repr=False)
    eval_set: str = "training"
    train_prompts: tuple[str, ...] = ()
    eval_prompts: tuple[str, ...] = ()
    eval_seeds: tuple[int, ...] = ()
    change: dict = field(default_factory=dict)
    independent_before: dict = field(default_factory=dict)
    independent_after: dict = field(default_factory=dict)
    independent_change: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"lora_dir": self.lora_dir, "steps_done": self.steps_done, "stopped": self.stopped,
                "before": dict(self.before), "after": dict(self.after), "change": dict(self.change),
                "independent_before": dict(self.independent_before),
                "independent_after": dict(self.independent_after),
                "independent_change": dict(self.independent_change), "outside_change": self.outside_change,
                "eval_set": self.eval_set, "train_prompts": list(self.train_prompts),
                "eval_prompts": list(self.eval_prompts), "eval_seeds": list(self.eval_seeds),
                "history": [dict(row) for row in self.history], "duration_s": self.duration_s}


def tune_lora(config: TuneConfig, loaded: LoadedModel, detector, prompts: Sequence[str],
              out_dir: str | os.PathLike, progress: ProgressFn | None = None, should_stop: StopFn | None = None,
              log: LogFn | None = None, clean_images: Sequence[np.ndarray] | None = None,
              held_out_prompts: Sequence[str] | None = None, eval_detector=None) -> TuneResult:
    """Tune a LoRA on `loaded.model` (a text-to-image pipeline) against `detector` (an ArtifactDetector).

    `prompts`: the prompt list; `held_out_prompts`: evaluation prompts, none of which may be a training
    prompt (without them a seeded `config.eval_fraction` of `prompts` is held out; see `split_prompts`).
    `eval_detector`: an ArtifactDetector that is not optimised, scoring the same evaluation images.
    `clean_images`: RGB uint8 HWC images for the regulariser. `progress(step, steps)` after each step,
    `log(row)` with {step, loss, lr, artifact_score} (plus `regulariser` when on), `should_stop()` checked
    before each step: the LoRA so far is saved and the result has stopped=True. Raises ValueError for bad input.
    """
    import torch

    config.validate()
    split = split_prompts(prompts, held_out_prompts, fraction=config.eval_fraction, seed=config.seed)
    if eval_detector is not None and eval_detector is detector:
        raise ValueError("The evaluation detector must be another detector than the one tuning optimises.")
    if config.regulariser_weight > 0 and not clean_images:
        raise ValueError("A regulariser weight above 0 needs clean images (clean_images) to compute it on.")
    clean = [_check_rgb(im, f"clean image {i}") for i, im in enumerate(clean_images or [])]
    pipe = loaded.model
    check_pipeline(pipe)
    width, height = _size(pipe, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = out_dir / LORA_SUBDIR
    eval_prompts = list(split.evaluate[:config.eval_prompts])
    seeds = [int(s) for s in config.eval_seeds]
    judges = [detector] + ([eval_detector] if eval_detector is not None else [])

    def evaluate():
        images = generate_eval_images(pipe, eval_prompts, seeds, num_inference_steps=config.num_inference_steps,
                                      guidance_scale=config.guidance_scale, width=width, height=height,
                                      should_stop=should_stop)
        return (None, []) if images is None else (images, [score_area(judge, images) for judge in judges])

    def result(steps_done, stopped, history, before_images, before, after_images=None, after=None):
        after = after or []
        values = dict(lora_dir=str(lora_dir), steps_done=steps_done, stopped=stopped, before=before[0].to_json(),
                     after=after[0].to_json() if after else {}, history=tuple(history),
                     duration_s=time.perf_counter() - start, before_images=tuple(before_images),
                     after_images=tuple(after_images or ()), eval_set=split.source, train_prompts=split.train,
                     eval_prompts=tuple(eval_prompts), eval_seeds=tuple(seeds),
                     outside_change=_outside_change(before_images, after_images, before[0].maps, after[0].maps)
                     if after else None, change=paired_change(before[0], after[0]) if after else {})
        if eval_detector is not None:
            values.update(independent_before=before[1].to_json(), independent_after=after[1].to_json() if after else {},
                         independent_change=paired_change(before[1], after[1]) if after else {})
        return _finish(out_dir, config, TuneResult(**values))

    start = time.perf_counter()
    unet, vae = pipe.unet, pipe.vae
    flags = {m: [p.requires_grad for p in m.parameters()] for m in (unet, vae, detector.model)}
    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    try:
        before_images, before = evaluate()
        if before_images is None:
            add_lora_adapter(unet, config)
            save_lora(pipe, lora_dir)
            return _finish(out_dir, config, TuneResult(str(lora_dir), 0, True, {}, {}, None, (),
                                                       time.perf_counter() - start, eval_set=split.source,
                                                       train_prompts=split.train, eval_prompts=tuple(eval_prompts),
                                                       eval_seeds=tuple(seeds)))
        for module in (vae, detector.model):
            module.requires_grad_(False)
        params = add_lora_adapter(unet, config)
        if config.gradient_checkpointing and not checkpointing:
            unet.enable_gradient_checkpointing()
        optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        # float16 UNets: scale the loss so that small gradients survive the half-precision backward
        scaler = torch.amp.GradScaler(unet.device.type) if unet.dtype == torch.float16 else None
        trainer = _Trainer(pipe, detector, config, width, height, list(split.train), clean)
        history: list[dict] = []
        stopped = False
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            optimiser.zero_grad(set_to_none=True)
            loss, row = trainer.step(step)
            if scaler is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimiser.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimiser)
                scaler.update()
            row = {"step": step + 1, "loss": row["loss"], "lr": float(optimiser.param_groups[0]["lr"]),
                   "artifact_score": row["artifact_score"], **({"regulariser": row["regulariser"]}
                                                               if "regulariser" in row else {})}
            history.append(row)
            if log is not None:
                log(dict(row))
            if progress is not None:
                progress(step + 1, config.steps)
        save_lora(pipe, lora_dir)
        after_images, after = evaluate() if not stopped else (None, [])
        if after_images is None:
            return result(len(history), True, history, before_images, before)
        return result(len(history), False, history, before_images, before, after_images, after)
    finally:
        if getattr(unet, "is_gradient_checkpointing", False) and not checkpointing:
            unet.disable_gradient_checkpointing()
        if getattr(unet, "peft_config", None):
            unet.unload_lora()
        for module, saved in flags.items():
            for p, flag in zip(module.parameters(), saved):
                p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# One training step


class _Trainer:
    """Holds what every step reuses: prompt embeddings, clean latents, the scheduler copy."""

    def __init__(self, pipe, detector, config: TuneConfig, width: int, height: int, prompts: list[str],
                 clean: list[np.ndarray]):
        import torch

        self.pipe, self.detector, self.config = pipe, detector, config
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.width, self.height = width, height
        self.prompts = prompts
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.cfg = config.guidance_scale > 1.0
        self.embeds: dict[str, object] = {}
        self.uncond = None
        self.scaling = float(pipe.vae.config.scaling_factor)
        spec = detector.spec
        det_param = next(detector.model.parameters(), None)
        self.det_device = detector.device
        self.det_dtype = det_param.dtype if det_param is not None else torch.float32
        self.mean = torch.tensor(spec.mean, device=self.det_device, dtype=self.det_dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.det_device, dtype=self.det_dtype).view(1, 3, 1, 1)
        self.clean_latents = [self._encode(im) for im in clean]

    def _embed(self, prompt: str):
        import torch

        if prompt not in self.embeds:
            with torch.no_grad():
                cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, True, "")
            self.embeds[prompt] = cond
            self.uncond = uncond
        return self.embeds[prompt]

    def _encode(self, image: np.ndarray):
        import torch
        from PIL import Image

        if image.shape[:2] != (self.height, self.width):
            image = np.asarray(Image.fromarray(image).resize((self.width, self.height), Image.BICUBIC))
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].to(self.device, self.pipe.vae.dtype)
        with torch.no_grad():
            return self.pipe.vae.encode(x / 127.5 - 1.0).latent_dist.mean * self.scaling

    def _eps(self, latents, t, cond):
        import torch

        sched, unet = self.scheduler, self.pipe.unet
        if self.cfg:
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(x.to(self.dtype), t, encoder_hidden_states=torch.cat([self.uncond, cond])).sample
            uncond, text = out.chunk(2)
            return uncond + self.config.guidance_scale * (text - uncond)
        x = sched.scale_model_input(latents, t)
        return unet(x.to(self.dtype), t, encoder_hidden_states=cond).sample

    def step(self, step: int):
        """Generate one image for step `step` and return (loss tensor, row); the caller runs backward."""
        import torch

        config = self.config
        seed = int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0])
        prompt = self.prompts[int(np.random.default_rng(seed).integers(len(self.prompts)))]
        cond = self._embed(prompt)
        sched = self.scheduler
        sched.set_timesteps(config.num_inference_steps, device=self.device)
        timesteps = sched.timesteps
        channels = self.pipe.unet.config.in_channels
        scale = self.pipe.vae_scale_factor
        shape = (1, channels, self.height // scale, self.width // scale)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = latents * sched.init_noise_sigma
        split = len(timesteps) - config.backprop_steps
        with torch.no_grad():
            for t in timesteps[:split]:
                latents = sched.step(self._eps(latents, t, cond), t, latents).prev_sample
        for t in timesteps[split:]:
            latents = sched.step(self._eps(latents, t, cond), t, latents).prev_sample
        vae = self.pipe.vae
        image = vae.decode((latents / self.scaling).to(vae.dtype)).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        probs = self.probabilities(image)
        loss = artifact_loss(probs, config.loss_mode, config.loss_threshold) * config.loss_scale
        row = {"artifact_score": float(probs.detach().mean())}
        if config.regulariser_weight > 0:
            reg = self._regulariser(seed)
            row["regulariser"] = float(reg.detach())
            loss = loss + config.regulariser_weight * reg
        row["loss"] = float(loss.detach())
        return loss, row

    def probabilities(self, image):
        """[0, 1] RGB N x 3 x H x W (differentiable) -> artifact probability N x S x S at the detector input."""
        import torch
        import torch.nn.functional as F

        from engines.detection.detect import extract_logits

        spec = self.detector.spec
        size = int(spec.input_size)
        x = image.to(self.det_device, self.det_dtype)
        if x.shape[-2:] != (size, size):
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        x = (x - self.mean) / self.std
        model = self.detector.model
        logits = extract_logits(model(x) if spec.family == "torchscript" else model(pixel_values=x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if spec.channel >= logits.shape[1]:
            raise ValueError(f"The detector outputs {logits.shape[1]} channel(s); channel {spec.channel} does not exist.")
        if spec.activation == "sigmoid":
            return torch.sigmoid(logits[:, spec.channel].float())
        return torch.softmax(logits.float(), dim=1)[:, spec.channel]

    def _regulariser(self, seed: int):
        """The ordinary diffusion loss on one clean image (empty prompt), chosen and noised by `seed`."""
        import torch
        import torch.nn.functional as F

        rng = np.random.default_rng(seed + 1)
        z0 = self.clean_latents[int(rng.integers(len(self.clean_latents)))]
        train_steps = int(self.scheduler.config.num_train_timesteps)
        t = torch.tensor([int(rng.integers(train_steps))], device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(self.device, z0.dtype)
        noisy = self.scheduler.add_noise(z0, noise, t)
        self._embed("")
        pred = self.pipe.unet(noisy.to(self.dtype), t, encoder_hidden_states=self.embeds[""]).sample
        if self.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------------------------
# Size, results


def _size(pipe, config: TuneConfig) -> tuple[int, int]:
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return int(config.width or side), int(config.height or side)


def _outside_change(before: list[np.ndarray], after: list[np.ndarray], maps_before, maps_after) -> float:
    """Mean |after - before| (uint8 units) over pixels that neither heatmap marks as artifact."""
    total, count = 0.0, 0
    for b, a, mb, ma in zip(before, after, maps_before, maps_after):
        keep = (mb < EVAL_THRESHOLD) & (ma < EVAL_THRESHOLD)
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2)
        total += float(diff[keep].sum())
        count += int(keep.sum())
    return total / count if count else 0.0


def _finish(out_dir: Path, config: TuneConfig, result: TuneResult) -> TuneResult:
    (out_dir / "tune.json").write_text(json.dumps({"config": config.to_json(), "result": result.to_json()}, indent=2))
    return result


def _check_rgb(image, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{what.capitalize()} must be RGB uint8 H x W x 3, got {arr.dtype} {arr.shape}.")
    return arr
