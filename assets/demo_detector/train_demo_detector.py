"""Train the demo artifact detector with the studio's own pipeline (CPU, 2 threads, reproducible).

    .venv/bin/python assets/demo_detector/train_demo_detector.py [--out assets/demo_detector] [--steps N]

1. Data, made by the studio itself. Every photo of assets/demo_photos.json is cut into 128 px square
   views (its centred square plus random squares, as the demo text-to-image model saw them). Each
   view gets random-blob regions (`engines.corrupt.random_blob_mask`) and is corrupted inside them by
   `engines.corrupt.RegionCorruptor` with the demo text-to-image model at the paper's settings
   (`CorruptParams()` defaults: ReNoise inversion of the k = 10 lowest-noise of N = 50 DDIM steps,
   eq. 3-5 noise inside the region, DDIM resampling), with the empty prompt (what the studio uses for
   a photo it did not generate). The region is the label. Negatives (empty label): the view itself and
   its uncorrupted round trip (inverted and resampled with no corruption), so neither the VAE's blur
   nor the resampling alone counts as an artifact.
2. Split by photo: photos marked "train" in demo_photos.json train the detector; the "heldout" photos
   (never seen by the detector) are only evaluated.
3. Detector: a small UperNet (ConvNeXt backbone 16/32/64/128 channels, depths 1/1/2/1, head 32; input
   128) trained by `engines.train_detector` (AdamW lr 1e-3, poly decay, class-balanced sampling,
   flips, colour jitter). The LAST checkpoint is shipped (no model selection on the held-out photos).
4. metrics.json: held-out artifact IoU / precision / recall on the corrupted held-out views, the
   detector's false-positive area on clean held-out views, and the mean heatmap inside vs outside the
   regions; the same on the training views for comparison.

Writes model.safetensors + detector.json (our detector format; `load_detector(folder)`) and metrics.json.
Bit-reproducible for a given seed and thread count on the same torch build.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "assets"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from demo_photos import load_photo, photo_catalogue, random_views, square_view  # noqa: E402

SIZE = 128
COVERAGE = (0.04, 0.2)


def detector_config():
    """The demo detector's architecture: a small UperNet (~0.6M parameters)."""
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return UperNetConfig(backbone_config=backbone, num_labels=2, hidden_size=32, use_auxiliary_head=False,
                         pool_scales=[1, 2, 3, 6])


def decode(corruptor, latents) -> np.ndarray:
    from engines.generate import to_uint8

    vae = corruptor.pipe.vae
    with torch.inference_mode():
        x = vae.decode(latents / float(vae.config.scaling_factor)).sample
    return to_uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())[0]


def corrupted_views(corruptor, entry: dict, views: int, masks: int, seeds: int, seed: int, prompt: str = ""):
    """Samples of one photo: list of (image, mask bool[H,W], kind, name); kind is "corrupted",
    "clean" (the view) or "roundtrip" (inverted and resampled, no corruption)."""
    from engines.corrupt import CorruptParams, random_blob_mask

    rng = np.random.default_rng([seed, _stable(entry["name"])])
    img = load_photo(entry)
    cut = [square_view(img, SIZE)] + random_views(img, rng, views - 1, SIZE, 0.6)
    params = CorruptParams(prompt=prompt)
    out = []
    for v, view in enumerate(cut):
        name = f"{entry['name']}/v{v}"
        out.append((view, np.zeros((SIZE, SIZE), bool), "clean", name + "/clean"))
        inversion = corruptor.invert(view, params)
        latent = corruptor.resample_latent(inversion.zt, inversion, params)
        out.append((decode(corruptor, latent), np.zeros((SIZE, SIZE), bool), "roundtrip", name + "/roundtrip"))
        for m in range(masks):
            mask = random_blob_mask(SIZE, SIZE, seed=int(rng.integers(0, 2**31)), coverage=COVERAGE)
            noise_seeds = [int(s) for s in rng.integers(0, 2**31, size=seeds)]
            for r in corruptor.preview(view, mask, params, noise_seeds):
                out.append((r.image, r.mask, "corrupted", f"{name}/m{m}/s{r.params.seed}"))
    return out


def _stable(name: str) -> int:
    import hashlib

    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def build_dataset(corruptor, split: str, seed: int = 0, views: int | None = None, masks: int = 3,
                  seeds: int | None = None):
    """All samples of the photos whose "detector" field is `split` ("train" or "heldout")."""
    views = views if views is not None else (6 if split == "train" else 3)
    seeds = seeds if seeds is not None else (2 if split == "train" else 1)
    samples = []
    for entry in photo_catalogue():
        if entry["detector"] == split:
            samples += corrupted_views(corruptor, entry, views, masks, seeds, seed)
    return samples


def demo_corruptor(data_dir: str | os.PathLike):
    from engines.corrupt import RegionCorruptor
    from engines.models import load_text2image

    return RegionCorruptor(load_text2image("demo", data_dir=data_dir, device="cpu"))


def heat_stats(detector, samples) -> dict:
    """Mean heatmap inside / outside the regions of corrupted samples, and the flagged area of clean ones."""
    inside, outside, clean_area = [], [], []
    maps = detector.predict([s[0] for s in samples])
    for (image, mask, kind, _), heat in zip(samples, maps):
        scores = heat.scores
        if kind == "corrupted":
            inside.append(float(scores[mask].mean()))
            outside.append(float(scores[~mask].mean()))
        else:
            clean_area.append(float((scores >= 0.5).mean()))
    return {"heat_inside_mean": round(float(np.mean(inside)), 4), "heat_outside_mean": round(float(np.mean(outside)), 4),
            "inside_above_outside": round(float(np.mean(np.array(inside) > np.array(outside))), 4),
            "clean_flagged_area_mean": round(float(np.mean(clean_area)), 4)}


