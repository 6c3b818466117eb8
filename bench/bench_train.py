"""Detector training speed: our trainer vs a bare PyTorch loop doing the same work.

Two ratios, each measured interleaved in one run (ours / bare, lower is better; goal <= 1.05):

1. step: `engines.train_detector.train_step` (with our AdamW param groups, lr set per step, the per-step
   RNG fork and loss.item() as the trainer does) vs a bare loop (`torch.optim.AdamW(model.parameters())`,
   forward, `F.cross_entropy(weight, ignore_index=255)`, zero_grad, backward, step, loss.item()) on the
   SAME batch tensors and the same starting weights. The bare loop runs twice: with AdamW's defaults
   ("bare") and with `fused=True` ("bare-fused", the kernel our trainer picks), so the optimiser choice
   and our own overhead can be told apart.
2. trainer: a whole `train_detector` run, time per step measured between its metric rows (so it
   includes the data pipeline: balanced sampling, PIL crops, flips, colour jitter, building tensors,
   prefetched in a background thread; the lr schedule, metric rows and metrics.jsonl writes), vs the
   bare loop on fixed, prebuilt tensors (no data pipeline at all). Model building, the final evaluation
   and checkpoint writing are excluded from both. Reported as wall time and as process CPU time (all
   threads): on a busy machine the background thread cannot overlap, and CPU time shows the work added.

    .venv/bin/python bench/bench_train.py [--arch tiny|upernet-convnext-tiny|upernet-swin-tiny] [--crop 128]
        [--batch 4] [--steps 30] [--repeats 5] [--threads N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.train_detector import (IGNORE, BalancedSampler, TrainConfig, TrainSample, _step_rng,  # noqa: E402
                                    _step_seed, build_model, lr_at, make_optimizer, to_tensors, train_detector,
                                    train_step)


def synthetic_set(n: int, size: int, seed: int) -> list[TrainSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = int(rng.integers(size, size * 3 // 2))
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:side, :side]
        r = rng.uniform(side / 16, side / 6)
        cy, cx = rng.uniform(r, side - r, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[mask] = (235, 40, 220)
        out.append(TrainSample(img, mask, "synthetic", f"s{i}"))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    train = synthetic_set(32, args.crop, 0)
    val = synthetic_set(4, args.crop, 1)
    cfg = TrainConfig(arch=args.arch, steps=args.steps, batch_size=args.batch, crop=args.crop, eval_every=10**6,
                      lr=6e-5, seed=0)
    model, spec = build_model(cfg)
    model = model.to(dev)
    sampler = BalancedSampler(train, cfg)
    x, y = to_tensors(*sampler.batch(0), spec, dev)
    cw = torch.tensor([1.0, 3.0], device=dev)
    bare = {}
    for name, kw in (("bare", {}), ("bare-fused", {"fused": True})):
        m = copy.deepcopy(model)
        bare[name] = (m, torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw))
    ours_opt = make_optimizer(model, cfg)
    cuda_index = (torch.device(dev).index or 0) if dev.startswith("cuda") else None

    def ours_steps(n: int) -> float:
        sync(dev)
        t0 = time.perf_counter()
        for step in range(n):
            for g in ours_opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            with _step_rng(_step_seed(cfg.seed, step), cuda_index):
                float(train_step(model, ours_opt, x, y, cw))
        sync(dev)
        return (time.perf_counter() - t0) / n

    def bare_steps(name: str, n: int, cpu: list | None = None) -> float:
        bare_model, opt = bare[name]
        sync(dev)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(n):
            logits = bare_model(pixel_values=x).logits
            loss = F.cross_entropy(logits, y, weight=cw, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        sync(dev)
        if cpu is not None:
            cpu.append((time.process_time() - c0) / n)
        return (time.perf_counter() - t0) / n

    def trainer_run(cpu: list) -> float:
        stamps = []
        with tempfile.TemporaryDirectory() as out:
            train_detector(cfg, train, val, out, device=dev, log=lambda row: (
                sync(dev), stamps.append((row["step"], time.perf_counter(), time.process_time()))))
        (s0, t0, c0), (s1, t1, c1) = stamps[2], stamps[-2]  # skip warm-up steps and the last row (after the evaluation)
        cpu.append((c1 - c0) / (s1 - s0))
        return (t1 - t0) / (s1 - s0)

    ours_steps(3), bare_steps("bare", 3), bare_steps("bare-fused", 3)  # warm-up
    wall = {k: [] for k in ("step", "bare", "bare-fused", "trainer", "t-bare", "t-bare-fused")}
    cpu = {k: [] for k in ("trainer", "t-bare", "t-bare-fused")}
    for i in range(args.repeats):  # interleaved, the order rotating every repeat
        jobs = [lambda: wall["step"].append(ours_steps(args.steps)),
                lambda: wall["bare"].append(bare_steps("bare", args.steps)),
                lambda: wall["bare-fused"].append(bare_steps("bare-fused", args.steps))]
        for fn in jobs[i % 3:] + jobs[:i % 3]:
            fn()
    for i in range(args.repeats):
        jobs = [lambda: wall["trainer"].append(trainer_run(cpu["trainer"])),
                lambda: wall["t-bare"].append(bare_steps("bare", args.steps, cpu["t-bare"])),
                lambda: wall["t-bare-fused"].append(bare_steps("bare-fused", args.steps, cpu["t-bare-fused"]))]
        for fn in jobs[i % 3:] + jobs[:i % 3]:
            fn()
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"arch={args.arch} params={params / 1e6:.2f}M crop={args.crop} batch={args.batch} steps/measure={args.steps} "
          f"repeats={args.repeats} device={dev} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("bare = torch.optim.AdamW defaults; bare-fused = AdamW(fused=True), what our trainer uses on CPU/CUDA")
    print(f"step (same batch tensors): train_step {med['step'] * 1e3:.1f} ms/step; bare {med['bare'] * 1e3:.1f}, "
          f"bare-fused {med['bare-fused'] * 1e3:.1f}; ratio ours/bare = {med['step'] / med['bare']:.3f}, "
          f"ours/bare-fused = {med['step'] / med['bare-fused']:.3f}")
    print(f"full trainer (incl. data pipeline) {med['trainer'] * 1e3:.1f} ms/step vs bare {med['t-bare'] * 1e3:.1f}, "
          f"bare-fused {med['t-bare-fused'] * 1e3:.1f} (prebuilt tensors): ratio ours/bare = "
          f"{med['trainer'] / med['t-bare']:.3f}, ours/bare-fused = {med['trainer'] / med['t-bare-fused']:.3f}")
    print(f"full trainer CPU time (all threads) {cmed['trainer'] * 1e3:.1f} ms/step vs bare {cmed['t-bare'] * 1e3:.1f}, "
          f"bare-fused {cmed['t-bare-fused'] * 1e3:.1f}: ratio ours/bare = {cmed['trainer'] / cmed['t-bare']:.3f}, "
          f"ours/bare-fused = {cmed['trainer'] / cmed['t-bare-fused']:.3f}")
    print(f"load average during the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
