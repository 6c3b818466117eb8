"""engines.training.feedback: DDPO's policy log-probability, clipped objective, advantages, and a run on the demo pipeline."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from engines.classification import classify as C
from engines.training.feedback import (FeedbackConfig, PromptStats, _Policy, ddim_step_with_logprob, ddpo_loss,
                                   tune_feedback)


def scheduler(prediction_type="epsilon"):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_policy_step_is_diffusers_ddim_at_eta_1_and_its_log_prob_is_the_gaussian_density(prediction_type):
    s = scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(3))
    for t in s.timesteps:
        ref = s.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        _, logp = ddim_step_with_logprob(s, eps, int(t), x, eta=1.0, prev_sample=ref)
        # the same mean and sigma, rebuilt from the scheduler's own zero-noise step and variance
        mean = s.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(noise)).prev_sample
        prev_t = int(t) - 100
        std = math.sqrt(s._get_variance(int(t), prev_t)) if prev_t >= 0 else \
            math.sqrt((1 - s.final_alpha_cumprod) / (1 - s.alphas_cumprod[int(t)]) * (1 - s.alphas_cumprod[int(t)] / s.final_alpha_cumprod))
        assert torch.allclose(ref, mean + std * noise, atol=1e-5)
        expected = torch.distributions.Normal(mean, std).log_prob(ref).mean(dim=(1, 2, 3))
        assert torch.allclose(logp, expected, atol=1e-4)
    # drawing instead of scoring: the drawn sample scores as its own log-prob
    prev, logp = ddim_step_with_logprob(s, eps, int(s.timesteps[0]), x, eta=1.0, generator=torch.Generator().manual_seed(1))
    _, again = ddim_step_with_logprob(s, eps, int(s.timesteps[0]), x, eta=1.0, prev_sample=prev)
    assert torch.allclose(logp, again)


def test_the_clipped_surrogate_and_per_prompt_advantages():
    old = torch.zeros(3)
    new = torch.tensor([0.5, -0.5, 0.0])
    adv = torch.tensor([1.0, 1.0, -2.0])
    ratio = new.exp()
    expected = torch.stack([torch.maximum(-a * r, -a * r.clamp(0.8, 1.2)) for a, r in zip(adv, ratio)]).mean()
    assert ddpo_loss(new, old, adv, 0.2) == pytest.approx(float(expected))
    assert float(ddpo_loss(new, old, adv, 0.2)) == pytest.approx((-1.2 - math.exp(-0.5) + 2.0) / 3)
    stats = PromptStats(min_count=3)
    first = stats.advantages(["a", "a", "b"], np.array([1.0, 3.0, 2.0]))  # too few per prompt: batch statistics
    assert first == pytest.approx((np.array([1.0, 3.0, 2.0]) - 2.0) / (np.std([1.0, 3.0, 2.0]) + 1e-8))
    second = stats.advantages(["a", "b"], np.array([5.0, 0.0]))  # "a" now has 3 rewards: its own statistics
    assert second[0] == pytest.approx((5.0 - 3.0) / (np.std([1.0, 3.0, 5.0]) + 1e-8))
    assert second[1] == pytest.approx((0.0 - 2.5) / (2.5 + 1e-8))


@pytest.fixture()
def head(tmp_path):
    torch.manual_seed(0)
    spec = C.ClassifierSpec(family="head", classes=({"name": "blur", "definition": ""}, {"name": "glow", "definition": ""}),
                            input_size=32)
    folder = C.save_head(C.build_crop_net(2, 8), spec, tmp_path / "head", width=8)
    return C.ArtifactClassifier(C.load_classifier(f"head:{folder}"))


def test_a_positive_advantage_makes_its_trajectory_more_likely_and_a_negative_one_less(text2image):
    from engines.training.lora import add_lora_adapter

    pipe = text2image.loaded.model
    config = FeedbackConfig(num_inference_steps=3, rank=4, alpha=4.0, lr=1e-2, clip_range=0.5, width=64, height=64)
    for sign in (1.0, -1.0):
        params = add_lora_adapter(pipe.unet, config)
        try:
            policy = _Policy(pipe, config, 64, 64)
            _, traj, old, ts = policy.sample("a cat", 3)
            optimizer = torch.optim.SGD(params, lr=config.lr)

            def logps():
                out = []
                for j, t in enumerate(ts):
                    eps = policy.eps(traj[j], t, "a cat")
                    out.append(ddim_step_with_logprob(policy.scheduler, eps, int(t), traj[j], eta=1.0,
                                                      prev_sample=traj[j + 1])[1])
                return torch.cat(out)

            before = logps()
            assert torch.allclose(before, old, atol=1e-5)  # sampling and scoring agree before any update
            loss = sum(ddpo_loss(lp, o, torch.tensor(sign), config.clip_range) for lp, o in zip(before, old))
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                after = logps()
            assert float((after - old).sum()) * sign > 0
        finally:
            pipe.unet.unload_lora()


@pytest.mark.slow
def test_tune_feedback_runs_reports_before_after_and_restores_the_pipeline(text2image, head, tmp_path):
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector
    from engines.training.lora import apply_lora

    pipe = text2image.loaded.model
    detector = ArtifactDetector(load_detector("demo", data_dir=tmp_path / "data"))
    config = FeedbackConfig(steps=2, samples_per_step=2, num_inference_steps=3, width=64, height=64, eval_seeds=(0,),
                            per_prompt_min=2)
    rows = []
    result = tune_feedback(config, text2image.loaded, head, ["a cat", "a dog"], tmp_path / "out",
                           eval_prompts=["a bird"], detector=detector, log=rows.append)
    assert result.steps_done == 2 and not result.stopped and [r["step"] for r in rows] == [1, 2]
    for key in ("classifier_artifact_rate", "classifier_mean_probability", "detector_artifact_rate", "detector_artifact_area"):
        assert 0.0 <= result.before[key] <= 1.0 and 0.0 <= result.after[key] <= 1.0
    assert result.before["images"] == 1 and "DDPO" in result.method
    assert rows[0]["artifact_probability"] == pytest.approx(-rows[0]["reward_mean"])
    assert not getattr(pipe.unet, "peft_config", None)  # the caller's pipeline is restored
    assert all(not p.requires_grad for p in pipe.unet.parameters())
    apply_lora(pipe, result.lora_dir)  # the LoRA is in diffusers' format
    apply_lora(pipe, None)
    stopped = tune_feedback(config, text2image.loaded, head, ["a cat"], tmp_path / "stop", should_stop=lambda: True)
    assert stopped.stopped and stopped.steps_done == 0 and stopped.after == {}
    with pytest.raises(ValueError, match="eta must be in"):
        tune_feedback(FeedbackConfig(eta=0.0), text2image.loaded, head, ["a cat"], tmp_path / "x")
    with pytest.raises(ValueError, match="at least one prompt"):
        tune_feedback(config, text2image.loaded, head, [" "], tmp_path / "x")
