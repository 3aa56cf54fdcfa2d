"""Scenario 4: the lock Redis fails while producers enqueue.

Producer processes call ``delay()`` with a new key each time while a backlog
waits in the queue, and the lock Redis (not the broker) fails:

* 4a, a crash: killed with ``SIGKILL`` and restarted empty once producers and
  the worker have both met the outage;
* 4b, a stall: frozen with ``SIGSTOP`` past the lock client's socket timeout,
  then resumed (``SIGCONT``) either once a ``delay()`` gave up or while
  callers wait for the reply of asking again. Redis then runs the commands it
  had buffered, among them acquires whose callers gave up or asked again.

Every ``delay()`` must either have published exactly once (and that task ran
exactly once) or have raised ``LockBackendError`` (and nothing of it ran):
lost = believed published - ran = 0; and no lock is left to a task id that was
never published. A release that fails in the worker is tried a few times,
logged, and left to the lock's TTL.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import signals

from celery_unique.exceptions import LockBackendError
from celery_unique.keys import digest_of_key, family_of
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app, producers
from tests.chaos.conftest import (
    SCALE,
    Events,
    Producers,
    Report,
    account,
    chaos_env,
    check,
    completed_twice,
    overlapping,
    producing,
    settle,
    starts,
)
from tests.integration.conftest import Worker, wait_for

pytestmark = pytest.mark.worker

QUEUE = "chaos-outage"
CRASHES = SCALE
FREEZES = 4 * SCALE
PUBLISHED_BETWEEN = 100  # messages published before each fault, and after the last
BACKLOG = 20  # messages waiting when the Redis fails, so the worker meets the outage too
SOCKET_TIMEOUT = "0.5"  # the lock client's, in producers and worker: a freeze outlasts it
# This process's lock client, as the producers': it gives up after the socket timeout.
FAST_FAILING = {
    "unique_redis_socket_timeout": float(SOCKET_TIMEOUT),
    "unique_redis_connect_timeout": float(SOCKET_TIMEOUT),
}


@pytest.fixture(scope="module")
def outage_redis() -> Iterator[RedisServer]:
    # With an AOF: crash() and start() restart it with its keys (stop() and start() empty).
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


@pytest.fixture(scope="module")
def env(app: Any, outage_redis: RedisServer) -> dict[str, str]:
    return chaos_env(app.conf.broker_url, outage_redis.url, CHAOS_SOCKET_TIMEOUT=SOCKET_TIMEOUT)


@pytest.fixture(scope="module")
def outage_worker(app: Any, env: dict[str, str]) -> Iterator[Worker]:
    with Worker(
        app.conf.broker_url, "outage", "--queues", QUEUE, app="tests.chaos.chaos_app", env=env
    ) as started:
        yield started


HAMMERED = 20  # keys that one producer hammers, beside the one calling with a new key each time


class Run:
    """Producers calling ``delay()`` while faults are injected: one with a new key per
    call (the backlog), one hammering the same 20 keys; both choose the task id of every
    other call."""

    def __init__(self, env: dict[str, str], broker: redis.Redis, token: str, events: Events) -> None:
        self.broker, self.token, self.events = broker, token, events
        self.group = Producers(
            env, token, 2,
            "--task", "chaos.work", "--queue", QUEUE, "--threads", "2", "--until-stopped",
            "--seconds", "0.05", "--pause", "0.02", "--fixed-ids",
            variants=[[], ["--keys", str(HAMMERED)]],
        )  # fmt: skip

    def count(self, key: str) -> int:
        return int(self.broker.get(key) or 0)

    def published(self) -> int:
        return self.count(producers.published_key(self.token))

    def raised(self) -> int:
        return self.count(producers.raised_key(self.token))

    def met_outage(self) -> int:
        """Runs that could not check their lock (and were retried, or failed)."""
        return sum(
            1
            for e in self.events()
            if e["event"] in ("retry", "failure") and e["reason"] == "LockBackendError"
        )

    def go(self, faults: int, inject: Callable[[], None]) -> list[dict[str, Any]]:
        """Between stretches of publishing, inject ``faults`` faults; the producers' reports."""
        try:
            self.group.go(self.broker)
            for _ in range(faults):
                self.publishing()
                wait_for(lambda: self.broker.llen(QUEUE) >= BACKLOG, timeout=60)
                inject()
            self.publishing()
            self.group.stop(self.broker)
            return self.group.reports()
        finally:
            self.group.kill()

    def publishing(self) -> None:
        mark = self.published()
        wait_for(lambda: self.published() >= mark + PUBLISHED_BETWEEN, timeout=60)


