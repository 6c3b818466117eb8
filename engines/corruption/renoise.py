"""One ReNoise inversion step (Garibi et al. 2024) as the official implementation runs it for SD + DDIM.

Reference: github.com/garibida/ReNoise-Inversion. `src/renoise_inversion.py` (`inversion_step`,
`noise_regularization`, `auto_corr_loss`, `patchify_latents_kl_divergence`), `src/config.py`
(`RunConfig` defaults) and `examples/inversion_example_sd.py` (the SD 1.5 settings: DDIM, 50 steps,
`num_renoise_steps=1`, `perform_noise_correction=False`). This file is an independent rewrite of
that algorithm, not a copy.

One inverted step goes from the latent z (abar a_cur) to the next, noisier timestep t (abar a_next).
eps(x) always means the noise prediction at latent x with the TARGET timestep t. The DDIM inverse
step with noise e is z' = sqrt(a_next) (z - sqrt(1 - a_cur) e) / sqrt(a_cur) + sqrt(1 - a_next) e
(the reference's `MyDDIMScheduler.inv_step`, same algebra).

  early  = t < first_step_max_timestep (250; the reference's `first_step_max_timestep` argument).
           This rule is not specific to SDXL-Turbo: the reference applies it to every model.
  range  = average_first_step_range (0, 5) if early else average_step_range (8, 10): half-open
           ranges of iteration indices i whose predictions are averaged.
  R      = min(max_renoise_first_step (5), renoise_iterations) if early else renoise_iterations.
  x = z
  for i in 0 .. R:                    (i = 0 is the plain DDIM estimate, i >= 1 the renoise ones)
      e_i = eps(x)                    (at i = 0 batched with eps(z0), the KL reference, when the
                                       KL regularisation is on: the reference's `noise_pred_optimal`;
                                       for SD its `add_noise` is patched to return z0 unchanged)
      if i in range: running mean  avg = j/(j+1) avg + e_i/(j+1),  j = i - range[0]  (raw e_i)
      if i >= range[0] (or, without averaging, i > 0): e_i = regularise(e_i)
      x = inverse_step(z, e_i)
  if averaging is on and avg exists: x = inverse_step(z, regularise(avg))
  return x

With the SD settings (R = 1) an early step therefore averages the DDIM estimate e_0 and the renoise
estimate e_1, each regularised before its own inverse step, and takes the final step with the
regularised average; a late step (t >= 250) averages nothing, regularises nothing and returns the
inverse step with e_1. For N = 50, k = 10 every inverted timestep (1 .. 181) is early.
Noise correction (`perform_noise_correction`) is off in the SD example and exists only for the
reference's stochastic Euler/LCM schedulers (its `MyDDIMScheduler` has no `step_and_update_noise`),
so it is not implemented.

Deviations, none of which changes a result: the KL reference eps(z0) is evaluated only when this
step regularises with lambda_kl > 0 (the reference evaluates it whenever num_reg_steps > 0, also
when it is unused); the random rolls come from a generator seeded by the caller (the reference
shares one seeded by `RunConfig.seed` with its other draws); the autocorrelation pyramid also
stops before a side would drop below 2 (the reference would fail there).
"""
from __future__ import annotations

import math
from typing import Any, Callable

RENOISE_FIELDS = ("renoise_iterations", "max_renoise_first_step", "first_step_max_timestep",
                  "average_first_step_range", "average_step_range", "average_latent_estimations",
                  "lambda_ac", "lambda_kl", "num_reg_steps", "num_reg_rolls")

# The official SD configuration: src/config.py RunConfig defaults with the overrides of
# examples/inversion_example_sd.py (num_renoise_steps=1). Each value is pinned by a test.
RENOISE_SD: dict[str, Any] = {
    "renoise_iterations": 1,  # examples/inversion_example_sd.py: num_renoise_steps = 1
    "max_renoise_first_step": 5,  # src/config.py: max_num_renoise_steps_first_step = 5
    "first_step_max_timestep": 250,  # src/renoise_inversion.py: inversion_step(first_step_max_timestep=250)
    "average_first_step_range": (0, 5),  # src/config.py: average_first_step_range = (0, 5)
    "average_step_range": (8, 10),  # src/config.py: average_step_range = (8, 10)
    "average_latent_estimations": True,  # src/config.py: average_latent_estimations = True
    "lambda_ac": 20.0,  # src/config.py: noise_regularization_lambda_ac = 20.0
    "lambda_kl": 0.065,  # src/config.py: noise_regularization_lambda_kl = 0.065
    "num_reg_steps": 4,  # src/config.py: noise_regularization_num_reg_steps = 4
    "num_reg_rolls": 5,  # src/config.py: noise_regularization_num_ac_rolls = 5
}
# Interactive previews: the same averaging rule, one renoise iteration, no regularisation.
RENOISE_FAST: dict[str, Any] = {**RENOISE_SD, "lambda_ac": 0.0, "lambda_kl": 0.0, "num_reg_steps": 0}
PRESETS: dict[str, dict[str, Any]] = {"renoise-sd": RENOISE_SD, "renoise-fast": RENOISE_FAST}

EpsFn = Callable[[Any], Any]  # latents [B, C, h, w] -> noise predictions [B, C, h, w] at the step's target timestep


def regularised(settings) -> bool:
    """Whether `settings` regularise the noise at all (steps > 0 and a positive lambda)."""
    return int(settings.num_reg_steps) > 0 and (float(settings.lambda_ac) > 0 or float(settings.lambda_kl) > 0)


