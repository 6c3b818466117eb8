"""Peak memory of detector training on a large set: streamed FileSamples vs the same images held in memory.

2,000 images of 512 x 512 (blocky texture with one square artifact each; PNG files written once to
--dir) are trained on with the tiny arch for a few steps (crop 256, batch 4) and evaluated on 16 held-out
files. Each mode runs in its own fresh process and reports its peak resident set size (ru_maxrss of the
process, plus its DataLoader workers when there are any):

- stream: `engines.training.detector.FileSample`s (what the studio passes): images are read per batch.
- memory: the same images loaded as `TrainSample` arrays first (how the studio trained before):
  2,000 x 512 x 512 x 3 bytes = 1.5 GiB of pixels plus the masks.
- imports: only importing torch, transformers and the trainer (the floor every mode starts from).

    .venv/bin/python bench/bench_train_rss.py [--images 2000] [--size 512] [--dir /tmp/rss-set]
        [--modes stream,memory] [--workers 0] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_set(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = folder / f"{i:05d}.png", folder / f"{i:05d}-mask.png"
        if image.is_file() and mask.is_file():
            continue
        rng = np.random.default_rng(i)
        blocks = rng.integers(30, 200, (size // 32 + 1, size // 32 + 1, 3)).astype(np.uint8)
        img = np.kron(blocks, np.ones((32, 32, 1), np.uint8))[:size, :size]
        side = int(rng.integers(size // 16, size // 4))
        y, x = (int(v) for v in rng.integers(0, size - side, 2))
        m = np.zeros((size, size), np.uint8)
        m[y:y + side, x:x + side] = 255
        img[m > 0] = (235, 40, 220)
        Image.fromarray(img).save(image)
        Image.fromarray(m).save(mask)


def run_mode(mode: str, folder: Path, n: int, steps: int, workers: int) -> dict:
    import torch

    from engines.training.detector import FileSample, TrainConfig, TrainSample, train_detector

    torch.set_num_threads(1)
    if mode == "imports":
        from transformers import UperNetForSemanticSegmentation  # noqa: F401

        return {"mode": mode, "images": 0, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                 / 1024, 1), "worker_peak_rss_mib": 0.0,
                "load_s": 0.0, "total_s": 0.0}
    files = [FileSample(str(folder / f"{i:05d}.png"), (str(folder / f"{i:05d}-mask.png"),), "human", f"{i}")
             for i in range(n)]
    train, val = files[16:], files[:16]
    t0 = time.perf_counter()
    if mode == "memory":
        train = [TrainSample(*s.load(), s.source, s.name) for s in train]
    loaded = time.perf_counter() - t0
    cfg = TrainConfig(arch="tiny", steps=steps, batch_size=4, crop=256, input_size=512, lr=3e-3, eval_every=steps)
    with tempfile.TemporaryDirectory() as out:
        train_detector(cfg, train, val, out, num_workers=workers)
    seconds = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"mode": mode, "images": n, "peak_rss_mib": round(own, 1), "worker_peak_rss_mib": round(kids, 1),
            "load_s": round(loaded, 1), "total_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "artifact-studio-rss-set"))
    ap.add_argument("--modes", default="imports,stream,memory")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = ap.parse_args()
    folder = Path(args.dir) / f"{args.images}x{args.size}"
    if args.mode:
        print(json.dumps(run_mode(args.mode, folder, args.images, args.steps, args.workers)))
        return
    t0 = time.perf_counter()
    make_set(folder, args.images, args.size)
    print(f"{args.images} images of {args.size}x{args.size} in {folder} ({time.perf_counter() - t0:.0f} s to write); "
          f"pixels in memory would be {args.images * args.size * args.size * 3 / 2**30:.2f} GiB")
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--images", str(args.images), "--size",
                              str(args.size), "--dir", args.dir, "--workers", str(args.workers), "--steps",
                              str(args.steps)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['mode']:>6}: peak RSS {row['peak_rss_mib']:.0f} MiB (workers {row['worker_peak_rss_mib']:.0f} "
              f"MiB), loading {row['load_s']} s, total {row['total_s']} s")


if __name__ == "__main__":
    main()
