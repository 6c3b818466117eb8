"""studio.tasks: the server-owned task registry (order, stop, commit, pages closing) and measured timings."""
from __future__ import annotations

import threading
import time

import pytest

from engines.progress import Cancelled
from studio.tasks import Task, TaskRegistry, Timings, duration_text


def wait_until(predicate, timeout: float = 300.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def stepping(n: int, gate: threading.Event | None = None, saved: list | None = None):
    """A task body: n steps that honour the stop flag, then a save inside `committing`."""

    def work(task: Task):
        for i in range(n):
            if gate is not None:
                gate.wait(300)
            if task.should_stop():
                raise Cancelled("stopped")
            task.progress(i + 1, n, "Working")
            time.sleep(0.01)
        with task.committing():
            if saved is not None:
                saved.append(task.id)
        return f"result {task.id}"

    return work


def test_tasks_run_in_order_and_report_results():
    registry = TaskRegistry()
    order = []
    tasks = [registry.submit("generate", "b1", lambda t, i=i: order.append(i) or i, label=f"#{i}") for i in range(4)]
    for task in tasks:
        registry.wait(task.id, 300)
    assert order == [0, 1, 2, 3]
    assert [t.status for t in tasks] == ["done"] * 4 and [t.result for t in tasks] == [0, 1, 2, 3]
    assert registry.tasks("b1")[0] is tasks[-1]  # newest first


def test_a_value_error_is_one_sentence_and_a_crash_is_reported():
    registry = TaskRegistry()

    def bad(task):
        raise ValueError("Steps: 1 is below\n the minimum 2.")

    def crash(task):
        raise RuntimeError("boom")

    a, b = registry.submit("x", "o", bad), registry.submit("x", "o", crash)
    registry.wait(b.id, 10)
    assert (a.status, a.error) == ("failed", "Steps: 1 is below the minimum 2.")
    assert b.status == "failed" and b.error.startswith("RuntimeError: boom")


def test_stop_a_running_task_saves_nothing():
    registry, gate, saved = TaskRegistry(), threading.Event(), []
    task = registry.submit("generate", "b1", stepping(50, gate, saved))
    assert wait_until(lambda: task.status == "running")
    assert registry.cancel(task.id) == "Stopping after the current step; nothing will be saved."
    gate.set()
    registry.wait(task.id, 300)
    assert task.status == "cancelled" and saved == [] and task.result is None


def test_stop_a_queued_task_removes_it():
    registry, gate = TaskRegistry(), threading.Event()
    first = registry.submit("generate", "b1", stepping(3, gate))
    second = registry.submit("generate", "b1", stepping(3))
    assert wait_until(lambda: first.status == "running")
    assert registry.position(second) == 1
    assert "before it started" in registry.cancel(second.id)
    gate.set()
    registry.wait(first.id, 10)
    assert (first.status, second.status, second.started) == ("done", "cancelled", None)


def test_a_stop_during_the_save_is_too_late_and_says_so():
    registry, saving, release = TaskRegistry(), threading.Event(), threading.Event()

    def work(task):
        with task.committing():
            saving.set()
            release.wait(300)
        return "saved"

    task = registry.submit("generate", "b1", work)
    assert saving.wait(300)
    answer = []
    stopper = threading.Thread(target=lambda: answer.append(registry.cancel(task.id)))
    stopper.start()
    time.sleep(0.05)
    assert not answer  # the stop waits for the save to finish ...
    release.set()
    stopper.join(300)
    registry.wait(task.id, 300)
    assert answer == ["Too late to stop: the results were already being saved."]  # ... and tells the truth
    assert (task.status, task.result) == ("done", "saved")


def test_a_stop_after_the_last_step_but_before_the_save_discards_the_result():
    registry, at_end, release = TaskRegistry(), threading.Event(), threading.Event()
    saved = []

    def work(task):
        at_end.set()
        release.wait(300)
        with task.committing():
            saved.append(1)

    task = registry.submit("generate", "b1", work)
    assert at_end.wait(300)
    registry.cancel(task.id)
    release.set()
    registry.wait(task.id, 300)
    assert task.status == "cancelled" and saved == []


def test_a_closed_page_stops_its_task_after_the_grace_period():
    registry, gate = TaskRegistry(grace_s=0.2), threading.Event()
    task = registry.submit("generate", "b1", stepping(100, gate), page="page-1")
    assert wait_until(lambda: task.status == "running")
    registry.page_closed("page-1")
    assert wait_until(lambda: task.stop_reason is not None)
    gate.set()
    registry.wait(task.id, 300)
    assert task.status == "cancelled" and task.stop_reason == "its page was closed"


def test_a_reload_within_the_grace_period_keeps_it_running():
    registry, gate = TaskRegistry(grace_s=0.3), threading.Event()
    task = registry.submit("generate", "b1", stepping(3, gate), page="page-1")
    assert wait_until(lambda: task.status == "running")
    registry.page_closed("page-1")
    assert registry.attach_owner("b1", "page-2") == [task]  # the reloaded page of the same browser
    time.sleep(0.6)
    assert task.live and not task.should_stop()
    assert registry.current("b1", ("generate",), "page-2") is task
    assert registry.current("someone-else", ("generate",), "page-9") is None
    gate.set()
    registry.wait(task.id, 300)
    assert task.status == "done"
    assert registry.current("b1", ("generate",), "page-2") is task  # the result is still to be shown there
    registry.mark_seen(task, "page-2")
    assert registry.current("b1", ("generate",), "page-2") is None


def test_keep_running_survives_every_page_closing():
    registry, gate = TaskRegistry(grace_s=0.1), threading.Event()
    task = registry.submit("generate", "b1", stepping(3, gate), page="page-1", keep_running=True)
    assert wait_until(lambda: task.status == "running")
    registry.page_closed("page-1")
    time.sleep(0.4)
    assert not task.should_stop()
    gate.set()
    registry.wait(task.id, 300)
    assert task.status == "done"


def test_remaining_time_from_the_steps_done():
    registry, gate = TaskRegistry(), threading.Event()
    task = registry.submit("generate", "b1", stepping(10, gate))
    assert wait_until(lambda: task.status == "running")
    assert task.remaining is None
    gate.set()
    assert wait_until(lambda: task.step >= 2)
    if task.live:
        assert task.remaining is not None and task.remaining >= 0
    registry.wait(task.id, 300)


def test_timings_persist_and_estimate_from_the_median(tmp_path):
    path = tmp_path / "timings.json"
    timings = Timings(path)
    assert timings.estimate("generate", "demo", 10) is None
    for seconds in (1.0, 2.0, 100.0):  # one outlier
        timings.record("generate", "demo", seconds, 1.0)
    assert timings.estimate("generate", "demo", 10) == pytest.approx(20.0)
    assert Timings(path).rate("generate", "demo") == pytest.approx(2.0)
    assert Timings(path).rate("generate", "other-model") is None
    path.write_text("not json")
    assert Timings(path).rate("generate", "demo") is None


@pytest.mark.parametrize("seconds,text", [(5, "5 s"), (89, "89 s"), (600, "10 min"), (5400, "1 h 30 min")])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text
