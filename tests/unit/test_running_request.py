"""Which run of a task is on this thread: what ``delay()`` asks to tell a retry and a
handover from a new call. It is read past Celery's ``request_stack.top`` (which
raises and catches two exceptions when the stack is empty), so these pin it down
on every thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery import Celery
from celery.utils import threads

from celery_unique import UniqueTask
from celery_unique.task import _nothing_pushed, _running_request


def _job() -> Any:
    app = Celery("running", set_as_current=False)

    @app.task(base=UniqueTask, name="running.job", shared=False)
    def job(n: int) -> None:
        pass

    return job


def test_a_run_is_seen_on_its_own_thread_only() -> None:
    job = _job()
    inside: dict[str, Any] = {}
    pushed, done = threading.Event(), threading.Event()

    def run() -> None:  # as a worker's trace does around a run
        job.push_request(id="the-run", task="running.job", called_directly=False)
        try:
            inside["request"] = _running_request(job)
            pushed.set()
            assert done.wait(5)
            inside["after wait"] = _running_request(job)
        finally:
            job.pop_request()
        inside["after pop"] = _running_request(job)

    assert _running_request(job) is None  # nothing ever pushed on this thread
    runner = threading.Thread(target=run)
    runner.start()
    assert pushed.wait(5)
    seen_elsewhere = _running_request(job)  # while the run is on the other thread
    done.set()
    runner.join(5)
    assert seen_elsewhere is None
    assert inside["request"] is not None and inside["request"].id == "the-run"
    assert inside["after wait"] is inside["request"]
    assert inside["after pop"] is None  # pushed and popped: empty again
    job.push_request(id="direct", called_directly=True)
    try:
        assert _running_request(job) is None  # a direct call is no run
    finally:
        job.pop_request()


def test_another_kind_of_stack_is_asked_as_celery_asks_it() -> None:
    class Stack:  # no thread storage to read: its own top answers
        top: Any = None

    class Task:
        request_stack = Stack()

    assert _running_request(Task()) is None
    run = type("Request", (), {"called_directly": False})()
    Stack.top = run
    assert _running_request(Task()) is run


def test_the_stack_is_read_for_the_current_greenlet_not_the_thread() -> None:
    """Under gevent or eventlet Celery keys the stack by greenlet: a run on one
    greenlet is not another's, though both share the thread."""
    job = _job()
    stack = job.request_stack
    current = ["g1"]
    stack.__ident_func__ = lambda: current[0]  # as celery.utils.threads does for greenlets
    job.push_request(id="on-g1", called_directly=False)
    try:
        assert _running_request(job).id == "on-g1"
        current[0] = "g2"
        assert _running_request(job) is None
        current[0] = "g1"
        assert _running_request(job).id == "on-g1"
    finally:
        job.pop_request()


@pytest.mark.skipif(threads.USE_FAST_LOCALS, reason="Celery's thread-local stack has no storage to read")
def test_an_empty_stack_is_seen_without_asking_its_top(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the shortcut: a producer's thread, where nothing was pushed,
    never reaches ``top`` (a Celery that renamed its storage would fail here)."""
    job = _job()
    stack = job.request_stack
    assert _nothing_pushed(stack) is True

    def no_top(self: Any) -> Any:
        raise AssertionError("top was asked")

    monkeypatch.setattr(type(stack), "top", property(no_top))
    assert _running_request(job) is None
