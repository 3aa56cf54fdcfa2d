"""Pool children seen from the worker's main process (real processes)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from celery_unique import children


def test_a_running_process_has_not_stopped_and_a_zombie_has() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not children.stopped(child.pid)
        assert child.stdin is not None
        child.stdin.close()  # it exits; not waited for, it stays a zombie
        deadline = time.monotonic() + 10
        while not children.stopped(child.pid):
            assert time.monotonic() < deadline, "a zombie counted as running"
            time.sleep(0.01)
        assert child.poll() == 0  # it had exited: reaped only now
        assert children.stopped(child.pid)
    finally:
        child.kill()
        child.wait()


def test_after_exit_calls_back_only_once_the_child_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    called = threading.Event()
    looked = threading.Semaphore(0)
    seen = children.stopped

    def stopped(pid: int) -> bool:
        found = seen(pid)
        looked.release()
        return found

    monkeypatch.setattr(children, "stopped", stopped)
    try:
        children.after_exit(child.pid, called.set, "a test lock")
        for _ in range(3):  # it looked three times, and found the child running each time
            assert looked.acquire(timeout=10)
        assert not called.is_set()
        assert child.stdin is not None
        child.stdin.close()
        assert called.wait(10)
    finally:
        child.kill()
        child.wait()


def test_after_exit_without_a_pid_calls_back_at_once() -> None:
    called: list[bool] = []
    children.after_exit(None, lambda: called.append(True), "a test lock")
    assert called == [True]


def test_without_proc_a_zombie_counts_as_running_till_it_is_reaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "_PROC", False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while not child_exited(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not children.stopped(child.pid)  # a zombie: os.kill still finds it
        child.wait()
        assert children.stopped(child.pid)
    finally:
        child.kill()
        child.wait()


def child_exited(pid: int) -> bool:
    """Whether the child exited, without reaping it (Linux: its state in /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
