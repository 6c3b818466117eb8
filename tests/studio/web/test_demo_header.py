"""The header and the Models panel tell the truth about the demo models (issue 10)."""
from __future__ import annotations

from studio.web.catalog import scan
from studio.services import Services
from studio.store.store import Store
from studio.web.ui import header_text


def test_header_says_what_each_demo_model_is_and_how_to_use_real_weights(tmp_path):
    services = Services(data_dir=tmp_path, store=Store(tmp_path))
    text = header_text(services)
    assert "Demo model in use" in text
    assert "trained offline on 15 bundled" in text and "128x128" in text  # what it is and was trained on
    assert "demo detector: trained on synthetic corruptions of the sample photos, not a real-world artifact detector" \
        in text
    assert "direct" in text and "held out" in text  # which corruption, and that photos were held out
    for flag in ("--model", "--sam", "diffdoctor:"):
        assert flag in text
    assert "random" not in text and "not meaningful" not in text  # the old untrained wording is gone


def test_header_names_only_the_demo_parts_in_use(tmp_path):
    services = Services(data_dir=tmp_path, store=Store(tmp_path), model_spec="/some/pipeline",
                        active_detector="/some/detector")
    text = header_text(services)
    assert "Demo" not in text and "demo detector" not in text
    assert "`/some/pipeline`" in text


def test_models_panel_describes_the_trained_demo_models(tmp_path):
    notes = {(a.kind, a.spec): a.note for a in scan(tmp_path, hf_cache=False)}
    assert "trained on the 15 bundled photos" in notes[("text2image", "demo")]
    assert notes[("detector", "demo")].startswith("demo detector: trained on synthetic corruptions of the sample photos")


def test_generate_defaults_to_the_size_the_demo_model_was_trained_at(tmp_path):
    from studio.web.tabs.generate import _default_size

    assert _default_size(Services(data_dir=tmp_path, store=Store(tmp_path))) == (128, 128)
    assert _default_size(Services(data_dir=tmp_path, store=Store(tmp_path), model_spec="/a/pipeline")) == (512, 512)
