"""Region-corruption previews with a warm inversion cache vs a cold one (engines.corruption.corrupt).

(a) time of `RegionCorruptor.preview` (several seeds, one mask) when the image's inversion is
    already cached (warm: another mask on the same image) vs when it is not (cold: a fresh
    corruptor); ratio warm / cold, goal <= 0.4.
(b) UNet evaluations per preview, counted by the corruptor and by a forward pre-hook on the UNet
    (latents per forward), vs the theoretical counts:
        cold = inversion + (seeds + 1) * k * cfg   (the uncorrupted z_t is resampled once per inversion)
        warm = seeds * k * cfg          (cfg = 2 when guidance_scale > 1, else 1)
    inversion = sum over the k inverted timesteps t of engines.corruption.renoise.unet_rows(t): R + 1 estimates
    (R = min(5, renoise iterations) below t = 250) + 1 for eps(z0) when the step regularises with KL.
(c) UNet evaluations per inversion for each preset (renoise-sd, the reference's SD configuration,
    vs renoise-fast, no noise regularisation) and the time of one cold inversion each.
Medians over a few repeats, measured in one run (cold and warm interleaved).

    .venv/bin/python bench/bench_corrupt.py [--model PATH] [--size 256] [--steps 50] [--k 10] [--seeds 3]
                                            [--preset renoise-sd]
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
from engines.corruption.corrupt import PRESETS, CorruptParams, RegionCorruptor  # noqa: E402
from engines.corruption.metrics import prepare_image, random_blob_mask  # noqa: E402
from engines.models import load_text2image  # noqa: E402
from engines.corruption.renoise import unet_rows  # noqa: E402


def test_image(size: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return prepare_image(np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.LANCZOS)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo", help="diffusers text-to-image folder or hub id (default: the demo)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=10, help="inverted steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--preset", default="renoise-sd", choices=PRESETS)
    ap.add_argument("--renoise-iterations", type=int, default=None, help="with --preset custom")
    ap.add_argument("--guidance", type=float, default=1.0, help="resampling guidance scale")
    ap.add_argument("--prompt", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: with two threads on two shared, busy cores the tiny demo model "
                         "runs up to 10x slower and the timings turn to noise)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as data_dir:
        loaded = load_text2image(args.model, data_dir=data_dir, device=args.device)
        image = test_image(args.size)
        height, width = image.shape[:2]
        extra = {} if args.renoise_iterations is None else {"renoise_iterations": args.renoise_iterations}
        params = CorruptParams.from_preset(args.preset, num_inference_steps=args.steps, inversion_steps=args.k,
                                           guidance_scale=args.guidance, prompt=args.prompt, **extra)
        seeds = list(range(args.seeds))
        masks = [random_blob_mask(height, width, seed=i, coverage=(0.05, 0.15)) for i in range(2 * args.repeats + 2)]
        rows = [0]
        hook = loaded.model.unet.register_forward_pre_hook(lambda module, a: rows.__setitem__(0, rows[0] + int(a[0].shape[0])))

        def run(corruptor, mask, phases=None):
            start_rows, start_calls = rows[0], corruptor.unet_calls
            stamps = []
            start = time.perf_counter()
            results = corruptor.preview(image, mask, params, seeds,
                                        progress=lambda step, total: stamps.append((step, total, time.perf_counter())))
            end = time.perf_counter()
            assert sum(r.unet_calls for r in results) == corruptor.unet_calls - start_calls
            if phases is not None:  # encode+inversion | resampling (seeds, uncorrupted) | decode+measure
                total = stamps[-1][1]
                inverted_steps = args.k if total == 3 * args.k else 0  # cold: inversion, seeds, uncorrupted z_t
                inverted = stamps[inverted_steps - 1][2] if inverted_steps else start
                phases.append((inverted - start, stamps[-1][2] - inverted, end - stamps[-1][2]))
            return end - start, corruptor.unet_calls - start_calls, rows[0] - start_rows, results

        warm_corruptor = RegionCorruptor(loaded)
        run(warm_corruptor, masks[-1])  # warm-up (first-call allocations) and fills the warm cache
        cold, warm, cold_calls, warm_calls, cold_phases, warm_phases = [], [], set(), set(), [], []
        for i in range(args.repeats):
            seconds, calls, hooked, results = run(RegionCorruptor(loaded), masks[2 * i], cold_phases)
            assert not results[0].cache_hit
            cold.append(seconds)
            cold_calls.add((calls, hooked))
            seconds, calls, hooked, results = run(warm_corruptor, masks[2 * i + 1], warm_phases)
            assert results[0].cache_hit
            warm.append(seconds)
            warm_calls.add((calls, hooked))
        presets = {}
        for name in ("renoise-sd", "renoise-fast"):  # (c): one cold inversion per preset
            p = CorruptParams.from_preset(name, num_inference_steps=args.steps, inversion_steps=args.k, prompt=args.prompt)
            corruptor = RegionCorruptor(loaded)
            start, before = time.perf_counter(), rows[0]
            inversion = corruptor.invert(image, p)
            presets[name] = (inversion.unet_calls, rows[0] - before, time.perf_counter() - start,
                             sum(unet_rows(t, p) for t in _inverted(corruptor, p)))
        hook.remove()

    cfg = 2 if args.guidance > 1 else 1
    k, s = args.k, args.seeds
    inversion_theory = sum(unet_rows(t, params) for t in _inverted(RegionCorruptor(loaded), params))
    theory_warm = s * k * cfg
    theory_cold = inversion_theory + (s + 1) * k * cfg  # the inversion runs without guidance (scale 1)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(f"model {args.model} ({'demo: tiny random weights' if loaded.is_demo else loaded.model_id}), "
          f"{width}x{height}, N={args.steps}, k={k}, preset {params.preset} (ReNoise iterations "
          f"{params.renoise_iterations}, regularised {params.regularised}), guidance {args.guidance}, "
          f"{s} seeds, {args.threads} threads, device {args.device}, median of {args.repeats}")
    print(f"(a) preview cold (inversion + resampling): {cold_s * 1000:8.1f} ms")
    print(f"    preview warm (inversion cached):       {warm_s * 1000:8.1f} ms")
    print(f"    ratio warm / cold: {warm_s / cold_s:.3f}  (goal <= 0.4: {'met' if warm_s / cold_s <= 0.4 else 'NOT met'})")
    for name, phases in (("cold", cold_phases), ("warm", warm_phases)):
        parts = [statistics.median(p[j] for p in phases) * 1000 for j in range(3)]
        print(f"    {name} phases (median ms): encode+inversion {parts[0]:7.1f} | resampling {parts[1]:7.1f} | "
              f"decode+measure {parts[2]:7.1f}")
    for name, seen, theory in (("cold", cold_calls, theory_cold), ("warm", warm_calls, theory_warm)):
        (calls, hooked), = seen if len(seen) == 1 else (sorted(seen)[-1],)
        formula = (f"inversion + (seeds+1)*k*cfg = {inversion_theory} + {s + 1}*{k}*{cfg}" if name == "cold"
                   else f"seeds*k*cfg = {s}*{k}*{cfg}")
        print(f"(b) UNet evaluations per {name} preview: counted {calls}, hook {hooked}, theory {formula} = {theory}"
              f"  {'ok' if calls == hooked == theory and len(seen) == 1 else 'MISMATCH'}")
    print(f"    warm/cold evaluation ratio {theory_warm / theory_cold:.3f} (what the ratio in (a) would be if the "
          f"UNet were all the work)")
    for name, (calls, hooked, seconds, theory) in presets.items():
        print(f"(c) {name:<12} UNet evaluations per inversion: counted {calls}, hook {hooked}, theory {theory}  "
              f"{'ok' if calls == hooked == theory else 'MISMATCH'}; one cold inversion {seconds * 1000:8.1f} ms")
    sd, quick = presets["renoise-sd"], presets["renoise-fast"]
    print(f"    renoise-sd / renoise-fast: UNet evaluations {sd[0] / quick[0]:.2f}, time {sd[2] / quick[2]:.2f}")


def _inverted(corruptor, params) -> list[int]:
    """The timesteps an inversion with `params` steps to (T[N-1], ..., T[N-k])."""
    timesteps = corruptor._schedule(int(params.num_inference_steps))
    return timesteps[len(timesteps) - params.corruption_steps:][::-1]


if __name__ == "__main__":
    main()