def account_and_report(
    run: Run,
    seen: list[dict[str, Any]],
    outage_redis: RedisServer,
    report: Report,
    scenario: str,
    faults: str,
    injected: int,
) -> tuple[dict[str, Any], Counter[str]]:
    """:func:`account` for a finished run, reported in the chaos summary."""
    with redis.Redis.from_url(outage_redis.url) as lock_client:
        figures, raised = account(seen, run.events, lock_client)
    report(
        scenario,
        f"{figures['calls']:,} delay() from 2 processes x 2 threads (new keys, and {HAMMERED} keys "
        f"hammered; every other id caller-chosen), a backlog of >= {BACKLOG}",
        faults,
        injected=injected,
        overlapping=figures["overlapping"],
        completed_twice=figures["completed twice"],
        lost=figures["lost"],
        note=f"{sum(raised.values())} delay() raised {dict(raised)}, {run.met_outage()} runs met the outage, "
        f"{figures['superseded']} discarded for their key's newer message, "
        f"{figures['orphan locks']} orphan locks left",
    )
    return figures, raised


def test_lock_redis_crash_loses_nothing_and_runs_nothing_twice(
    outage_worker: Worker,
    outage_redis: RedisServer,
    env: dict[str, str],
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
) -> None:
    run = Run(env, broker_client, token, events)

    def crash() -> None:
        raised, met = run.raised(), run.met_outage()
        assert outage_redis.process is not None
        os.kill(outage_redis.process.pid, signal.SIGKILL)
        outage_redis.process.wait()
        outage_redis.stop()  # removes its directory; start() makes a new, empty one
        # Down until a producer's delay() and a worker's run have both failed on it.
        wait_for(lambda: run.raised() > raised and run.met_outage() > met, timeout=90, worker=outage_worker)
        outage_redis.start()

    figures = account_and_report(
        run, run.go(CRASHES, crash), outage_redis, report,
        "4a lock Redis crash and restart", f"{CRASHES} SIGKILL + restart of the lock Redis (empty)", CRASHES,
    )  # fmt: skip
    check(*figures)


def test_lock_redis_stall_loses_nothing_and_leaves_no_orphan_lock(
    outage_worker: Worker,
    outage_redis: RedisServer,
    env: dict[str, str],
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
) -> None:
    run = Run(env, broker_client, token, events)

    frozen = 0

    def freeze() -> None:
        nonlocal frozen
        raised = run.raised()
        assert outage_redis.process is not None
        os.kill(outage_redis.process.pid, signal.SIGSTOP)
        try:
            if frozen % 2:
                # Resumed while callers wait for the reply of asking again: it
                # comes after their first acquire, which Redis had buffered.
                time.sleep(1.5 * float(SOCKET_TIMEOUT))
            else:
                # Until a delay() gave up: its acquires run late, after it raised.
                wait_for(lambda: run.raised() > raised, timeout=60, worker=outage_worker)
        finally:
            os.kill(outage_redis.process.pid, signal.SIGCONT)
            frozen += 1

    figures, raised = account_and_report(
        run, run.go(FREEZES, freeze), outage_redis, report,
        "4b lock Redis frozen past the socket timeout",
        f"{FREEZES} SIGSTOP/SIGCONT of the lock Redis (socket timeout {SOCKET_TIMEOUT}s)", FREEZES,
    )  # fmt: skip
    check(figures, raised)
    assert figures["superseded"] == 0  # a stall loses no lock


def test_a_release_that_fails_is_done_in_the_background_once_redis_answers(
    app: Any,
    outage_worker: Worker,
    outage_redis: RedisServer,
    broker_client: redis.Redis,
    token: str,
    events: Events,
) -> None:
    """The lock Redis freezes as a task ends, then crashes and restarts from its AOF (the
    releases it had buffered are lost with it): the release fails its few attempts, and the
    worker goes on; once Redis answers, the lock of the run that ended is released (and its
    message noted as run to its end) from the background, not left to its 60 s TTL."""
    with producing(app.conf.broker_url, outage_redis.url):
        first = chaos_app.hold.apply_async((token,), queue=QUEUE)
        key = chaos_app.hold.unique_lock_key((token,))
    wait_for(lambda: starts(events()), worker=outage_worker)
    assert outage_redis.process is not None
    os.kill(outage_redis.process.pid, signal.SIGSTOP)  # frozen while the task ends and releases
    try:
        broker_client.set(chaos_app.release_key(token), 1)
        # The owner is the message's token: its task id and a suffix.
        failed = re.compile(
            rf"could not release lock {digest_of_key(key)[:12]} "
            rf"of {re.escape(first.id)}#[0-9a-f]{{12}} \(SUCCESS\)"
        )
        wait_for(lambda: failed.search(outage_worker.whole_log()), worker=outage_worker)
    finally:
        outage_redis.crash()
        outage_redis.start()
    with redis.Redis.from_url(outage_redis.url) as lock_client:
        assert lock_client.exists(key)  # kept by the AOF: only the background release frees it
        wait_for(lambda: not lock_client.exists(key), timeout=30, worker=outage_worker)
        assert 0 < lock_client.pttl(family_of(key) + ":done") <= 60_000  # its message ran to its end
    released = re.compile(
        rf"lock {digest_of_key(key)[:12]} of {re.escape(first.id)}#\w+, whose run had ended"
    )
    assert released.search(outage_worker.whole_log())
    # The worker went on with the next task meanwhile.
    with producing(app.conf.broker_url, outage_redis.url):
        chaos_app.work.apply_async((token,), {"seconds": 0, "item": "next"}, queue=QUEUE)
    wait_for(lambda: [e for e in starts(events()) if e["item"] == "next"], worker=outage_worker)
    assert len(failed.findall(outage_worker.whole_log())) == 1


