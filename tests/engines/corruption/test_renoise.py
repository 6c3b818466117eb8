"""engines.corruption.renoise against the official ReNoise implementation's rules (github.com/garibida/ReNoise-Inversion).

No UNet here: the noise prediction is a known function eps(x) = 0.5 x + 0.1 (float64), so every
expected latent is the reference's equations written out by hand, step by step.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from engines.corruption.corrupt import CorruptParams
from engines.corruption.renoise import (PRESETS, RENOISE_FAST, RENOISE_SD, autocorrelation_loss, inverse_step, patch_kl_loss,
                             regularise_noise, renoise_step, step_plan, unet_rows)

A_CUR, A_NEXT = 0.93, 0.88  # abar before / after the inverted step


def known_eps(calls: list):
    def eps(x):
        calls.append(x.shape[0])
        return 0.5 * x + 0.1
    return eps


def latents(seed: int = 0, shape=(1, 4, 16, 16)):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def inv(z, e):
    """The reference's MyDDIMScheduler.inv_step (src/schedulers/ddim_scheduler.py), its own algebra:
    sqrt(a_t) z / sqrt(a_prev) + sqrt(1 - a_t) e - sqrt(a_t) sqrt(1 - a_prev) e / sqrt(a_prev)."""
    return (math.sqrt(A_NEXT) * z / math.sqrt(A_CUR) + math.sqrt(1 - A_NEXT) * e
            - math.sqrt(A_NEXT) * math.sqrt(1 - A_CUR) * e / math.sqrt(A_CUR))


def settings(**overrides) -> CorruptParams:
    return CorruptParams(**{**RENOISE_FAST, "preset": "custom", **overrides})


# ---------------------------------------------------------------------------------------------
# Defaults: the reference's SD configuration, value by value

def test_sd_preset_is_the_reference_sd_configuration():
    sd = PRESETS["renoise-sd"]
    assert sd["renoise_iterations"] == 1  # examples/inversion_example_sd.py: RunConfig(num_renoise_steps = 1)
    assert sd["max_renoise_first_step"] == 5  # src/config.py: max_num_renoise_steps_first_step = 5
    assert sd["first_step_max_timestep"] == 250  # src/renoise_inversion.py: inversion_step(..., first_step_max_timestep=250)
    assert sd["average_first_step_range"] == (0, 5)  # src/config.py: average_first_step_range = (0, 5)
    assert sd["average_step_range"] == (8, 10)  # src/config.py: average_step_range = (8, 10)
    assert sd["average_latent_estimations"] is True  # src/config.py: average_latent_estimations = True
    assert sd["lambda_ac"] == 20.0  # src/config.py: noise_regularization_lambda_ac = 20.0
    assert sd["lambda_kl"] == 0.065  # src/config.py: noise_regularization_lambda_kl = 0.065
    assert sd["num_reg_steps"] == 4  # src/config.py: noise_regularization_num_reg_steps = 4
    assert sd["num_reg_rolls"] == 5  # src/config.py: noise_regularization_num_ac_rolls = 5
    assert set(sd) == set(RENOISE_SD)


def test_corrupt_params_default_to_the_sd_preset_and_the_fast_preset_only_drops_regularisation():
    p = CorruptParams()
    assert p.preset == "renoise-sd" and p.renoise_settings() == RENOISE_SD
    # examples/inversion_example_sd.py: num_inference_steps = 50 (DDIM); the paper inverts k = 10 of them
    assert (p.num_inference_steps, p.inversion_steps) == (50, 10)
    # src/config.py: guidance_scale = 0.0 -> no classifier-free guidance while inverting
    assert p.inversion_guidance_scale == 1.0
    fast = CorruptParams.from_preset("renoise-fast")
    assert fast.renoise_settings() == {**RENOISE_SD, "lambda_ac": 0.0, "lambda_kl": 0.0, "num_reg_steps": 0}
    assert not fast.regularised and p.regularised
    fast.validate()
    with pytest.raises(ValueError, match="differ from preset 'renoise-sd'"):
        replace(p, renoise_iterations=2).validate()
    replace(p, renoise_iterations=2, preset="custom").validate()


def test_step_plan_follows_the_early_timestep_rule():
    sd = CorruptParams()
    assert step_plan(249, sd) == (1, (0, 5), True)  # early: first range, the KL reference is needed
    assert step_plan(250, sd) == (1, (8, 10), False)  # late: nothing to average or regularise with R = 1
    nine = settings(renoise_iterations=9)
    assert step_plan(1, nine)[0] == 5 and step_plan(981, nine)[0] == 9  # max_num_renoise_steps_first_step caps early steps
    assert unet_rows(1, sd) == 3 and unet_rows(1, CorruptParams.from_preset("renoise-fast")) == 2
    assert unet_rows(981, sd) == 2


# ---------------------------------------------------------------------------------------------
# The step on a known eps function

def test_early_step_averages_the_ddim_estimate_with_the_renoise_one():
    z, z0 = latents(0), latents(1)
    calls = []
    out = renoise_step(known_eps(calls), z, z0, 181, A_CUR, A_NEXT, settings())
    e0 = 0.5 * z + 0.1  # i = 0: the plain DDIM estimate, at z
    e1 = 0.5 * inv(z, e0) + 0.1  # i = 1: the renoise estimate, at the DDIM guess
    expected = inv(z, (e0 + e1) / 2)  # average_first_step_range (0, 5) covers both
    assert (out - expected).abs().max() < 1e-12
    assert calls == [1, 1]
    assert (out - inv(z, e1)).abs().max() > 1e-4  # excluding the DDIM estimate would differ


def test_late_step_takes_the_last_renoise_estimate_without_averaging():
    z, z0 = latents(2), latents(3)
    calls = []
    out = renoise_step(known_eps(calls), z, z0, 261, A_CUR, A_NEXT, settings())
    e1 = 0.5 * inv(z, 0.5 * z + 0.1) + 0.1
    assert (out - inv(z, e1)).abs().max() < 1e-12  # average_step_range (8, 10) holds no index of 0..1
    assert calls == [1, 1]


def test_nine_iterations_average_the_ninth_and_tenth_estimates_late_and_cap_at_five_early():
    z, z0 = latents(4), latents(5)
    x, estimates = z, []
    for _ in range(10):  # i = 0 .. 9
        e = 0.5 * x + 0.1
        estimates.append(e)
        x = inv(z, e)
    calls = []
    late = renoise_step(known_eps(calls), z, z0, 501, A_CUR, A_NEXT, settings(renoise_iterations=9))
    assert (late - inv(z, (estimates[8] + estimates[9]) / 2)).abs().max() < 1e-12 and len(calls) == 10
    calls.clear()
    early = renoise_step(known_eps(calls), z, z0, 101, A_CUR, A_NEXT, settings(renoise_iterations=9))
    # R = min(5, 9) = 5: i = 0 .. 5 are evaluated, the half-open range (0, 5) averages i = 0 .. 4
    assert (early - inv(z, sum(estimates[:5]) / 5)).abs().max() < 1e-12 and len(calls) == 6


def test_without_averaging_the_last_estimate_is_returned():
    z, z0 = latents(6), latents(7)
    x = z
    for _ in range(4):
        x = inv(z, 0.5 * x + 0.1)
    out = renoise_step(known_eps([]), z, z0, 101, A_CUR, A_NEXT, settings(renoise_iterations=3,
                                                                            average_latent_estimations=False))
    assert (out - x).abs().max() < 1e-12


def test_regularised_step_follows_the_reference_order():
    """SD preset, early step: e0 comes batched with eps(z0) (the KL reference); the running average
    takes the RAW e0, e1; e0 and e1 are regularised before their own inverse steps, then the average
    is regularised and gives the result. One generator, consumed in exactly that order."""
    import torch

    z, z0 = latents(8), latents(9)
    sd = CorruptParams()
    calls = []
    out = renoise_step(known_eps(calls), z, z0, 41, A_CUR, A_NEXT, sd, torch.Generator().manual_seed(0))
    assert calls == [2, 1]  # [z0, z] in one batch, then the renoise estimate

    gen = torch.Generator().manual_seed(0)
    reference = 0.5 * z0 + 0.1
    e0 = 0.5 * z + 0.1
    x1 = inv(z, regularise_noise(e0, reference, sd, gen))
    e1 = 0.5 * x1 + 0.1
    regularise_noise(e1, reference, sd, gen)  # its estimate is superseded by the average, the rolls are drawn
    expected = inv(z, regularise_noise((e0 + e1) / 2, reference, sd, gen))
    assert (out - expected).abs().max() < 1e-12
    assert (out - inv(z, (e0 + e1) / 2)).abs().max() > 1e-6  # the regularisation does something


# ---------------------------------------------------------------------------------------------
# The regularisation losses on hand cases

def test_autocorrelation_loss_of_ones_counts_channels_levels_and_directions():
    import torch

    ones = torch.ones(1, 4, 16, 16, dtype=torch.float64)
    # every mean(x * roll(x)) is 1: 4 channels x 2 levels (16, then 8: stop) x 2 directions
    assert float(autocorrelation_loss(ones, torch.Generator().manual_seed(0))) == 16.0
    tall = torch.ones(1, 1, 32, 8, dtype=torch.float64)  # the pyramid stops on the height (32, 16, 8)
    assert float(autocorrelation_loss(tall, torch.Generator().manual_seed(0))) == 6.0


def test_patch_kl_loss_matches_the_gaussian_kl_per_patch():
    import torch

    sign = torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2, dtype=torch.float64)  # one 4x4 patch, mean 0
    eps = (0.5 * sign).repeat(1, 4, 2, 2)  # 4 channels, 2x2 patches of 4x4
    ref = (2.0 * sign).repeat(1, 4, 2, 2)
    v0, v1 = 0.25 * 16 / 15, 4.0 * 16 / 15  # unbiased variances over 16 values
    per = math.log((v1 + 1e-6) / (v0 + 1e-6)) + v0 / (v1 + 1e-6) - 1
    assert float(patch_kl_loss(eps, ref)) == pytest.approx(16 * per, rel=1e-12)  # 4 patches x 4 channels
    assert float(patch_kl_loss(ref, ref)) == pytest.approx(0.0, abs=1e-5)  # only the 1e-6 terms


def test_regularise_noise_is_the_identity_without_steps_and_moves_towards_the_reference_with_kl():
    import torch

    eps = latents(10)
    off = CorruptParams.from_preset("renoise-fast")
    assert torch.equal(regularise_noise(eps, None, off), eps)
    kl_only = settings(lambda_kl=0.065, num_reg_steps=4)
    reference = 0.1 * latents(11)
    moved = regularise_noise(eps, reference, kl_only)
    assert float(patch_kl_loss(moved, reference)) < float(patch_kl_loss(eps, reference))
    assert inverse_step(eps, eps, A_CUR, A_NEXT).shape == eps.shape
