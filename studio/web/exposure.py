"""What the web server shows to whom: least exposure of the data directory and of the app itself.

- `served_folders(data_dir)`: the only folders the browser may download files from (the content
  files and the shipped assets); `private_paths(data_dir)`: everything else in the data directory
  (studio.db and its WAL, jobs and their logs, caches, models, exports), blocked even if a folder
  above it were allowed.
- `LoginOnly`: ASGI middleware for a server started with credentials. A client without a valid
  login cookie gets the login page and the static files it needs, nothing else: no config, no API
  schema (it is scrubbed from the page), no files, no queue, no uploads (401 for everything else).
- `check_port_free(host, port)`: refuse a busy port before anything is written.
"""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

PRIVATE_NAMES = ("studio.db", "studio.db-wal", "studio.db-shm", "studio.db-journal", "jobs", "cache", "models",
                 "exports", "logs", ".samples-created")
"""Entries of the data directory that are never served, whatever else is allowed."""

_PUBLIC_EXACT = frozenset({"/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt",
                           "/manifest.json", "/gradio_api/login_check", "/gradio_api/login_check/",
                           "/gradio_api/theme.css", "/gradio_api/app_id", "/gradio_api/app_id/",
                           "/gradio_api/startup-events"})  # gradio calls this itself at launch
_PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
_API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*.*?;\s*</script>", re.S)
_EMPTY_API_INFO = b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


def served_folders(data_dir: Path, assets_dir: Path) -> list[str]:
    """allowed_paths for gradio: the content-addressed files and the app's own assets, no more."""
    return [str(Path(data_dir) / "files"), str(assets_dir)]


def private_paths(data_dir: Path) -> list[str]:
    """blocked_paths for gradio: the database, logs, caches, models and exports of the data directory."""
    return [str(Path(data_dir) / name) for name in PRIVATE_NAMES]


def check_port_free(host: str, port: int) -> None:
    """ValueError with one sentence if nothing can listen on (host, port) now (busy, or a bad host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"Cannot listen on host '{host}': {exc.strerror or exc}; use an address of this machine "
                         "such as 127.0.0.1.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                raise ValueError(f"Port {port} on {host} is already in use (another Artifact Studio or program); "
                                 "stop it or choose another with --port.") from None
            if exc.errno in (13, 10013):
                raise ValueError(f"Not allowed to listen on port {port} (ports below 1024 need administrator "
                                 "rights); choose another with --port.") from None
            raise ValueError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None


class LoginOnly:
    """ASGI middleware: with auth configured, unauthenticated clients reach only the login page.

    Pass it as `launch(app_kwargs={"middleware": [Middleware(LoginOnly)]})`; it reads the gradio app
    from the ASGI scope (its `auth`, `tokens` and `cookie_id`), so it needs no reference to it.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")
        if getattr(gradio_app, "auth", None) is None or _logged_in(scope, gradio_app):
            return await self.app(scope, receive, send)
        path = scope.get("path", "/")
        root = scope.get("root_path", "") or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if scope["type"] == "http" and path in ("/", "") and scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, _Scrubbing(send))
        if scope["type"] == "http" and (path in _PUBLIC_EXACT or path.startswith(_PUBLIC_PREFIXES)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "Not authenticated"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _logged_in(scope, gradio_app) -> bool:
    cookies = {}
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, sep, val = part.strip().partition("=")
                if sep:
                    cookies[key] = val
    cookie_id = getattr(gradio_app, "cookie_id", "")
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and getattr(gradio_app, "tokens", {}).get(token) is not None


class _Scrubbing:
    """Wraps `send` for the page at /: replaces the embedded API description with an empty one."""

    def __init__(self, send):
        self.send = send
        self.start = None
        self.body = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return
        body = _API_INFO.sub(_EMPTY_API_INFO, self.body)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
