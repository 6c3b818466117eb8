"""What an experiment run writes: results.md, results.csv, plots/*.png, environment.json.

Each table is laid out as in the paper (one row per training set / method / corruption step) with our
numbers (mean +- std over seeds when there are several) and the paper's published number beside them.
The headline is the artifact-class IoU (%): a detector that marks nothing scores 0 on it, while the
2-class mIoU of that detector is about 47.6 (the background IoU averaged in), so only the artifact-class
IoU can be what the paper's "mIoU (%)" column (values 0.22-28.5) reports. Both are shown.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import subprocess
from pathlib import Path

import numpy as np

from studio.experiments.plan import STEP_TITLES, STEPS, plan, read_config, table_rows, unit_done
from studio.experiments.config import PAPER_COUNTS

TABLE_TITLES = {
    "table1": "Table 1. Training data for the artifact detector",
    "table2": "Table 2. Corruption methods",
    "table3": "Table 3. Corruption step (of 50 DDIM steps)",
    "table4": "Table 4. Direct corruption vs resampling",
}
BACKBONES = {"upernet-convnext-tiny": "ConvNeXt-T", "upernet-swin-tiny": "Swin-T", "tiny": "toy UperNet"}

PAPER_NUMBERS: dict[tuple[str, str, str], float] = {}
"""(table, row key, "ConvNeXt-T" | "Swin-T") -> the paper's mIoU (%). Empty: the tables of Menn, Liang,
Marculescu (arXiv 2509.19589) could not be read from the sources available when this was written (only
the abstract was); every paper cell therefore reads "n/a". Fill in from the paper to compare."""

PAPER_FACTS = (
    "Paper facts we could verify (abstract of arXiv 2509.19589): the corruption pipeline improves the detector "
    "by 13.2% (ConvNeXt) and 3.7% (Swin-T) over the baselines, measured on human-labelled data; whether these are "
    "points or relative percentages is not stated there. The table values themselves (n/a below) and the "
    f"{PAPER_COUNTS['train']:,} train / {PAPER_COUNTS['test']} test counts (quoted from the issue that specified "
    "this runner) could not be checked against the paper's text.")


# ---------------------------------------------------------------------------------------------- results

def collect(run_dir: Path) -> dict:
    """Per table row: the seeds' evaluation results and their mean/std. Rows whose evaluation has not
    finished have `pending` True."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    units = {u.name: u for u in plan(config)}
    tables = {}
    for table, rows in table_rows(config).items():
        out_rows = []
        for row in rows:
            per_seed = []
            for seed in config.get("experiment.seeds"):
                record = unit_done(run_dir, units[f"evaluate/{row.train}-s{seed}"])
                if record is not None:
                    per_seed.append({"seed": seed, **record["result"]})
            entry = {"table": table, "label": row.label, "train": row.train, "paper_key": row.paper,
                     "seeds": [r["seed"] for r in per_seed], "pending": len(per_seed) < len(config.get("experiment.seeds"))}
            for metric in ("artifact_iou", "miou", "mean_image_iou", "precision", "recall"):
                values = [r[metric] for r in per_seed if r.get(metric) is not None]
                entry[f"{metric}_mean"] = float(np.mean(values)) if values else None
                entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            ious = [v for r in per_seed for v in r.get("per_image_iou", {}).values()]
            entry["per_image_iou"] = ious
            entry["per_image_iou_median"] = float(np.median(ious)) if ious else None
            entry["test_images"] = per_seed[0]["test_images"] if per_seed else None
            entry["untrained"] = sorted({r["untrained"] for r in per_seed if r.get("untrained")})
            for backbone in ("ConvNeXt-T", "Swin-T"):
                entry[f"paper_{backbone}"] = PAPER_NUMBERS.get((table, row.paper, backbone))
            out_rows.append(entry)
        tables[table] = out_rows
    data = unit_done(run_dir, units["data"])
    return {"config": config, "tables": tables, "data": data["result"] if data else None, "units": units}


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "pending"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _paper(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------- writing

def write_report(run_dir: Path) -> Path:
    """Write results.md, results.csv, plots/ and environment.json into the run folder; returns results.md."""
    run_dir = Path(run_dir)
    results = collect(run_dir)
    plots = write_plots(run_dir, results)
    (run_dir / "results.csv").write_text(results_csv(results))
    env = environment(run_dir)
    (run_dir / "environment.json").write_text(json.dumps(env, indent=1))
    (run_dir / "results.md").write_text(results_markdown(run_dir, results, plots, env))
    return run_dir / "results.md"


CSV_FIELDS = ("table", "row", "train", "architecture", "seeds", "artifact_iou_mean", "artifact_iou_std", "miou_mean",
              "miou_std", "mean_image_iou_mean", "per_image_iou_median", "precision_mean", "recall_mean", "test_images",
              "paper_convnext_t", "paper_swin_t")


def results_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_FIELDS)
    arch = results["config"].get("model.architecture")
    for table, rows in results["tables"].items():
        for r in rows:
            writer.writerow([table, r["label"], r["train"], arch, " ".join(map(str, r["seeds"])),
                             *(_num(r[k]) for k in ("artifact_iou_mean", "artifact_iou_std", "miou_mean", "miou_std",
                                                    "mean_image_iou_mean", "per_image_iou_median", "precision_mean",
                                                    "recall_mean")),
                             r["test_images"] if r["test_images"] is not None else "",
                             _num(r["paper_ConvNeXt-T"]), _num(r["paper_Swin-T"])])
    return buf.getvalue()


