"""Experiment configs: the shipped files, profiles, the plan's caching keys, the engine adapter, and bad
configs failing before any work with one sentence naming the key."""
from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from studio.cli.main import main
from studio.experiments.plan import plan, table_rows, variants
from studio.experiments.config import DEFAULTS, TINY, load_config, resolve

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "assets" / "experiments"


def test_paper_toml_is_the_papers_protocol_and_the_code_defaults():
    raw = tomllib.loads((ASSETS / "paper.toml").read_text())
    config = resolve(raw, check_files=False)
    assert config.values == resolve({}, check_files=False).values  # the file spells out DEFAULTS
    v = config.values
    assert v["data"]["human_images"] == 100 and v["data"]["votes"] == 2 and v["data"]["min_annotators"] == 3
    assert (v["selector"]["steps"], v["selector"]["batch_size"], v["selector"]["recipe"]) == (1000, 8, "paper")
    assert v["detector"]["steps"] == 10000
    c = v["corruption"]
    assert (c["inversion"], c["num_inference_steps"], c["inversion_steps"], c["baseline_steps"]) == ("renoise", 50, 10, 20)
    assert v["table3"]["steps"] == [45, 40, 35, 30, 25, 20]
    assert v["model"]["architecture"] == "upernet-convnext-tiny"


def test_tiny_toml_is_paper_toml_with_the_tiny_profile():
    tiny = load_config(ASSETS / "tiny.toml")
    shrunk = load_config(ASSETS / "paper.toml", "tiny")
    assert tiny.values == shrunk.values and tiny.profile == shrunk.profile == "tiny"
    assert tiny.get("data.synthesise") and tiny.get("model.architecture") == "tiny"
    # The protocol itself is not shrunk: the same tables, rows, N, k and baseline steps.
    for key in ("experiment.tables", "corruption.num_inference_steps", "corruption.inversion_steps",
                "corruption.baseline_steps", "table2.methods", "table3.steps", "table4.variants"):
        assert tiny.get(key) == DEFAULTS[key.split(".")[0]][key.split(".")[1]]
    assert set(TINY) <= set(DEFAULTS)


def test_tables_have_the_papers_rows():
    config = resolve({}, check_files=False)
    rows = table_rows(config)
    assert [r.train for r in rows["table1"]] == ["human", "pseudo", "proposed"]
    assert [r.train for r in rows["table2"]] == ["proposed", "rotate", "blur", "gaussian", "downscale"]
    assert [r.train for r in rows["table3"]] == ["step45", "proposed", "step35", "step30", "step25", "step20"]
    assert [r.train for r in rows["table4"]] == ["direct", "proposed"]
    v = variants(config)
    assert v["proposed"] == {"method": "proposed", "steps": 10}
    assert v["step45"]["steps"] == 5 and v["step20"]["steps"] == 30  # corruption step s of 50 -> k = 50 - s
    assert v["rotate"] == {"method": "rotate", "steps": 20}  # the baselines: 20 steps
    assert v["direct"]["method"] == "direct"


def test_plan_keys_change_only_where_the_config_changed():
    base = {u.name: u.key for u in plan(resolve({"data": {"synthesise": True}}, check_files=False))}
    longer = {u.name: u.key for u in plan(resolve({"data": {"synthesise": True}, "detector": {"steps": 5}},
                                                 check_files=False))}
    for name in base:
        changed = base[name] != longer[name]
        assert changed == name.startswith(("detector/", "evaluate/")), name
    fewer = {u.name: u.key for u in plan(resolve({"data": {"synthesise": True}, "table3": {"steps": [40]},
                                                  "experiment": {"tables": ["table1", "table3"]}}, check_files=False))}
    assert set(fewer) < set(base) and all(base[n] == k for n, k in fewer.items())
    assert "corrupt/step45" not in fewer and "corrupt/rotate" not in fewer


