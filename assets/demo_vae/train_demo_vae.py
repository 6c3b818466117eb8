"""Train the tiny demo VAE shipped in assets/demo_vae/ (CPU, one thread, reproducible).

    .venv/bin/python assets/demo_vae/train_demo_vae.py [--out assets/demo_vae] [--steps N] [--seed 0]

The architecture is exactly the AutoencoderKL of engines/models.py ``build_demo_pipeline``.
Training data are public-domain / CC0 photos bundled with scikit-image (no download): random
crops with flips, scaled to [-1, 1] (64 px, the last 20% of steps 128 px so GroupNorm sees
whole-image-like statistics). Loss: L1 + MSE + a small edge (finite-difference) term on
decode(latent mean), a tiny KL weight, and for the first half a decaying "latent anchor"
(latent channels 0-2 ~ the 8x average-pooled image), which speeds up early training
(~+3 dB at 800 steps).
Default 2000 steps: about 7.5 min wall-clock on one CPU thread. Bit-reproducible for a given seed.
Writes config.json, diffusion_pytorch_model.safetensors and metrics.json (PSNR of
encode->mode->decode on each full sample photo, trained vs the same random init untrained).

Deterministic posterior. Training only ever decodes the latent mean, and the tiny KL weight pulls the
posterior's log-variance to 0 (std 1), so a *sampled* latent (what diffusers' img2img and inpainting
pipelines encode with) would be the mean plus unit noise. Before saving, the log-variance half of
`quant_conv` is set to the constant LOGVAR (weights 0, bias -30: std 3e-7), so sample() == mode() up
to 1e-6; the mean half and everything else are untouched. `--fix-posterior-only` applies just this
step to the weights already in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Licence of each image as stated in its scikit-image 0.26 loader docstring.
SAMPLE_PHOTOS = {  # the app's sample photos (assets/samples.json); also the evaluation set
    "astronaut": "public domain (NASA)",
    "coffee": "CC0 (Rachel Michetti)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "rocket": "public domain (SpaceX)",
    "hubble_deep_field": "public domain (NASA / HubbleSite)",
}
EXTRA_PHOTOS = {  # further bundled images whose docstring says CC0 / public domain
    "retina": "CC0 1.0 (Mikael Haggstrom, Wikimedia Commons)",
    "camera": "CC0 (Lav Varshney)",
    "clock": "public domain (Stefan van der Walt)",
    "brick": "CC0 (CC0Textures Bricks25)",
    "grass": "CC0 (CC0Textures)",
    "gravel": "CC0 (CC0Textures Gravel04)",
}


LOGVAR = -30.0  # the posterior log-variance written into quant_conv (diffusers clamps logvar to [-30, 20])


def make_posterior_deterministic(vae) -> None:
    """Set quant_conv's log-variance outputs to the constant LOGVAR (see the module docstring)."""
    c = int(vae.config.latent_channels)
    with torch.no_grad():
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(LOGVAR)


def build_vae() -> "torch.nn.Module":
    """Same config as engines/models.py build_demo_pipeline (architecture must match exactly)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def load_rgb(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [-1, 1]."""
    return torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)


def half_size(t: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(t[None], 2)[0]


def build_pool(crop: int, sample_weight: float) -> tuple[list[torch.Tensor], np.ndarray]:
    """Training images (3xHxW in [-1,1]); large ones also at half size (scale augmentation).

    Returns the images and their sampling probabilities: every source image has the same total
    weight, shared by its scales, except the app's sample photos (what the demo shows), which
    weigh ``sample_weight`` times more."""
    pool, weights = [], []
    for name in list(SAMPLE_PHOTOS) + list(EXTRA_PHOTOS):
        t = to_tensor(load_rgb(name))
        scales = [t]
        while min(t.shape[1:]) >= max(2 * crop, 512):
            t = half_size(t)
            scales.append(t)
        w = sample_weight if name in SAMPLE_PHOTOS else 1.0
        pool += scales
        weights += [w / len(scales)] * len(scales)
    weights = np.array(weights)
    return pool, weights / weights.sum()


def sample_batch(pool, weights, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    out = []
    idx = rng.choice(len(pool), size=batch, p=weights)
    for i in idx:
        img = pool[i]
        h, w = img.shape[1:]
        y = int(rng.integers(0, h - crop + 1))
        x = int(rng.integers(0, w - crop + 1))
        c = img[:, y:y + crop, x:x + crop]
        if rng.random() < 0.5:
            c = c.flip(2)
        if rng.random() < 0.2:
            c = c.flip(1)
        out.append(c)
    return torch.stack(out)


def edge_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


@torch.no_grad()
def reconstruct(vae, img: np.ndarray) -> np.ndarray:
    """Whole image, reflect-padded to a multiple of 8, encode -> mode -> decode, cropped back."""
    h, w = img.shape[:2]
    x = to_tensor(img)[None]
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample[..., :h, :w]
    return ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-12)))


