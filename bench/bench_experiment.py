"""How long would the paper profile take here? Measures one detector training step of the paper's detector
(UperNet ConvNeXt-T by default) on this device and projects the experiment runner's paper profile.

    .venv/bin/python bench/bench_experiment.py [--config assets/experiments/paper.toml] [--device cpu]
        [--batch 2] [--crop 512] [--steps 2] [--unet-seconds S] [--sources 1000] [--speedup 100]

Prints the measured seconds per step (scaled linearly to the config's batch size when --batch is smaller),
the number of training steps and UNet evaluations the protocol needs, and the projected time on this
device; `--speedup F` also prints that time divided by F, an ESTIMATE for a device F times faster (e.g. a
datacenter GPU against 2 CPU cores): label it so wherever you quote it. `--unet-seconds` is the time of one
UNet evaluation of the corruption model at 512 px (not measured here: PITFALLS has 7.6 s for a batch of 2
of an SD-1.5-sized UNet on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def protocol_cost(config, sources: int) -> dict:
    """Training steps (at the config's batch size) and UNet evaluations of the corruption, per the plan."""
    from studio.experiments.plan import plan

    units = plan(config)
    detector_steps = sum(u.params["steps"] for u in units if u.kind == "detector")
    selector_steps = sum(u.params["steps"] for u in units if u.kind == "selector")
    # ReNoise (engines/corruption/renoise.py, N=50: every inverted step is "early"): the DDIM estimate and one renoise
    # estimate per step, plus the KL reference eps(z0) when the noise regularisation is on (renoise-sd)
    per_step = 3 if config.get("corruption.preset") == "renoise-sd" else 2
    inversions = {}  # inverted steps k -> k; methods inverting the same k share one cached inversion
    resample = 0
    for u in units:
        if u.kind != "corrupt":
            continue
        p = u.params
        k = p["steps"] if p["method"] in ("proposed", "direct") else p["baseline_steps"]
        if p["method"] != "direct":
            inversions[k] = k
            resample += k
    # + the uncorrupted resample of each inversion, which every result is measured against (cached per inversion)
    unet_per_image = per_step * sum(inversions.values()) + resample + sum(inversions.values())
    return {"detector_steps": detector_steps, "selector_steps": selector_steps,
            "unet_calls_per_source": unet_per_image, "unet_calls": unet_per_image * sources}


def measure_step(arch: str, batch: int, crop: int, steps: int, device: str) -> float:
    import numpy as np
    import torch

    from engines.training.detector import TrainConfig, build_model, make_optimizer, to_tensors, train_step

    config = TrainConfig(arch=arch, steps=10, batch_size=batch, crop=crop)
    model, spec = build_model(config)
    model = model.to(device)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, crop, crop, 3), dtype=np.uint8)
    labels = (rng.random((batch, crop, crop)) > 0.9).astype(np.uint8)
    x, y = to_tensors(images, labels, np.ones((batch, 3), np.float32), spec, device)
    weights = torch.tensor([1.0, 1.0], device=device)
    train_step(model, optimizer, x, y, weights)  # warm-up
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        float(train_step(model, optimizer, x, y, weights))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h ({seconds / 86400:.1f} days)"


def main() -> int:
    from studio.experiments.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "assets/experiments/paper.toml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="measured batch (default: the config's)")
    parser.add_argument("--crop", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unet-seconds", type=float, default=None)
    parser.add_argument("--sources", type=int, default=1000, help="source images corrupted (the paper's HPS sample)")
    parser.add_argument("--speedup", type=float, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    config = load_config(args.config, check_files=False)
    target_batch, crop = config.get("detector.batch_size"), args.crop or config.get("detector.crop")
    batch = args.batch or target_batch
    arch = config.get("model.architecture")
    cost = protocol_cost(config, args.sources)
    seconds = measure_step(arch, batch, crop, args.steps, args.device)
    per_step = seconds * target_batch / batch
    steps = cost["detector_steps"] + cost["selector_steps"]
    print(f"measured: {arch} train step, batch {batch}, crop {crop}, {args.device}, {args.threads} thread(s): "
          f"{seconds:.2f} s (median of {args.steps})")
    if batch != target_batch:
        print(f"scaled linearly to the config's batch {target_batch}: {per_step:.2f} s per step")
    print(f"protocol: {cost['selector_steps']:,} selector + {cost['detector_steps']:,} detector steps; "
          f"{cost['unet_calls_per_source']} UNet evaluations per source image x {args.sources:,} sources")
    train_time = steps * per_step
    print(f"projected training time on this device: {_hours(train_time)}")
    total = train_time
    if args.unet_seconds:
        corrupt_time = cost["unet_calls"] * args.unet_seconds
        total += corrupt_time
        print(f"projected corruption time at {args.unet_seconds} s per UNet evaluation: {_hours(corrupt_time)}")
    if args.speedup:
        print(f"ESTIMATE for a device {args.speedup:g}x faster (not measured): {_hours(total / args.speedup)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
