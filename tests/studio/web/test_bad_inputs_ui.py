"""The bad-input corpus against the UI handlers (called directly, as a Gradio event would).

Mechanism-agnostic: a handler may raise (ValueError / gr.Error) or report through its status output;
either way the message is one sentence naming the problem, and the database dump and the data
directory's files are unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from studio.services import Services


def _message(call) -> str:
    """The one-sentence message of a failed handler call, whatever the reporting mechanism."""
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - gr.Error, ValueError
        return getattr(exc, "message", None) or str(exc)
    texts = [v for v in (result if isinstance(result, tuple) else (result,)) if isinstance(v, str)]
    return " ".join(texts)


@pytest.fixture
def services(corpus, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(corpus[0], target)
    opened = Services.open(target)
    yield opened
    opened.close()


def _sessions():
    from studio.web.tabs import sessions
    return sessions


def _inspect():
    from studio.web.tabs import inspect
    return inspect


def _label():
    from studio.web.tabs import label
    return label


def _panels():
    from studio.web.tabs import classifier_panels
    return classifier_panels


def _corrupt():
    from studio.web.tabs import corrupt
    return corrupt


S = "SESSION"  # replaced by the id of session "s"
UI_CASES = [
    ("ui-create-invisible", lambda: _sessions().create_session, ["\u200b\u200c"], ["visible"]),
    ("ui-create-bidi", lambda: _sessions().create_session, ["photos\u202egpj.exe"], ["bidirectional"]),
    ("ui-create-empty", lambda: _sessions().create_session, ["   "], ["visible"]),
    ("ui-create-too-long", lambda: _sessions().create_session, ["n" * 101], ["100"]),
    ("ui-create-digits", lambda: _sessions().create_session, ["2024"], ["digits"]),
    ("ui-create-duplicate", lambda: _sessions().create_session, ["S"], ["already exists"]),
    ("ui-create-hangul-filler", lambda: _sessions().create_session, ["\u3164"], ["visible"]),
    ("ui-rename-bidi", lambda: _sessions().rename_session, [S, "\u2066x\u2069"], ["bidirectional"]),
    ("ui-rename-newline", lambda: _sessions().rename_session, [S, "a\nb"], ["control"]),
    ("ui-rename-no-session", lambda: _sessions().rename_session, [None, "x"], ["session"]),
    ("ui-upload-garbage", lambda: _sessions().upload_images, [S, ["F/garbage.png"]], ["garbage.png", "Nothing"]),
    ("ui-upload-bomb", lambda: _sessions().upload_images, [S, ["F/bomb.png"]], ["bomb.png", "megapixels"]),
    ("ui-upload-truncated", lambda: _sessions().upload_images, [S, ["F/good.png", "F/trunc.png"]],
     ["trunc.png", "Nothing"]),
    ("ui-upload-empty-file", lambda: _sessions().upload_images, [S, ["F/empty.png"]], ["empty.png"]),
    ("ui-upload-nothing", lambda: _sessions().upload_images, [S, []], ["No files"]),
    ("ui-upload-no-session", lambda: _sessions().upload_images, [None, ["F/good.png"]], ["session"]),
    ("ui-export-absolute-elsewhere", lambda: _sessions().export_labels, [S, "png", "/etc/artifact-export"],
     ["inside", "--export-root"]),
    ("ui-export-escape", lambda: _sessions().export_labels, [S, "png", "../../escape"], ["inside"]),
    ("ui-export-empty-folder", lambda: _sessions().export_labels, [S, "png", "  "], ["empty"]),
    ("ui-export-no-session", lambda: _sessions().export_labels, [None, "png", "x"], ["session"]),
    ("ui-inspect-upload-garbage", lambda: _inspect().upload_images, [S, ["F/garbage.png"]], ["garbage.png"]),
    ("ui-inspect-bogus-detector", lambda: _inspect().load_detector, ["bogus:x"], ["Unknown detector"]),
    ("ui-inspect-truncated-detector", lambda: _inspect().load_detector, ["F/trunc-detector"],
     ["damaged or truncated"]),
    ("ui-inspect-random-bytes", lambda: _inspect().load_detector, ["diffdoctor:F/random.bin"],
     ["not a PyTorch checkpoint"]),
    ("ui-taxonomy-invisible-class", lambda: _label().set_taxonomy, [None, S, '[{"name": "\\u200b"}]'], ["visible"]),
    ("ui-taxonomy-bidi-class", lambda: _label().set_taxonomy, [None, S, '[{"name": "hand\\u202e"}]'],
     ["bidirectional"]),
    ("ui-taxonomy-not-json", lambda: _label().set_taxonomy, [None, S, "[{"], ["JSON"]),
    ("ui-taxonomy-twice-after-cleaning", lambda: _label().set_taxonomy,
     [None, S, '[{"name": "hand"}, {"name": "hand\\u200b"}]'], ["twice"]),
    ("ui-feedback-no-prompts", lambda: _panels().launch_feedback, ["  \n ", "demo", "demo", 5], ["prompt"]),
    ("ui-feedback-zero-steps", lambda: _panels().launch_feedback, ["a cat\na dog", "demo", "demo", 0], ["Steps"]),
    ("ui-feedback-half-step", lambda: _panels().launch_feedback, ["a cat\na dog", "demo", "demo", 2.5], ["whole"]),
    ("ui-corrupt-negative-seed", lambda: _corrupt()._parse_seeds, ["0,-5"], ["seeds"]),
]


def test_the_ui_corpus_is_large():
    assert len(UI_CASES) >= 20 and len({c[0] for c in UI_CASES}) == len(UI_CASES)


@pytest.mark.parametrize("case", UI_CASES, ids=[c[0] for c in UI_CASES])
def test_bad_ui_input_is_one_sentence_and_changes_nothing(case, corpus, services, data_snapshot):
    _, handler, args, words = case
    fx = corpus[1]
    sid = services.store.get_session("s").id
    values = []
    for a in args:
        if a == S:
            a = sid
        elif a == "S":
            a = "s"
        elif isinstance(a, str) and (a.startswith("F/") or ":F/" in a):
            a = a.replace("F/", f"{fx}/")
        elif isinstance(a, list):
            a = [str(fx / x[2:]) if isinstance(x, str) and x.startswith("F/") else x for x in a]
        values.append(a)
    before = data_snapshot(services.data_dir)
    message = _message(lambda: handler()(services, *values) if _takes_services(handler()) else handler()(*values))
    assert message and "\n" not in message.strip() and "Traceback" not in message and " at 0x" not in message, message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    assert data_snapshot(services.data_dir) == before
    assert not Path("/etc/artifact-export").exists()


def _takes_services(fn) -> bool:
    import inspect

    params = list(inspect.signature(fn).parameters)
    return bool(params) and params[0] == "services"
