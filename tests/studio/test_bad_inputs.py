"""A bad-input corpus against every CLI command (generated at test time, run in-process).

Each case asserts: exit status 1 (2 for argparse usage errors), exactly one line on stderr that
starts with "artifact-studio" and names what was wrong, no traceback, and nothing changed: the
database dump (`iterdump`), the data directory's file tree and the --out paths are as before.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

import app
from snapshots import file_tree, snapshot
from studio.store.store import Store


@pytest.fixture
def data(corpus, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(corpus[0], target)
    return target


# ------------------------------------------------------------------ the corpus
LONG = "x" * 10_001
# (id, argv (D = data dir, F = fixtures, T = a tmp folder for outputs), words the line must contain, status)
CASES = [
    # generate
    ("gen-negative-seed", ["generate", "--session", "s", "--prompt", "x", "--seed", "-1"], ["Seed -1"], 1),
    ("gen-zero-steps", ["generate", "--session", "s", "--prompt", "x", "--steps", "0"], ["Steps"], 1),
    ("gen-odd-width", ["generate", "--session", "s", "--prompt", "x", "--width", "65"], ["Width", "65"], 1),
    ("gen-too-many", ["generate", "--session", "s", "--prompt", "x", "--count", "17"], ["count", "17"], 1),
    ("gen-long-prompt", ["generate", "--session", "s", "--prompt", LONG], ["prompt", "10000"], 1),
    ("gen-long-negative", ["generate", "--session", "s", "--prompt", "x", "--negative-prompt", LONG],
     ["negative prompt"], 1),
    ("gen-guidance", ["generate", "--session", "s", "--prompt", "x", "--guidance", "99"], ["Guidance"], 1),
    ("gen-unknown-session", ["generate", "--session", "nope", "--prompt", "x", "--steps", "1"], ["nope"], 1),
    ("gen-invisible-name", ["generate", "--session", "\u200b\u2060", "--create-session", "--prompt", "x"],
     ["visible"], 1),
    ("gen-bidi-name", ["generate", "--session", "abc\u202egnp.exe", "--create-session", "--prompt", "x"],
     ["bidirectional", "U+202E"], 1),
    ("gen-digits-name", ["generate", "--session", "12345", "--create-session", "--prompt", "x"], ["digits"], 1),
    ("gen-newline-name", ["generate", "--session", "a\nb", "--create-session", "--prompt", "x"], ["control"], 1),
    ("gen-long-name", ["generate", "--session", "n" * 101, "--create-session", "--prompt", "x"], ["100"], 1),
    ("gen-seed-not-int", ["generate", "--session", "s", "--prompt", "x", "--seed", "abc"], ["--seed", "abc"], 2),
    ("gen-lora-missing", ["generate", "--session", "s", "--prompt", "x", "--lora", "F/no-lora"], ["LoRA", "no-lora"], 1),
    ("gen-lora-truncated", ["generate", "--session", "s", "--prompt", "x", "--steps", "1", "--width", "64",
                            "--height", "64", "--lora", "F/lora"], ["LoRA", "damaged or truncated"], 1),
    ("gen-model-missing", ["generate", "--session", "s", "--prompt", "x", "--model", "F/no-model"], ["no-model"], 1),
    # import
    ("imp-missing-path", ["import", "--session", "s", "F/nothing-here.png"], ["nothing-here.png", "no such file"], 1),
    ("imp-garbage", ["import", "--session", "s", "F/garbage.png"], ["garbage.png", "not a readable image"], 1),
    ("imp-empty-file", ["import", "--session", "s", "F/empty.png"], ["empty.png", "empty"], 1),
    ("imp-truncated", ["import", "--session", "s", "F/trunc.png"], ["trunc.png", "damaged or truncated"], 1),
    ("imp-bomb-header", ["import", "--session", "s", "F/bomb.png"], ["bomb.png", "megapixels"], 1),
    ("imp-bad-among-good", ["import", "--session", "s", "F/good.png", "F/garbage.png"],
     ["garbage.png", "Nothing was imported"], 1),
    ("imp-skip-bad-only-bad", ["import", "--session", "s", "--skip-bad", "F/garbage.png"], ["skipped", "garbage.png"], 1),
    ("imp-no-images", ["import", "--session", "s", "F/no-images"], ["No image files"], 1),
    ("imp-unknown-session", ["import", "--session", "nope", "F/good.png"], ["nope"], 1),
    ("imp-dev-null-file", ["import", "--session", "s", "/dev/null"], ["/dev/null"], 1),
    ("imp-data-dir-dev-null", ["import", "--data-dir", "/dev/null", "--session", "s", "F/good.png"],
     ["/dev/null", "not a folder"], 1),
    ("imp-data-dir-file", ["import", "--data-dir", "F/a-file", "--session", "s", "F/good.png"],
     ["a-file", "not a folder"], 1),
    ("imp-data-dir-under-file", ["import", "--data-dir", "F/a-file/sub", "--session", "s", "F/good.png"],
     ["a-file", "Not a directory"], 1),
    # sessions / jobs / cancel / doctor
    ("sessions-dev-null", ["sessions", "--data-dir", "/dev/null"], ["/dev/null", "not a folder"], 1),
    ("sessions-proc", ["sessions", "--data-dir", "/proc/self/artifact-studio"], ["/proc/", "artifact-studio"], 1),
    ("cancel-unknown-job", ["cancel", "999"], ["999"], 1),
    ("cancel-not-a-number", ["cancel", "x"], ["invalid int"], 2),
    ("doctor-empty-folder", ["doctor", "--data-dir", "T/nothing"], ["no Artifact Studio database"], 1),
    ("unknown-command", ["frobnicate"], ["invalid choice"], 2),
    # detect
    ("det-images-no-out", ["detect", "--images", "F/one-bad"], ["--out"], 1),
    ("det-threshold", ["detect", "--session", "s", "--threshold", "2"], ["--threshold"], 1),
    ("det-alpha", ["detect", "--session", "s", "--alpha", "3", "--out", "T/out"], ["--alpha"], 1),
    ("det-out-is-file", ["detect", "--session", "s", "--out", "F/a-file"], ["a-file", "is a file"], 1),
    ("det-out-under-file", ["detect", "--session", "s", "--out", "F/a-file/out"], ["a-file", "not a folder"], 1),
    ("det-out-proc", ["detect", "--session", "s", "--out", "/proc/artifact-out"], ["/proc"], 1),
    ("det-unknown-session", ["detect", "--session", "nope"], ["nope"], 1),
    ("det-empty-session", ["detect", "--session", "empty"], ["no images"], 1),
    ("det-bogus-family", ["detect", "--session", "s", "--detector", "bogus:x"], ["Unknown detector"], 1),
    ("det-missing-folder", ["detect", "--session", "s", "--detector", "F/no-such-detector/"], ["does not exist"], 1),
    ("det-truncated-weights", ["detect", "--session", "s", "--detector", "F/trunc-detector"],
     ["model.safetensors", "damaged or truncated"], 1),
    ("det-random-bytes", ["detect", "--session", "s", "--detector", "diffdoctor:F/random.bin"],
     ["random.bin", "not a PyTorch checkpoint"], 1),
    ("det-code-pickle", ["detect", "--session", "s", "--detector", "diffdoctor:F/evil.pkl"],
     ["evil.pkl", "run code"], 1),
    ("det-sliding-3000x1", ["detect", "--images", "F/wide", "--out", "T/out", "--mode", "sliding"],
     ["3000x1", "windows", "1024"], 1),
    ("det-bad-mode", ["detect", "--session", "s", "--mode", "tiles"], ["--mode"], 2),
    ("det-images-bad-file", ["detect", "--images", "F/one-trunc", "--out", "T/out"], ["trunc.png"], 1),
    # evaluate
    ("eval-non-image-prediction", ["evaluate", "--predictions", "F/one-bad", "--masks", "F/one-bad"],
     ["garbage.png", "not a readable image"], 1),
    ("eval-missing-masks", ["evaluate", "--predictions", "F/one-bad", "--masks", "F/no-masks"], ["no-masks"], 1),
    ("eval-threshold", ["evaluate", "--predictions", "F/wide", "--masks", "F/wide", "--threshold", "-1"],
     ["--threshold"], 1),
    ("eval-detector-no-images", ["evaluate", "--detector", "demo", "--masks", "F/wide"], ["--images"], 1),
    ("eval-nothing-matches", ["evaluate", "--predictions", "F/one-bad", "--masks", "F/wide"], ["No prediction"], 1),
    # import-richhf
    ("rich-missing-tfrecord", ["import-richhf", "--session", "s", "--tfrecord", "F/none.tfrecord", "--images", "F/wide"],
     ["none.tfrecord"], 1),
    ("rich-garbage-tfrecord", ["import-richhf", "--session", "s", "--tfrecord", "F/garbage.tfrecord",
                               "--images", "F/wide"], ["No RichHF record could be read"], 1),
    ("rich-threshold", ["import-richhf", "--session", "s", "--tfrecord", "F/garbage.tfrecord", "--images", "F/wide",
                        "--threshold", "0"], ["--threshold"], 1),
    # export
    ("exp-unknown-session", ["export", "--session", "nope", "--format", "png", "--out", "T/out"], ["nope"], 1),
    ("exp-out-is-file", ["export", "--session", "s", "--format", "png", "--out", "F/a-file"], ["is a file"], 1),
    ("exp-out-under-file", ["export", "--session", "s", "--format", "coco", "--out", "F/a-file/x"], ["not a folder"], 1),
    ("exp-out-proc", ["export", "--session", "s", "--format", "png", "--out", "/proc/x"], ["/proc"], 1),
    ("exp-out-not-empty", ["export", "--session", "s", "--format", "png", "--out", "F/nonempty"], ["not empty"], 1),
    ("exp-val-fraction", ["export", "--session", "s", "--format", "mmseg", "--out", "T/out", "--val-fraction", "1.5"],
     ["val_fraction"], 1),
    ("exp-empty-session", ["export", "--session", "empty", "--format", "png", "--out", "T/out"], ["no images"], 1),
    ("exp-bad-format", ["export", "--session", "s", "--format", "tiff", "--out", "T/out"], ["--format"], 2),
    # import-masks
    ("imm-rle-bomb", ["import-masks", "--session", "s", "--format", "coco", "F/rle-bomb.json"],
     ["40000x40000", "megapixels"], 1),
    ("imm-rle-size-mismatch", ["import-masks", "--session", "s", "--format", "coco", "F/rle-mismatch.json"],
     ["differs"], 1),
    ("imm-bad-category", ["import-masks", "--session", "s", "--format", "coco", "F/bad-category.json"],
     ["category_id"], 1),
    ("imm-huge-entry", ["import-masks", "--session", "s", "--format", "coco", "F/huge-entry.json"],
     ["50000x50000", "megapixels"], 1),
    ("imm-bad-rle-string", ["import-masks", "--session", "s", "--format", "coco", "F/bad-rle-string.json"],
     ["RLE"], 1),
    ("imm-not-json", ["import-masks", "--session", "s", "--format", "coco", "F/not-json.json"], ["not readable JSON"], 1),
    ("imm-coco-missing", ["import-masks", "--session", "s", "--format", "coco", "F/none.json"], ["none.json"], 1),
    ("imm-png-not-folder", ["import-masks", "--session", "s", "--format", "png", "F/good.png"], ["not a folder"], 1),
    ("imm-png-grey", ["import-masks", "--session", "s", "--format", "png", "F/grey-masks"], ["not a binary mask"], 1),
    ("imm-png-bomb", ["import-masks", "--session", "s", "--format", "png", "F/one-bomb"], ["megapixels"], 1),
    ("imm-empty-session", ["import-masks", "--session", "empty", "--format", "png", "F/grey-masks"], ["no images"], 1),
    # corrupt
    ("cor-negative-seed", ["corrupt", "--images", "F/wide", "--seeds", "0,-5", "--out", "T/out"], ["-5"], 1),
    ("cor-seeds-not-numbers", ["corrupt", "--images", "F/wide", "--seeds", "0,x", "--out", "T/out"],
     ["comma-separated"], 1),
    ("cor-too-many-seeds", ["corrupt", "--images", "F/wide", "--seeds", ",".join(map(str, range(17))),
                            "--out", "T/out"], ["17 seeds"], 1),
    ("cor-out-under-file", ["corrupt", "--images", "F/wide", "--out", "F/a-file/out"], ["not a folder"], 1),
    ("cor-out-proc", ["corrupt", "--images", "F/wide", "--out", "/proc/out"], ["/proc"], 1),
    ("cor-masks-without-images", ["corrupt", "--session", "s", "--masks", "F/wide", "--out", "T/out"],
     ["--masks"], 1),
    ("cor-steps", ["corrupt", "--images", "F/wide", "--num-inference-steps", "0", "--out", "T/out"], ["step"], 1),
    ("cor-max-side", ["corrupt", "--images", "F/wide", "--max-side", "1", "--out", "T/out"], ["--max-side"], 1),
    ("cor-unknown-session", ["corrupt", "--session", "nope", "--out", "T/out"], ["nope"], 1),
    # repair
    ("rep-image-no-out", ["repair", "--image", "F/good.png", "--detector", "demo"], ["--out"], 1),
    ("rep-duplicate-seeds", ["repair", "--session", "s", "--detector", "demo", "--seeds", "1,1"], ["distinct"], 1),
    ("rep-strength", ["repair", "--session", "s", "--detector", "demo", "--strength", "0"], ["Strength"], 1),
    ("rep-garbage-image", ["repair", "--image", "F/garbage.png", "--detector", "demo", "--out", "T/out"],
     ["garbage.png"], 1),
    ("rep-out-proc", ["repair", "--session", "s", "--detector", "demo", "--out", "/proc/out"], ["/proc"], 1),
    ("rep-unknown-session", ["repair", "--session", "nope", "--detector", "demo"], ["nope"], 1),
    # train-detector / tune
    ("td-no-session", ["train-detector", "--steps", "2"], ["--session"], 1),
    ("td-unknown-session", ["train-detector", "--session", "nope"], ["nope"], 1),
    ("td-zero-steps", ["train-detector", "--session", "s", "--steps", "0"], ["teps"], 1),
    ("td-resume-unknown", ["train-detector", "--resume", "999"], ["999"], 1),
    # experiment (issue 14): bad configs fail before any work, naming the key
    ("xp-missing-config", ["experiment", "run", "F/none.toml"], ["none.toml", "does not exist"], 1),
    ("xp-broken-toml", ["experiment", "run", "F/broken.toml"], ["broken.toml", "not valid TOML"], 1),
    ("xp-unknown-key", ["experiment", "run", "F/unknown-key.toml"], ["Unknown key 'data.foo'"], 1),
    ("xp-unknown-arch", ["experiment", "run", "F/bad-arch.toml"], ["resnet-9000"], 1),
    ("xp-unknown-profile", ["experiment", "run", "tiny", "--profile", "nope"], ["Unknown profile 'nope'"], 1),
    ("xp-cuda-missing", ["experiment", "run", "tiny", "--device", "cuda"], ["CUDA is not available"], 1),
    ("xp-status-not-a-run", ["experiment", "status", "F/no-images"], ["not an experiment run folder"], 1),
    ("xp-report-not-a-run", ["experiment", "report", "F/no-images"], ["not an experiment run folder"], 1),
    ("tune-missing-prompts", ["tune", "--prompts", "F/none.txt", "--detector", "demo"], ["none.txt", "does not exist"], 1),
    ("tune-prompts-folder", ["tune", "--prompts", "F/no-images", "--detector", "demo"], ["is a folder"], 1),
    ("tune-prompts-empty", ["tune", "--prompts", "F/prompts-empty.txt", "--detector", "demo"], ["no prompts"], 1),
    ("tune-prompts-latin1", ["tune", "--prompts", "F/prompts-latin1.txt", "--detector", "demo"], ["UTF-8"], 1),
    # classify / train-classifier (SynArtifact): nothing is ever written by classify; no job is created
    ("cls-unknown-classifier", ["classify", "--session", "s", "--classifier", "clip:x"], ["Unknown classifier"], 1),
    ("cls-missing-folder", ["classify", "--session", "s", "--classifier", "F/no-such-classifier/"],
     ["does not exist"], 1),
    ("cls-truncated-head", ["classify", "--session", "s", "--classifier", "head:F/trunc-classifier"],
     ["damaged or truncated"], 1),
    ("cls-vlm-not-a-model", ["classify", "--images", "F/wide", "--classifier", "vlm:F/no-images"], ["config.json"], 1),
    ("cls-bad-option", ["classify", "--session", "s", "--classifier", "demo#threshold=7"], ["threshold"], 1),
    ("cls-threshold", ["classify", "--session", "s", "--threshold", "1.5"], ["--threshold"], 1),
    ("cls-batch-size", ["classify", "--session", "s", "--batch-size", "0"], ["--batch-size"], 1),
    ("cls-regions-no-session", ["classify", "--images", "F/wide", "--regions", "labels"], ["--session"], 1),
    ("cls-unknown-session", ["classify", "--session", "nope"], ["nope"], 1),
    ("cls-empty-session", ["classify", "--session", "empty"], ["no images"], 1),
    ("cls-images-no-images", ["classify", "--images", "F/no-images"], ["No image files"], 1),
    ("cls-images-truncated", ["classify", "--images", "F/one-trunc"], ["trunc.png"], 1),
    ("cls-no-source", ["classify"], ["--session", "--images"], 2),
    ("tc-no-session", ["train-classifier", "--steps", "2"], ["--session"], 1),
    ("tc-unknown-session", ["train-classifier", "--session", "nope"], ["nope"], 1),
    ("tc-no-classified-regions", ["train-classifier", "--session", "s"], ["no labelled region with a class"], 1),
    ("tc-zero-steps", ["train-classifier", "--session", "s", "--steps", "0"], ["steps"], 1),
    ("tc-val-fraction", ["train-classifier", "--session", "s", "--val-fraction", "1.5"], ["val_fraction"], 1),
    ("tc-fractions-sum", ["train-classifier", "--session", "s", "--val-fraction", "0.5", "--test-fraction", "0.5"],
     ["below 1"], 1),
    ("tc-bad-device", ["train-classifier", "--session", "s", "--device", "tpu"], ["tpu"], 1),
    ("tc-unknown-classifier", ["train-classifier", "--session", "s", "--classifier", "clip:x"],
     ["Unknown classifier"], 1),
    ("tc-truncated-head", ["train-classifier", "--session", "s", "--classifier", "F/trunc-classifier"],
     ["damaged or truncated"], 1),
    ("tc-resume-unknown", ["train-classifier", "--resume", "999"], ["999"], 1),
    ("tc-bad-level", ["train-classifier", "--session", "s", "--level", "pixel"], ["--level"], 2),
    # serve (fails before anything is written or launched)
    ("serve-public-no-auth", ["serve", "--host", "0.0.0.0"], ["Refusing", "--auth"], 1),
    ("serve-share-no-auth", ["serve", "--share"], ["Refusing", "share"], 1),
    ("serve-port-range", ["serve", "--port", "70000"], ["70000"], 1),
    ("serve-bad-auth", ["serve", "--auth", "nopassword"], ["USER:PASSWORD"], 1),
    ("serve-auth-file-folder", ["serve", "--auth-file", "F/no-images"], ["is a folder"], 1),
    ("serve-auth-file-missing", ["serve", "--auth-file", "F/none.txt"], ["does not exist"], 1),
    ("serve-export-root-proc", ["serve", "--export-root", "/proc/exports"], ["--export-root", "/proc"], 1),
    ("serve-export-root-file", ["serve", "--export-root", "F/a-file"], ["--export-root", "is a file"], 1),
    ("serve-busy-port", ["serve", "--port", "BUSY"], ["already in use"], 1),
]


def test_the_corpus_is_large_and_covers_every_command():
    from studio.cli.main import COMMANDS

    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    covered = {c[1][0] for c in CASES}
    assert set(COMMANDS) - {"jobs"} <= covered, set(COMMANDS) - covered  # `jobs` has no input; see below
    assert "serve" in covered


def _expand(argv: list[str], data: Path, fx: Path, tmp: Path, port: int) -> list[str]:
    out = []
    for a in argv:
        family, sep, rest = a.partition(":")
        if sep and rest.startswith("F/"):  # FAMILY:F/file
            a = f"{family}:{fx / rest[2:]}"
        elif a.startswith("F/"):
            a = str(fx / a[2:])
        elif a.startswith("T/"):
            a = str(tmp / a[2:])
        elif a == "BUSY":
            a = str(port)
        out.append(a)
    if "--data-dir" not in out and out[0] not in ("frobnicate",):
        at = 2 if out[0] == "experiment" else 1  # after the action of a nested command
        out[at:at] = ["--data-dir", str(data)]
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_changes_nothing(case, corpus, data, tmp_path, capsys):
    _, argv, words, status = case
    fx = corpus[1]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = _expand(argv, data, fx, outputs, busy.getsockname()[1])
        before, fixtures_before = snapshot(data), file_tree(fx)
        with pytest.raises(SystemExit) if status == 2 else _nothing() as exit_info:
            rc = app.main(args)
    if status == 2:
        rc = exit_info.value.code
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == status, (rc, captured.err)
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("artifact-studio") and "Traceback" not in line and " at 0x" not in line, line
    for word in words:
        assert word in line, (word, line)
    assert snapshot(data) == before, "the data directory changed"
    assert file_tree(fx) == fixtures_before
    assert list(outputs.iterdir()) == [], "an output was written"
    assert not Path("/proc/artifact-out").exists()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_damaged_database_is_one_sentence_for_every_command(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "studio.db").write_bytes(b"this is not a database" * 100)
    before = file_tree(data)
    for argv in (["sessions"], ["jobs"], ["import", "--session", "s", str(corpus[1] / "good.png")],
                 ["detect", "--session", "s"], ["doctor"]):
        rc = app.main([argv[0], "--data-dir", str(data), *argv[1:]])
        err = capsys.readouterr().err.splitlines()
        assert rc == 1 and len(err) == 1, err
        assert "studio.db" in err[0] and "damaged" in err[0], err
    assert file_tree(data) == before


def test_a_damaged_stored_image_is_one_sentence(data, tmp_path, capsys):
    with Store(data) as store:
        record = store.list_images("s")[0]
    Path(record.path).write_bytes(Path(record.path).read_bytes()[:60])
    before = snapshot(data)
    rc = app.main(["detect", "--data-dir", str(data), "--session", "s", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"image {record.id}" in err[0] and "damaged" in err[0] and "doctor" in err[0]
    assert snapshot(data) == before and not (tmp_path / "out").exists()


def test_a_missing_stored_image_is_one_sentence_and_doctor_names_it(data, capsys):
    with Store(data) as store:
        record = store.list_images("s")[1]
    Path(record.path).unlink()
    rc = app.main(["export", "--data-dir", str(data), "--session", "s", "--format", "png", "--unlabelled-as-background", "--out",
                   str(data.parent / "exp")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == 1 and "missing" in err[0], err
    rc = app.main(["doctor", "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert rc == 1 and f"image {record.id} is missing" in out


def test_unexpected_errors_are_one_line_too(data, capsys, monkeypatch):
    import studio.cli.main as cli

    def boom(args):
        raise KeyError("surprise")
    monkeypatch.setitem(cli.COMMANDS, "sessions", boom)
    rc = app.main(["sessions", "--data-dir", str(data)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == 1 and "KeyError" in err[0] and "ARTIFACT_STUDIO_DEBUG" in err[0]
    monkeypatch.setenv("ARTIFACT_STUDIO_DEBUG", "1")
    with pytest.raises(KeyError):
        app.main(["sessions", "--data-dir", str(data)])


def test_library_warnings_are_not_printed(data, corpus, capsys):
    """A 16-bit TIFF-like path through Pillow and torch warns; the CLI prints only its own lines."""
    import warnings

    import studio.cli.main as cli

    def noisy(args):
        warnings.warn("a library warning", UserWarning)
        warnings.warn("deprecated thing", FutureWarning)
        raise ValueError("The real problem, in one sentence.")
    cli.COMMANDS["sessions"], old = noisy, cli.COMMANDS["sessions"]
    try:
        rc = app.main(["sessions", "--data-dir", str(data)])
    finally:
        cli.COMMANDS["sessions"] = old
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and err == ["artifact-studio: The real problem, in one sentence."]