# -- 4c: calls with caller-chosen task ids while the lock Redis stalls -------------------

STALLS = (0.75, 3.0) * SCALE  # seconds frozen: past one socket timeout, and past the re-ask too


class Stall:
    """The lock Redis frozen (SIGSTOP) now and resumed (SIGCONT) ``seconds`` later."""

    def __init__(self, server: RedisServer, seconds: float) -> None:
        assert server.process is not None
        self.pid = server.process.pid
        os.kill(self.pid, signal.SIGSTOP)
        self.timer = threading.Timer(seconds, os.kill, (self.pid, signal.SIGCONT))
        self.timer.start()

    def over(self) -> None:
        """Wait until Redis answers again."""
        self.timer.join()


def test_fixed_id_calls_during_a_stall_never_report_an_unpublished_duplicate(
    app: Any,
    outage_worker: Worker,
    outage_redis: RedisServer,
    token: str,
    events: Events,
    report: Report,
) -> None:
    """A call with a caller-chosen id either publishes its message or raises; a duplicate it
    reports names a message that was published; a lock taken by an acquire whose caller
    gave up is released, and the caller's retry with the same id publishes."""
    task = chaos_app.work
    published: list[str] = []

    def sent(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("task") == task.name:
            published.append(headers["id"])  # type: ignore[index]

    phantoms, raised, abandoned = [], 0, []
    ids = {}
    signals.after_task_publish.connect(sent, weak=False)
    try:
        with producing(app.conf.broker_url, outage_redis.url, **FAST_FAILING):
            for n, seconds in enumerate(STALLS):
                # Ids as users choose them: with the characters keys and patterns treat apart.
                for retries in (True, False):
                    item = f"{n}-{retries}"
                    task_id = ids[item] = f"fixed:{token}*[{{#{item}}}"
                    stall = Stall(outage_redis, seconds)
                    while True:
                        try:
                            result = task.apply_async(
                                (token,), {"seconds": 0, "item": item}, task_id=task_id, queue=QUEUE
                            )
                        except LockBackendError:
                            raised += 1
                            stall.over()
                            if retries:
                                continue  # the caller tries again with its id, once Redis answers
                            abandoned.append(item)
                        else:
                            if result.duplicate and result.id not in published:
                                phantoms.append(item)
                        break
                    stall.over()
    finally:
        signals.after_task_publish.disconnect(sent)

    settle(lambda: set(published) <= {e["id"] for e in starts(events())}, progress=lambda: len(events()))
    keys = [task.unique_lock_key((token,), {"item": item}) for item in ids]
    with redis.Redis.from_url(outage_redis.url) as lock_client:
        settle(lambda: not lock_client.exists(*keys), timeout=45)
        left = lock_client.exists(*keys)
    ran = Counter(e["id"] for e in starts(events()))
    report(
        "4c lock Redis frozen during calls with caller-chosen ids",
        f"{len(ids)} apply_async(task_id=...) with ids holding : * [ {{ #, half of them retried",
        f"{len(ids)} SIGSTOP/SIGCONT of the lock Redis for {sorted(set(STALLS))} s (socket timeout 0.5 s)",
        injected=len(ids),
        overlapping=overlapping(events()),
        completed_twice=completed_twice(events()),
        lost=len(set(published) - set(ran)),
        note=f"{raised} calls raised, {len(phantoms)} reported a duplicate of an unpublished message, "
        f"{left} locks left",
    )
    assert phantoms == []
    # Every retried call published in the end, exactly once, and it ran once.
    assert sorted(published) == sorted(ids[item] for item in ids if item not in abandoned)
    assert ran == Counter(published)
    # No lock is left, neither of a run that ended nor of an acquire whose caller gave up.
    assert left == 0
