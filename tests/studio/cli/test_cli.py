"""The `artifact-studio` command (app.main / studio.cli.main) against a real store and the demo pipeline."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from studio.store.store import Store

ROOT = Path(__file__).resolve().parents[3]
TABLES = ("sessions", "images", "generations")
GEN = ["--prompt", "x", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64"]


# ------------------------------------------------------------------ helpers
@pytest.fixture
def data(tmp_path, demo_dir) -> Path:
    """A fresh data dir that already holds the demo pipeline (copied, so no test rebuilds it)."""
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target / "models" / "demo-sd")
    return target


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    rc = app.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err.splitlines()


def cli_subprocess(*argv, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "app.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def snapshot(data_dir: Path) -> tuple[dict, set]:
    counts = {t: 0 for t in TABLES}
    if (data_dir / "studio.db").exists():
        with sqlite3.connect(data_dir / "studio.db") as conn:
            counts = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
        conn.close()
    files = {p.relative_to(data_dir).as_posix() for p in (data_dir / "files").rglob("*")} \
        if (data_dir / "files").exists() else set()
    return counts, files


def session_names(data_dir: Path) -> set[str]:
    with Store(data_dir) as store:
        return {s.name for s in store.list_sessions()}


def create_session(data_dir: Path, name: str) -> None:
    with Store(data_dir) as store:
        store.create_session(name)


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def assert_one_error_line(err: list[str], *words: str) -> str:
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("artifact-studio:"), line
    assert "Traceback" not in line
    for word in words:
        assert word in line, (word, line)
    return line


# ------------------------------------------------------------------ generate
def test_generate_twice_prints_the_same_content_addressed_path(capsys, data, text2image):
    from engines.generation.generate import GenerateParams

    rc1, out1, _ = cli(capsys, "generate", "--data-dir", data, "--session", "s", "--create-session", *GEN)
    rc2, out2, _ = cli(capsys, "generate", "--data-dir", data, "--session", "s", "--create-session", *GEN)
    assert rc1 == rc2 == 0
    assert len(out1) == 1 and out1 == out2
    path = Path(out1[0])
    assert path.is_file() and path.parent.parent == data.resolve() / "files"
    import hashlib

    assert path.stem == hashlib.sha256(path.read_bytes()).hexdigest()
    counts, files = snapshot(data)
    assert counts == {"sessions": 1, "images": 2, "generations": 2}
    assert len([f for f in files if f.endswith(".png")]) == 1
    # the stored pixels are exactly what the engine makes for these parameters
    expected = text2image.generate(GenerateParams(prompt="x", seed=3, num_inference_steps=2, width=64, height=64))
    assert np.array_equal(pixels(path), expected.images[0].rgb)
    with Store(data) as store:
        records = store.list_images("s")
        assert [r.source for r in records] == ["generated", "generated"]
        assert {r.params["seed"] for r in records} == {3} and all(r.params["demo"] for r in records)
        assert records[0].generation_id != records[1].generation_id
        gen = store.get_generation(records[0].generation_id)
        assert (gen.prompt, gen.seed, gen.num_inference_steps, gen.width, gen.height, gen.count, gen.model_id) \
            == ("x", 3, 2, 64, 64, 1, "demo")


def test_generate_count_two_prints_two_paths_with_consecutive_seeds(capsys, data):
    rc, out, _ = cli(capsys, "generate", "--data-dir", data, "--session", "s", "--create-session", *GEN,
                     "--count", "2")
    assert rc == 0 and len(out) == 2 and out[0] != out[1]
    assert all(Path(p).is_file() for p in out)
    with Store(data) as store:
        records = store.list_images("s")
        assert [str(Path(r.path)) for r in records] == out
        assert [r.params["seed"] for r in records] == [3, 4]
        assert records[0].generation_id == records[1].generation_id
        assert store.get_generation(records[0].generation_id).count == 2


def test_generate_into_unknown_session_fails_cleanly(capsys, data):
    create_session(data, "existing")
    before = snapshot(data)
    rc, out, err = cli(capsys, "generate", "--data-dir", data, "--session", "ghost-session", *GEN)
    assert rc == 1 and out == []
    assert_one_error_line(err, "ghost-session")
    assert snapshot(data) == before
    assert session_names(data) == {"existing"}


@pytest.mark.slow
def test_generate_unknown_session_in_a_real_process_has_no_traceback(data):
    create_session(data, "existing")
    proc = cli_subprocess("generate", "--data-dir", data, "--session", "ghost", "--prompt", "x", timeout=600)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error_line(proc.stderr.splitlines(), "ghost")


def test_generate_with_missing_model_folder_fails_in_one_line(capsys, data):
    create_session(data, "s")
    before = snapshot(data)
    rc, out, err = cli(capsys, "generate", "--data-dir", data, "--session", "s", *GEN, "--model", "/nonexistent/path")
    assert rc == 1 and out == []
    assert_one_error_line(err, "/nonexistent/path")
    assert snapshot(data) == before


def test_generate_with_bad_width_fails_before_loading(capsys, data):
    create_session(data, "s")
    before = snapshot(data)
    rc, out, err = cli(capsys, "generate", "--data-dir", data, "--session", "s", "--prompt", "x", "--width", "65")
    assert rc == 1 and out == []
    assert_one_error_line(err, "Width", "65")
    assert snapshot(data) == before


# ------------------------------------------------------------------ import
def test_import_a_folder_of_two_pngs(capsys, data, tmp_path):
    a, b = noise(12, 16, 1), noise(20, 10, 2)
    write_png(tmp_path / "in" / "a.png", a)
    write_png(tmp_path / "in" / "nested" / "b.png", b)
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    rc, out, err = cli(capsys, "import", "--data-dir", data, "--session", "imp", "--create-session", tmp_path / "in")
    assert rc == 0 and len(out) == 2 and err == []
    assert np.array_equal(pixels(out[0]), a) and np.array_equal(pixels(out[1]), b)
    with Store(data) as store:
        records = store.list_images("imp")
        assert [(r.original_name, r.source, r.width, r.height) for r in records] == \
            [("a.png", "uploaded", 16, 12), ("b.png", "uploaded", 10, 20)]


def test_import_with_one_bad_file_imports_nothing(capsys, data, tmp_path):
    write_png(tmp_path / "in" / "good1.png", noise(8, 8, 3))
    write_png(tmp_path / "in" / "good2.png", noise(8, 8, 4))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    create_session(data, "imp")
    before = snapshot(data)
    rc, out, err = cli(capsys, "import", "--data-dir", data, "--session", "imp", tmp_path / "in")
    assert rc == 1 and out == []
    line = assert_one_error_line(err, "broken.png", "--skip-bad")
    assert "good1.png" not in line and "good2.png" not in line
    assert snapshot(data) == before


def test_import_skip_bad_imports_the_good_files_and_reports_the_bad_one(capsys, data, tmp_path):
    good = [noise(8, 8, 5), noise(8, 8, 6)]
    write_png(tmp_path / "in" / "good1.png", good[0])
    write_png(tmp_path / "in" / "good2.png", good[1])
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    rc, out, err = cli(capsys, "import", "--data-dir", data, "--session", "imp", "--create-session", "--skip-bad",
                       tmp_path / "in")
    assert rc == 0 and len(out) == 2
    assert [pixels(p).tolist() for p in out] == [g.tolist() for g in good]
    assert len(err) == 1 and err[0].startswith("artifact-studio: skipped") and "empty.png" in err[0]
    assert snapshot(data)[0]["images"] == 2


def test_import_cmyk_jpeg_and_16bit_png(capsys, data, tmp_path):
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, 255 - x * 5], axis=2).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    rc, out, err = cli(capsys, "import", "--data-dir", data, "--session", "imp", "--create-session",
                       tmp_path / "cmyk.jpg", tmp_path / "grey16.png")
    assert rc == 0 and len(out) == 2 and err == []
    cmyk, grey = pixels(out[0]), pixels(out[1])
    assert cmyk.shape == (32, 48, 3) and np.abs(cmyk.astype(int) - rgb).mean() < 3
    assert np.array_equal(grey[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_import_missing_path_fails_in_one_line(capsys, data, tmp_path):
    rc, out, err = cli(capsys, "import", "--data-dir", data, "--session", "imp", "--create-session",
                       tmp_path / "nowhere")
    assert rc == 1 and out == []
    assert_one_error_line(err, "nowhere")


# ------------------------------------------------------------------ sessions
def test_sessions_json(capsys, data, tmp_path):
    write_png(tmp_path / "one.png", noise(4, 4, 7))
    write_png(tmp_path / "two.png", noise(4, 4, 8))
    assert cli(capsys, "import", "--data-dir", data, "--session", "alpha", "--create-session",
               tmp_path / "one.png", tmp_path / "two.png")[0] == 0
    create_session(data, "empty one")
    rc, out, err = cli(capsys, "sessions", "--data-dir", data, "--json")
    assert rc == 0 and err == []
    listed = json.loads("\n".join(out))
    assert {s["name"]: s["images"] for s in listed} == {"alpha": 2, "empty one": 0}
    assert all(isinstance(s["id"], int) and s["created_at"] and s["updated_at"] for s in listed)
    rc, out, _ = cli(capsys, "sessions", "--data-dir", data)
    assert rc == 0 and out[0] == f"data dir: {data.resolve()}" and len(out) == 3


# ------------------------------------------------------------------ serve refuses to expose itself
@pytest.mark.parametrize("argv,where", [
    (["serve", "--host", "0.0.0.0"], "0.0.0.0"),
    (["serve", "--share"], "share"),
    (["--host", "0.0.0.0"], "0.0.0.0"),  # `python app.py [serve options]`
    (["serve", "--host", "192.168.1.5", "--share"], "share"),
])
def test_serve_refuses_exposed_hosts_without_auth(capsys, tmp_path, argv, where):
    data_dir = tmp_path / "never-created"
    rc, out, err = cli(capsys, *argv, "--data-dir", data_dir)
    assert rc == 1 and out == []
    assert_one_error_line(err, "--auth", where)
    assert not data_dir.exists()  # refused before the store (or any server) was opened


@pytest.mark.slow
def test_serve_refusal_in_a_real_process_is_immediate(tmp_path):
    data_dir = tmp_path / "never-created"
    for argv in (["serve", "--host", "0.0.0.0"], ["serve", "--share"]):
        proc = cli_subprocess(*argv, "--data-dir", data_dir, timeout=600)
        assert proc.returncode == 1, proc.stderr
        assert_one_error_line(proc.stderr.splitlines(), "--auth")
        assert proc.stdout == "" and not data_dir.exists()


def test_serve_rejects_malformed_credentials(capsys, tmp_path):
    rc, _, err = cli(capsys, "serve", "--host", "0.0.0.0", "--auth", "no-colon", "--data-dir", tmp_path / "d")
    assert rc == 1
    assert_one_error_line(err, "USER:PASSWORD")


# ------------------------------------------------------------------ known bugs
@pytest.mark.parametrize("case", ["import-bad-file", "generate-bad-width", "generate-missing-model"])
def test_failed_command_does_not_create_the_session(capsys, data, tmp_path, case):
    create_session(data, "existing")
    write_png(tmp_path / "in" / "good.png", noise(8, 8, 9))
    (tmp_path / "in" / "bad.png").write_text("not an image")
    argv = {
        "import-bad-file": ["import", "--data-dir", data, "--session", "fresh", "--create-session", tmp_path / "in"],
        "generate-bad-width": ["generate", "--data-dir", data, "--session", "fresh", "--create-session",
                               "--prompt", "x", "--width", "65"],
        "generate-missing-model": ["generate", "--data-dir", data, "--session", "fresh", "--create-session",
                                   *GEN, "--model", "/nonexistent/path"],
    }[case]
    rc, out, err = cli(capsys, *argv)
    assert rc == 1 and out == [] and len(err) == 1
    assert session_names(data) == {"existing"}


@pytest.mark.slow
def test_broken_model_folder_is_one_stderr_line_in_a_real_process(data, demo_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    create_session(data, "s")
    proc = cli_subprocess("generate", "--data-dir", data, "--session", "s", *GEN, "--model", broken,
                          "--device", "cpu")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("artifact-studio: ") and str(broken) in lines[-1]
    assert len(lines) == 1, lines
