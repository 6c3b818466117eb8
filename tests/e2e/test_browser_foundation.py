"""End to end in a real browser: generate, reload, upload (issue: foundation)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

pytestmark = pytest.mark.e2e


def gallery_images(page, elem_id: str):
    return page.locator(f"#{elem_id} img")


def wait_for_count(page, elem_id: str, n: int, timeout_ms: int = 600_000) -> None:
    page.wait_for_function(
        "([id, n]) => document.querySelectorAll(`#${id} img`).length >= n", arg=[elem_id, n], timeout=timeout_ms)


def test_generate_reload_upload(studio, page, tmp_path):
    url, data_dir = studio
    page.goto(url)
    page.get_by_text("Demo model in use").wait_for()
    # The current session defaults to the bundled Samples session.
    expect(page.locator("#current-session input")).to_have_value("Samples")

    page.locator("#generate-prompt textarea").fill("a melted clock on a beach")
    page.locator("#generate-run").click()
    wait_for_count(page, "generate-gallery", 1)
    page.get_by_text("Saved 1 image(s)").wait_for()
    assert gallery_images(page, "generate-gallery").count() == 1
    files = list((data_dir / "files").rglob("*.png"))
    assert len(files) == 6  # 5 sample photos + the generated image

    page.reload()
    page.get_by_text("Demo model in use").wait_for()
    wait_for_count(page, "generate-gallery", 1)
    expect(page.locator("#current-session input")).to_have_value("Samples")
    assert gallery_images(page, "generate-gallery").count() == 1

    page.get_by_role("tab", name="Sessions").click()
    wait_for_count(page, "sessions-gallery", 6)
    upload = tmp_path / "upload-me.png"
    Image.fromarray(np.full((40, 60, 3), (10, 200, 30), dtype=np.uint8)).save(upload)
    page.locator("#sessions-upload input[type=file]").set_input_files(str(upload))
    page.get_by_text("Imported 1 image(s)").wait_for()
    wait_for_count(page, "sessions-gallery", 7)
    assert gallery_images(page, "sessions-gallery").count() == 7


def test_bad_upload_shows_one_sentence_and_changes_nothing(studio, page, tmp_path):
    url, data_dir = studio
    bad = tmp_path / "not-really.png"
    bad.write_text("this is text, not a PNG")
    before = sorted(p.name for p in (data_dir / "files").rglob("*.png"))
    page.goto(url)
    page.get_by_text("Demo model in use").wait_for()
    expect(page.locator("#current-session input")).not_to_have_value("")
    page.get_by_role("tab", name="Sessions").click()
    page.locator("#sessions-upload input[type=file]").set_input_files(str(bad))
    toast = page.get_by_text("not-really.png: not a readable image")
    toast.first.wait_for()
    assert "Nothing was imported" in page.locator(".toast-body").first.inner_text()
    assert sorted(p.name for p in (data_dir / "files").rglob("*.png")) == before
