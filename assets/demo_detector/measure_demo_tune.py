"""Measure detector-guided LoRA tuning with the demo models on held-out prompts (CPU, reproducible).

    .venv/bin/python assets/demo_detector/measure_demo_tune.py [--out assets/demo_detector/tune_metrics.json]

`engines.training.tune.tune_lora` (DiffDoctor stage 2: the frozen demo detector's per-pixel artifact map as the
loss, LoRA on the demo UNet's attention) trains on TRAINING prompts and is evaluated on HELD-OUT
prompts it never saw, before and after, same prompts and seeds (paired), with the engine's own
evaluation: the demo detector's artifact area (fraction of pixels with score >= 0.5) and mean score.

- Training prompts: caption variants 2-5 of the 11 photos the demo detector trained on (44 prompts);
  `--train-photos all`: of all 15 photos (60 prompts; the held-out prompts are then new wordings of
  subjects tuning saw, a weaker hold-out).
- Held-out prompts: the first caption of the 4 photos the detector never saw, and 8 blends the demo
  model was never trained on ("a cat astronaut", "a rocket made of coins", ...).
- `--eval-detector FOLDER`: a second detector, not optimised, scores the same images (e.g. the demo
  detector retrained by train_demo_detector.py with `--seed 1`): a drop only the optimised detector
  sees is the LoRA fooling it.
- Independent check (no detector involved): for the held-out photos' captions, the PSNR of the image
  to that photo's centred 128 px view before and after (does tuning keep the images what they were?).

Defaults: 1000 steps, lr 1e-3, rank 8, 20 denoising steps with the last one carrying gradients, guidance
7.5 (what Generate uses), DiffDoctor's weighted loss; 128 px; eval seeds 0, 1, 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, ROOT / "assets", HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from demo_photos import canonical_views, photo_catalogue  # noqa: E402

BLENDS = ["a cat astronaut", "a rocket made of coins", "galaxies and grass", "a cup of coffee on the moon",
          "a portrait of a horse", "old coins on a brick wall", "a clock in deep space", "a retina made of gravel"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def per_prompt(result, detector) -> dict:
    """{prompt: {"before", "after"}}: `detector`'s artifact area (score >= 0.5) averaged over the eval seeds."""
    if not result.after_images:
        return {}
    n = len(result.eval_seeds)

    def areas(images):
        return [float((h.scores >= 0.5).mean()) for h in detector.predict(list(images))]

    before, after = areas(result.before_images), areas(result.after_images)
    return {p: {"before": round(float(np.mean(before[i * n:(i + 1) * n])), 4),
                "after": round(float(np.mean(after[i * n:(i + 1) * n])), 4)} for i, p in enumerate(result.eval_prompts)}


def main(argv=None) -> dict:
    from engines.detection.detect import ArtifactDetector
    from engines.detection.detectors import load_detector
    from engines.models import load_text2image
    from engines.training.tune import TuneConfig, tune_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "tune_metrics.json"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-detector", default=None,
                    help="an independent detector folder (not optimised) that also scores the evaluation images, "
                         "e.g. the demo detector retrained with --seed 1")
    ap.add_argument("--train-photos", choices=("detector-train", "all"), default="detector-train",
                    help="whose captions (variants 2-5) are the training prompts: the 11 photos the detector trained "
                         "on (default; the held-out prompts then name photos and subjects tuning never saw), or all 15")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="demo-tune-"))
    catalogue = photo_catalogue()
    train_prompts = [c for e in catalogue if args.train_photos == "all" or e["detector"] == "train"
                     for c in e["captions"][1:]]
    photo_prompts = {e["captions"][0]: e["name"] for e in catalogue if e["detector"] == "heldout"}
    held_out = list(photo_prompts) + BLENDS
    loaded = load_text2image("demo", data_dir=work / "data")
    detector = ArtifactDetector(load_detector("demo", data_dir=work / "data"))
    eval_detector = ArtifactDetector(load_detector(args.eval_detector, data_dir=work / "data")) \
        if args.eval_detector else None
    config = TuneConfig(steps=args.steps, lr=args.lr, seed=args.seed, eval_prompts=len(held_out))
    result = tune_lora(config, loaded, detector, train_prompts, work / "run", held_out_prompts=held_out,
                       eval_detector=eval_detector,
                       log=lambda row: print(json.dumps(row), flush=True) if row["step"] % 25 == 0 else None)
    views = canonical_views()
    seeds = list(result.eval_seeds)
    fidelity = {}
    for i, prompt in enumerate(result.eval_prompts):
        if prompt in photo_prompts:
            view = views[photo_prompts[prompt]]
            before = [psnr(result.before_images[i * len(seeds) + j], view) for j in range(len(seeds))]
            after = [psnr(result.after_images[i * len(seeds) + j], view) for j in range(len(seeds))]
            fidelity[prompt] = {"psnr_before": round(float(np.mean(before)), 2), "psnr_after": round(float(np.mean(after)), 2)}
    metrics = {
        "result": result.to_json(), "psnr_to_photo": fidelity,
        "psnr_to_photo_mean": {k: round(float(np.mean([v[k] for v in fidelity.values()])), 2)
                               for k in ("psnr_before", "psnr_after")},
        "config": {**asdict(config), "eval_seeds": list(config.eval_seeds)},
        "train_prompts": train_prompts, "held_out_prompts": held_out, "train_photos": args.train_photos,
        "eval_detector": args.eval_detector,
        "per_prompt": per_prompt(result, detector),
        "seconds": round(time.time() - t0, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    r = metrics["result"]
    print(json.dumps({"before": r.get("before"), "after": r.get("after"), "change": r.get("change"),
                      "independent_before": r.get("independent_before"), "independent_after": r.get("independent_after"),
                      "independent_change": r.get("independent_change"),
                      "outside_change": r.get("outside_change"), "psnr_to_photo_mean": metrics["psnr_to_photo_mean"],
                      "seconds": metrics["seconds"]}, indent=1, default=str))
    return metrics


if __name__ == "__main__":
    main()
