"""`artifact-studio` commands that make images from images: corrupt (region corruption datasets) and
repair.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from studio.cli.common import StderrProgress, captions_for, open_services, parse_seeds
from studio.cli.data import by_stem, read_mask


def cmd_corrupt(args) -> int:
    """Resumable dataset builder: each item is written (image, mask: temp + rename) before its manifest
    line, so a rerun skips finished items and a kill leaves no half-written item. Under
    `accelerate launch` (RANK / WORLD_SIZE set) items are sharded across processes, each writing its own
    manifest shard; the shards are merged into manifest.jsonl. Seeds and options are all checked
    before the first item is written."""
    from engines.corruption.corrupt import CorruptParams
    from engines.images import find_images
    from studio.safeio import Created, check_out_dir

    seeds = parse_seeds(args.seeds)
    if args.renoise_iterations is not None and args.preset != "custom":
        raise ValueError(f"--renoise-iterations goes with --preset custom (preset {args.preset} fixes its settings).")
    extra = {} if args.renoise_iterations is None else {"renoise_iterations": args.renoise_iterations}
    base = CorruptParams.from_preset(args.preset, num_inference_steps=args.num_inference_steps,
                                     inversion_steps=args.inversion_steps, baseline_steps=args.baseline_steps,
                                     method=args.method, seed=seeds[0], guidance_scale=args.guidance,
                                     label=args.label, **extra)
    base.validate()
    for seed in seeds:  # every seed is checked before the first item is written
        try:
            CorruptParams(**{**base.to_json(), "seed": seed}).validate()
        except ValueError as exc:
            raise ValueError(f"--seeds: {exc}") from None
    if args.masks and not args.images:
        raise ValueError("--masks goes with --images.")
    if args.captions and not args.images:
        raise ValueError("--captions goes with --images (session images carry their captions; `import --captions` sets them).")
    if args.max_side is not None and not 8 <= args.max_side <= 4096:
        raise ValueError(f"--max-side must be between 8 and 4096, got {args.max_side}.")
    captions = captions_for(args.captions, find_images([args.images])) if args.captions else {}
    out = check_out_dir(args.out, "--out")
    rows = [json.loads(line) for f in out.glob("manifest*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    settings = {k: v for k, v in json.loads(json.dumps(base.to_json())).items() if k not in ("seed", "prompt")}
    for row in rows:  # a rerun resumes; other settings for the same method would mix two datasets
        if row.get("method") == args.method and \
                {k: v for k, v in row.get("params", {}).items() if k not in ("seed", "prompt")} != settings:
            raise ValueError(f"{out} holds {args.method} items made with other settings (item {row.get('item')}); "
                             "use another --out, or the same settings to resume.")
    done = {row["item"] for row in rows}
    with Created() as created:  # a run that fails before writing an item leaves no empty folders
        created.mkdir(out / "images")
        created.mkdir(out / "masks")
        return _corrupt_into(args, out, seeds, base, captions, done)


def _corrupt_into(args, out: Path, seeds: list[int], base, captions: dict, done: set) -> int:
    import os

    from PIL import Image

    from engines.corruption.corrupt import CorruptParams
    from engines.corruption.metrics import random_blob_mask
    from engines.images import find_images, load_image
    from studio.datasets.captions import caption_for
    from studio.services import fit_pair

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    shard = out / (f"manifest.rank{rank}.jsonl" if world > 1 else "manifest.jsonl")
    services = open_services(args, args.model)
    try:
        # Work list: (name, loader of rgb, loader of mask, mask source, prompt, parent info)
        work = []
        if args.session:
            session = services.store.get_session(args.session)
            for rec in services.store.list_images(session.id):
                if rec.source == "corrupted":
                    continue
                src = args.mask_source or ("label regions" if services.store.is_labelled(rec.id) else "random blobs")
                work.append((f"{Path(rec.original_name or 'image').stem}-{rec.id}", rec.id, None, src, caption_for(rec)))
        else:
            masks = by_stem(find_images([args.masks]), "mask") if args.masks else {}
            for f in find_images([args.images]):
                if args.masks and f.stem not in masks:
                    print(f"artifact-studio: no mask for {f.name}; skipped", file=sys.stderr)
                    continue
                work.append((f.stem, f, masks.get(f.stem), "mask file" if args.masks else "random blobs",
                             captions.get(f.name, "")))
        items = [(w, seed) for w in work for seed in seeds]
        items = [it for i, it in enumerate(items) if i % world == rank]
        todo = [it for it in items if f"{it[0][0]}-{args.method}-s{it[1]}" not in done]
        print(f"{len(items) - len(todo)} item(s) already done, {len(todo)} to do (rank {rank} of {world})", file=sys.stderr)
        corruptor = services.corruptor() if todo else None
        written = []
        bar = StderrProgress("corrupting")
        for n, ((name, src_ref, mask_ref, mask_source, prompt), seed) in enumerate(todo, start=1):
            item = f"{name}-{args.method}-s{seed}"
            if isinstance(src_ref, int):
                rgb = services.store.load_rgb(src_ref)
                mask = services.corruption_mask(src_ref, mask_source, detector=args.selector,
                                                threshold=args.threshold, seed=seed)
            else:
                rgb = load_image(src_ref)
                mask = (read_mask(mask_ref) if mask_ref is not None
                        else random_blob_mask(rgb.shape[0], rgb.shape[1], seed))
                if mask.shape != rgb.shape[:2]:
                    raise ValueError(f"{Path(mask_ref).name}: mask size {mask.shape[::-1]} differs from the image's "
                                     f"{rgb.shape[1::-1]}; masks are not stretched.")
            rgb, mask = fit_pair(rgb, mask, args.max_side)
            if not mask.any():
                print(f"artifact-studio: empty region for {item}; skipped", file=sys.stderr)
                continue
            params = CorruptParams(**{**base.to_json(), "seed": seed, "prompt": prompt})
            result = corruptor.corrupt(rgb, mask, params)
            for folder, array in (("images", result.image), ("masks", result.mask.astype(np.uint8) * 255)):
                tmp = out / folder / f".{item}.tmp.png"
                Image.fromarray(array).save(tmp)
                os.replace(tmp, out / folder / f"{item}.png")
            row = {"item": item, "image": f"images/{item}.png", "mask": f"masks/{item}.png", "source": str(src_ref),
                   "mask_source": mask_source, "method": args.method, "preset": params.preset, "seed": seed,
                   "caption": prompt, "label": params.label, "params": params.to_json(),
                   "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), **result.metrics(),
                   "unet_calls": result.unet_calls, "cache_hit": result.cache_hit}
            with open(shard, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            written.append(row)
            bar(n, len(todo))
        bar.close()
        if world > 1:
            _merge_manifests(out)
        if args.json:
            print(json.dumps(written, indent=2))
        else:
            print(f"wrote {len(written)} item(s) to {out}")
        return 0
    finally:
        services.close()


def _merge_manifests(out: Path) -> None:
    """manifest.jsonl = the union of all rank shards (atomic replace; safe to run repeatedly)."""
    import os

    rows = {}
    for f in sorted(out.glob("manifest*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows[json.loads(line)["item"]] = line
    tmp = out / ".manifest.tmp"
    tmp.write_text("".join(rows[k] + "\n" for k in sorted(rows)))
    os.replace(tmp, out / "manifest.jsonl")


def cmd_repair(args) -> int:
    """JSON per image: before/after artifact area in the region, the chosen seed, max change outside.

    Options, seeds and --out are checked first; every image is repaired before anything is written;
    then the files go to --out and the session's repaired images are stored in one transaction (a
    failure removes the files again)."""
    from PIL import Image

    from engines.images import load_image
    from engines.generation.repair import RepairParams
    from studio.safeio import Created, atomic_output, check_out_dir
    from studio.store.records import NewImage

    seeds = tuple(parse_seeds(args.seeds))
    if args.image and not args.out:
        raise ValueError("--image needs --out DIR for the repaired image.")
    RepairParams(threshold=args.threshold, grow=args.grow, feather=args.feather, seeds=seeds,
                 num_inference_steps=args.steps, strength=args.strength, prompt=args.prompt or "").validate()
    out = check_out_dir(args.out, "--out") if args.out else None
    image = load_image(args.image) if args.image else None
    services = open_services(args, args.model, uses=args.detector)
    try:
        if args.image:
            work = [(Path(args.image).stem, image, None, "")]
        else:
            session = services.store.get_session(args.session)
            work = [(Path(r.original_name or "image").stem + f"-{r.id}", services.store.load_rgb(r.id), r,
                     str(r.params.get("prompt", "") or "")) for r in services.store.list_images(session.id)
                    if r.source != "repaired"]
        rows, results = [], []
        for name, rgb, record, prompt in work:
            params = RepairParams(threshold=args.threshold, grow=args.grow, feather=args.feather, seeds=seeds,
                                  num_inference_steps=args.steps, strength=args.strength,
                                  prompt=args.prompt if args.prompt is not None else prompt)
            try:
                result = services.repair(rgb, args.detector, params)
            except ValueError as exc:
                if args.image:
                    raise
                rows.append({"name": name, "skipped": " ".join(str(exc).split())})
                continue
            best = result.candidates[0]
            row = {"name": name, "seed": best.seed, "artifact_area_before": round(best.artifact_area_before, 6),
                   "artifact_area_after": round(best.artifact_area_after, 6),
                   "max_change_outside_mask": int(best.outside_max_change),
                   "candidates": [{"seed": c.seed, "artifact_area_after": round(c.artifact_area_after, 6)}
                                  for c in result.candidates]}
            if out:
                row["path"] = str(out / f"{name}_repaired.png")
            rows.append(row)
            results.append((row, best.image, record))
        with Created() as created:
            if out:
                created.mkdir(out)
                for row, repaired, _ in results:
                    with atomic_output(created.file(Path(row["path"]))) as tmp:
                        Image.fromarray(repaired).save(tmp, format="PNG")
            stored = [(row, repaired, record) for row, repaired, record in results if record is not None]
            if stored:
                with services.store.transaction():
                    for row, repaired, record in stored:
                        rec = services.store.add_images(record.session_id, [NewImage(
                            rgb=repaired, source="repaired", parent_id=record.id, model_id=services.model_spec,
                            params={k: v for k, v in row.items() if k not in ("path", "name")})])[0]
                        row["image_id"] = rec.id
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                if "skipped" in row:
                    print(f"{row['name']}: skipped ({row['skipped']})")
                else:
                    print(f"{row['name']}: artifact area {100 * row['artifact_area_before']:.2f}% -> "
                          f"{100 * row['artifact_area_after']:.2f}% (seed {row['seed']}), max change outside "
                          f"{row['max_change_outside_mask']}")
        return 0
    finally:
        services.close()
