"""The chaos suite: real worker subprocesses, private redis-servers, faults injected.

Two private redis-servers for the session: the broker (never stopped; the
tasks' events are recorded there) and the lock Redis. A scenario that stops a
server or a worker starts its own. Each scenario reports its figures (load
held, faults injected, overlapping runs per key, tasks lost) and the suite prints
them at the end.

``CHAOS_SCALE`` (default 1) multiplies the load and the number of faults; the
``chaos-soak`` tox env runs the suite with a larger one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from celery_unique.conf import get_conf
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app, producers
from tests.integration.conftest import ROOT, Events, Worker, lock_holder, read_events, wait_for

SCALE = max(int(os.environ.get("CHAOS_SCALE", "1")), 1)


@dataclass(frozen=True)
class Figures:
    scenario: str
    load: str
    faults: str
    injected: int
    overlapping: int  # runs of one key that overlapped in time (see overlapping())
    lost: int  # messages believed published that never ran
    completed_twice: int = 0  # runs of one task id that ran to their end again
    note: str = ""


_reported: list[Figures] = []

Report = Callable[..., None]


@pytest.fixture
def report() -> Report:
    """Record a scenario's figures for the summary (call it before asserting on them)."""

    def add(scenario: str, load: str, faults: str, **figures: Any) -> None:
        _reported.append(Figures(scenario, load, faults, **figures))

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _reported:
        return
    terminalreporter.section(f"celery-unique chaos summary (CHAOS_SCALE={SCALE})")
    for f in sorted(_reported, key=lambda f: f.scenario):
        terminalreporter.write_line(f"{f.scenario}")
        terminalreporter.write_line(f"    load held         {f.load}")
        terminalreporter.write_line(f"    faults injected   {f.faults}")
        terminalreporter.write_line(f"    overlapping runs  {f.overlapping} (two runs of one key at once)")
        terminalreporter.write_line(f"    completed twice   {f.completed_twice} (an id ran to its end again)")
        terminalreporter.write_line(f"    tasks lost        {f.lost}")
        if f.note:
            terminalreporter.write_line(f"    observed          {f.note}")
    terminalreporter.write_line(
        f"total: {len(_reported)} scenarios, {sum(f.injected for f in _reported)} faults injected, "
        f"{sum(f.overlapping for f in _reported)} overlapping runs per key, "
        f"{sum(f.completed_twice for f in _reported)} completed twice, "
        f"{sum(f.lost for f in _reported)} tasks lost"
    )


# -- servers, app, worker ---------------------------------------------------------


