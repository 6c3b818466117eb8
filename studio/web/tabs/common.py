"""Small pieces every tab uses: shared components, per-browser objects, error translation, and the
mechanics of server-owned tasks (submit, poll, stop) and of remembering a browser's place."""
from __future__ import annotations

import functools
import inspect
import re
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from studio.services import wait_for_libraries

GPU = "gpu"
"""concurrency_id shared by every event that runs a model, so two tabs never fight over the device."""
STATE_SECRET = "artifact-studio-browser-state"
"""Key for gr.BrowserState values (a place in the UI, not a secret): fixed so they survive restarts."""
POLL_S = 1.0
"""How often a page with a running task asks for its progress."""


@dataclass(frozen=True)
class Shared:
    """Components that live outside any one tab and the per-browser registry."""

    session: gr.Dropdown  # value: current session id (int)
    browser_session: gr.BrowserState  # the same id, kept in the browser's localStorage across reloads
    per_browser: "PerBrowser"
    client: gr.BrowserState | None = None  # this browser's id (localStorage): the owner of its tasks
    demo: gr.Blocks | None = None  # for tabs that re-attach on page load (demo.load)
    deferred: list = field(default_factory=list)  # components ui.py renders outside the tabs (browser_state)


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


def user_message(exc: BaseException) -> str:
    """One clean sentence from a ValueError / gr.Error (whitespace folded, Python object reprs dropped)."""
    text = getattr(exc, "message", None) if isinstance(exc, gr.Error) else None
    text = " ".join(str(text if text is not None else exc).split())
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", text)


def keep_on_error(fn: Callable, n_outputs: int, status_index: int | None = None) -> Callable:
    """`fn`, but a failure leaves every output as it was (gr.skip()) and shows one sentence as a warning toast
    and, when `status_index` is given, in that output (the tab's status line). A user mistake (ValueError,
    gr.Error) is shown as it is; any other exception is named and its traceback printed to the log.
    Raising gr.Error instead would badge every output of the event (Gradio 6.31)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wait_for_libraries()  # never import torch/diffusers beside the start-up warm-up thread
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - nothing may replace the screen's content
            if isinstance(exc, (ValueError, gr.Error)):
                message = user_message(exc)
            else:  # a bug, not a user mistake: say so in one sentence, the traceback goes to the server log
                traceback.print_exc()
                message = (f"Unexpected error ({type(exc).__name__}: {user_message(exc)[:200]}); nothing was changed "
                           "here, and the details are in the studio's log.")
            gr.Warning(message)
            outputs = [gr.skip()] * n_outputs
            if status_index is not None:
                outputs[status_index] = warning_text(message)
            if n_outputs == 1:
                return outputs[0]
            return tuple(outputs) if n_outputs else None

    return wrapper


def warning_text(message: str) -> str:
    return f"⚠️ {message}"


def wire(trigger: Callable, fn: Callable, inputs=None, outputs=None, *, status=None, **kwargs):
    """`trigger(fn, inputs, outputs, ...)` with errors that never replace content (see keep_on_error).

    UI events are private (not part of the API, which studio/web/api.py defines) unless an api_name is
    given. `status`: the output that shows the one-sentence message.
    """
    outs = list(outputs) if isinstance(outputs, (list, tuple)) else ([] if outputs is None else [outputs])
    index = next((i for i, o in enumerate(outs) if o is status), None) if status is not None else None
    if "api_name" not in kwargs:
        kwargs.setdefault("api_visibility", "private")
    return trigger(keep_on_error(fn, len(outs), index), inputs=inputs, outputs=outputs, **kwargs)


def number(value: Any, field: str, *, minimum: float | None = None, maximum: float | None = None,
           whole: bool = False) -> float | int:
    """A form value as a number, or a ValueError naming the field: "Steps: 1 is below the minimum 2."."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{field}: empty; give a number.")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: {value!r} is not a number.") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{field}: {value} is not a finite number.")
    if whole and x != int(x):
        raise ValueError(f"{field}: {value} is not a whole number.")
    shown = int(x) if x == int(x) else x
    if minimum is not None and x < minimum:
        raise ValueError(f"{field}: {shown} is below the minimum {_fmt(minimum)}.")
    if maximum is not None and x > maximum:
        raise ValueError(f"{field}: {shown} is above the maximum {_fmt(maximum)}.")
    return int(x) if whole else x


def _fmt(x: float) -> str:
    return str(int(x)) if float(x) == int(x) else str(x)


# ---------------------------------------------------------------------------------------------- tasks