def test_paper_recipe_and_corruption_protocol_reach_the_engines():
    from studio.experiments import adapter

    common = dict(arch="upernet-convnext-tiny", init="openmmlab/upernet-convnext-tiny", steps=10, batch_size=2,
                  crop=64, eval_every=5, seed=3)
    paper = adapter.train_config(recipe="paper", lr=0.0, **common)  # an ADE20K-initialised UperNet, as in the paper
    assert paper.lr == 6e-5 and tuple(paper.betas) == (0.9, 0.999) and paper.weight_decay == 0.01
    assert paper.artifact_weight == 1.0 and paper.color_jitter == 0.0 and paper.p_pos == 0.0
    assert paper.negative_fraction is None and paper.lr_schedule == "poly"
    assert (paper.steps, paper.batch_size, paper.crop, paper.seed) == (10, 2, 64, 3)
    balanced = adapter.train_config(recipe="balanced", lr=1e-3, **common)
    assert balanced.lr == 1e-3 and balanced.artifact_weight is None and balanced.color_jitter > 0
    assert balanced.p_pos > 0

    common = dict(inversion="renoise", preset="renoise-sd", num_inference_steps=50, steps=10, baseline_steps=20,
                  guidance_scale=1.0, prompt="a red circle", seed=3)
    proposed = adapter.corrupt_params(method="proposed", **common)
    assert (proposed.method, proposed.inversion_steps, proposed.prompt) == ("renoise", 10, "a red circle")
    assert proposed.preset == "renoise-sd" and proposed.regularised and proposed.label == "corrupted"
    rotate = adapter.corrupt_params(method="rotate", **common)
    assert rotate.method == "rotate" and rotate.corruption_steps == 20  # corrupted at step 30, 20 steps resampled
    assert proposed.corruption_steps == 10
    fast = adapter.corrupt_params(method="proposed", **{**common, "preset": "renoise-fast"})
    assert fast.preset == "renoise-fast" and not fast.regularised
    assert adapter.corrupt_params(method="direct", **common).method == "direct"
    from engines.corruption.corrupt import PRESETS
    from studio.experiments.config import PRESETS as CONFIG_PRESETS

    assert set(CONFIG_PRESETS) == set(PRESETS) - {"custom"}


def _trained_units(units):
    return [u for u in units if u.kind in ("selector", "detector")]


def test_units_train_with_the_resolved_paper_recipe_and_a_changed_recipe_retrains(monkeypatch):
    """Every selector/detector unit carries the full config engines.training.recipes resolves (part of its key):
    the paper recipe (plain cross-entropy, no class weights, uniform sampling, no jitter), 6e-5 with an
    ADE20K init, the measured from-scratch rate without one; a recipe changed in the engines retrains."""
    from engines.training import recipes as train_recipes

    config = resolve({"data": {"synthesise": True}}, check_files=False)  # paper.toml, no init available
    units = plan(config)
    for unit in _trained_units(units):
        tc = unit.params["train_config"]
        assert tc["recipe"] == "paper" and tc["artifact_weight"] == 1.0 and tc["sampling"] == "uniform"
        assert tc["color_jitter"] == 0.0 and tc["p_pos"] == 0.0 and tc["negative_fraction"] is None
        assert tuple(tc["betas"]) == (0.9, 0.999) and tc["weight_decay"] == 0.01 and tc["lr_schedule"] == "poly"
        assert (tc["batch_size"], tc["crop"]) == (8, 512) and tc["seed"] == unit.params["seed"]
        assert tc["lr"] == train_recipes.SCRATCH_LR["upernet-convnext-tiny"]  # random init: the measured rate
        assert tc["steps"] == (1000 if unit.kind == "selector" else 10000)
    inited = resolve({"data": {"synthesise": True}, "model": {"init": "openmmlab/upernet-convnext-tiny"}},
                     check_files=False)
    for unit in _trained_units(plan(inited)):
        assert unit.params["train_config"]["lr"] == 6e-5 and unit.params["train_config"]["aux_weight"] == 0.4
    tiny = load_config(ASSETS / "tiny.toml")
    for unit in _trained_units(plan(tiny)):  # tiny: the recipe's from-scratch rate, nothing else of its own
        tc = unit.params["train_config"]
        assert tc["lr"] == train_recipes.SCRATCH_LR["tiny"] and tc["artifact_weight"] == 1.0
        assert tc["sampling"] == "uniform" and tc["steps"] == 1000
    assert {unit.params["preset"] for unit in plan(tiny) if unit.kind == "corrupt"} == {"renoise-sd"}

    before = {u.name: u.key for u in units}
    monkeypatch.setitem(train_recipes.SCRATCH_LR, "upernet-convnext-tiny", 1e-4)
    after = {u.name: u.key for u in plan(config)}
    assert after["data"] == before["data"]
    assert all(after[name] != key for name, key in before.items() if name != "data")  # selector and downstream


