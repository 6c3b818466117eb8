"""The experiment runner's steps: what each unit does, and one step as the body of a job.

See studio/experiments/runner.py for the protocol, the units and their caching. Unit runners take a
`StepContext` and a `Unit` and return the unit's result (a JSON dict), or None when `should_stop()`
ended them early (their partial work stays and is continued on the next run). Arrays are stored as
`.npy` files (written to a temporary name, then renamed) and read back as memory maps, so training
sets never have to fit in memory.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from studio.experiments import adapter
from studio.experiments.context import StepContext
from studio.experiments.plan import (DONE, STEPS, Stopped, Unit, now, plan, read_config, save_array, save_png, step_key,
                                     unit_done, write_json)
from studio.experiments.config import empty_fraction
from studio.experiments.dataset import run_data

# ---------------------------------------------------------------------------------------------- samples

def _load(ctx: StepContext, rel: str) -> np.ndarray:
    return np.load(ctx.folder("data") / rel, mmap_mode="r")


def human_samples(ctx: StepContext, role: str) -> list:
    return [adapter.sample(_load(ctx, r["image"]), _load(ctx, r["mask"]), "human", r["id"])
            for r in ctx.index() if r["role"] == role]


# ---------------------------------------------------------------------------------------------- 2. selector

def run_selector(ctx: StepContext, unit: Unit) -> dict | None:
    return _train(ctx, unit, adapter.config_from_json(unit.params["train_config"]), human_samples(ctx, "human"))


def _train(ctx: StepContext, unit: Unit, config, train_samples) -> dict | None:
    """Train `config` on `train_samples`; the checkpoint is chosen on the experiment's validation images
    (engines.training.detector: best val artifact IoU). The test set is not given to the trainer."""
    out = ctx.folder(unit)
    started = time.perf_counter()
    if not (out / "train" / "last").is_dir():
        print(f"unit {unit.name}: recipe '{config.recipe}'\n{adapter.describe_config(config)}", flush=True)
    val = human_samples(ctx, "val")
    test_set = json.loads((ctx.folder("data") / "test_set.json").read_text())
    provenance = {"experiment_unit": unit.name, "experiment_split": {
        "train_images": len(train_samples), "val_ids": [s.name for s in val],
        "reserved_test_digest": test_set["digest"]}}
    result = adapter.train(config, train_samples, val, out / "train", device=ctx.device,
                           progress=lambda s, t: ctx.progress(unit, s, t), should_stop=ctx.should_stop,
                           provenance=provenance)
    if result.stopped:
        return None
    history = [r for r in result.history if "seconds" in r]
    seconds = float(history[-1]["seconds"]) if history else time.perf_counter() - started
    checkpoint = adapter.best_checkpoint(out / "train")
    return {"checkpoint": str(checkpoint.relative_to(ctx.run_dir)), "selected_on": "val artifact_iou",
            "best_step": int(result.best_step), "steps": int(result.steps_done), "train_seconds": seconds,
            "steps_per_second": result.steps_done / seconds if seconds > 0 else None,
            "val_best_artifact_iou": _pct(result.best_artifact_iou), "val_best_miou": _pct(result.best_miou),
            "val_images": len(val), "train_images": len(train_samples), "recipe": config.to_json()}


# ---------------------------------------------------------------------------------------------- 3. corruption

def run_regions(ctx: StepContext, unit: Unit) -> dict | None:
    """The selector's probability maps on every source image (uint8, p * 255), sharded over ranks."""
    out = ctx.folder(unit) / "heat"
    out.mkdir(exist_ok=True)
    detector = adapter.load_detector(ctx.run_dir / ctx.result("selector")["checkpoint"], ctx.device)
    sources = [r for r in ctx.index() if r["role"] == "source"]
    mine = [r for i, r in enumerate(sources) if i % ctx.world == ctx.rank and not (out / f"{r['id']}.npy").is_file()]
    batch = 8
    for start in range(0, len(mine), batch):
        if ctx.should_stop():
            return None
        chunk = mine[start:start + batch]
        for row, heat in zip(chunk, adapter.predict(detector, [np.asarray(_load(ctx, r["image"])) for r in chunk], batch)):
            save_array(out / f"{row['id']}.npy", np.rint(np.clip(heat, 0, 1) * 255).astype(np.uint8))
        ctx.progress(unit, min(start + batch, len(mine)), len(mine))
    barrier = _shard_barrier(ctx, unit)
    if barrier is None:
        return {"shard": ctx.rank}
    if not barrier:
        return None
    tau = ctx.config.get("selector.threshold")
    areas = [float((np.load(out / f"{r['id']}.npy") >= tau * 255).mean()) for r in sources]
    return {"sources": len(sources), "mean_area_at_tau": float(np.mean(areas)) if areas else 0.0,
            "empty_at_tau": int(sum(a == 0 for a in areas))}


