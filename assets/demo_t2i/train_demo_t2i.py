"""Train the demo text-to-image model's UNet and text encoder (CPU, 2 threads, reproducible).

    .venv/bin/python assets/demo_t2i/train_demo_t2i.py [--out assets/demo_t2i] [--steps N] [--seed 0]
    .venv/bin/python assets/demo_t2i/train_demo_t2i.py --eval-only     # re-measure the shipped weights

The architecture is exactly engines/models.py ``build_demo_pipeline`` (random init from its seed), with
the trained demo VAE (assets/demo_vae) frozen. Data: the 15 captioned photos of assets/demo_photos.json
(public domain / CC0, bundled with scikit-image and matplotlib; no download), as DEMO_SIZE (128 px)
square views: the centre square of the photo ("canonical" view) or a random square of 75-100% of the
shorter side, resized with Lanczos. A bank of views per photo is encoded once (VAE latent mean times
DEMO_LATENT_SCALE). Each step draws a batch of views (the canonical one with probability
--p-canonical), a random caption variant of its photo (the empty caption with probability
--p-uncond, for classifier-free guidance), a uniform timestep and Gaussian noise; the loss is the
epsilon-prediction MSE with min-SNR-5 weights. AdamW on UNet + text encoder, warm-up then cosine;
an exponential moving average (EMA) of the weights is what is saved.

Evaluation (metrics.json): for every photo, its first caption generated with the StableDiffusionPipeline
(DDIM, --eval-steps steps, guidance --eval-guidance, seeds 0..--eval-seeds-1) at 128x128; PSNR and SSIM
of each image against the canonical view of every photo: "own" (its photo), "best other" (the most
similar other photo) and whether the own photo is the most similar of all (identification). The VAE
round trip of the canonical view is the ceiling (decode(encode(view))).
Bit-reproducible for a given seed and thread count on the same torch build.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "assets"))
from demo_photos import canonical_views, load_photo, photo_catalogue, random_views, square_view  # noqa: E402

from engines.models import DEMO_SIZE, build_demo_pipeline  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Metrics

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-12)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def to_latent(pipe, views: list[np.ndarray], batch: int = 32) -> torch.Tensor:
    vae, out = pipe.vae, []
    with torch.no_grad():
        for i in range(0, len(views), batch):
            x = torch.from_numpy(np.stack(views[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(vae.encode(x).latent_dist.mean * float(vae.config.scaling_factor))
    return torch.cat(out)


def vae_round_trip(pipe, view: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        z = to_latent(pipe, [view])
        y = pipe.vae.decode(z / float(pipe.vae.config.scaling_factor)).sample
    return ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def evaluate(pipe, seeds: int, steps: int, guidance: float, size: int = DEMO_SIZE) -> dict:
    """Per photo (first caption): PSNR/SSIM of generated images against every photo's canonical view.

    "identified_psnr" / "identified_ssim": the own photo is the most similar of all 15 by that measure.
    SSIM favours flat, low-contrast references (the grey clock) for blurry images, so PSNR is the
    identification measure quoted in the README; both are reported."""
    views = canonical_views(size)
    names = list(views)
    per_photo, hits_psnr, hits_ssim, total = {}, 0, 0, 0
    for entry in photo_catalogue():
        caption = entry["captions"][0]
        images = []
        for seed in range(seeds):
            with torch.no_grad():
                out = pipe(caption, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
            images.append((out.images[0] * 255).round().clip(0, 255).astype(np.uint8))
        rows = []
        for img in images:
            s = {n: ssim(img, views[n]) for n in names}
            p = {n: psnr(img, views[n]) for n in names}
            others = [n for n in names if n != entry["name"]]
            by_psnr, by_ssim = max(others, key=lambda n: p[n]), max(others, key=lambda n: s[n])
            ok_psnr, ok_ssim = p[entry["name"]] > p[by_psnr], s[entry["name"]] > s[by_ssim]
            hits_psnr, hits_ssim, total = hits_psnr + ok_psnr, hits_ssim + ok_ssim, total + 1
            rows.append({"ssim": round(s[entry["name"]], 4), "psnr": round(p[entry["name"]], 2),
                         "best_other_psnr": [by_psnr, round(p[by_psnr], 2)],
                         "best_other_ssim": [by_ssim, round(s[by_ssim], 4)],
                         "identified_psnr": bool(ok_psnr), "identified_ssim": bool(ok_ssim)})
        ceiling = vae_round_trip(pipe, views[entry["name"]])
        per_photo[entry["name"]] = {
            "caption": caption, "seeds": rows,
            "ssim_mean": round(float(np.mean([r["ssim"] for r in rows])), 4),
            "psnr_mean": round(float(np.mean([r["psnr"] for r in rows])), 2),
            "best_other_psnr_mean": round(float(np.mean([r["best_other_psnr"][1] for r in rows])), 2),
            "best_other_ssim_mean": round(float(np.mean([r["best_other_ssim"][1] for r in rows])), 4),
            "identified_psnr": sum(r["identified_psnr"] for r in rows),
            "identified_ssim": sum(r["identified_ssim"] for r in rows),
            "vae_ceiling_ssim": round(ssim(ceiling, views[entry["name"]]), 4),
            "vae_ceiling_psnr": round(psnr(ceiling, views[entry["name"]]), 2),
        }
    mean = lambda key: float(np.mean([v[key] for v in per_photo.values()]))  # noqa: E731
    return {"per_photo": per_photo, "generated": total,
            "identification_rate_psnr": round(hits_psnr / max(1, total), 4),
            "identification_rate_ssim": round(hits_ssim / max(1, total), 4),
            "psnr_own_mean": round(mean("psnr_mean"), 2), "psnr_best_other_mean": round(mean("best_other_psnr_mean"), 2),
            "ssim_own_mean": round(mean("ssim_mean"), 4), "ssim_best_other_mean": round(mean("best_other_ssim_mean"), 4),
            "vae_ceiling_psnr_mean": round(mean("vae_ceiling_psnr"), 2),
            "vae_ceiling_ssim_mean": round(mean("vae_ceiling_ssim"), 4),
            "settings": {"seeds": list(range(seeds)), "num_inference_steps": steps, "guidance_scale": guidance,
                         "size": size, "scheduler": "DDIM (the pipeline's)", "caption": "each photo's first caption",
                         "reference": "canonical view: centred square of the shorter side, Lanczos to size"}}


# ----------------------------------------------------------------------------------------------
# Training

def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Exactly what StableDiffusionPipeline.encode_prompt feeds the text encoder (padded to 77)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def save_weights(out: Path, modules: dict, ema: list | None = None, params: list | None = None) -> None:
    """<out>/<name>.safetensors for each module; with `ema`, the EMA values of `params` are written
    (the live weights are left as they are). Written to a temporary file and renamed."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    swap = {id(p): e for p, e in zip(params or [], ema or [])}
    for name, module in modules.items():
        state = {}
        for key, value in module.state_dict(keep_vars=True).items():
            state[key] = swap.get(id(value), value).detach().clone().contiguous()
        tmp = out / f".{name}.safetensors.tmp"
        save_file(state, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / f"{name}.safetensors")


