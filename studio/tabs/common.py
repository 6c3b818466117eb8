"""Small pieces every tab uses: shared components, per-browser objects, error translation."""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

GPU = "gpu"
"""concurrency_id shared by every event that runs a model, so two tabs never fight over the device."""


@dataclass(frozen=True)
class Shared:
    """Components that live outside any one tab and the per-browser registry."""

    session: gr.Dropdown  # value: current session id (int)
    browser_session: gr.BrowserState  # the same id, kept in the browser's localStorage across reloads
    per_browser: "PerBrowser"


class PerBrowser:
    """Heavy or live per-browser objects keyed by `request.session_hash`; freed on page unload."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}

    def get(self, request: gr.Request | None, key: str, factory: Callable[[], Any]) -> Any:
        sid = getattr(request, "session_hash", None) or "anonymous"
        with self._lock:
            slot = self._items.setdefault(sid, {})
            if key not in slot:
                slot[key] = factory()
            return slot[key]

    def free(self, request: gr.Request | None) -> None:
        sid = getattr(request, "session_hash", None) or "anonymous"
        with self._lock:
            slot = self._items.pop(sid, {})
        for item in slot.values():  # e.g. a SAM masker's background worker
            for value in (item, getattr(item, "masker", None)):
                close = getattr(value, "close", None)
                if callable(close):
                    close()

    def __len__(self) -> int:
        return len(self._items)


def bind(fn: Callable, *bound: Any) -> Callable:
    """`fn` with its first arguments fixed, keeping the annotations Gradio reads to inject
    gr.Request / gr.Progress (functools.partial hides them from Gradio)."""

    @functools.wraps(fn)
    def bound_fn(*args, **kwargs):
        return fn(*bound, *args, **kwargs)

    sig = inspect.signature(fn)
    bound_fn.__signature__ = sig.replace(parameters=list(sig.parameters.values())[len(bound):])
    return bound_fn


def user_errors(fn: Callable) -> Callable:
    """Turn a ValueError (every user mistake in engines/ and the store) into one gr.Error sentence."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise gr.Error(" ".join(str(exc).split()), print_exception=False) from None

    return wrapper


def require_session(session_id: Any) -> int:
    """The current session id as int, or a clear error when none is selected."""
    if session_id in (None, "", []):
        raise ValueError("No session is selected; choose or create one in the Sessions tab.")
    return int(session_id)


def session_choices(services) -> list[tuple[str, int]]:
    return [(s.name, s.id) for s in services.store.list_sessions()]


def gallery_items(records) -> list[tuple[str, str]]:
    """Gallery value for image records: (file path, short caption)."""
    items = []
    for rec in records:
        seed = rec.params.get("seed")
        caption = f"#{rec.id} {rec.source}" + (f" · seed {seed}" if seed is not None else "")
        if rec.original_name:
            caption += f" · {rec.original_name}"
        items.append((rec.path, caption))
    return items