def region_mask(heat: np.ndarray, threshold: float, fallback: float | None) -> tuple[np.ndarray, bool]:
    """(region, used_fallback): selector probability >= threshold. When that region covers no 8x8 latent
    cell (by the corruption's "area" rule) and `fallback` is F, the F * H * W most probable pixels instead
    (ties broken by position, so the choice is deterministic)."""
    from engines.corruption.metrics import latent_mask

    region = heat >= threshold * 255.0
    if fallback is None or latent_mask(region, "area").any():
        return region, False
    count = max(1, int(round(fallback * heat.size)))
    order = np.argsort(-heat.astype(np.int32).ravel(), kind="stable")[:count]
    region = np.zeros(heat.size, bool)
    region[order] = True
    return region.reshape(heat.shape), True


def run_corrupt(ctx: StepContext, unit: Unit) -> dict | None:
    """One corrupted dataset: every source image's selected region corrupted by this variant."""
    from engines.corruption.metrics import latent_mask

    p = unit.params
    out = ctx.folder(unit)
    items = out / "items"
    items.mkdir(exist_ok=True)
    (out / "examples").mkdir(exist_ok=True)
    heat_dir = ctx.folder("regions") / "heat"
    fallback = empty_fraction(p["empty_regions"])
    sources = [r for r in ctx.index() if r["role"] == "source"]
    done = _manifest_ids(out)
    mine = [(i, r) for i, r in enumerate(sources) if i % ctx.world == ctx.rank and r["id"] not in done]
    shard = out / f"manifest.rank{ctx.rank}.jsonl"
    for n, (i, src) in enumerate(mine, start=1):
        if ctx.should_stop():
            return None
        heat = np.load(heat_dir / f"{src['id']}.npy")
        region, used_fallback = region_mask(heat, p["threshold"], fallback)
        row = {"id": src["id"], "source": src["id"], "fallback": used_fallback}
        if not region.any():
            row["skipped"] = "empty region at tau"
        elif not latent_mask(region, "area").any():
            row["skipped"] = "region smaller than one latent cell"
        else:
            params = adapter.corrupt_params(method=p["method"], inversion=p["inversion"], preset=p["preset"],
                                            num_inference_steps=p["num_inference_steps"], steps=p["steps"],
                                            baseline_steps=p["baseline_steps"], guidance_scale=p["guidance_scale"],
                                            prompt=src.get("caption", ""), seed=(p["seed"] + i) % 2**32)
            image, label, info = adapter.corrupt(ctx.engine(), np.asarray(_load(ctx, src["image"])), region, params)
            if not label.any():
                row["skipped"] = "nothing corrupted"
            else:
                from engines.detection.richhf_prep import array_digest

                save_array(items / f"{src['id']}.npy", image)
                save_array(items / f"{src['id']}.mask.npy", label)
                if i < p["examples"]:
                    save_png(out / "examples" / f"{i:03d}-{src['id']}.png", _example_strip(
                        np.asarray(_load(ctx, src["image"])), region, image, label))
                row.update(image=f"items/{src['id']}.npy", mask=f"items/{src['id']}.mask.npy",
                           digest=array_digest(image), label_area=float(label.mean()), prompt=params.prompt,
                           params=adapter.params_json(params), **info)
        with open(shard, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        ctx.progress(unit, n, len(mine))
    barrier = _shard_barrier(ctx, unit)
    if barrier is None:
        return {"shard": ctx.rank}
    if not barrier:
        return None
    rows = _merge_manifest(out)
    made = [r for r in rows if "skipped" not in r]
    if not made:
        raise ValueError(f"corruption.empty_regions: the selector marked no region on any source image for "
                         f"{unit.name}; lower selector.threshold or use empty_regions = \"top:0.05\".")
    def mean(key: str) -> float | None:
        values = [r[key] for r in made if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"items": len(made), "skipped": dict(Counter(r["skipped"] for r in rows if "skipped" in r)),
            "fallback_regions": sum(bool(r["fallback"]) for r in made),
            "mean_confinement_vs_input": mean("confinement_vs_input"),
            "mean_confinement_vs_resample": mean("confinement_vs_resample"),
            "mean_region_iou": mean("region_iou"),
            "mean_label_area": float(np.mean([r["label_area"] for r in made])),
            "unet_calls": int(sum(r["unet_calls"] for r in made)), "params": made[0]["params"]}


def _example_strip(source: np.ndarray, region: np.ndarray, corrupted: np.ndarray, label: np.ndarray) -> np.ndarray:
    """source | source with the region in red | corrupted | corrupted with the label outlined."""
    from engines.detection.detect import mask_edges

    def tint(img, mask):
        out = img.astype(np.float32).copy()
        out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0])
        return out.astype(np.uint8)

    outlined = corrupted.copy()
    outlined[mask_edges(label)] = (255, 255, 0)
    return np.concatenate([source, tint(source, region), corrupted, outlined], axis=1)


