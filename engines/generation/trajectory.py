"""The experimental trajectory map: how much the predicted clean latent moves in late denoising steps.

After Menn et al. (WACV 2025), who link large step-to-step changes of the predicted clean image in
late denoising steps to artifacts. `TrajectoryRecorder` collects the predicted x0 per step during a
generation (engines.generation.generate); `trajectory_heatmap` turns them into a float32 [H, W] map in [0, 1]
(stored and shown like a detector heatmap, engines.detection.detect). Training-free; not a trained detector.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class TrajectoryRecorder:
    """Predicted clean latents x0 per step, recovered from consecutive latents (for the trajectory map).

    With a deterministic DDIM update, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps and
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps share x0 and eps, so two consecutive latents
    give x0 exactly. For other schedulers this is an approximation (documented as experimental).
    """

    KEEP = 8

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.previous = None
        self.x0: list[np.ndarray] = []

    def _alpha(self, index: int) -> float:
        timesteps = self.scheduler.timesteps
        cumprod = self.scheduler.alphas_cumprod
        if index >= len(timesteps):
            final = getattr(self.scheduler, "final_alpha_cumprod", cumprod[0])
            return float(final)
        return float(cumprod[int(timesteps[index])])

    def add(self, step: int, latents) -> None:
        current = latents.detach().float().cpu().numpy()
        if self.previous is not None:
            a_t, a_prev = self._alpha(step), self._alpha(step + 1)
            denom = np.sqrt(a_prev) * np.sqrt(1 - a_t) - np.sqrt(a_t) * np.sqrt(1 - a_prev)
            if abs(denom) > 1e-8:
                x0 = (np.sqrt(1 - a_t) * current - np.sqrt(1 - a_prev) * self.previous) / denom
                self.x0 = (self.x0 + [x0])[-self.KEEP:]
        self.previous = current

    def heatmaps(self, height: int, width: int) -> list[np.ndarray | None]:
        if len(self.x0) < 2:
            return [None] * (0 if self.previous is None else self.previous.shape[0])
        return [trajectory_heatmap([x[i] for x in self.x0], height, width) for i in range(self.x0[0].shape[0])]


def trajectory_heatmap(x0_predictions: Sequence[np.ndarray], height: int, width: int, last: int = 5) -> np.ndarray:
    """Heatmap of how much the predicted clean latent changes between consecutive late steps.

    `x0_predictions` are float latents C x h x w, one per step; the mean absolute change over the
    channels and the last `last` step pairs is upsampled to height x width and normalised by its 99th
    percentile to [0, 1]. Experimental, not a trained detector.
    """
    if len(x0_predictions) < 2:
        raise ValueError("The trajectory map needs at least 2 denoising steps.")
    preds = [np.asarray(p, np.float32) for p in x0_predictions[-(last + 1):]]
    change = np.mean([np.abs(b - a).mean(axis=0) for a, b in zip(preds[:-1], preds[1:])], axis=0)
    scale = float(np.percentile(change, 99)) or 1.0
    return np.clip(_resize_float(change / scale, height, width), 0.0, 1.0).astype(np.float32)


def _resize_float(values: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if values.shape == (h, w):
        return values.astype(np.float32)
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize((w, h), Image.BILINEAR), np.float32)
