"""AI feedback for the generator (SynArtifact's RLAIF step): DDPO on LoRA weights with a classifier's reward.

`tune_feedback(config, loaded, classifier, prompts, out_dir)` tunes LoRA adapters on the UNet of a Stable-
Diffusion-style pipeline so that an artifact classifier (engines.classification.classify) sees fewer artifacts. The
reward of an image is r = -p, p = the classifier's artifact probability (its largest class probability).
The method is DDPO with importance sampling and clipping (Black et al., "Training Diffusion Models with
Reinforcement Learning", 2023), as in their reference implementation:

1. Sample. Each of `samples_per_step` images (prompt and initial noise seeded by (seed, step, i)) is
   generated with the pipeline's DDIM schedule at eta = `eta` (1.0: every step is a Gaussian policy
   x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I) with DDIM's sigma_t), recording every latent and the
   log-probability of each step under the current policy (`ddim_step_with_logprob`: DDIM's mean and
   sigma, log N summed... averaged over the latent's elements, DDPO's convention). Classifier-free
   guidance with an empty negative prompt when guidance_scale > 1.
2. Reward and advantage. r_i = -p_i; advantages A_i = (r_i - mean) / (std + 1e-8) over the batch, or
   per prompt once a prompt has `per_prompt_min` rewards in its running buffer (DDPO's per-prompt stat
   tracking), clipped to +-adv_clip_max.
3. Update (`inner_epochs` passes over the batch; a `timestep_fraction` of the steps, random per sample):
   the clipped surrogate loss mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) with
   ratio = exp(logp_theta(x_{t-1} | x_t) - logp_old) and eps = `clip_range`, gradients accumulated over
   the batch and timesteps, AdamW on the LoRA parameters (clipped to max_grad_norm), one optimizer step per
   inner epoch.
Why DDPO and not reward-weighted regression: the classifier is not differentiable through sampling in
general (a VLM's option scoring, a thresholded head), DDPO optimises the expected reward of the images
the model itself samples (reward-weighted fine-tuning only re-weights one fixed batch of samples and
cannot move beyond it), and it is the policy-gradient method the RLAIF literature uses for diffusion.

Evaluation: before training (no adapter) and after (adapter on), every held-out prompt x eval seed is
generated with the pipeline's own deterministic call (eta 0, same size, steps and guidance) and judged by
the classifier (artifact rate: share of images with p >= 0.5; mean p) and, when given, the pixel detector
(artifact rate: share of images with any pixel >= 0.5; mean artifact area). The caller's pipeline is
restored as in engines.training.tune (adapters unloaded, requires_grad flags back).
Output: out_dir/lora (diffusers LoRA format, loadable by apply_lora) and out_dir/tune_feedback.json.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engines.models import LoadedModel
from engines.progress import StopFn

LogFn = Callable[[dict], None]
EVAL_THRESHOLD = 0.5


@dataclass(frozen=True)
class FeedbackConfig:
    """Settings of one DDPO run (module docstring)."""

    steps: int = 50  # outer iterations: sample, then update
    samples_per_step: int = 4
    num_inference_steps: int = 10
    eta: float = 1.0
    guidance_scale: float = 1.0
    width: int | None = None
    height: int | None = None
    rank: int = 4
    alpha: float = 4.0
    lr: float = 3e-4
    weight_decay: float = 1e-4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    per_prompt_min: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_seeds: tuple[int, ...] = (0, 1)

    def validate(self) -> None:
        checks = [
            (1 <= int(self.steps) <= 100_000, f"Feedback steps must be between 1 and 100000, got {self.steps}."),
            (1 <= int(self.samples_per_step) <= 1024, f"Samples per step must be between 1 and 1024, got {self.samples_per_step}."),
            (1 <= int(self.num_inference_steps) <= 500, f"Inference steps must be between 1 and 500, got {self.num_inference_steps}."),
            (0.0 < float(self.eta) <= 1.0, f"eta must be in (0, 1] (a stochastic policy), got {self.eta}."),
            (0.0 <= float(self.guidance_scale) <= 50.0, f"Guidance scale must be between 0 and 50, got {self.guidance_scale}."),
            (1 <= int(self.rank) <= 512, f"LoRA rank must be between 1 and 512, got {self.rank}."),
            (float(self.alpha) > 0, f"LoRA alpha must be positive, got {self.alpha}."),
            (0 < float(self.lr) <= 1, f"Learning rate must be in (0, 1], got {self.lr}."),
            (0 < float(self.clip_range) < 1, f"clip_range must be in (0, 1), got {self.clip_range}."),
            (float(self.adv_clip_max) > 0, f"adv_clip_max must be positive, got {self.adv_clip_max}."),
            (1 <= int(self.inner_epochs) <= 100, f"inner_epochs must be between 1 and 100, got {self.inner_epochs}."),
            (0 < float(self.timestep_fraction) <= 1, f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}."),
            (float(self.max_grad_norm) > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}."),
            (0 <= int(self.seed) <= 2**32 - 1, f"Seed {self.seed} is out of range; use 0 to {2**32 - 1}."),
            (bool(self.eval_seeds), "Give at least one evaluation seed."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name, side in (("Width", self.width), ("Height", self.height)):
            if side is not None and (int(side) < 64 or int(side) > 2048 or int(side) % 8):
                raise ValueError(f"{name} must be a multiple of 8 between 64 and 2048, got {side}.")

    def to_json(self) -> dict:
        data = asdict(self)
        data["eval_seeds"] = list(self.eval_seeds)
        return data


@dataclass(frozen=True)
class FeedbackResult:
    """`before`/`after`: the held-out evaluation (module docstring); `after` is empty when stopped."""

    lora_dir: str
    steps_done: int
    stopped: bool
    before: dict
    after: dict
    history: tuple[dict, ...] = field(default=())
    duration_s: float = 0.0
    method: str = "DDPO (importance sampling, clipped), Black et al. 2023"

    def to_json(self) -> dict:
        data = asdict(self)
        data["history"] = list(self.history)
        return data


# ----------------------------------------------------------------------------------------------
# The policy: one DDIM step with its log-probability


def ddim_step_with_logprob(scheduler, eps, timestep: int, sample, *, eta: float, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy: returns (prev_sample, log_prob per batch item).

    mean = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma^2) * eps, sigma = eta * sqrt(DDIM variance);
    x0_hat from eps (epsilon prediction) or from v (v_prediction). With `prev_sample` given its
    log-probability is computed; otherwise it is drawn with `generator`. log_prob is the Gaussian log-density
    averaged over the latent's elements (DDPO's convention)."""
    import torch

    config = scheduler.config
    step = config.num_train_timesteps // scheduler.num_inference_steps
    t = int(timestep)
    prev_t = t - step
    alphas = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    a_t = alphas[t]
    a_prev = alphas[prev_t] if prev_t >= 0 else torch.as_tensor(float(scheduler.final_alpha_cumprod), device=sample.device)
    b_t = 1 - a_t
    x = sample.float()
    e = eps.float()
    if config.prediction_type == "v_prediction":
        x0, e = a_t.sqrt() * x - b_t.sqrt() * e, a_t.sqrt() * e + b_t.sqrt() * x
    elif config.prediction_type == "epsilon":
        x0 = (x - b_t.sqrt() * e) / a_t.sqrt()
    else:
        raise ValueError(f"DDPO supports epsilon or v_prediction schedulers, not {config.prediction_type!r}.")
    if getattr(config, "clip_sample", False):
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = float(eta) * variance.clamp_min(1e-20).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp_min(0).sqrt() * e
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        prev_sample = mean + std * noise
    prev = prev_sample.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def ddpo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """DDPO's clipped surrogate: mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logp - logp_old)."""
    import torch

    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


