"""Learning-rate sweep for a from-scratch detector: which lr learns? (the measurement behind
`engines.training.recipes.SCRATCH_LR`).

The task (as in the measurement that found the problem): 24 training images, 96-127 px, blocky random
texture with one obvious solid square (side 16-40 px, a random bright colour) labelled as the artifact;
8 held-out images made the same way with other seeds. `tiny` arch (random init), the balanced recipe,
crop 96, batch 4, 80 steps, poly decay, evaluated on the held-out images at the end (artifact
threshold 0.5, native size). Prints held-out artifact IoU and 2-class mIoU per lr and seed.

    .venv/bin/python bench/lr_sweep.py [--lrs 6e-5,1e-4,3e-4,1e-3,3e-3,1e-2] [--seeds 0,1] [--steps 80]
        [--arch tiny] [--crop 96] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.training.detector import TrainSample, train_detector  # noqa: E402
from engines.training.recipes import resolve_recipe  # noqa: E402


def square_sample(seed: int, name: str) -> TrainSample:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(96, 128))
    blocks = rng.integers(30, 200, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    img = np.kron(blocks, np.ones((8, 8, 1)))[:size, :size] + rng.normal(0, 10, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    side = int(rng.integers(16, 41))
    y, x = (int(v) for v in rng.integers(0, size - side, 2))
    mask = np.zeros((size, size), bool)
    mask[y:y + side, x:x + side] = True
    img[mask] = rng.integers(210, 256, 3)
    return TrainSample(img, mask, "human", name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", default="6e-5,1e-4,3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = [square_sample(i, f"t{i}") for i in range(24)]
    val = [square_sample(1000 + i, f"v{i}") for i in range(8)]
    print(f"arch={args.arch} steps={args.steps} crop={args.crop} batch=4 train=24 val=8 recipe=balanced "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'lr':>8} {'seed':>4} {'art IoU':>8} {'mIoU':>6}")
    summary = {}
    for lr in [float(v) for v in args.lrs.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            cfg = resolve_recipe("balanced", arch=args.arch, lr=lr, steps=args.steps, batch_size=4, crop=args.crop,
                                 eval_every=args.steps, seed=seed)
            with tempfile.TemporaryDirectory() as out:
                result = train_detector(cfg, train, val, out, num_workers=0)
            row = result.history[-1]
            summary.setdefault(lr, []).append((row["artifact_iou"], row["miou"]))
            print(f"{lr:>8.0e} {seed:>4} {row['artifact_iou']:>8.3f} {row['miou']:>6.3f}", flush=True)
    print("mean over seeds:")
    for lr, values in summary.items():
        print(f"{lr:>8.0e} artifact IoU {statistics.mean(v[0] for v in values):.3f}  "
              f"mIoU {statistics.mean(v[1] for v in values):.3f}")


if __name__ == "__main__":
    main()