def _num(value) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def results_markdown(run_dir: Path, results: dict, plots: dict, env: dict) -> str:
    config = results["config"]
    arch = config.get("model.architecture")
    ours = BACKBONES.get(arch, arch)
    seeds = config.get("experiment.seeds")
    lines = [f"# {config.name}: reproducing *Synthesizing Artifact Dataset for Pixel-level Detection*", "",
             f"Profile **{config.profile}**, detector **{ours}** (`{arch}`), seeds {seeds} "
             f"({'mean ± sample std over seeds' if len(seeds) > 1 else 'one seed: no std'}), device "
             f"`{env.get('device')}`. Headline: **artifact-class IoU (%)** on the fixed test set (what the paper "
             "calls mIoU); the 2-class mIoU (background and artifact averaged) is beside it.", ""]
    if config.profile == "tiny" or config.get("data.synthesise"):
        lines += ["> Synthetic data and toy models: these numbers test the pipeline, they say nothing about the "
                  "paper's claims.", ""]
    lines += _data_section(results) + [""]
    lines += _config_section(results)
    for table, rows in results["tables"].items():
        lines += [f"## {TABLE_TITLES[table]}", "",
                  f"| {'Corruption step' if table == 'table3' else 'Training data' if table == 'table1' else 'Method'} "
                  f"| Ours: artifact IoU (%) | Ours: 2-class mIoU (%) | Ours: per-image IoU median (%) "
                  f"| Paper ConvNeXt-T (%) | Paper Swin-T (%) |",
                  "|---|---:|---:|---:|---:|---:|"]
        notes = []
        for r in rows:
            median = "pending" if r["per_image_iou_median"] is None else f"{r['per_image_iou_median']:.2f}"
            label = r["label"]
            if r["untrained"]:
                label += " †"
                notes.append(f"† {r['label']}: {', '.join(r['untrained'])}; not trained, scored as a detector that "
                             "marks nothing.")
            lines.append(f"| {label} | {_fmt(r['artifact_iou_mean'], r['artifact_iou_std'])} "
                         f"| {_fmt(r['miou_mean'], r['miou_std'])} | {median} "
                         f"| {_paper(r['paper_ConvNeXt-T'])} | {_paper(r['paper_Swin-T'])} |")
        lines += [""] + notes if notes else []
        if table in plots:
            lines += ["", f"![{table}](plots/{plots[table]})"]
        lines.append("")
    lines += ["## Paper numbers", "", PAPER_FACTS, ""]
    lines += _corruption_section(run_dir, results, plots)
    if "per_image_iou" in plots:
        lines += ["## Per-image IoU on the test set", "", f"![per-image IoU](plots/{plots['per_image_iou']})", ""]
    lines += _timing_section(run_dir, results)
    lines += ["## Environment", "", "```json", json.dumps({k: env[k] for k in ("device", "python", "packages", "git",
                                                                              "cpu") if k in env}, indent=1), "```",
              "", "The exact config is in `config.resolved.json` (and the file as given in `config.toml`).", ""]
    return "\n".join(lines)


