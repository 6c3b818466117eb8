"""Detector training speed: our trainer vs a bare PyTorch loop doing the same work.

Two ratios, each measured interleaved in one run (ours / bare, lower is better; goal <= 1.05):

1. step: `engines.training.detector.train_step` (with our AdamW param groups, lr set per step, the per-step
   RNG fork and loss.item() as the trainer does) vs a bare loop (`torch.optim.AdamW(model.parameters())`,
   forward, `F.cross_entropy(weight, ignore_index=255)`, zero_grad, backward, step, loss.item()) on the
   SAME batch tensors and the same starting weights. The bare loop runs twice: with AdamW's defaults
   ("bare") and with `fused=True` ("bare-fused", the kernel our trainer picks), so the optimiser choice
   and our own overhead can be told apart. The three alternate in blocks of `--block` steps for
   `--rounds` rounds (the order rotating), and the ratio reported is the median of the per-round ratios
   of wall time and of process CPU time: on a shared machine the load changes within seconds, and
   comparing neighbouring blocks cancels it.
2. trainer: a whole `train_detector` run, time per step measured between its metric rows (so it
   includes the data pipeline: balanced sampling, PIL crops, flips, colour jitter, building tensors,
   through the DataLoader with `--workers` worker processes; the lr schedule, metric rows and
   metrics.jsonl writes), vs the bare loop on fixed, prebuilt tensors (no data pipeline at all). Model
   building, the final evaluation and checkpoint writing are excluded from both. Reported as wall time
   and as process CPU time (this process; workers excluded).

    .venv/bin/python bench/bench_train.py [--arch tiny|upernet-convnext-tiny|upernet-swin-tiny] [--crop 128]
        [--batch 4] [--steps 30] [--repeats 5] [--rounds 30] [--block 4] [--threads N] [--workers 0]
        [--device cpu|cuda]
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
from engines.training.detector import (IGNORE, BalancedSampler, TrainConfig, TrainSample,  # noqa: E402
                                    build_model, lr_at, make_optimizer, to_tensors, train_detector, train_step)
from engines.training.resume import step_rng, step_seed  # noqa: E402


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
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
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

    def ours_steps(n: int, cpu: list | None = None) -> float:
        sync(dev)
        c0 = time.process_time()
        t0 = time.perf_counter()
        for step in range(n):
            for g in ours_opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            with step_rng(step_seed(cfg.seed, step), cuda_index):
                float(train_step(model, ours_opt, x, y, cw))
        sync(dev)
        if cpu is not None:
            cpu.append((time.process_time() - c0) / n)
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
            train_detector(cfg, train, val, out, device=dev, num_workers=args.workers, log=lambda row: (
                sync(dev), stamps.append((row["step"], time.perf_counter(), time.process_time()))))
        (s0, t0, c0), (s1, t1, c1) = stamps[2], stamps[-2]  # skip warm-up steps and the last row (after the evaluation)
        cpu.append((c1 - c0) / (s1 - s0))
        return (t1 - t0) / (s1 - s0)

    ours_steps(3), bare_steps("bare", 3), bare_steps("bare-fused", 3)  # warm-up
    wall = {k: [] for k in ("trainer", "t-bare", "t-bare-fused")}
    cpu = {k: [] for k in ("trainer", "t-bare", "t-bare-fused")}
    step_ratios = {k: [] for k in ("wall-bare", "wall-fused", "cpu-bare", "cpu-fused")}
    step_ms = {k: [] for k in ("ours", "bare", "bare-fused")}
    for i in range(args.rounds):  # neighbouring blocks, the order rotating every round
        w, c = {}, {k: [] for k in ("ours", "bare", "bare-fused")}
        jobs = [lambda: w.__setitem__("ours", ours_steps(args.block, c["ours"])),
                lambda: w.__setitem__("bare", bare_steps("bare", args.block, c["bare"])),
                lambda: w.__setitem__("bare-fused", bare_steps("bare-fused", args.block, c["bare-fused"]))]
        for fn in jobs[i % 3:] + jobs[:i % 3]:
            fn()
        step_ratios["wall-bare"].append(w["ours"] / w["bare"])
        step_ratios["wall-fused"].append(w["ours"] / w["bare-fused"])
        step_ratios["cpu-bare"].append(c["ours"][0] / c["bare"][0])
        step_ratios["cpu-fused"].append(c["ours"][0] / c["bare-fused"][0])
        for k in step_ms:
            step_ms[k].append(w[k])
    for i in range(args.repeats):
        jobs = [lambda: wall["trainer"].append(trainer_run(cpu["trainer"])),
                lambda: wall["t-bare"].append(bare_steps("bare", args.steps, cpu["t-bare"])),
                lambda: wall["t-bare-fused"].append(bare_steps("bare-fused", args.steps, cpu["t-bare-fused"]))]
        for fn in jobs[i % 3:] + jobs[:i % 3]:
            fn()
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    r = {k: statistics.median(v) for k, v in step_ratios.items()}
    ms = {k: statistics.median(v) * 1e3 for k, v in step_ms.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"arch={args.arch} params={params / 1e6:.2f}M crop={args.crop} batch={args.batch} steps/measure={args.steps} "
          f"repeats={args.repeats} rounds={args.rounds}x{args.block} steps device={dev} "
          f"threads={torch.get_num_threads()} workers={args.workers} torch={torch.__version__}")
    print("bare = torch.optim.AdamW defaults; bare-fused = AdamW(fused=True), what our trainer uses on CPU/CUDA")
    print(f"step (same batch tensors): train_step {ms['ours']:.1f} ms/step; bare {ms['bare']:.1f}, "
          f"bare-fused {ms['bare-fused']:.1f} (medians of {args.block}-step blocks)")
    print(f"step ratio (median of per-round ratios): wall ours/bare = {r['wall-bare']:.3f}, ours/bare-fused = "
          f"{r['wall-fused']:.3f}; CPU time ours/bare = {r['cpu-bare']:.3f}, ours/bare-fused = {r['cpu-fused']:.3f}")
    print(f"full trainer (incl. data pipeline) {med['trainer'] * 1e3:.1f} ms/step vs bare {med['t-bare'] * 1e3:.1f}, "
          f"bare-fused {med['t-bare-fused'] * 1e3:.1f} (prebuilt tensors): ratio ours/bare = "
          f"{med['trainer'] / med['t-bare']:.3f}, ours/bare-fused = {med['trainer'] / med['t-bare-fused']:.3f}")
    print(f"full trainer CPU time (this process) {cmed['trainer'] * 1e3:.1f} ms/step vs bare {cmed['t-bare'] * 1e3:.1f}, "
          f"bare-fused {cmed['t-bare-fused'] * 1e3:.1f}: ratio ours/bare = {cmed['trainer'] / cmed['t-bare']:.3f}, "
          f"ours/bare-fused = {cmed['trainer'] / cmed['t-bare-fused']:.3f}")
    print(f"load average during the run: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