@pytest.fixture(scope="session")
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def lock_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def broker_client(broker: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def lock_client(lock_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(lock_redis.url)
    yield client
    client.close()


def chaos_env(broker_url: str, lock_url: str, **extra: str) -> dict[str, str]:
    """The environment that points a chaos worker or producer at its servers."""
    return {"CHAOS_BROKER_URL": broker_url, "CHAOS_LOCK_URL": lock_url, **extra}


def chaos_worker(broker_url: str, lock_url: str, name: str, *extra: str, **env: str) -> Worker:
    """A worker of the chaos app on those servers; ``with`` it to wait for it and stop it."""
    return Worker(
        broker_url, name, *extra, app="tests.chaos.chaos_app", env=chaos_env(broker_url, lock_url, **env)
    )


@contextlib.contextmanager
def producing(
    broker_url: str, lock_url: str, prefix: str = "celery_unique", **settings: Any
) -> Iterator[Any]:
    """Point this process's chaos app (the producer side) at the servers (and
    ``settings``), then back."""
    app = chaos_app.app
    names = ("broker_url", "unique_redis_url", "unique_key_prefix", *settings)
    before = {name: app.conf.get(name) for name in names}
    conf = get_conf(app)

    def close() -> None:
        conf.close()  # the lock client
        # The broker connections (app.close() keeps the producer pool): the
        # next use opens new ones, to the broker configured then.
        app.close()
        app.amqp._producer_pool = None

    close()
    app.conf.update(broker_url=broker_url, unique_redis_url=lock_url, unique_key_prefix=prefix, **settings)
    try:
        yield app
    finally:
        close()
        app.conf.update(before)


@pytest.fixture(scope="session")
def app(broker: RedisServer, lock_redis: RedisServer) -> Iterator[Any]:
    with producing(broker.url, lock_redis.url) as app:
        yield app


@pytest.fixture(scope="session")
def worker(app: Any, broker: RedisServer, lock_redis: RedisServer) -> Iterator[Worker]:
    """A worker (prefork, -c 2) on the default queue, shared by the scenarios that keep it alive."""
    with chaos_worker(broker.url, lock_redis.url, "chaos") as started:
        yield started


@pytest.fixture
def events(broker_client: redis.Redis, token: str) -> Events:
    """The events the workers recorded for a token (this test's unless given)."""

    def read(of: str | None = None) -> list[dict[str, Any]]:
        return read_events(broker_client, chaos_app.events_key(of or token))

    return read


def spans(
    seen: list[dict[str, Any]], unended: Callable[[dict[str, Any]], float] | None = None
) -> dict[str, list[tuple[float, float, str]]]:
    """The runs of each key (the ``item`` a task records): (start, end, task id), by start.

    A start is paired with the first end of its task id that follows it, before
    that id starts again (a redelivery). A run without an end lasts until
    ``unended(start)`` (when it was killed, say), else forever: it may still run.
    """
    found: dict[str, list[tuple[float, float, str]]] = {}
    ordered = sorted(seen, key=lambda e: e["time"])
    for n, start in enumerate(ordered):
        if start["event"] != "start":
            continue
        end = math.inf if unended is None else unended(start)
        for later in ordered[n + 1 :]:
            if later["id"] != start["id"]:
                continue
            if later["event"] == "end":
                end = later["time"]
            if later["event"] in ("end", "start"):
                break
        found.setdefault(start.get("item", ""), []).append((start["time"], end, start["id"]))
    return found


def overlapping(seen: list[dict[str, Any]], unended: Callable[[dict[str, Any]], float] | None = None) -> int:
    """Runs that started while another run of the same key was still going: what a user
    of a unique task counts as a duplicate, whatever the task ids."""
    return sum(
        1
        for runs in spans(seen, unended).values()
        for n, (begin, _, _) in enumerate(runs)
        if any(b <= begin < e for b, e, _ in runs[:n])
    )


def completed_twice(seen: list[dict[str, Any]]) -> int:
    """Ends of one task id beyond its first: a message that ran to its end again."""
    return sum(n - 1 for n in Counter(e["id"] for e in ends(seen)).values())


def starts(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in seen if e["event"] == "start"]


def ends(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in seen if e["event"] == "end"]


def discarded(seen: list[dict[str, Any]]) -> dict[str, str]:
    """Runs dropped as they started (``on_conflict="discard"``): task id -> the holder they met."""
    return {e["id"]: e["holder"] for e in seen if e["event"] == "conflict" and e["policy"] == "discard"}


def account(
    seen: list[dict[str, Any]], events: Events, lock_client: redis.Redis
) -> tuple[dict[str, Any], Counter[str]]:
    """What producers believe against what workers ran, once the backlog has run."""
    published = Counter(task_id for r in seen for _, task_id in r["published"])
    believed = {task_id for r in seen for _, task_id, _ in r["returned"]}
    unsure = {task_id for r in seen for task_id in r.get("unsure", [])}
    raised = sum((Counter(r["raised"]) for r in seen), Counter())
    # A message dropped as it started never starts: it is not waited for.
    settle(
        lambda: believed <= {e["id"] for e in starts(events())} | set(discarded(events())),
        progress=lambda: len(events()),
    )
    ran = Counter(e["id"] for e in starts(events()))

    def orphans() -> set[str]:
        """Lock holders that were never published."""
        holders = {lock_holder(lock_client, key) for key in lock_client.scan_iter("celery_unique:*:lock")}
        return {h for h in holders if h is not None} - set(published)

    settle(lambda: not orphans(), timeout=45)  # the orphan releaser's schedule
    # A message whose lock was lost (a Redis restarted empty, a failover), and taken by
    # another message of its key, is discarded as it starts (on_conflict="discard"): its
    # key's work is the other message's, which ran. Dropped in favour of a run, not lost.
    # The holder may have been discarded in turn (its lock lost again, in a later
    # fault): follow the chain to the message that ran.
    dropped_for = discarded(events())

    def done_by_a_run(task_id: str) -> bool:
        followed: set[str] = set()
        while task_id in dropped_for and task_id not in followed:
            followed.add(task_id)
            task_id = dropped_for[task_id]
        return task_id in ran

    superseded = {task_id for task_id in dropped_for if done_by_a_run(task_id)}
    figures = {
        "calls": sum(len(r["returned"]) for r in seen) + sum(raised.values()),
        "overlapping": overlapping(events()),
        "completed twice": completed_twice(events()),
        "run twice": sum(n - 1 for n in ran.values()),
        "published twice": sum(n - 1 for n in published.values()),
        "lost": len(believed - set(ran) - superseded),
        "lost ids": sorted(believed - set(ran) - superseded),
        "superseded": len(superseded),
        "handles without a message": len(believed - set(published)),
        "ran although raised": len({i for r in seen for i in r["unpublished"]} & set(ran)),
        "orphan locks": len(orphans()),
        # A call the broker failed may have landed (its reply lost): its run is the
        # broker's at-least-once, not a message published behind the producer's back.
        "ran after a broker error": len(unsure & set(ran)),
        "ran unpublished": len(set(ran) - believed - unsure),
    }
    return figures, raised


def check(
    figures: dict[str, Any], raised: Counter[str], allowed: frozenset[str] = frozenset({"LockBackendError"})
) -> None:
    """:func:`account`'s figures of a run that lost nothing and ran nothing twice; calls
    raised only ``allowed`` errors."""
    assert raised and set(raised) <= allowed
    assert figures["lost"] == 0
    assert figures["overlapping"] == 0
    assert figures["run twice"] == figures["published twice"] == 0
    assert figures["handles without a message"] == 0
    assert figures["ran although raised"] == 0
    assert figures["orphan locks"] == 0
    assert figures["ran unpublished"] == 0


class Producers:
    """Producer processes (:mod:`tests.chaos.producers`) of one token.

    They start, connect, and wait until :meth:`go`; :meth:`reports` collects
    what each one saw. Process ``i`` adds ``variants[i % len(variants)]`` to
    the options, when given.
    """

    def __init__(
        self,
        env: dict[str, str],
        token: str,
        processes: int,
        *options: str,
        variants: list[list[str]] | None = None,
    ) -> None:
        self.token = token
        # Their logs go to files: a pipe nobody reads while they run would fill and block them.
        self.logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]  # noqa: SIM115
        command = [
            sys.executable,
            "-m",
            "tests.chaos.producers",
            "--token",
            token,
            "--processes",
            str(processes),
        ]
        variants = variants or [[]]
        self.processes = [
            subprocess.Popen(
                [*command, "--index", str(index), *options, *variants[index % len(variants)]],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            for index, log in enumerate(self.logs)
        ]

    def log_text(self, index: int) -> str:
        self.logs[index].seek(0)
        return self.logs[index].read()[-3000:]

    def go(self, client: redis.Redis) -> None:
        """Wait until every process is ready, then let them all call at once."""

        def ready() -> bool:
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    pytest.fail(f"a producer exited early:\n{self.log_text(index)}")
            return int(client.get(producers.ready_key(self.token)) or 0) == len(self.processes)

        wait_for(ready, timeout=60)
        client.set(producers.go_key(self.token), 1)

    def stop(self, client: redis.Redis) -> None:
        client.set(producers.stop_key(self.token), 1)

    def reports(self, timeout: float = 120) -> list[dict[str, Any]]:
        found = []
        for index, process in enumerate(self.processes):
            out, _ = process.communicate(timeout=timeout)
            if process.returncode != 0:
                pytest.fail(f"a producer failed ({process.returncode}):\n{self.log_text(index)}")
            found.append(json.loads(out.strip().splitlines()[-1]))
        return found

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
        for log in self.logs:
            log.close()


def settle(
    predicate: Callable[[], Any], timeout: float = 60.0, progress: Callable[[], Any] | None = None
) -> bool:
    """Poll until ``predicate()`` holds; False after ``timeout`` seconds in
    which ``progress()`` (if given) did not change: a backlog that is still
    being worked off is waited for. The test then reports what it saw and fails."""
    deadline, last = time.monotonic() + timeout, progress() if progress else None
    while not predicate():
        if progress is not None and (now := progress()) != last:
            deadline, last = time.monotonic() + timeout, now
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True
