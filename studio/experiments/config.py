"""Experiment configs (TOML): the synthetic-artifact paper's protocol, profiles, validation.

A config is a TOML file whose tables and keys are those of `DEFAULTS` (the paper's protocol; every key
is optional). The values in force are, in order of precedence (last wins):

    DEFAULTS (the paper)  <  the file  <  the profile's overrides

The profile is `--profile`, else `[experiment] profile` in the file, else "paper". Built-in profiles:
"paper" (no overrides) and "tiny" (`TINY`: the same protocol shrunk to run on 2 CPU cores in minutes
on RichHF-format data the runner synthesises itself). A file may define more under
`[profiles.NAME]` (or extend "tiny"), with the same tables and keys.

Relative paths are relative to the current directory; `~` is expanded. `load_config` checks
everything that can be checked without doing work (unknown keys, types, ranges, architecture, files
that must exist, and that no test image is also a training, validation or source image, by file
name) and raises ValueError with one sentence naming the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("tiny", "upernet-convnext-tiny", "upernet-swin-tiny")
RECIPES = ("paper", "balanced")
PRESETS = ("renoise-sd", "renoise-fast")
"""engines.corruption.corrupt's named ReNoise presets (renoise-sd: the reference's SD configuration)."""
TABLES = ("table1", "table2", "table3", "table4")
TABLE2_METHODS = ("proposed", "rotate", "blur", "gaussian", "downscale")
TABLE4_VARIANTS = ("direct", "resampled")
PAPER_COUNTS = {"train": 7801, "test": 500}
"""Samples the paper keeps from RichHF-18k after its preprocessing (Sec. on data)."""

DEFAULTS: dict = {
    "experiment": {
        "name": "paper",
        "profile": "paper",
        "tables": list(TABLES),
        "seeds": [0],  # detector seeds; mean +- std over seeds when more than one
        "threads": 0,  # torch CPU threads in the step jobs (0: torch's default)
    },
    "data": {
        "synthesise": False,  # true: write RichHF-format data into the run folder (tiny profile)
        "train_tfrecord": "richhf18k/train.tfrecord",
        "val_tfrecord": "richhf18k/dev.tfrecord",  # "": hold out `val_images` from the train pool
        "test_tfrecord": "richhf18k/test.tfrecord",
        "images": "pickapic",  # folder of the Pick-a-Pic images, matched by filename
        "clean_images": "",  # clean source images (e.g. an HPS sample); "": RichHF train images with empty maps
        "captions": "",  # JSONL ({"filename", "caption"}) or CSV (filename,caption); "": none
        "annotator_rule": "grid",  # "grid": infer annotators from each map's value grid; "none": keep every map
        "min_annotators": 3,
        "votes": 2,  # a pixel is artifact when at least `votes` of 3 annotators marked it
        "keep_empty_maps": True,
        "threshold": 0.5,  # only for annotator_rule "none": raw / 255 >= threshold
        "human_images": 100,  # RichHF-100: the human labels of the selector and of Table 1's first row
        "val_images": 100,  # only when val_tfrecord is ""
        "test_images": 0,  # 0: every eligible test record
        "seed": 0,
        "synthetic": {"train": 60, "val": 12, "test": 16, "clean": 12, "size": 64,
                      "fewer_annotators": 0.25, "empty": 0.15, "seed": 0},
    },
    "model": {
        "architecture": "upernet-convnext-tiny",
        "init": "",  # ADE20K UperNet folder or hub id ("": random init)
        "diffusion": "demo",  # text-to-image pipeline for the corruption (folder or hub id of SD 1.x/2.x)
    },
    "selector": {
        "steps": 1000,
        "batch_size": 8,
        "crop": 512,
        "recipe": "paper",
        "lr": 0.0,  # 0: the recipe's learning rate
        "eval_every": 100,
        "threshold": 0.5,  # tau: selected region = selector probability >= tau
        "seed": 0,
    },
    "corruption": {
        "sources": 0,  # source images to corrupt (0: all)
        "inversion": "renoise",
        "preset": "renoise-sd",  # ReNoise settings: "renoise-sd" (the reference's SD configuration) or "renoise-fast"
        "num_inference_steps": 50,  # N
        "inversion_steps": 10,  # k: corruption at step N - k
        "baseline_steps": 20,  # rotate/blur/gaussian/downscale corrupt at N - 20 and resample 20 steps
        "guidance_scale": 1.0,
        "max_side": 512,
        "empty_regions": "skip",  # when the selector marks nothing: "skip", or "top:F" (the top F of its map)
        "seed": 0,
        "examples": 4,  # corrupted examples per method in the grid plot
    },
    "pseudo": {
        "threshold": 0.5,  # pseudo label = selector probability >= threshold
    },
    "detector": {
        "steps": 10000,
        "batch_size": 8,
        "crop": 512,
        "recipe": "paper",
        "lr": 0.0,
        "eval_every": 1000,
    },
    "table2": {"methods": list(TABLE2_METHODS)},
    "table3": {"steps": [45, 40, 35, 30, 25, 20]},
    "table4": {"variants": list(TABLE4_VARIANTS)},
}

TINY: dict = {
    "experiment": {"name": "tiny", "threads": 1},
    "data": {"synthesise": True, "human_images": 20, "val_images": 12,
             "synthetic": {"train": 60, "val": 12, "test": 16, "clean": 12, "size": 64}},
    "model": {"architecture": "tiny", "init": "", "diffusion": "demo"},
    "selector": {"steps": 1000, "batch_size": 4, "crop": 64, "eval_every": 100},
    "corruption": {"max_side": 64, "empty_regions": "top:0.05", "examples": 3},
    "detector": {"steps": 1000, "batch_size": 4, "crop": 64, "eval_every": 100},
}
"""The tiny profile: the paper's protocol (all tables, N=50, k=10, 20 baseline steps, ReNoise renoise-sd,
the paper recipe) on 64-px synthetic data, the toy UperNet from random weights at the recipe's
from-scratch learning rate (engines.training.recipes.SCRATCH_LR["tiny"], 3e-3), 1,000 selector and
detector iterations at batch 4, one torch thread. assets/experiments/tiny.toml writes it out with the
reason for each value (including the measured learning-rate / length sweep on this data)."""

PROFILES = {"paper": {}, "tiny": TINY}


@dataclass(frozen=True)
class ExperimentConfig:
    """A resolved config: `values` has every key of DEFAULTS; `profile` the profile applied;
    `source` the file it came from (None for built-in); `text` that file's text."""

    values: dict
    profile: str
    source: str | None = None
    text: str = ""

    def get(self, dotted: str):
        node = self.values
        for part in dotted.split("."):
            node = node[part]
        return node

    def section(self, name: str) -> dict:
        return copy.deepcopy(self.values[name])

    def to_json(self) -> dict:
        return {"profile": self.profile, "source": self.source, "values": self.values}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.values, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        return str(self.values["experiment"]["name"])