def _manifest_ids(out: Path) -> set[str]:
    ids = set()
    for file in out.glob("manifest.rank*.jsonl"):
        for line in file.read_text().splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue
    return ids


def _merge_manifest(out: Path) -> list[dict]:
    rows = {}
    for file in sorted(out.glob("manifest.rank*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    ordered = [rows[k] for k in sorted(rows)]
    tmp = out / ".manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    os.replace(tmp, out / "manifest.jsonl")
    return ordered


def _shard_barrier(ctx: StepContext, unit: Unit) -> bool | None:
    """Every rank marks its share done; rank 0 waits for all of them and gets True (False if stopped
    meanwhile); other ranks get None (their share is done, rank 0 finishes the unit)."""
    if ctx.world == 1:
        return True
    folder = ctx.folder(unit)
    write_json(folder / f"rank{ctx.rank}.done", {"key": unit.key, "world": ctx.world})
    if ctx.rank != 0:
        return None

    def all_done() -> bool:
        for r in range(ctx.world):
            f = folder / f"rank{r}.done"
            if not f.is_file() or json.loads(f.read_text()).get("world") != ctx.world:
                return False
        return True

    return _wait(all_done, ctx.should_stop)


def _wait(predicate: Callable[[], bool], should_stop: Callable[[], bool], poll: float = 0.5) -> bool:
    while not predicate():
        if should_stop():
            return False
        time.sleep(poll)
    return True


# ---------------------------------------------------------------------------------------------- 4. detectors

def run_detector(ctx: StepContext, unit: Unit) -> dict | None:
    """One detector of a table row. A training set whose labels hold no artifact pixel at all (e.g. pseudo
    labels from a selector that marks nothing) cannot train a detector: the row is then scored as the
    detector that marks nothing, and the report says so."""
    p = unit.params
    train = _training_samples(ctx, unit)
    write_json(ctx.folder(unit) / "training_set.json",
               [{"name": s.name, "source": s.source, "digest": d} for s, d in train])
    sources = dict(Counter(s.source for s, _ in train))
    if not any(np.asarray(s.mask).any() for s, _ in train):
        return {"checkpoint": None, "untrained": "no artifact pixel in the training labels", "steps": 0,
                "train_images": len(train), "sources": sources}
    result = _train(ctx, unit, adapter.config_from_json(p["train_config"]), [s for s, _ in train])
    if result is not None:
        result["sources"] = sources
    return result


def _training_samples(ctx: StepContext, unit: Unit) -> list[tuple[object, str]]:
    """[(TrainSample, digest of its image)] of this detector's training set."""
    p = unit.params
    index = ctx.index()
    if p["train"] == "human":
        return [(adapter.sample(_load(ctx, r["image"]), _load(ctx, r["mask"]), "human", r["id"]), r["digest"])
                for r in index if r["role"] == "human"]
    if p["train"] == "pseudo":
        heat_dir = ctx.folder("regions") / "heat"
        masks = ctx.folder(unit) / "pseudo_masks"
        masks.mkdir(exist_ok=True)
        out = []
        for r in index:
            if r["role"] != "source":
                continue
            file = masks / f"{r['id']}.npy"
            if not file.is_file():
                save_array(file, np.load(heat_dir / f"{r['id']}.npy") >= p["pseudo_threshold"] * 255.0)
            out.append((adapter.sample(_load(ctx, r["image"]), np.load(file, mmap_mode="r"), "pseudo", r["id"]),
                        r["digest"]))
        return out
    variant = ctx.folder(f"corrupt/{p['train']}")
    rows = [json.loads(line) for line in (variant / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [(adapter.sample(np.load(variant / r["image"], mmap_mode="r"), np.load(variant / r["mask"], mmap_mode="r"),
                            "synthetic", f"{p['train']}:{r['id']}"), r["digest"]) for r in rows if "skipped" not in r]


# ---------------------------------------------------------------------------------------------- 5. evaluation

def run_evaluate(ctx: StepContext, unit: Unit) -> dict | None:
    """The detector's chosen checkpoint (best on validation) on the fixed test set, scored as the trainer
    scores (adapter.Scorer = engines.training.detector.evaluate_detector): artifact-class IoU (the headline),
    2-class mIoU, per-image IoU. Percentages."""
    trained = ctx.result(unit.inputs[0])
    test = human_samples(ctx, "test")
    checkpoint = None if trained["checkpoint"] is None else ctx.run_dir / trained["checkpoint"]
    scorer = adapter.Scorer(checkpoint, ctx.device)
    scores, chunk = [], 8
    for start in range(0, len(test), chunk):
        if ctx.should_stop():
            return None
        scores += scorer.score(test[start:start + chunk])
        ctx.progress(unit, len(scores), len(test))
    m = scorer.metrics(scores)
    test_set = json.loads((ctx.folder("data") / "test_set.json").read_text())
    return {"artifact_iou": _pct(m.artifact_iou), "miou": _pct(m.miou), "background_iou": _pct(m.background_iou),
            "mean_image_iou": _pct(m.mean_image_iou), "precision": _pct(m.precision), "recall": _pct(m.recall),
            "f1": _pct(m.f1), "test_images": len(test), "test_digest": test_set["digest"],
            "checkpoint": trained["checkpoint"], "selected_on": trained.get("selected_on"),
            "untrained": trained.get("untrained"),
            "per_image_iou": {s.name: s.iou * 100.0 for s in scores}}


def _pct(value: float) -> float | None:
    return float(value) * 100.0 if np.isfinite(value) else None


RUNNERS = {"data": run_data, "selector": run_selector, "regions": run_regions, "corrupt": run_corrupt,
           "detector": run_detector, "evaluate": run_evaluate}


# ---------------------------------------------------------------------------------------------- one step (inside a job)

def run_step(run_dir: Path, step: str, *, data_dir: Path, device: str, should_stop=None, log=None,
             rank: int | None = None, world: int | None = None, expected_key: str | None = None) -> dict:
    """Run the unfinished units of one step (the body of an `experiment` job). Returns
    {"step", "units", "done", "stopped"}; partial work is kept when stopped."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    units = plan(config)
    by_name = {u.name: u for u in units}
    mine = [u for u in units if u.step == step]
    if not mine:
        raise ValueError(f"Unknown experiment step '{step}'; steps are {', '.join(STEPS)}.")
    if expected_key and expected_key != step_key(mine):
        raise ValueError(f"The config in '{run_dir}' changed since this job was queued; rerun `experiment run`.")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if device.startswith("cuda") and world > 1 and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    threads = int(config.get("experiment.threads"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    ctx = StepContext(run_dir=run_dir, data_dir=Path(data_dir), device=device, config=config, units=by_name,
                      rank=rank, world=world, should_stop=should_stop or (lambda: False), log=log or (lambda r: None))
    stopped = False
    try:
        if step in ("data", "selector"):
            for unit in mine:
                if rank == 0:
                    stopped = not _run_unit(ctx, unit)
                else:
                    stopped = not _wait(lambda u=unit: unit_done(run_dir, u) is not None, ctx.should_stop)
                if stopped:
                    break
        elif step == "corruption":
            for unit in mine:  # regions first, then each variant; items are sharded inside
                if unit_done(run_dir, unit) is None:
                    ok = _run_unit(ctx, unit) if rank == 0 else _run_shard(ctx, unit)
                    if not ok:
                        stopped = True
                        break
        else:
            for i, unit in enumerate(mine):
                if i % world == rank and not _run_unit(ctx, unit):
                    stopped = True
                    break
            if not stopped:
                stopped = not _wait(lambda: all(unit_done(run_dir, u) for u in mine), ctx.should_stop)
    except Stopped:
        stopped = True
    done = sum(unit_done(run_dir, u) is not None for u in mine)
    return {"step": step, "units": len(mine), "done": done, "stopped": stopped}


def _run_unit(ctx: StepContext, unit: Unit) -> bool:
    """Run a unit unless done; write its done record. False when stopped."""
    if unit_done(ctx.run_dir, unit) is not None:
        return True
    started, cpu = time.perf_counter(), time.process_time()
    print(f"unit {unit.name}: start", flush=True)
    result = RUNNERS[unit.kind](ctx, unit)
    if result is None:
        return False
    write_json(ctx.folder(unit) / DONE, {"key": unit.key, "name": unit.name, "kind": unit.kind, "params": unit.params,
                                          "result": result, "seconds": time.perf_counter() - started,
                                          "cpu_seconds": time.process_time() - cpu,
                                          "device": ctx.device, "world": ctx.world, "finished_at": now()})
    ctx.progress(unit, 1, 1, force=True)
    print(f"unit {unit.name}: done in {time.perf_counter() - started:.1f} s", flush=True)
    return True


def _run_shard(ctx: StepContext, unit: Unit) -> bool:
    """A rank > 0's share of a sharded unit; then wait for rank 0 to finish the unit."""
    result = RUNNERS[unit.kind](ctx, unit)
    if result is None and ctx.should_stop():
        return False
    return _wait(lambda: unit_done(ctx.run_dir, unit) is not None, ctx.should_stop)


def run_step_job(services, job, out: Path, should_stop, log) -> dict:
    """studio/jobs.py runner for the `experiment` job kind."""
    params = job.params
    result = run_step(Path(params["run_dir"]), params["step"], data_dir=services.data_dir,
                      device=params.get("device", "cpu"), should_stop=should_stop, log=log,
                      expected_key=params.get("key"))
    return {**result, "stopped": bool(result["stopped"])}