class PromptStats:
    """DDPO's per-prompt advantage normalisation: a running buffer of rewards per prompt; prompts with fewer
    than `min_count` rewards are normalised with the whole batch's mean and std."""

    def __init__(self, min_count: int):
        self.min_count = int(min_count)
        self.buffers: dict[str, list[float]] = {}

    def advantages(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, np.float64)
        out = np.empty_like(rewards)
        for prompt in set(prompts):
            self.buffers.setdefault(prompt, []).extend(rewards[[p == prompt for p in prompts]].tolist())
        for i, prompt in enumerate(prompts):
            pool = np.asarray(self.buffers[prompt]) if len(self.buffers[prompt]) >= self.min_count else rewards
            out[i] = (rewards[i] - pool.mean()) / (pool.std() + 1e-8)
        return out


# ----------------------------------------------------------------------------------------------
# Tuning


class _Policy:
    """Prompt embeddings, the scheduler copy and the eps prediction (with CFG) of the pipeline's UNet."""

    def __init__(self, pipe, config: FeedbackConfig, width: int, height: int):
        self.pipe, self.config, self.width, self.height = pipe, config, width, height
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(int(config.num_inference_steps), device=self.device)
        self.cfg = float(config.guidance_scale) > 1.0
        self.embeds: dict = {}

    def embed(self, prompt: str):
        import torch

        if prompt not in self.embeds:
            with torch.no_grad():
                cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, True, "")
            self.embeds[prompt] = (cond, uncond)
        return self.embeds[prompt]

    def eps(self, latents, t, prompt: str):
        import torch

        cond, uncond = self.embed(prompt)
        unet, sched = self.pipe.unet, self.scheduler
        if self.cfg:
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(x.to(self.dtype), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.float()
            u, c = out.chunk(2)
            return u + float(self.config.guidance_scale) * (c - u)
        return unet(sched.scale_model_input(latents, t).to(self.dtype), t, encoder_hidden_states=cond).sample.float()

    def sample(self, prompt: str, seed: int):
        """(uint8 image H x W x 3, latents [T+1], log_probs [T], timesteps [T]) of one stochastic trajectory."""
        import torch

        from engines.generation.generate import to_uint8

        scale = self.pipe.vae_scale_factor
        shape = (1, self.pipe.unet.config.in_channels, self.height // scale, self.width // scale)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = latents * self.scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                eps = self.eps(latents, t, prompt)
                latents, logp = ddim_step_with_logprob(self.scheduler, eps, int(t), latents, eta=self.config.eta,
                                                       generator=generator)
                trajectory.append(latents)
                log_probs.append(logp)
            vae = self.pipe.vae
            image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
            image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return to_uint8(image)[0], trajectory, torch.cat(log_probs), list(self.scheduler.timesteps)


def tune_feedback(config: FeedbackConfig, loaded: LoadedModel, classifier, prompts: Sequence[str],
                  out_dir: str | os.PathLike, *, eval_prompts: Sequence[str] | None = None, detector=None,
                  progress=None, should_stop: StopFn | None = None, log: LogFn | None = None) -> FeedbackResult:
    """DDPO-tune a LoRA on `loaded.model` with `classifier` (an ArtifactClassifier) as the judge.

    `prompts`: training prompts; `eval_prompts`: held-out prompts for the before/after report (default: the
    training prompts); `detector`: an optional ArtifactDetector for the pixel-level report. `log(row)` per
    step {step, reward_mean, reward_std, artifact_probability, loss, clip_fraction}; `should_stop()` is checked
    before each step (the LoRA so far is saved, stopped=True, no after-evaluation)."""
    import torch

    from engines.training.lora import ADAPTER, LORA_SUBDIR, add_lora_adapter, check_pipeline, save_lora

    config.validate()
    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("Give at least one prompt, and no empty prompts.")
    held_out = [str(p) for p in (eval_prompts or prompts)]
    pipe = loaded.model
    check_pipeline(pipe)
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    width, height = int(config.width or side), int(config.height or side)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = out_dir / LORA_SUBDIR
    start = time.perf_counter()
    unet = pipe.unet
    flags = {m: [p.requires_grad for p in m.parameters()] for m in (unet, pipe.vae)}
    try:
        before = evaluate_feedback(pipe, classifier, detector, held_out, config, width, height)
        params = add_lora_adapter(unet, config)
        optimizer = torch.optim.AdamW(params, lr=float(config.lr), weight_decay=float(config.weight_decay))
        policy = _Policy(pipe, config, width, height)
        stats = PromptStats(config.per_prompt_min)
        history, stopped = [], False
        for step in range(int(config.steps)):
            if should_stop is not None and should_stop():
                stopped = True
                break
            row = ddpo_step(policy, classifier, prompts, config, step, stats, optimizer, params)
            history.append(row)
            if log is not None:
                log(dict(row))
            if progress is not None:
                progress(step + 1, int(config.steps))
        save_lora(pipe, lora_dir)
        after = {} if stopped else evaluate_feedback(pipe, classifier, detector, held_out, config, width, height)
        result = FeedbackResult(str(lora_dir), len(history), stopped, before, after, tuple(history),
                                time.perf_counter() - start)
        (out_dir / "tune_feedback.json").write_text(json.dumps({"config": config.to_json(), "result": result.to_json(),
                                                                "prompts": prompts, "eval_prompts": held_out}, indent=2))
        return result
    finally:
        if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
            unet.unload_lora()
        for module, saved in flags.items():
            for p, flag in zip(module.parameters(), saved):
                p.requires_grad_(flag)


def ddpo_step(policy: _Policy, classifier, prompts: Sequence[str], config: FeedbackConfig, step: int,
              stats: PromptStats, optimizer, params) -> dict:
    """One DDPO iteration: sample `samples_per_step` trajectories, reward them, update (module docstring)."""
    import torch

    seeds = np.random.SeedSequence([int(config.seed), step]).generate_state(int(config.samples_per_step))
    chosen, images, trajectories, old_logps, timesteps = [], [], [], [], []
    for seed in seeds:
        prompt = prompts[int(np.random.default_rng(int(seed)).integers(len(prompts)))]
        image, traj, logp, ts = policy.sample(prompt, int(seed))
        chosen.append(prompt)
        images.append(image)
        trajectories.append(traj)
        old_logps.append(logp)
        timesteps = ts
    probs = np.array([r.artifact_probability for r in classifier.classify(images, captions=False)])
    rewards = -probs
    adv = np.clip(stats.advantages(chosen, rewards), -config.adv_clip_max, config.adv_clip_max)
    n_train = max(1, int(round(len(timesteps) * float(config.timestep_fraction))))
    rng = np.random.default_rng([int(config.seed), step, 1])
    losses, clipped = [], []
    for _ in range(int(config.inner_epochs)):
        optimizer.zero_grad(set_to_none=True)
        for i, prompt in enumerate(chosen):
            order = sorted(rng.permutation(len(timesteps))[:n_train])
            a = torch.tensor(float(adv[i]), device=policy.device)
            for j in order:
                t = timesteps[j]
                eps = policy.eps(trajectories[i][j], t, prompt)
                _, logp = ddim_step_with_logprob(policy.scheduler, eps, int(t), trajectories[i][j], eta=config.eta,
                                                 prev_sample=trajectories[i][j + 1])
                loss = ddpo_loss(logp, old_logps[i][j:j + 1], a, float(config.clip_range))
                (loss / (len(chosen) * n_train)).backward()
                losses.append(float(loss.detach()))
                clipped.append(float((torch.abs(torch.exp(logp - old_logps[i][j:j + 1]) - 1) > config.clip_range).float().mean()))
        torch.nn.utils.clip_grad_norm_(params, float(config.max_grad_norm))
        optimizer.step()
    return {"step": step + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "artifact_probability": float(probs.mean()), "loss": float(np.mean(losses)),
            "clip_fraction": float(np.mean(clipped)), "lr": float(config.lr)}


def evaluate_feedback(pipe, classifier, detector, prompts: Sequence[str], config: FeedbackConfig, width: int,
                      height: int) -> dict:
    """Held-out prompts x eval seeds, generated deterministically, judged by the classifier (and detector)."""
    import torch

    from engines.generation.generate import to_uint8

    images = []
    for prompt in prompts:
        for seed in config.eval_seeds:
            with torch.inference_mode():
                out = pipe(prompt=prompt, num_inference_steps=int(config.num_inference_steps),
                           guidance_scale=float(config.guidance_scale), width=width, height=height,
                           generator=torch.Generator(device="cpu").manual_seed(int(seed)), output_type="np")
            images.extend(to_uint8(out.images))
    probs = np.array([r.artifact_probability for r in classifier.classify(images, captions=False)])
    summary = {"images": len(images), "classifier_artifact_rate": float((probs >= EVAL_THRESHOLD).mean()),
               "classifier_mean_probability": float(probs.mean()), "classifier": classifier.classifier_id}
    if detector is not None:
        maps = [h.scores for h in detector.predict(images)]
        summary.update({"detector_artifact_rate": float(np.mean([(m >= EVAL_THRESHOLD).any() for m in maps])),
                        "detector_artifact_area": float(np.mean([(m >= EVAL_THRESHOLD).mean() for m in maps])),
                        "detector": detector.detector_id})
    return summary