def test_the_report_lists_every_deviation_from_the_papers_protocol():
    from studio.experiments.report import deviations

    paper = {k: (ours, theirs) for k, ours, theirs in deviations(resolve({}, check_files=False))}
    assert paper == {"selector training: init": (None, "ADE20K UperNet"), "selector training: lr": (3e-4, 6e-5),
                     "detector training: init": (None, "ADE20K UperNet"), "detector training: lr": (3e-4, 6e-5)}
    inited = resolve({"model": {"init": "openmmlab/upernet-convnext-tiny"}}, check_files=False)
    assert {k for k, _, _ in deviations(inited)} == {"selector training: init", "detector training: init"}
    tiny = {k: (ours, theirs) for k, ours, theirs in deviations(load_config(ASSETS / "tiny.toml"))}
    assert tiny["detector training: steps"] == (1000, 10000) and tiny["selector training: lr"] == (3e-3, 6e-5)
    assert tiny["detector training: arch"] == ("tiny", "upernet-convnext-tiny") and "corruption.preset" not in tiny
    assert tiny["data.synthesise"] == (True, False) and tiny["corruption.empty_regions"] == ("top:0.05", "skip")
    weighted = resolve({"detector": {"recipe": "balanced"}}, check_files=False)
    rows = {k: (ours, theirs) for k, ours, theirs in deviations(weighted)}
    assert rows["detector training: artifact_weight"] == (None, 1.0)  # class weights from the pixel frequency
    assert rows["detector training: sampling"] == ("balanced", "uniform") and "selector training: sampling" not in rows


