"""Click latency of `SamMasker` on a vit_b-sized SAM (random weights, 1024-px input).

(a) warm click (embedding already set: `predict` only) vs cold first click (`set_image` on a new
    image + `predict`), both through SamMasker; also the plain `segment_anything.SamPredictor`
    doing the cold click (set_image + predict), to show what the cache bookkeeping costs (hashing the
    image on the click's path; the disk write happens after the click is answered).
(b) re-open after a restart: a fresh SamMasker over the same disk cache (`set_image` finds the
    embedding on disk) + `predict`, vs the cold click.
Medians over a few repeats, measured in one run; ratios are ours / cold (lower is better). On a busy
machine prefer the median of paired ratios (each of our clicks over the reference click run next to it).

    .venv/bin/python bench/bench_segment.py [--repeats 4] [--clicks 10] [--threads 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.segmentation.segment import SamMasker  # noqa: E402


def make_image(seed: int, height: int = 768, width: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height - 100), rng.integers(0, width - 100)
        image[y:y + rng.integers(50, 300), x:x + rng.integers(50, 400)] = rng.integers(0, 256, 3)
    return np.clip(image.astype(int) + rng.integers(-10, 11, image.shape), 0, 255).astype(np.uint8)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=4, help="cold clicks (distinct images) per method")
    ap.add_argument("--clicks", type=int, default=10, help="warm clicks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from segment_anything import SamPredictor, sam_model_registry

    start = time.perf_counter()
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval().to(args.device)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in sam.parameters()) / 1e6
    images = [make_image(seed) for seed in range(2 * args.repeats)]
    click = [(400, 300)]

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        masker = SamMasker.from_sam(sam, model_id="vit_b-random", cache_dir=cache_dir, device=args.device)
        key_s = time.perf_counter() - start
        reference = SamPredictor(sam)

        def ours_cold(image):
            masker.set_image(image)
            masker.predict(click, [1])

        def ref_cold(image):
            with torch.inference_mode():
                reference.set_image(image)
                reference.predict(np.array(click, float), np.array([1]), multimask_output=True)

        ours_cold(make_image(999))  # warm-up (first-call allocations), not counted
        masker.flush()
        cold, ref = [], []
        for i in range(args.repeats):  # interleaved, alternating who goes first; every image is new to both
            pair = [lambda: cold.append(timed(lambda: ours_cold(images[i]))),
                    lambda: ref.append(timed(lambda: ref_cold(images[args.repeats + i])))]
            for run in (pair if i % 2 == 0 else pair[::-1]):
                run()
                masker.flush()  # the cache file is written after the click was answered; keep it out of ref's time
        assert masker.encoder_calls == args.repeats + 1
        from engines.images import image_digest

        def bookkeeping(image):  # what a cold click does besides the encoder and the decoder
            masker._disk_get(image_digest(image), image.shape[:2])

        fresh = [make_image(500 + i) for i in range(args.clicks)]
        overhead = [timed(lambda: bookkeeping(image)) for image in fresh]
        rng = np.random.default_rng(0)
        warm = [timed(lambda: masker.predict([tuple(rng.integers(0, 700, 2))], [1])) for _ in range(args.clicks)]

        restarted = SamMasker.from_sam(sam, model_id="vit_b-random", cache_dir=cache_dir, device=args.device)

        def reopen(image):
            restarted.set_image(image)
            restarted.predict(click, [1])

        again = [timed(lambda: reopen(images[i])) for i in range(args.repeats)]
        assert restarted.encoder_calls == 0 and restarted.disk_hits == args.repeats
        cache_mb = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.safetensors")) / 1e6 / (args.repeats + 1)

    med = statistics.median
    print(f"SAM vit_b random weights ({params:.1f}M params), 1024-px input, {args.device}, "
          f"{torch.get_num_threads()} threads; image 768x1024")
    print(f"  build {build_s:.1f} s; cache key (state-dict hash, once per masker) {key_s:.2f} s; "
          f"disk entry {cache_mb:.1f} MB")
    print(f"  cold first click, SamPredictor set_image+predict (reference): median {med(ref) * 1e3:8.1f} ms "
          f"over {len(ref)}")
    paired = med([c / r for c, r in zip(cold, ref)])  # adjacent runs share the machine's load of the moment
    print(f"  cold first click, SamMasker set_image+predict:              median {med(cold) * 1e3:8.1f} ms "
          f"over {len(cold)}  (ours/reference {med(cold) / med(ref):.3f}; median of paired ratios {paired:.3f}; "
          f"goal <= 1.05)")
    print(f"  cache bookkeeping on a cold click's path (image hash + disk lookup): median {med(overhead) * 1e3:.1f} ms "
          f"= {med(overhead) / med(ref):.4f} of the reference click (the disk write comes after the answer)")
    print(f"  (a) warm click, SamMasker predict:                          median {med(warm) * 1e3:8.1f} ms "
          f"over {len(warm)}  ratio warm/cold {med(warm) / med(cold):.4f}  (goal <= 0.05)")
    print(f"  (b) re-open after restart, disk hit set_image+predict:      median {med(again) * 1e3:8.1f} ms "
          f"over {len(again)}  ratio reopen/cold {med(again) / med(cold):.4f}")


if __name__ == "__main__":
    main()