def load_weights(pipe, folder: Path) -> None:
    from safetensors.torch import load_file

    for name in ("unet", "text_encoder"):
        getattr(pipe, name).load_state_dict(load_file(str(folder / f"{name}.safetensors")), strict=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--views", type=int, default=48, help="random views per photo in the latent bank")
    ap.add_argument("--min-frac", type=float, default=0.75, help="smallest random square, as a fraction of the shorter side")
    ap.add_argument("--p-canonical", type=float, default=0.35)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-guidance", type=float, default=7.5)
    ap.add_argument("--save-every", type=int, default=1000, help="write the EMA weights to --out every N steps")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights in --out; no training")
    ap.add_argument("--write-metrics", action="store_true", help="with --eval-only: replace the 'eval' entry of "
                                                                  "--out/metrics.json with the new evaluation")
    args = ap.parse_args(argv)

    t0 = time.time()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.eval_only:
        pipe = build_demo_pipeline(args.seed, trained=("vae",))
        load_weights(pipe, out)
        pipe.set_progress_bar_config(disable=True)
        result = evaluate(pipe, args.eval_seeds, args.eval_steps, args.eval_guidance)
        print(json.dumps({k: v for k, v in result.items() if k != "per_photo"}, indent=1))
        metrics_file = out / "metrics.json"
        if args.write_metrics and metrics_file.is_file():  # refresh the evaluation of the shipped weights
            metrics = json.loads(metrics_file.read_text())
            metrics["eval"] = result
            metrics_file.write_text(json.dumps(metrics, indent=1) + "\n")
        return result

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pipe = build_demo_pipeline(args.seed, trained=("vae",))
    pipe.set_progress_bar_config(disable=True)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    vae.requires_grad_(False).eval()

    catalogue = photo_catalogue()
    bank, owner, canonical_index = [], [], []
    for k, entry in enumerate(catalogue):
        img = load_photo(entry)
        views = [square_view(img, DEMO_SIZE)] + random_views(img, rng, args.views, DEMO_SIZE, args.min_frac)
        canonical_index.append(len(bank))
        bank += views
        owner += [k] * len(views)
    latents = to_latent(pipe, bank)
    owner_t = np.array(owner)
    per_photo = [np.flatnonzero(owner_t == k) for k in range(len(catalogue))]
    print(f"bank: {len(bank)} views of {len(catalogue)} photos, latents {tuple(latents.shape)}, "
          f"std {latents.std().item():.3f} mean {latents.mean().item():.3f}  ({time.time() - t0:.1f}s)", flush=True)
    captions = [e["captions"] for e in catalogue]
    token_cache = {c: tokenize(tokenizer, [c])[0] for caps in captions for c in caps + [""]}

    scheduler = pipe.scheduler
    alphas = scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    ema = [p.detach().clone() for p in params]

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    unet.train()
    text_encoder.train()
    loss_log, avg = [], None
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        photos = rng.integers(0, len(catalogue), size=args.batch)
        idx = [canonical_index[k] if rng.random() < args.p_canonical else int(rng.choice(per_photo[k]))
               for k in photos]
        caps = ["" if rng.random() < args.p_uncond else captions[k][int(rng.integers(0, len(captions[k])))]
                for k in photos]
        x0 = latents[idx]
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, size=args.batch))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ids = torch.stack([token_cache[c] for c in caps])
        emb = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        weight = torch.clamp(snr[t], max=args.snr_gamma) / snr[t]
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_weights(out, {"unet": unet, "text_encoder": text_encoder}, ema, params)
        if step % 100 == 0 or step == args.steps - 1:
            loss_log.append([step, round(avg, 5)])
            print(f"step {step:6d}  loss {avg:.4f}  lr {lr_at(step):.2e}  {time.time() - t_train:7.1f}s", flush=True)
    train_seconds = time.time() - t_train

    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    save_weights(out, {"unet": unet, "text_encoder": text_encoder})
    t_eval = time.time()
    result = evaluate(pipe, args.eval_seeds, args.eval_steps, args.eval_guidance)
    metrics = {
        "steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "views_per_photo": 1 + args.views, "min_frac": args.min_frac, "p_canonical": args.p_canonical,
        "p_uncond": args.p_uncond, "snr_gamma": args.snr_gamma, "size": DEMO_SIZE,
        "seconds": round(time.time() - t0, 1), "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - t_eval, 1),
        "params": {"unet": sum(p.numel() for p in unet.parameters()),
                   "text_encoder": sum(p.numel() for p in text_encoder.parameters())},
        "weights_bytes": {n: (out / f"{n}.safetensors").stat().st_size for n in ("unet", "text_encoder")},
        "latent_std": round(latents.std().item(), 4), "latent_mean": round(latents.mean().item(), 4),
        "train_loss_end": loss_log[-1][1], "train_loss_log": loss_log,
        "photos": {e["name"]: {"licence": e["licence"], "credit": e["credit"]} for e in catalogue},
        "eval": result,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_photo"}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