def _data_section(results: dict) -> list[str]:
    data = results["data"]
    if data is None:
        return ["## Data", "", "pending"]
    c, used = data["counts"], data["used"]
    lines = ["## Data (RichHF-18k preprocessing)", "",
             "| split | records | kept (>= 3 annotators or empty) | used | paper |", "|---|---:|---:|---:|---:|"]
    lines.append(f"| train | {c['train'].get('records', 0)} | {c['train'].get('eligible', 0)} | RichHF-100 set "
                 f"{used.get('human', 0)}, sources {used.get('source', 0)} | {PAPER_COUNTS['train']:,} |")
    if "val" in c:
        lines.append(f"| validation | {c['val'].get('records', 0)} | {c['val'].get('eligible', 0)} | {used.get('val', 0)} | — |")
    lines.append(f"| test | {c['test'].get('records', 0)} | {c['test'].get('eligible', 0)} | {used.get('test', 0)} "
                 f"| {PAPER_COUNTS['test']} |")
    reasons = {split: {k: v for k, v in counts.items() if k not in ("records", "eligible", "unmatched names")}
               for split, counts in c.items()}
    lines += ["", "Maps by inferred annotator count (from each map's value grid; `engines/detection/richhf_prep.py`): "
              + "; ".join(f"{split}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.items())) for split, r in reasons.items())
              + f". Test set digest `{data['test_digest']}`; source images from the {data['source_origin']}."]
    if data.get("duplicates_of_test_excluded"):
        lines.append(f"{len(data['duplicates_of_test_excluded'])} training image(s) with the same pixels as a test "
                     "image were left out of training.")
    return lines


NOT_PROTOCOL = ("experiment.name", "experiment.profile", "experiment.threads", "corruption.examples",
                # shown as the effective training knobs instead (the recipe's rows)
                "model.architecture", "model.init", *(f"{section}.{key}" for section in ("selector", "detector")
                                                       for key in ("steps", "batch_size", "crop", "lr", "recipe")))
DATA_FILES = ("data.train_tfrecord", "data.val_tfrecord", "data.test_tfrecord", "data.images", "data.captions")
RECIPE_KNOBS = ("recipe", "arch", "init", "steps", "batch_size", "crop", "lr", "betas", "weight_decay", "lr_schedule",
                "warmup_steps", "sampling", "p_pos", "artifact_weight", "color_jitter", "scale_range", "hflip",
                "aux_weight")


def paper_train_config(architecture: str, selector: bool):
    """The paper's own training setting for comparison: its recipe on an ADE20K-initialised UperNet
    (the config's UperNet, ConvNeXt-T for the toy architecture), with 1,000 selector / 10,000 detector
    iterations at batch 8 and 512-px crops."""
    from engines.training.recipes import resolve_recipe

    arch = architecture if architecture.startswith("upernet-") else "upernet-convnext-tiny"
    return resolve_recipe("paper", arch=arch, init="ADE20K UperNet", region_selector=selector)


def deviations(config) -> list[tuple[str, object, object]]:
    """(setting, ours, paper) for every protocol value of the config that differs from the paper's
    (studio.experiments.config.DEFAULTS), and for every training knob of the selector and the detectors
    that differs from the paper's recipe on an ADE20K-initialised UperNet (`paper_train_config`)."""
    from studio.experiments.config import DEFAULTS

    out = []

    def walk(ours: dict, paper: dict, prefix: str) -> None:
        for key, default in paper.items():
            dotted = f"{prefix}{key}"
            if dotted in NOT_PROTOCOL or (config.get("data.synthesise") and (dotted in DATA_FILES)):
                continue
            if dotted == "data.synthetic" and not config.get("data.synthesise"):
                continue
            if isinstance(default, dict) and dotted != "data.synthetic":
                walk(ours[key], default, f"{dotted}.")
            elif ours[key] != default:
                out.append((dotted, ours[key], "(not synthesised)" if dotted == "data.synthetic" else default))

    walk(config.values, DEFAULTS, "")
    units = {u.kind: u for u in plan(config) if u.kind in ("selector", "detector")}
    for kind, unit in units.items():
        paper = paper_train_config(config.get("model.architecture"), kind == "selector").to_json()
        ours = unit.params["train_config"]
        for knob in RECIPE_KNOBS:
            if ours.get(knob) != paper.get(knob):
                out.append((f"{kind} training: {knob}", ours.get(knob), paper.get(knob)))
    return out


def _config_section(results: dict) -> list[str]:
    config = results["config"]
    lines = ["## Config: deviations from the paper's protocol", "",
             "Every setting of this run that differs from the paper's protocol (`assets/experiments/paper.toml`) or "
             "from the paper's training recipe on an ADE20K-initialised UperNet (`engines/training/recipes.py`, recipe "
             "`paper`: plain cross-entropy, no class weights, uniform sampling, no jitter, AdamW 6e-5, betas "
             "(0.9, 0.999), weight decay 0.01, poly decay). The reasons are in the config file's comments "
             "(`config.toml`; the shipped `tiny.toml` explains each of its values).", ""]
    rows = deviations(config)
    if not rows:
        return lines + ["None: this run is the paper's protocol.", ""]
    lines += ["| setting | this run | paper |", "|---|---|---|"]
    lines += [f"| `{k}` | {_show(ours)} | {_show(paper)} |" for k, ours, paper in rows]
    if not config.get("model.init"):
        lines += ["", "Without `model.init` the models start from random weights: the recipe then uses its measured "
                  "from-scratch learning rate (`SCRATCH_LR` in engines/training/recipes.py) unless the config sets `lr`, "
                  "and a model built from scratch has no auxiliary head, so the recipe's aux_weight has no effect."]
    return lines + [""]


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)
    return text.replace("|", "\\|")