def main(argv=None) -> dict:
    from engines.detect import ArtifactDetector, evaluate_masks, score_image
    from engines.detectors import DetectorSpec, load_detector, save_detector
    from engines.train_detector import TrainConfig, TrainSample, train_detector

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-views", type=int, default=6, help="128 px views per training photo")
    ap.add_argument("--heldout-views", type=int, default=3, help="128 px views per held-out photo")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)

    t0 = time.time()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="demo-detector-"))
    work.mkdir(parents=True, exist_ok=True)
    corruptor = demo_corruptor(work / "data")
    train_set = build_dataset(corruptor, "train", args.seed, views=args.train_views)
    heldout = build_dataset(corruptor, "heldout", args.seed, views=args.heldout_views)
    data_seconds = time.time() - t0
    print(f"data: {len(train_set)} training and {len(heldout)} held-out samples ({data_seconds:.0f}s, "
          f"{corruptor.unet_calls} UNet evaluations)", flush=True)

    init = work / "init"
    torch.manual_seed(args.seed)
    from transformers import UperNetForSemanticSegmentation

    save_detector(UperNetForSemanticSegmentation(detector_config()), DetectorSpec(family="upernet", input_size=SIZE,
                                                                                 trained=False), init)
    config = TrainConfig(arch=str(init), steps=args.steps, batch_size=args.batch, crop=SIZE, input_size=SIZE,
                         lr=args.lr, warmup_steps=min(100, args.steps // 10), scale_range=(0.8, 1.25), color_jitter=0.1,
                         eval_every=max(1, args.steps // 6), log_every=100, seed=args.seed)
    to_sample = lambda s: TrainSample(image=s[0], mask=s[1], source="synthetic", name=s[3])  # noqa: E731
    val = [to_sample(s) for s in heldout if s[2] == "corrupted"]
    t_train = time.time()
    result = train_detector(config, [to_sample(s) for s in train_set], val, work / "train", resume=False,
                            log=lambda row: print(json.dumps(row), flush=True))
    train_seconds = time.time() - t_train

    loaded = load_detector(str(result.last_dir), data_dir=work)
    detector = ArtifactDetector(loaded)

    def scores(samples):
        maps = detector.predict([s[0] for s in samples])
        return evaluate_masks([score_image(h.scores >= 0.5, s[1], s[3]) for h, s in zip(maps, samples)])

    held_corrupted = [s for s in heldout if s[2] == "corrupted"]
    train_corrupted = [s for s in train_set if s[2] == "corrupted"]
    held = scores(held_corrupted)
    seen = scores(train_corrupted)
    per_photo = {}
    for name in sorted({s[3].split("/")[0] for s in held_corrupted}):
        m = scores([s for s in held_corrupted if s[3].startswith(name + "/")])
        per_photo[name] = {"artifact_iou": round(m.artifact_iou, 4), "precision": round(m.precision, 4),
                           "recall": round(m.recall, 4)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = json.loads((result.last_dir / "detector.json").read_text())["provenance"]
    provenance.update({
        "demo": True, "script": "assets/demo_detector/train_demo_detector.py",
        "note": "Demo detector: trained on synthetic corruptions of the sample photos, not a real-world artifact detector.",
        "data": {"photos_train": sorted({s[3].split('/')[0] for s in train_set}),
                 "photos_heldout": sorted({s[3].split('/')[0] for s in heldout}),
                 "corruption": "engines.corrupt.RegionCorruptor with the demo text-to-image model, CorruptParams() "
                               "defaults, prompt ''", "regions": f"random_blob_mask coverage {COVERAGE}"},
        "heldout_artifact_iou": round(held.artifact_iou, 4),
    })
    for tmp_name in ("model.safetensors", "detector.json"):
        (out / tmp_name).unlink(missing_ok=True)
    shutil.copy2(result.last_dir / "model.safetensors", out / "model.safetensors")
    meta = json.loads((result.last_dir / "detector.json").read_text())
    meta["provenance"] = provenance
    (out / "detector.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.chmod(out / "model.safetensors", 0o644)

    metrics = {
        "heldout": {"artifact_iou": round(held.artifact_iou, 4), "miou": round(held.miou, 4),
                    "precision": round(held.precision, 4), "recall": round(held.recall, 4), "f1": round(held.f1, 4),
                    "mean_image_iou": round(held.mean_image_iou, 4), "images": len(held_corrupted),
                    "per_photo": per_photo, **heat_stats(detector, heldout)},
        "train": {"artifact_iou": round(seen.artifact_iou, 4), "precision": round(seen.precision, 4),
                  "recall": round(seen.recall, 4), "images": len(train_corrupted), **heat_stats(detector, train_set)},
        "samples": {"train": len(train_set), "heldout": len(heldout),
                    "kinds": "per view: the clean view, its uncorrupted round trip, 3 blob masks x (2 noise seeds train, 1 held out)"},
        "training_curve": [r for r in result.history if "artifact_iou" in r],
        "config": config.to_json(), "steps": args.steps, "seed": args.seed,
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "seconds": round(time.time() - t0, 1), "data_seconds": round(data_seconds, 1),
        "train_seconds": round(train_seconds, 1), "threshold": 0.5,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: metrics[k] for k in ("heldout", "train", "seconds")}, indent=1))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


if __name__ == "__main__":
    main()