def test_a_recipe_value_the_trainer_refuses_fails_before_any_work(tmp_path, capsys):
    """selector.seed is not range-checked by the config schema; the recipe's config check refuses it."""
    code, err = _run(tmp_path, "[data]\nsynthesise = true\n[selector]\nseed = -1\n", capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "[selector]" in err and "Seed" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_region_fallback_takes_the_most_probable_pixels():
    from studio.experiments.steps import region_mask

    heat = np.zeros((64, 64), np.uint8)
    heat[10:30, 20:40] = np.arange(20, dtype=np.uint8)[None, :] + 50  # a weak blob, below tau = 0.5
    region, used = region_mask(heat, 0.5, None)
    assert not region.any() and not used
    region, used = region_mask(heat, 0.5, 0.05)
    assert used and region.sum() == round(0.05 * 64 * 64)
    assert region[10:30, 20:40].sum() == region.sum()  # inside the blob, its most probable columns
    again, _ = region_mask(heat, 0.5, 0.05)
    np.testing.assert_array_equal(region, again)
    strong = heat.copy()
    strong[0:16, 0:16] = 255
    region, used = region_mask(strong, 0.5, 0.05)
    assert not used and region.sum() == 256


# ---------------------------------------------------------------------------------------------- bad configs

@pytest.fixture(scope="module")
def richhf_files(tmp_path_factory):
    from engines.detection.richhf_prep import synthesise_richhf

    root = tmp_path_factory.mktemp("richhf")
    synthesise_richhf(root, train=6, val=2, test=3, clean=2, size=32)
    return root


def _run(tmp_path, toml: str, capsys, *extra) -> tuple[int, str]:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    code = main(["experiment", "run", str(cfg), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _files(root: Path, **over) -> str:
    values = {"train_tfrecord": root / "train.tfrecord", "val_tfrecord": root / "dev.tfrecord",
              "test_tfrecord": root / "test.tfrecord", "images": root / "images", **over}
    return "[data]\n" + "".join(f'{k} = "{v}"\n' for k, v in values.items())


@pytest.mark.parametrize("toml, key", [
    ("[detector]\nstpes = 3\n", "detector.stpes"),
    ("[model]\narchitecture = \"resnet-50\"\n", "model.architecture"),
    ("[detector]\nsteps = \"many\"\n", "detector.steps"),
    ("[experiment]\ntables = [\"table9\"]\n", "experiment.tables"),
    ("[table3]\nsteps = [45, 55]\n", "table3.steps"),
    ("[corruption]\nempty_regions = \"top:2\"\n", "corruption.empty_regions"),
    ("[data.synthetic]\nsize = 50\n", "data.synthetic.size"),
    ("[selector]\nbatch_size = 1\n", "selector.batch_size"),
    ("colour = \"red\"\n", "'colour'"),
])
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, capsys, toml, key):
    code, err = _run(tmp_path, toml + "\n[data]\nsynthesise = true\n", capsys)
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("artifact-studio: ") and key in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_missing_tfrecord_and_unknown_profile(tmp_path, capsys, richhf_files):
    code, err = _run(tmp_path, _files(richhf_files, train_tfrecord=tmp_path / "nope.tfrecord"), capsys)
    assert code == 1 and "data.train_tfrecord" in err and "does not exist" in err
    code, err = _run(tmp_path, "[data]\nsynthesise = true\n", capsys, "--profile", "huge")
    assert code == 1 and "profile 'huge'" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_test_set_overlapping_training_is_refused(tmp_path, capsys, richhf_files):
    same = _files(richhf_files, test_tfrecord=richhf_files / "train.tfrecord")
    code, err = _run(tmp_path, same, capsys)
    assert code == 1 and "data.test_tfrecord" in err and "overlap" in err
    copy = tmp_path / "test-copy.tfrecord"  # another file holding training records
    shutil.copy(richhf_files / "train.tfrecord", copy)
    code, err = _run(tmp_path, _files(richhf_files, test_tfrecord=copy), capsys)
    assert code == 1 and "data.test_tfrecord" in err and "data.train_tfrecord" in err and "synth-train-" in err
    clean = tmp_path / "clean"  # a clean source folder holding a test image
    clean.mkdir()
    shutil.copy(richhf_files / "images" / "synth-test-00001.png", clean / "synth-test-00001.png")
    code, err = _run(tmp_path, _files(richhf_files, clean_images=clean), capsys)
    assert code == 1 and "data.clean_images" in err and "synth-test-00001" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    assert load_config(_write(tmp_path, _files(richhf_files))).get("data.synthesise") is False  # the good one loads


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(text)
    return path


def test_the_experiments_tab_is_registered_and_empty_without_runs(tmp_path):
    import gradio as gr

    from studio.services import Services
    from studio.web.tabs import experiments
    from studio.web.ui import build_ui

    services = Services.open(tmp_path / "data")
    try:
        demo = build_ui(services)
        labels = [block.label for block in demo.blocks.values() if isinstance(block, gr.Tab)]
        assert "Experiments" in labels and labels.index("Experiments") == labels.index("Train") + 1
        dropdown, summary, rows, results, plots = experiments.refresh(services, None)
        assert dropdown.value is None and summary == "No experiment runs yet." and rows == [] and plots == []
    finally:
        services.close()