def load_config(path: str | Path, profile: str | None = None, *, check_files: bool = True) -> ExperimentConfig:
    """Read, merge (defaults < file < profile) and validate a config file; see the module docstring."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"Config file '{path}' does not exist.")
    text = file.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{file.name} is not valid TOML: {exc}.") from None
    return resolve(raw, profile, source=str(file), text=text, check_files=check_files)


def resolve(raw: dict, profile: str | None = None, *, source: str | None = None, text: str = "",
            check_files: bool = True) -> ExperimentConfig:
    """Merge a parsed TOML dict with the defaults and a profile; validate (see `load_config`)."""
    where = Path(source).name if source else "the config"
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {})
    if not isinstance(profiles, dict):
        raise ValueError(f"[profiles] in {where} must be a table of profile tables.")
    _check_keys(raw, DEFAULTS, "", where)
    values = _merge(DEFAULTS, raw)
    chosen = profile or values["experiment"]["profile"]
    overrides = copy.deepcopy(PROFILES.get(chosen, {}))
    if chosen in profiles:
        if not isinstance(profiles[chosen], dict):
            raise ValueError(f"profiles.{chosen} in {where} must be a table.")
        _check_keys(profiles[chosen], DEFAULTS, f"profiles.{chosen}.", where)
        overrides = _merge(overrides, profiles[chosen])
    elif chosen not in PROFILES:
        known = sorted(set(PROFILES) | set(profiles))
        raise ValueError(f"Unknown profile '{chosen}'; use one of {', '.join(known)} (or define [profiles.{chosen}]).")
    values = _merge(values, overrides)
    values["experiment"]["profile"] = chosen
    _check_types(values, DEFAULTS, "")
    config = ExperimentConfig(values=values, profile=chosen, source=source, text=text)
    validate(config, check_files=check_files)
    return config


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(node: dict, schema: dict, prefix: str, where: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            table = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ValueError(f"Unknown key '{dotted}' in {where} (known keys of {table}: {known}).")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"'{dotted}' in {where} must be a table ([{dotted}]), got {_show(value)}.")
            _check_keys(value, schema[key], f"{dotted}.", where)


def _check_types(node: dict, schema: dict, prefix: str) -> None:
    for key, default in schema.items():
        dotted, value = f"{prefix}{key}", node[key]
        if isinstance(default, dict):
            _check_types(value, default, f"{dotted}.")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{dotted} must be true or false, got {_show(value)}.")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{dotted} must be a whole number, got {_show(value)}.")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{dotted} must be a number, got {_show(value)}.")
            node[key] = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError(f"{dotted} must be text, got {_show(value)}.")
        elif isinstance(default, list):
            kind = type(default[0]) if default else str
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
                raise ValueError(f"{dotted} must be a list of {'whole numbers' if kind is int else 'names'}, "
                                 f"got {_show(value)}.")


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def path_of(value: str) -> Path:
    return Path(value).expanduser()


def validate(config: ExperimentConfig, *, check_files: bool = True) -> None:
    """Ranges, names, files and test-set disjointness; ValueError naming the key."""
    v = config.values
    exp, data, model = v["experiment"], v["data"], v["model"]
    if not str(exp["name"]).strip() or any(c in str(exp["name"]) for c in "/\\") or str(exp["name"]).startswith("."):
        raise ValueError(f"experiment.name must be a plain name (no slashes), got {exp['name']!r}.")
    if not exp["tables"]:
        raise ValueError("experiment.tables is empty; name at least one of " + ", ".join(TABLES) + ".")
    for table in exp["tables"]:
        if table not in TABLES:
            raise ValueError(f"experiment.tables: unknown table '{table}'; use {', '.join(TABLES)}.")
    seeds = exp["seeds"]
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"experiment.seeds must be distinct whole numbers from 0 to 2**32-1, got {seeds}.")
    if not 0 <= exp["threads"] <= 256:
        raise ValueError(f"experiment.threads must be between 0 and 256, got {exp['threads']}.")
    if model["architecture"] not in ARCHITECTURES:
        raise ValueError(f"model.architecture '{model['architecture']}' is not one of {', '.join(ARCHITECTURES)}.")
    if model["init"] and model["architecture"] == "tiny":
        raise ValueError("model.init applies to the UperNet architectures; the tiny architecture has no pretrained weights.")
    if data["annotator_rule"] not in ("grid", "none"):
        raise ValueError(f"data.annotator_rule must be 'grid' or 'none', got {data['annotator_rule']!r}.")
    if not 1 <= data["min_annotators"] <= 12:
        raise ValueError(f"data.min_annotators must be between 1 and 12, got {data['min_annotators']}.")
    if not 1 <= data["votes"] <= 3:
        raise ValueError(f"data.votes must be 1, 2 or 3 (of 3 annotators), got {data['votes']}.")
    if not 0.0 < data["threshold"] <= 1.0:
        raise ValueError(f"data.threshold must be in (0, 1], got {data['threshold']}.")
    if data["human_images"] < 2:
        raise ValueError(f"data.human_images must be at least 2, got {data['human_images']}.")
    if data["val_images"] < 1 or data["test_images"] < 0:
        raise ValueError("data.val_images must be at least 1 and data.test_images 0 or more.")
    syn = data["synthetic"]
    if syn["size"] < 32 or syn["size"] % 8 or syn["size"] > 1024:
        raise ValueError(f"data.synthetic.size must be a multiple of 8 from 32 to 1024, got {syn['size']}.")
    for key in ("train", "val", "test", "clean"):
        if not 1 <= syn[key] <= 100000:
            raise ValueError(f"data.synthetic.{key} must be between 1 and 100000, got {syn[key]}.")
    if not (0 <= syn["fewer_annotators"] < 1 and 0 <= syn["empty"] < 1 and syn["fewer_annotators"] + syn["empty"] < 1):
        raise ValueError("data.synthetic.fewer_annotators and data.synthetic.empty must be fractions with a sum below 1.")
    for section in ("selector", "detector"):
        s = v[section]
        if s["steps"] < 1:
            raise ValueError(f"{section}.steps must be at least 1, got {s['steps']}.")
        if s["batch_size"] < 2:
            raise ValueError(f"{section}.batch_size must be at least 2 (UperNet's BatchNorm), got {s['batch_size']}.")
        if not 32 <= s["crop"] <= 4096:
            raise ValueError(f"{section}.crop must be between 32 and 4096, got {s['crop']}.")
        if s["recipe"] not in RECIPES:
            raise ValueError(f"{section}.recipe must be one of {', '.join(RECIPES)}, got {s['recipe']!r}.")
        if s["lr"] < 0 or s["eval_every"] < 1:
            raise ValueError(f"{section}.lr must be 0 (the recipe's) or positive and {section}.eval_every at least 1.")
        _check_recipe(v, section)
    for key in ("selector.threshold", "pseudo.threshold"):
        if not 0.0 < config.get(key) < 1.0:
            raise ValueError(f"{key} must be between 0 and 1, got {config.get(key)}.")
    c = v["corruption"]
    n = c["num_inference_steps"]
    if not 2 <= n <= 1000:
        raise ValueError(f"corruption.num_inference_steps must be between 2 and 1000, got {n}.")
    for key in ("inversion_steps", "baseline_steps"):
        if not 1 <= c[key] < n:
            raise ValueError(f"corruption.{key} must be at least 1 and below num_inference_steps ({n}), got {c[key]}.")
    if c["inversion"] not in ("renoise", "ddim"):
        raise ValueError(f"corruption.inversion must be 'renoise' or 'ddim', got {c['inversion']!r}.")
    if c["preset"] not in PRESETS:
        raise ValueError(f"corruption.preset must be one of {', '.join(PRESETS)}, got {c['preset']!r}.")
    if not 0.0 <= c["guidance_scale"] <= 50.0:
        raise ValueError(f"corruption.guidance_scale must be between 0 and 50, got {c['guidance_scale']}.")
    if not 32 <= c["max_side"] <= 4096 or c["sources"] < 0 or c["examples"] < 0:
        raise ValueError("corruption.max_side must be between 32 and 4096, corruption.sources and corruption.examples 0 or more.")
    empty_fraction(c["empty_regions"])
    tables = exp["tables"]  # a table's own section is checked when the table runs
    for method in v["table2"]["methods"] if "table2" in tables else []:
        if method not in TABLE2_METHODS:
            raise ValueError(f"table2.methods: unknown method '{method}'; use {', '.join(TABLE2_METHODS)}.")
    for step in v["table3"]["steps"] if "table3" in tables else []:
        if not 0 < step < n:
            raise ValueError(f"table3.steps: corruption step {step} is outside 1..{n - 1} (num_inference_steps {n}).")
    for variant in v["table4"]["variants"] if "table4" in tables else []:
        if variant not in TABLE4_VARIANTS:
            raise ValueError(f"table4.variants: unknown variant '{variant}'; use {', '.join(TABLE4_VARIANTS)}.")
    for table, key in (("table2", "methods"), ("table3", "steps"), ("table4", "variants")):
        if table in exp["tables"] and not v[table][key]:
            raise ValueError(f"{table}.{key} is empty but {table} is in experiment.tables.")
    if check_files and not data["synthesise"]:
        check_data_files(config)


def _check_recipe(values: dict, section: str) -> None:
    """The section's training config resolves (engines.training.recipes.resolve_recipe); else ValueError
    naming the section."""
    from studio.experiments.adapter import train_config

    s = values[section]
    try:
        train_config(arch=values["model"]["architecture"], init=values["model"]["init"], recipe=s["recipe"],
                     steps=s["steps"], batch_size=s["batch_size"], crop=s["crop"], lr=s["lr"],
                     eval_every=s["eval_every"], seed=s["seed"] if section == "selector" else 0,
                     selector=section == "selector")
    except ValueError as exc:
        raise ValueError(f"[{section}]: {exc}") from None


def empty_fraction(spec: str) -> float | None:
    """corruption.empty_regions: None for "skip", F for "top:F"."""
    if spec == "skip":
        return None
    if spec.startswith("top:"):
        try:
            value = float(spec[4:])
        except ValueError:
            value = -1.0
        if 0.0 < value < 1.0:
            return value
    raise ValueError(f"corruption.empty_regions must be 'skip' or 'top:F' with F in (0, 1), got {spec!r}.")


def check_data_files(config: ExperimentConfig) -> None:
    """The RichHF files and folders exist, and no test image is a training, validation or source image
    (by file name; the data step checks again by pixel content)."""
    data = config.values["data"]
    for key in ("train_tfrecord", "test_tfrecord"):
        if not path_of(data[key]).is_file():
            raise ValueError(f"data.{key}: '{data[key]}' does not exist (RichHF-18k's {Path(data[key]).name}).")
    if data["val_tfrecord"] and not path_of(data["val_tfrecord"]).is_file():
        raise ValueError(f"data.val_tfrecord: '{data['val_tfrecord']}' does not exist (or set it to \"\" to hold "
                         "out validation images from the training records).")
    if not path_of(data["images"]).is_dir():
        raise ValueError(f"data.images: '{data['images']}' is not a folder (the Pick-a-Pic images, matched by filename).")
    if data["clean_images"] and not path_of(data["clean_images"]).is_dir():
        raise ValueError(f"data.clean_images: '{data['clean_images']}' is not a folder.")
    if data["captions"] and not path_of(data["captions"]).is_file():
        raise ValueError(f"data.captions: '{data['captions']}' does not exist.")
    test = record_filenames(path_of(data["test_tfrecord"]))
    if path_of(data["test_tfrecord"]).resolve() == path_of(data["train_tfrecord"]).resolve():
        raise ValueError("data.test_tfrecord is the same file as data.train_tfrecord; the test set must not overlap training.")
    others = [("data.train_tfrecord", record_filenames(path_of(data["train_tfrecord"])))]
    if data["val_tfrecord"]:
        others.append(("data.val_tfrecord", record_filenames(path_of(data["val_tfrecord"]))))
    if data["clean_images"]:
        from engines.images import find_images

        others.append(("data.clean_images", [p.name for p in find_images([path_of(data["clean_images"])])]))
    test_stems = {Path(name).stem.lower() for name in test}
    for key, names in others:
        shared = sorted({n for n in names if Path(n).stem.lower() in test_stems})
        if shared:
            raise ValueError(f"data.test_tfrecord: {len(shared)} test image(s) also appear in {key} (e.g. '{shared[0]}'); "
                             "the test set must not overlap training.")


_FILENAMES_CACHE: dict = {}


def record_filenames(path: Path) -> list[str]:
    """The `filename` of every readable record of a RichHF TFRecord (maps are not decoded)."""
    from engines.detection.richhf import FramingError, iter_tfrecord, parse_example

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILENAMES_CACHE:
        names = []
        for _, item in iter_tfrecord(path):
            if isinstance(item, FramingError):
                continue
            try:
                kind, values = parse_example(item).get("filename", (None, []))
            except ValueError:
                continue
            if kind == "bytes_list" and len(values) == 1:
                names.append(values[0].decode("utf-8", "replace"))
        _FILENAMES_CACHE[key] = names
    return list(_FILENAMES_CACHE[key])
