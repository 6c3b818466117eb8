"""Train the demo artifact classifier (assets/demo_classifier): a CropNet head over the default taxonomy.

No labelled diffusion artifacts ship offline, so the training crops are made here: 64x64 crops of
public-domain / CC0 photos bundled with scikit-image (train: astronaut, hubble_deep_field (public
domain, NASA), chelsea, retina, camera, brick, grass, gravel (CC0); held out: coffee (CC0), rocket
(public domain, SpaceX); licences as stated in the scikit-image 0.26 loader docstrings), each either clean or with one procedural
artifact painted into a soft ellipse around its centre (two artifacts in 10 % of the crops). The
procedural stand-ins, one per class that a pixel operation can imitate:

    Distorted and Deformated Components   a swirl warp of the ellipse
    Omitted Components                    the ellipse erased and filled from its border (inpainting)
    Duplicated Components                 a neighbouring patch cloned over the ellipse
    Illegible Letters                     random glyph strokes and characters drawn in the ellipse
    Abnormal Texture                      a small patch tiled repetitively over the ellipse
    Localized Blur                        a strong Gaussian blur inside the ellipse only
    Chromatic Irregularity                hue rotation and oversaturation inside the ellipse
    Unrealistic Lighting                  a steep brightness ramp across the whole crop
    Luminance Discrepancy                 the ellipse brightened or darkened by 45-70 %
    Impractical Luminosity                a glowing halo added at the ellipse

Awkward Facial Expression, Abnormal Spatial Relationship and Abnormal Non-Spatial Relationship need
semantics no pixel operation gives; they have no examples and the head gives them low probabilities.
Photos are split by photo (image family): the held-out photos never appear in training.

Run (3000 steps, about 30 minutes on one CPU thread of a busy shared machine): python assets/demo_classifier/train_demo_classifier.py
Writes model.safetensors + classifier.json (with metrics) here and metrics.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

TRAIN_PHOTOS = ("astronaut", "chelsea", "hubble_deep_field", "retina", "camera", "brick", "grass", "gravel")
VAL_PHOTOS = ("coffee", "rocket")  # skimage's "cat" is Chelsea again, so it is not a held-out photo
SIZE = 64
SEED = 0


def photos(names) -> list[np.ndarray]:
    from PIL import Image
    from skimage import data

    out = []
    for name in names:
        rgb = getattr(data, name)()
        rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb[..., :3]  # grey photos as RGB
        scale = 320 / max(rgb.shape[:2])
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        out.append(np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS)))
    return out


def ellipse(rng, size=SIZE) -> np.ndarray:
    """A soft (feathered) ellipse mask in [0, 1] covering 20-60 % of the crop, near its centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-6, 6, 2)
    ry, rx = rng.uniform(0.22, 0.42, 2) * size
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip((1.15 - d) / 0.3, 0, 1)


def blend(base, other, m):
    return (base * (1 - m[..., None]) + other * m[..., None]).clip(0, 255)


def corrupt(crop: np.ndarray, name: str, rng, source: np.ndarray, y: int, x: int) -> np.ndarray:
    import cv2
    from PIL import Image, ImageDraw
    from scipy import ndimage
    from skimage import color, transform

    img = crop.astype(np.float32)
    m = ellipse(rng)
    if name == "Distorted and Deformated Components":
        warped = transform.swirl(crop, center=(SIZE / 2, SIZE / 2), strength=rng.uniform(4, 9) * rng.choice([-1, 1]),
                                 radius=SIZE * 0.45, preserve_range=True)
        return blend(img, warped, m)
    if name == "Omitted Components":
        hole = (m > 0.3).astype(np.uint8) * 255
        filled = cv2.inpaint(crop, hole, 5, cv2.INPAINT_TELEA).astype(np.float32)
        return blend(img, ndimage.gaussian_filter(filled, (2, 2, 0)), m)
    if name == "Duplicated Components":
        dy, dx = rng.integers(-24, 25, 2)
        yy, xx = np.clip(y + dy, 0, source.shape[0] - SIZE), np.clip(x + dx, 0, source.shape[1] - SIZE)
        if abs(yy - y) + abs(xx - x) < 12:
            xx = np.clip(x + 20, 0, source.shape[1] - SIZE)
        clone = source[yy:yy + SIZE, xx:xx + SIZE].astype(np.float32)
        return blend(img, np.roll(clone, (int(rng.integers(-8, 9)), int(rng.integers(-8, 9))), (0, 1)), m)
    if name == "Illegible Letters":
        canvas = Image.fromarray(crop)
        draw = ImageDraw.Draw(canvas)
        ink = tuple(int(v) for v in rng.integers(0, 256, 3))
        for _ in range(int(rng.integers(6, 14))):
            px, py = rng.uniform(10, SIZE - 10, 2)
            if rng.random() < 0.5:
                draw.text((px - 4, py - 5), "".join(rng.choice(list("aeghkmqrsxzAEHKMRW#%&@"), 2)), fill=ink)
            else:
                draw.line([(px, py), (px + rng.uniform(-7, 7), py + rng.uniform(-7, 7))], fill=ink, width=1)
        return blend(img, np.asarray(canvas, np.float32), (m > 0.2).astype(np.float32))
    if name == "Abnormal Texture":
        t = int(rng.integers(5, 10))
        oy, ox = rng.integers(0, SIZE - t, 2)
        tile = img[oy:oy + t, ox:ox + t]
        tiled = np.tile(tile, (SIZE // t + 1, SIZE // t + 1, 1))[:SIZE, :SIZE]
        return blend(img, tiled, m)
    if name == "Localized Blur":
        return blend(img, ndimage.gaussian_filter(img, (rng.uniform(2.5, 4.5),) * 2 + (0,)), m)
    if name == "Chromatic Irregularity":
        hsv = color.rgb2hsv(crop)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(0.2, 0.8)) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * 1.5 + 0.15, 0, 1)
        return blend(img, color.hsv2rgb(hsv) * 255, m)
    if name == "Unrealistic Lighting":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
        ramp = 1 + rng.uniform(1.2, 1.8) * (np.cos(angle) * xx + np.sin(angle) * yy)
        return img * ramp[..., None]
    if name == "Luminance Discrepancy":
        factor = rng.uniform(1.45, 1.7) if rng.random() < 0.5 else rng.uniform(0.3, 0.55)
        return blend(img, img * factor, m)
    if name == "Impractical Luminosity":
        glow = ndimage.gaussian_filter(m, 4) ** 0.7
        tint = np.array([255, 250, 220], np.float32) * rng.uniform(0.7, 1.0)
        return img + glow[..., None] * (tint - img) * rng.uniform(0.6, 0.9)
    raise KeyError(name)


