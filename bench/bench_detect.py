"""Detector throughput: batched `ArtifactDetector.predict` vs a plain per-image forward loop, and
overlay rendering time at 2048x2048.

The reference loop does the same work per image with the same model (resize, normalise, forward,
upsample, softmax/sigmoid, resize back) one image at a time, as a straightforward script would.
Both are measured interleaved in one run; the ratio is ours / reference (lower is better).

    .venv/bin/python bench/bench_detect.py [--detector demo|SPEC] [--images 16] [--batch 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.detection.detect import ArtifactDetector, extract_logits, render_overlay  # noqa: E402
from engines.detection.detectors import load_detector  # noqa: E402


def reference_loop(detector: ArtifactDetector, images: list[np.ndarray]) -> list[np.ndarray]:
    spec, model = detector.spec, detector.model
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for im in images:
            small = np.array(Image.fromarray(im).resize((spec.input_size, spec.input_size), Image.BILINEAR))
            x = (torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255 - mean) / std
            logits = extract_logits(model(pixel_values=x))
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
            p = torch.softmax(logits, 1)[0, spec.channel] if spec.activation == "softmax" else torch.sigmoid(logits[0, spec.channel])
            out.append(np.asarray(Image.fromarray(p.numpy()).resize((im.shape[1], im.shape[0]), Image.BILINEAR)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detector", default="demo")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(300, 700)), int(rng.integers(300, 700)), 3), dtype=np.uint8)
              for _ in range(args.images)]
    with tempfile.TemporaryDirectory() as data_dir:
        detector = ArtifactDetector(load_detector(args.detector, data_dir=data_dir))
        ours = lambda: [h.scores for h in detector.predict(images, batch_size=args.batch)]  # noqa: E731
        ref = lambda: reference_loop(detector, images)  # noqa: E731
        ours(), ref()
        t_ours, t_ref = [], []
        for i in range(args.repeats):
            for name, fn in ((("ours", ours), ("ref", ref)) if i % 2 == 0 else (("ref", ref), ("ours", ours))):
                t0 = time.perf_counter()
                result = fn()
                (t_ours if name == "ours" else t_ref).append(time.perf_counter() - t0)
                if name == "ours":
                    a = result
                else:
                    b = result
            diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        print(f"detector={args.detector} images={args.images} batch={args.batch} input={detector.spec.input_size} "
              f"threads={torch.get_num_threads()}")
        print(f"batched predict median {mo:.3f} s, per-image reference loop median {mr:.3f} s, "
              f"ratio ours/reference = {mo / mr:.3f}; max |difference| = {diff:.2e}")

    big = rng.integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    scores = rng.random((2048, 2048), dtype=np.float32)
    render_overlay(big, scores)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        render_overlay(big, scores, colormap="turbo", alpha=0.6, threshold=0.5, contours=True)
        times.append(time.perf_counter() - t0)
    print(f"overlay 2048x2048 (turbo, threshold, contours): median {statistics.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