def _corruption_section(run_dir: Path, results: dict, plots: dict) -> list[str]:
    rows = []
    for name, unit in results["units"].items():
        if unit.kind != "corrupt":
            continue
        record = unit_done(run_dir, unit)
        if record is None:
            rows.append(f"| {name.split('/', 1)[1]} | pending | | | | |")
            continue
        r = record["result"]
        figures = " | ".join("" if r.get(k) is None else f"{r[k]:.{d}f}" for k, d in (
            ("mean_confinement_vs_input", 2), ("mean_confinement_vs_resample", 2), ("mean_region_iou", 3)))
        rows.append(f"| {name.split('/', 1)[1]} | {r['items']} | {r['fallback_regions']} | {figures} |")
    if not rows:
        return []
    lines = ["## Corrupted datasets", "", "| variant | items | regions from the fallback | confinement vs input "
             "| confinement vs uncorrupted resample | IoU(selected region, corrupted area) |",
             "|---|---:|---:|---:|---:|---:|", *rows, "",
             "The label of every corrupted image is the area actually corrupted (the corrupted latent cells at pixel "
             "resolution), not the selector's region. Confinement = mean change inside / outside the label, against "
             "the input (includes the VAE and inversion error) and against the uncorrupted resample of the same "
             "inversion (only what the corruption changed)."]
    if "examples" in plots:
        lines += ["", f"![corrupted examples](plots/{plots['examples']})",
                  "", "Each strip: source | selected region (red) | corrupted | label outline (yellow)."]
    return lines + [""]