def evaluate(vae, photos: dict[str, np.ndarray]) -> dict[str, float]:
    vae.eval()
    res = {name: round(psnr(img, reconstruct(vae, img)), 2) for name, img in photos.items()}
    vae.train()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--edge-weight", type=float, default=0.5)
    ap.add_argument("--mse-weight", type=float, default=1.0)
    ap.add_argument("--anchor-weight", type=float, default=1.0,
                    help="weight of the latent anchor (latent[:3] ~ 8x-downsampled RGB), decays to 0")
    ap.add_argument("--anchor-frac", type=float, default=0.5, help="fraction of steps the anchor decays over")
    ap.add_argument("--final-crop", type=int, default=128,
                    help="crop size of the last --final-frac of the steps (batch shrunk to keep "
                         "pixels/step): GroupNorm statistics closer to those of whole images")
    ap.add_argument("--final-frac", type=float, default=0.2)
    ap.add_argument("--sample-weight", type=float, default=2.0)
    ap.add_argument("--no-eval-untrained", action="store_true", help="skip the untrained reference PSNR")
    ap.add_argument("--fix-posterior-only", action="store_true",
                    help="only make the posterior of the weights in --out deterministic (no training)")
    args = ap.parse_args(argv)
    if args.fix_posterior_only:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.out)
        make_posterior_deterministic(vae)
        vae.save_pretrained(args.out, safe_serialization=True)
        return {}

    t0 = time.time()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    vae = build_vae()
    n_params = sum(p.numel() for p in vae.parameters())
    photos = {name: load_rgb(name) for name in SAMPLE_PHOTOS}
    untrained = {} if args.no_eval_untrained else evaluate(vae, photos)

    pool, weights = build_pool(args.crop, args.sample_weight)

    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    warmup = max(1, min(50, args.steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    final_start = args.steps - round(args.final_frac * args.steps)
    vae.train()
    ema, loss_log = None, []
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        crop, batch = args.crop, args.batch
        if step >= final_start:
            crop, batch = args.final_crop, max(1, round(args.batch * (args.crop / args.final_crop) ** 2))
        x = sample_batch(pool, weights, rng, batch, crop)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.mode()).sample
        rec = (y - x).abs().mean() + args.mse_weight * F.mse_loss(y, x)
        loss = rec + args.edge_weight * edge_loss(y, x) + args.kl_weight * post.kl().mean()
        aw = args.anchor_weight * max(0.0, 1.0 - step / max(1.0, args.anchor_frac * args.steps))
        if aw > 0:
            loss = loss + aw * (post.mean[:, :3] - F.avg_pool2d(x, 8)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            loss_log.append([step, round(ema, 5)])
            print(f"step {step:5d}  loss {ema:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - t_train:6.1f}s", flush=True)
    train_seconds = time.time() - t_train

    vae.eval()
    trained = evaluate(vae, photos)
    with torch.no_grad():  # latent statistics (useful for choosing a scaling_factor)
        lat = torch.cat([vae.encode(to_tensor(p)[None, :, :256, :256]).latent_dist.mode().flatten()
                         for p in photos.values()])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_posterior_deterministic(vae)
    vae.save_pretrained(out, safe_serialization=True)
    weights_file = out / "diffusion_pytorch_model.safetensors"
    metrics = {
        "steps": args.steps,
        "seed": args.seed,
        "seconds": round(time.time() - t0, 1),
        "train_seconds": round(train_seconds, 1),
        "batch": args.batch,
        "crop": args.crop,
        "lr": args.lr,
        "final_crop": args.final_crop,
        "final_steps": args.steps - final_start,
        "loss": "L1 + %g*MSE + %g*edge + %g*KL on decode(latent mean), + latent anchor "
                "%g*|mean[:3] - avgpool8(x)| decaying to 0 over the first %g of the steps" % (
                    args.mse_weight, args.edge_weight, args.kl_weight, args.anchor_weight, args.anchor_frac),
        "train_loss_end": loss_log[-1][1] if loss_log else None,
        "train_loss_log": loss_log,
        "params": n_params,
        "weights_bytes": weights_file.stat().st_size,
        "psnr_db_trained": trained,
        "psnr_db_untrained": untrained,
        "psnr_db_trained_mean": round(float(np.mean(list(trained.values()))), 2),
        "latent_mean": round(lat.mean().item(), 4),
        "latent_std": round(lat.std().item(), 4),
        "eval": "whole photo, reflect-padded to a multiple of 8, encode().latent_dist.mode() -> decode, "
                "uint8 PSNR on the original extent",
        "posterior": f"deterministic: quant_conv log-variance outputs set to {LOGVAR} before saving",
        "train_images": {**SAMPLE_PHOTOS, **EXTRA_PHOTOS},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("seconds", "psnr_db_untrained", "psnr_db_trained")}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
