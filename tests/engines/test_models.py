"""engines.models: the offline demo set, the loader registry and its one-sentence errors."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from engines.models import (
    DEMO_MARKER, DEMO_NOTE, DEMO_SIZE, DEMO_UNTRAINED_NOTE, ModelNotFoundError, build_byte_tokenizer,
    build_demo_pipeline, demo_note, demo_trained_parts, ensure_demo_pipeline, load_text2image,
)
from engines.models import demo_dir as demo_folder
from engines.registry import LOADERS, load

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def assert_one_sentence_naming(exc: BaseException, name: str, full_stop: bool = True) -> None:
    message = str(exc)
    assert name in message, message
    assert "\n" not in message, message
    assert message.endswith(".") or not full_stop, message


# ------------------------------------------------------------------ the demo set
def test_demo_build_is_bit_identical_for_the_same_seed(demo_dir, tmp_path):
    again = ensure_demo_pipeline(tmp_path / "fresh")
    assert again == demo_folder(tmp_path / "fresh")
    reference, fresh = file_hashes(demo_dir), file_hashes(again)
    assert set(WEIGHT_FILES) | {"model_index.json", DEMO_MARKER} <= set(reference)
    assert fresh == reference


def test_demo_build_differs_with_another_seed_only_in_untrained_parts(demo_dir, tmp_path):
    other = file_hashes(ensure_demo_pipeline(tmp_path / "seed1", seed=1))
    reference = file_hashes(demo_dir)
    assert set(other) == set(reference)
    trained = demo_trained_parts()
    for weights in WEIGHT_FILES:
        if weights.split("/")[0] in trained:  # shipped trained weights (assets/demo_*) are the same for every seed
            assert other[weights] == reference[weights], weights
        else:
            assert other[weights] != reference[weights], weights
    assert other["model_index.json"] == reference["model_index.json"]  # same architecture, other weights
    assert json.loads((tmp_path / "seed1" / "models" / "demo-sd" / DEMO_MARKER).read_text())["seed"] == 1


def test_untrained_config_built_pipeline_depends_on_the_seed_alone():
    import torch

    a, b, c = build_demo_pipeline(0, trained=()), build_demo_pipeline(0, trained=()), build_demo_pipeline(1, trained=())
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    with pytest.raises(ValueError, match="Unknown demo parts"):
        build_demo_pipeline(0, trained=("unet", "controlnet"))


def test_demo_ships_trained_weights_and_says_what_they_are():
    assert set(demo_trained_parts()) == {"vae", "unet", "text_encoder"}
    assert demo_note() == DEMO_NOTE and demo_note([]) == DEMO_UNTRAINED_NOTE
    assert "trained" in DEMO_NOTE and "--model" in DEMO_NOTE and "not meaningful" in DEMO_UNTRAINED_NOTE
    pipe = build_demo_pipeline(0)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == DEMO_SIZE  # the default size is the training size


def test_a_demo_folder_saved_from_other_weights_is_rebuilt(demo_dir, tmp_path):
    data = tmp_path / "data"
    target = ensure_demo_pipeline(data)
    marker = json.loads((target / DEMO_MARKER).read_text())
    assert marker["trained"] == demo_trained_parts() and marker["weights"]
    marker["weights"] = "from an older release"
    (target / DEMO_MARKER).write_text(json.dumps(marker))
    (target / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"old weights")
    assert ensure_demo_pipeline(data) == target
    assert file_hashes(target) == file_hashes(demo_dir)


def test_ensure_demo_pipeline_is_idempotent(demo_data_dir, demo_dir):
    before = mtimes(demo_dir)
    assert ensure_demo_pipeline(demo_data_dir) == demo_dir
    assert mtimes(demo_dir) == before
    # no temp folders left behind (other demo models, e.g. a demo detector another test built, may sit beside it)
    assert "demo-sd" in {p.name for p in demo_dir.parent.iterdir()}
    assert not [p.name for p in demo_dir.parent.iterdir() if ".tmp" in p.name]


def test_stale_partial_folder_and_temp_folder_are_replaced(demo_dir, tmp_path):
    data = tmp_path / "data"
    target = demo_folder(data)
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "partial.bin").write_bytes(b"half a model")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    (tmp / "junk").write_text("left by a killed build")
    assert ensure_demo_pipeline(data) == target
    assert not (target / "unet" / "partial.bin").exists()
    assert not tmp.exists()
    assert file_hashes(target) == file_hashes(demo_dir)


def test_demo_dir_location(tmp_path):
    assert demo_folder(tmp_path) == tmp_path / "models" / "demo-sd"


# ------------------------------------------------------------------ loading
def test_load_demo_is_marked_and_matches_a_fresh_build(demo_data_dir, demo_dir):
    import torch

    loaded = load_text2image("demo", data_dir=demo_data_dir, device="cpu", dtype="float16")
    assert loaded.is_demo is True and loaded.note == DEMO_NOTE and "demo" in loaded.note.lower()
    assert loaded.kind == "text2image" and loaded.model_id == "demo" and loaded.device == "cpu"
    assert loaded.path == str(demo_dir)
    pipe = loaded.model
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32  # the demo ignores float16: it is a CPU toy
    fresh = build_demo_pipeline(0)
    for name in ("unet", "vae", "text_encoder"):
        saved, built = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert saved.keys() == built.keys()
        assert all(torch.equal(saved[k], built[k]) for k in built), name
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000


def test_load_demo_folder_by_path_is_still_marked_demo(demo_dir, tmp_path):
    loaded = load_text2image(str(demo_dir), data_dir=tmp_path / "unused")
    assert loaded.is_demo is True and loaded.note == DEMO_NOTE
    assert loaded.model_id == str(demo_dir) and loaded.path == str(demo_dir.resolve())
    assert not (tmp_path / "unused").exists()  # a folder spec builds nothing under the data dir


def test_registry_loads_text2image_and_rejects_unknown_kinds(demo_data_dir):
    assert {"text2image", "detector", "segmenter"} <= set(LOADERS)
    assert load("text2image", "demo", data_dir=demo_data_dir).is_demo
    with pytest.raises(ValueError) as exc:
        load("nope", "demo", data_dir=demo_data_dir)
    assert_one_sentence_naming(exc.value, "nope")
    assert "text2image" in str(exc.value)


def test_unknown_dtype_is_rejected(demo_data_dir):
    with pytest.raises(ValueError) as exc:
        load_text2image("demo", data_dir=demo_data_dir, dtype="float64")
    assert_one_sentence_naming(exc.value, "float64")
    assert "float32" in str(exc.value)


def test_nonexistent_path(tmp_path):
    spec = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(ModelNotFoundError) as exc:
        load_text2image(spec, data_dir=tmp_path)
    assert isinstance(exc.value, ValueError)
    assert_one_sentence_naming(exc.value, spec)


def test_folder_without_model_index(tmp_path):
    folder = tmp_path / "not-a-pipeline"
    (folder / "unet").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError) as exc:
        load_text2image(str(folder), data_dir=tmp_path)
    assert_one_sentence_naming(exc.value, str(folder))
    assert "model_index.json" in str(exc.value)


def test_single_file_instead_of_folder(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError) as exc:
        load_text2image(str(checkpoint), data_dir=tmp_path)
    assert_one_sentence_naming(exc.value, str(checkpoint))
    assert "folder" in str(exc.value)


def test_broken_pipeline_folder(demo_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelNotFoundError) as exc:
        load_text2image(str(broken), data_dir=tmp_path)
    # the loader's reason is cut at 200 characters, so a long path may end mid-sentence
    assert_one_sentence_naming(exc.value, str(broken), full_stop=False)
    assert "could not be loaded" in str(exc.value)


def test_unknown_hub_id_offline(tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        load_text2image("nobody/does-not-exist-xyz", data_dir=tmp_path, local_files_only=True)
    assert_one_sentence_naming(exc.value, "nobody/does-not-exist-xyz")
    assert "--model" in str(exc.value)


# ------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_round_trip():
    tok = build_byte_tokenizer()
    assert len(tok) == 514 and tok.model_max_length == 77
    ids = tok("a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < 514 for i in ids)
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a cat"
    text = "héllo 🐱"  # non-ASCII goes through the byte map, never to <unk>
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == text
    padded = tok("x" * 300, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.eos_token_id