def _timing_section(run_dir: Path, results: dict) -> list[str]:
    lines = ["## Measured time", "", "| step | units | seconds | measured rate |", "|---|---:|---:|---|"]
    units = list(results["units"].values())
    for step in STEPS:
        mine = [u for u in units if u.step == step]
        records = [unit_done(run_dir, u) for u in mine]
        done = [r for r in records if r is not None]
        seconds = sum(float(r.get("seconds", 0.0)) for r in done)
        rates = [r["result"].get("steps_per_second") for r in done if r["result"].get("steps_per_second")]
        rate = f"{np.mean(rates):.2f} training steps/s" if rates else ""
        lines.append(f"| {STEP_TITLES[step]} | {len(done)}/{len(mine)} | {seconds:.1f} | {rate} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots

def write_plots(run_dir: Path, results: dict) -> dict:
    """Bar chart per table, per-image IoU histograms, corrupted examples grid; returns {name: file}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = run_dir / "plots"
    folder.mkdir(exist_ok=True)
    made = {}
    for table, rows in results["tables"].items():
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.4), dpi=100)
        labels = [r["label"].split(" (")[0] for r in rows]
        x = np.arange(len(rows))
        for offset, metric, name in ((-0.2, "artifact_iou", "artifact IoU"), (0.2, "miou", "2-class mIoU")):
            means = [r[f"{metric}_mean"] or 0.0 for r in rows]
            stds = [r[f"{metric}_std"] or 0.0 for r in rows]
            ax.bar(x + offset, means, 0.4, yerr=stds, capsize=3, label=name)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("%")
        ax.set_title(TABLE_TITLES[table], fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{table}.png")
        plt.close(fig)
        made[table] = f"{table}.png"
    rows = [r for rs in results["tables"].values() for r in rs]
    unique = {}
    for r in rows:
        unique.setdefault(r["train"], r)
    if any(r["per_image_iou"] for r in unique.values()):
        fig, axes = plt.subplots(1, len(unique), figsize=(2.2 * len(unique) + 1, 2.6), dpi=100, sharey=True,
                                 squeeze=False)
        for ax, r in zip(axes[0], unique.values()):
            ax.hist(r["per_image_iou"], bins=np.linspace(0, 100, 11), color="tab:blue")
            ax.set_title(r["train"], fontsize=8)
            ax.set_xlabel("IoU (%)", fontsize=7)
        axes[0][0].set_ylabel("test images (all seeds)", fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "per_image_iou.png")
        plt.close(fig)
        made["per_image_iou"] = "per_image_iou.png"
    grid = _examples_grid(run_dir, results)
    if grid is not None:
        from PIL import Image

        Image.fromarray(grid).save(folder / "corrupted_examples.png")
        made["examples"] = "corrupted_examples.png"
    return made


def _examples_grid(run_dir: Path, results: dict) -> np.ndarray | None:
    """One block per corruption method: its example strips stacked, with the method's name above."""
    from PIL import Image, ImageDraw

    blocks = []
    for name, unit in results["units"].items():
        if unit.kind != "corrupt" or unit_done(run_dir, unit) is None:
            continue
        files = sorted((run_dir / unit.folder / "examples").glob("*.png"))
        if not files:
            continue
        strips = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        width = max(s.shape[1] for s in strips)
        strips = [np.pad(s, ((0, 2), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
        title = Image.new("RGB", (width, 14), "white")
        ImageDraw.Draw(title).text((2, 1), name.split("/", 1)[1], fill="black")
        blocks.append(np.concatenate([np.asarray(title), *strips], axis=0))
    if not blocks:
        return None
    width = max(b.shape[1] for b in blocks)
    padded = [np.pad(b, ((0, 6), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    return np.concatenate(padded, axis=0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- environment

def environment(run_dir: Path) -> dict:
    """Package versions, device, git commit and CPU of the machine writing the report."""
    from importlib import metadata

    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    packages = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "numpy", "pillow", "safetensors", "matplotlib"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    device = run.get("device")
    if device and device.startswith("cuda"):
        try:
            import torch

            device = f"{device} ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)"
        except Exception:  # noqa: BLE001 - the report is written even where CUDA cannot be queried
            pass
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return {"device": device, "python": platform.python_version(), "packages": packages, "git": commit,
            "cpu": f"{cpu} ({os.cpu_count()} logical cores)", "platform": platform.platform(),
            "config": json.loads((run_dir / "config.resolved.json").read_text())["values"], "run": run}