def step_plan(timestep: int, settings) -> tuple[int, tuple[int, int], bool]:
    """(R renoise iterations, averaging range, whether eps(z0) is evaluated) for one step to `timestep`."""
    early = int(timestep) < int(settings.first_step_max_timestep)
    lo, hi = settings.average_first_step_range if early else settings.average_step_range
    iterations = int(settings.renoise_iterations)
    if early:
        iterations = min(int(settings.max_renoise_first_step), iterations)
    regularises = iterations >= lo or (not settings.average_latent_estimations and iterations > 0)
    return iterations, (int(lo), int(hi)), regularised(settings) and float(settings.lambda_kl) > 0 and regularises


def unet_rows(timestep: int, settings) -> int:
    """Latents passed through the UNet by one step (x2 under classifier-free guidance)."""
    iterations, _, reference = step_plan(timestep, settings)
    return iterations + 1 + int(reference)


def inverse_step(z, eps, a_cur: float, a_next: float):
    """DDIM step backwards (towards more noise): from abar a_cur to a_next with noise eps."""
    x0 = (z - math.sqrt(1 - a_cur) * eps) / math.sqrt(a_cur)
    return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps


def renoise_step(eps_fn: EpsFn, z, z0, timestep: int, a_cur: float, a_next: float, settings, generator=None):
    """One inverted step from z to `timestep` (see the module docstring); `settings` is anything with
    the RENOISE_FIELDS attributes (e.g. CorruptParams). `generator` (CPU torch.Generator) draws the
    autocorrelation rolls; it is needed when the settings regularise."""
    import torch

    iterations, (lo, hi), with_reference = step_plan(timestep, settings)
    regularise = regularised(settings)
    average_on = bool(settings.average_latent_estimations)
    reference = average = None
    estimate = z
    for i in range(iterations + 1):
        if i == 0 and with_reference:
            reference, eps = eps_fn(torch.cat([z0, estimate])).chunk(2)
        else:
            eps = eps_fn(estimate)
        if lo <= i < hi:
            j = i - lo
            average = eps.clone() if average is None else j * average / (j + 1) + eps / (j + 1)
        if regularise and (i >= lo or (not average_on and i > 0)):
            eps = regularise_noise(eps, reference, settings, generator)
        estimate = inverse_step(z, eps, a_cur, a_next)
    if average_on and average is not None:
        if regularise:
            average = regularise_noise(average, reference, settings, generator)
        estimate = inverse_step(z, average, a_cur, a_next)
    return estimate


# ----------------------------------------------------------------------------------------------
# Noise regularisation (pix2pix-zero losses as ReNoise uses them; gradients on eps only)

def autocorrelation_loss(eps, generator=None):
    """Sum over channels and pyramid levels of mean(x * roll(x, r, H))^2 + mean(x * roll(x, r, W))^2,
    r drawn in [0, H//2) per level; levels halve by 2x2 average pooling until H <= 8."""
    import torch
    import torch.nn.functional as F

    loss = eps.new_zeros(())
    for channel in range(eps.shape[1]):
        level = eps[:, channel:channel + 1]
        while True:
            roll = int(torch.randint(0, max(1, level.shape[-2] // 2), (1,), generator=generator))
            loss = loss + (level * torch.roll(level, shifts=roll, dims=-2)).mean() ** 2
            loss = loss + (level * torch.roll(level, shifts=roll, dims=-1)).mean() ** 2
            if level.shape[-2] <= 8 or min(level.shape[-2:]) < 2:
                break
            level = F.avg_pool2d(level, kernel_size=2)
    return loss


def patch_kl_loss(eps, reference, patch: int = 4):
    """Sum over 4x4 patches of sum over channels of |KL| between per-patch Gaussians (mean, unbiased
    variance over the patch's 16 values) of eps and of the reference, with 1e-6 added to variances."""
    h, w = (eps.shape[-2] // patch) * patch, (eps.shape[-1] // patch) * patch
    if h == 0 or w == 0:
        return eps.new_zeros(())

    def stats(x):
        c = x.shape[1]
        cells = x[..., :h, :w].reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 0, 2, 4)
        cells = cells.reshape(-1, c, patch * patch)
        return cells.mean(-1), cells.var(-1)

    mu0, var0 = stats(eps)
    mu1, var1 = stats(reference)
    tiny = 1e-6
    kl = ((var1 + tiny) / (var0 + tiny)).log() + (var0 + (mu0 - mu1) ** 2) / (var1 + tiny) - 1
    return kl.abs().sum()


def regularise_noise(eps, reference, settings, generator=None):
    """`num_reg_steps` rounds of: one KL gradient step towards `reference` (gradient clipped to
    +-100, times lambda_kl), then `num_reg_rolls` autocorrelation gradient steps (each gradient
    divided by the number of rolls, times lambda_ac). Returns a new tensor; gradients on eps only."""
    import torch

    with torch.inference_mode(False), torch.enable_grad():
        e = eps.detach().clone()
        ref = reference.detach().clone() if reference is not None else None
        rolls = int(settings.num_reg_rolls)
        for _ in range(int(settings.num_reg_steps)):
            if settings.lambda_kl > 0 and ref is not None:
                var = e.detach().clone().requires_grad_(True)
                grad, = torch.autograd.grad(patch_kl_loss(var, ref), var)
                e = e - settings.lambda_kl * grad.clamp(-100, 100)
            if settings.lambda_ac > 0:
                for _ in range(rolls):
                    var = e.detach().clone().requires_grad_(True)
                    grad, = torch.autograd.grad(autocorrelation_loss(var, generator), var)
                    e = e - settings.lambda_ac * (grad / rolls)
            e = e.detach()
        return e.detach().clone()