def owner_of(client_id: Any, request: gr.Request | None) -> str:
    """The owner of this page's tasks: the browser's id from localStorage, else the page itself."""
    if isinstance(client_id, str) and client_id.strip():
        return client_id.strip()
    return page_of(request) or "anonymous"


def page_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def task_text(task, registry) -> str:
    """One line about a task for a status area: queued / progress with time left / how it ended."""
    from studio.tasks import duration_text

    if task.status == "queued":
        position = registry.position(task)
        return f"⏳ **Queued** ({task.label}){f' · position {position} in line' if position > 1 else ''}."
    if task.status == "running":
        what = task.desc or task.kind.capitalize()
        if task.total:
            pct = 100 * task.step / task.total
            filled = int(round(pct / 5))
            bar = "█" * filled + "░" * (20 - filled)
            left = task.remaining
            eta = f" · about {duration_text(left)} left" if left is not None else ""
            return (f"**{what}** `{bar}` {task.step} of {task.total} ({pct:.0f}%) · {duration_text(task.elapsed)} "
                    f"elapsed{eta} · {task.label}")
        return f"**{what}** · {duration_text(task.elapsed)} elapsed · {task.label}"
    if task.status == "cancelled":
        why = f" ({task.stop_reason})" if task.stop_reason and task.stop_reason != "stopped" else ""
        return f"Stopped{why}; nothing was saved."
    if task.status == "failed":
        return warning_text(task.error or "The task failed.")
    return ""


def confirm_box(prefix: str) -> tuple[gr.Group, gr.Markdown, gr.Button, gr.Button]:
    """A hidden "this will take long: run anyway?" box: (group, text, run-anyway button, cancel button)."""
    with gr.Group(visible=False, elem_id=f"{prefix}-confirm") as group:
        text = gr.Markdown(elem_id=f"{prefix}-confirm-text")
        with gr.Row():
            yes = gr.Button("Run anyway", variant="primary", elem_id=f"{prefix}-confirm-run")
            no = gr.Button("Cancel", elem_id=f"{prefix}-confirm-cancel")
    return group, text, yes, no


def ask_first(shared: Shared, request, kind: str, key: str, seconds: float | None, confirmed: bool,
              unmeasured_is_long: bool = False) -> bool:
    """True when the page must ask before this run: it is estimated to be long (or it is large and nothing
    was measured yet) and this exact run was not confirmed before (ask once)."""
    from studio.tasks import LONG_RUN_S

    remembered = shared.per_browser.get(request, f"{kind}-confirmed", dict)
    if confirmed:
        remembered["key"] = key
        return False
    long_run = seconds > LONG_RUN_S if seconds is not None else unmeasured_is_long
    return long_run and remembered.get("key") != key


def keep_running_box(elem_id: str) -> gr.Checkbox:
    return gr.Checkbox(value=False, label="Keep running if I close the page", elem_id=elem_id,
                       info="Unticked: closing every page of this browser stops the run (a reload does not).")


# ---------------------------------------------------------------------------------------------- places

def browser_state(shared: Shared, default: Any, key: str) -> gr.BrowserState:
    """A value kept in this browser's localStorage under `artifact-studio-KEY`.

    It is rendered outside the tabs (by ui.py, from `shared.deferred`): a component inside a tab that is not
    shown is not mounted, so it would not have read localStorage yet when the page's load events run."""
    state = gr.BrowserState(default, storage_key=f"artifact-studio-{key}", secret=STATE_SECRET, render=False)
    shared.deferred.append(state)
    return state


def remember_open(shared: Shared, key: str, accordions: dict[str, gr.Accordion]) -> None:
    """Accordions that come back open (or closed) after a reload, per browser (localStorage)."""
    if shared.demo is None:
        return
    state = browser_state(shared, {}, f"open-{key}")
    for name, accordion in accordions.items():
        accordion.expand(bind(set_open, name, True), inputs=[state], outputs=[state], queue=False,
                         api_visibility="private", show_progress="hidden")
        accordion.collapse(bind(set_open, name, False), inputs=[state], outputs=[state], queue=False,
                           api_visibility="private", show_progress="hidden")
    shared.demo.load(bind(restore_open, list(accordions)), inputs=[state], outputs=list(accordions.values()),
                     api_visibility="private", show_progress="hidden")


def set_open(name: str, is_open: bool, remembered) -> dict:
    return {**(remembered if isinstance(remembered, dict) else {}), name: bool(is_open)}


def restore_open(names: list[str], remembered):
    remembered = remembered if isinstance(remembered, dict) else {}
    updates = [gr.Accordion(open=remembered[n]) if isinstance(remembered.get(n), bool) else gr.skip() for n in names]
    return updates[0] if len(updates) == 1 else tuple(updates)


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
