"""Fixtures that start the real studio in a subprocess and drive it with Debian's Chromium."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("ARTIFACT_STUDIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run",
                 # a starved machine: no watchdog kills a slow GPU/renderer process, no timer is throttled
                 "--disable-gpu-watchdog", "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 "--disable-backgrounding-occluded-windows"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A running `python app.py` on a free port with a fresh data dir; yields (url, data_dir)."""
    data_dir = tmp_path_factory.mktemp("studio-data")
    port = free_port()
    log = (data_dir / "server.log").open("w")
    # a short heartbeat: a closed page is noticed in seconds (its tasks stop after the grace period)
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "GRADIO_HEARTBEAT_INTERVAL": "2"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600  # a safety net: a busy one-core machine starts slowly
    while True:
        if proc.poll() is not None:
            raise RuntimeError("studio exited early:\n" + (data_dir / "server.log").read_text())
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("studio did not start in 600 s:\n" + (data_dir / "server.log").read_text())
            time.sleep(0.5)
    yield url, data_dir
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium); .ci/run installs it."
        if os.environ.get("ARTIFACT_STUDIO_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=int(os.environ.get("E2E_EXPECT_MS", "300000")))  # for tests without `page` too

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=int(os.environ.get("E2E_EXPECT_MS", "300000")))  # CI machines are slow and busy: wait for the UI, never assert speed
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(300_000)  # a safety net: every wait is for an element or a text
    yield page
    context.close()