SIMULATED = ("Distorted and Deformated Components", "Omitted Components", "Duplicated Components",
             "Illegible Letters", "Abnormal Texture", "Localized Blur", "Chromatic Irregularity",
             "Unrealistic Lighting", "Luminance Discrepancy", "Impractical Luminosity")


def make_samples(images, count: int, seed: int, family: str):
    from engines.training.classifier import ClassifierSample

    rng = np.random.default_rng(seed)
    out = []
    for n in range(count):
        k = int(rng.integers(len(images)))
        source = images[k]
        y, x = (int(rng.integers(0, source.shape[d] - SIZE + 1)) for d in (0, 1))
        crop = source[y:y + SIZE, x:x + SIZE]
        if rng.random() < 0.22:
            classes = ()
        else:
            classes = (str(rng.choice(SIMULATED)),)
            if rng.random() < 0.1:
                second = str(rng.choice([c for c in SIMULATED if c != classes[0]]))
                classes = classes + (second,)
        image = crop.astype(np.float32)
        for c in classes:
            image = corrupt(image.clip(0, 255).astype(np.uint8), c, rng, source, y, x)
        out.append(ClassifierSample(image=image.clip(0, 255).astype(np.uint8), bbox=None, classes=classes,
                                    family=f"{family}-{k}", name=f"{family}-{n}"))
    return out


def main() -> None:
    import torch

    from engines.training.classifier import ClassifierTrainConfig, train_head

    torch.set_num_threads(1)  # on a shared 2-core machine one thread is ~10x faster than two
    taxonomy = json.loads((HERE.parent / "taxonomy.json").read_text())["classes"]
    start = time.perf_counter()
    train = make_samples(photos(TRAIN_PHOTOS), 6000, SEED, "train")
    val = make_samples(photos(VAL_PHOTOS), 400, SEED + 1, "val")
    print(f"made {len(train)} train / {len(val)} val crops in {time.perf_counter() - start:.0f} s", flush=True)
    config = ClassifierTrainConfig(steps=3000, batch_size=32, lr=3e-3, eval_every=750, pos_weight=4.0, seed=SEED, width=16,
                                   input_size=SIZE)
    out = HERE / "run"
    result = train_head(config, [{"name": c["name"], "definition": c["definition"]} for c in taxonomy], train, val,
                        out, resume=False, log=lambda row: print(json.dumps(row), flush=True),
                        provenance={"script": "assets/demo_classifier/train_demo_classifier.py", "seed": SEED,
                                    "train_photos": TRAIN_PHOTOS, "val_photos": VAL_PHOTOS,
                                    "simulated_classes": SIMULATED})
    best = Path(result.best_dir)
    for name in ("model.safetensors", "classifier.json"):
        (HERE / name).write_bytes((best / name).read_bytes())
    metrics = {"zero_shot_untrained": result.zero_shot, "trained": result.tuned, "steps": result.steps_done,
               "train_crops": len(train), "val_crops": len(val), "val_photos": VAL_PHOTOS,
               "duration_s": round(time.perf_counter() - start, 1)}
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2))
    import shutil

    shutil.rmtree(out)
    print(json.dumps({k: metrics["trained"].get(k) for k in ("micro_f1", "macro_f1", "exact_match")}))


if __name__ == "__main__":
    main()
