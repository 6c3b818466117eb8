"""Studio generation engine vs a bare diffusers pipeline call: time ratio and pixel equality.

Both run the same loaded pipeline, prompt, steps, size and seed, interleaved in one process so
that drift (thermal, caches) hits both equally. Prints the median-time ratio (goal <= 1.03).

    .venv/bin/python bench/bench_generate.py [--model demo|PATH] [--steps 20] [--size 256] [--repeats 7]
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
from engines.generation.generate import GenerateParams, TextToImage, to_uint8  # noqa: E402
from engines.models import load_text2image, pick_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = args.device or (pick_device() if args.model != "demo" else "cpu")
    with tempfile.TemporaryDirectory() as data_dir:
        loaded = load_text2image(args.model, data_dir=data_dir, device=device,
                                 dtype="float16" if device == "cuda" and args.model != "demo" else "float32")
        engine = TextToImage(loaded)
        pipe = loaded.model
        params = GenerateParams(prompt="a photo of a hand holding a cup", seed=1234, num_inference_steps=args.steps,
                                guidance_scale=7.5, width=args.size, height=args.size, num_images=args.count)

        def studio():
            return [im.rgb for im in engine.generate(params, progress=lambda s, t: None, should_stop=lambda: False).images]

        def bare():
            gens = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(args.count)]
            with torch.inference_mode():
                out = pipe(prompt=params.prompt, num_inference_steps=args.steps, guidance_scale=7.5, width=args.size,
                           height=args.size, num_images_per_prompt=args.count, generator=gens, output_type="np")
            return to_uint8(out.images)

        studio(), bare()  # warm-up
        t_studio, t_bare, same = [], [], True
        for i in range(args.repeats):
            order = (studio, bare) if i % 2 == 0 else (bare, studio)
            results = {}
            for fn in order:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                results[fn.__name__] = fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                (t_studio if fn is studio else t_bare).append(time.perf_counter() - t0)
            same &= all(np.array_equal(a, b) for a, b in zip(results["studio"], results["bare"]))
        ms, mb = statistics.median(t_studio), statistics.median(t_bare)
        print(f"model={args.model} device={device} steps={args.steps} size={args.size} count={args.count} repeats={args.repeats}")
        print(f"studio engine median {ms * 1000:.1f} ms, bare diffusers pipeline median {mb * 1000:.1f} ms")
        print(f"ratio studio/bare = {ms / mb:.3f} (goal <= 1.03); pixels identical: {same}")


if __name__ == "__main__":
    main()
