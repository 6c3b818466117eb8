"""Least exposure of a running server: only content files are downloadable, and with --auth an
unauthenticated client gets the login page and nothing else (not the config, not the API schema).
Plus the UI export folder rule (<data-dir>/exports unless --export-root)."""
from __future__ import annotations

import http.cookiejar
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from studio.web.exposure import PRIVATE_NAMES, private_paths, served_folders

pytestmark = pytest.mark.slow  # real processes end to end
ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status(opener, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with opener.open(url, data=data, timeout=300) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("served")
    port = free_port()
    log = (data.parent / f"{data.name}.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(data), "--port", str(port),
                             "--auth", "ann:secret-pass"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + Path(log.name).read_text())
        try:
            urllib.request.urlopen(url + "/favicon.ico", timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("server did not start:\n" + Path(log.name).read_text())
            time.sleep(0.5)
    yield url, data, Path(log.name)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_an_unauthenticated_client_gets_only_the_login_page(auth_server):
    url, data, log = auth_server
    anon = urllib.request.build_opener()
    code, page = status(anon, url + "/")
    assert code == 200 and b'"auth_required": true' in page.replace(b'"auth_required":true', b'"auth_required": true')
    assert b"parameters" not in page and b"Current session" not in page  # no endpoint, no component
    assert b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}}' in page
    db = data / "studio.db"
    for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json", f"/gradio_api/file={db}",
                 "/gradio_api/queue/data?session_hash=x", "/gradio_api/upload_progress", "/monitoring/x",
                 "/gradio_api/run-history/records", "/gradio_api/token", "/gradio_api/user",
                 "/gradio_api/heartbeat/abc", "/docs"):
        code, _ = status(anon, url + path)
        assert code == 401, (path, code)
    code, _ = status(anon, url + "/gradio_api/upload", data=b"x")
    assert code == 401
    assert "Data check (" in log.read_text()  # start-up ran the cheap part of doctor and said so


def test_a_logged_in_client_can_fetch_content_but_never_the_database(auth_server):
    url, data, _ = auth_server
    jar = http.cookiejar.CookieJar()
    user = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    code, _ = status(user, url + "/login", data=urllib.parse.urlencode({"username": "ann",
                                                                         "password": "secret-pass"}).encode())
    assert code == 200
    code, page = status(user, url + "/")
    assert code == 200 and b'{"named_endpoints": {}, "unnamed_endpoints": {}}' not in page
    assert b"parameters" in page  # the API description is there for a logged-in client
    code, _ = status(user, url + "/config")
    assert code == 200
    content = next((data / "files").rglob("*.png"))  # a sample image
    code, body = status(user, url + f"/gradio_api/file={content}")
    assert code == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    for private in ("studio.db", "studio.db-wal", "models/demo-sd/model_index.json", ".samples-created"):
        code, _ = status(user, url + f"/gradio_api/file={data / private}")
        assert code in (403, 404), (private, code)


def test_served_and_private_paths(tmp_path):
    folders = served_folders(tmp_path, ROOT / "assets")
    assert folders == [str(tmp_path / "files"), str(ROOT / "assets")]
    assert str(tmp_path) not in folders
    assert {Path(p).name for p in private_paths(tmp_path)} == set(PRIVATE_NAMES)


def test_ui_exports_stay_inside_the_export_root(tmp_path):
    from studio.services import Services
    from studio.store.records import NewImage
    from studio.web.tabs.sessions import export_labels

    services = Services.open(tmp_path / "data")
    try:
        sid = services.store.create_session("s").id
        image = services.store.add_images(sid, [NewImage(rgb=np.zeros((8, 8, 3), np.uint8), source="uploaded")])[0]
        services.store.mark_reviewed(image.id)  # labelled: "no artifacts here"
        message = export_labels(services, sid, "png", "mine")
        assert (tmp_path / "data" / "exports" / "mine" / "regions.csv").is_file(), message
        for outside in (str(tmp_path / "elsewhere"), "../escape", "/etc/x"):
            with pytest.raises(Exception) as info:
                export_labels(services, sid, "png", outside)
            assert "inside" in str(info.value) and "--export-root" in str(info.value)
        assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "data" / "escape").exists()
        services.export_root = tmp_path / "elsewhere"
        export_labels(services, sid, "png", str(tmp_path / "elsewhere" / "ok"))
        assert (tmp_path / "elsewhere" / "ok" / "regions.csv").is_file()
    finally:
        services.close()
