"""Scenario 4: the lock Redis crashes and comes back while producers enqueue.

Producer processes call ``delay()`` with a new key each time; the lock Redis
(not the broker) is killed with ``SIGKILL`` while a backlog waits in the
queue, and restarted empty once producers and the worker have both met the
outage. Every ``delay()`` must either have published exactly once (and that
task ran exactly once) or have raised ``LockBackendError`` (and nothing of it
ran): lost = believed published - ran = 0.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique.testing import RedisServer
from tests.chaos import producers
from tests.chaos.conftest import SCALE, Events, Producers, Report, chaos_env, settle, starts
from tests.integration.conftest import Worker, wait_for

pytestmark = pytest.mark.worker

QUEUE = "chaos-outage"
OUTAGES = SCALE
PUBLISHED_BETWEEN = 100  # messages published before each outage, and after the last
BACKLOG = 20  # messages waiting when the Redis goes down, so the worker meets the outage too


@pytest.fixture(scope="module")
def outage_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def outage_worker(app: Any, outage_redis: RedisServer) -> Iterator[Worker]:
    broker_url = app.conf.broker_url
    started = Worker(
        broker_url,
        "outage",
        "--queues",
        QUEUE,
        app="tests.chaos.chaos_app",
        env=chaos_env(broker_url, outage_redis.url),
    )
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def crash(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    server.stop()  # removes its directory; start() makes a new, empty one


def test_lock_redis_crash_loses_nothing_and_runs_nothing_twice(
    app: Any,
    outage_worker: Worker,
    outage_redis: RedisServer,
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
) -> None:
    group = Producers(
        chaos_env(app.conf.broker_url, outage_redis.url),
        token,
        2,
        "--task", "chaos.work", "--queue", QUEUE, "--threads", "2", "--until-stopped",
        "--seconds", "0.05", "--pause", "0.02",
    )  # fmt: skip

    def count(key: str) -> int:
        return int(broker_client.get(key) or 0)

    def met_outage() -> int:
        return sum(
            1 for e in events() if e["event"] in ("retry", "failure") and e["reason"] == "LockBackendError"
        )

    try:
        group.go(broker_client)
        for _ in range(OUTAGES):
            mark = count(producers.published_key(token))
            wait_for(
                lambda m=mark: count(producers.published_key(token)) >= m + PUBLISHED_BETWEEN, timeout=60
            )
            wait_for(lambda: broker_client.llen(QUEUE) >= BACKLOG, timeout=60)
            raised, worker_met = count(producers.raised_key(token)), met_outage()
            crash(outage_redis)
            # Down until a producer's delay() and a worker's run have both failed on it.
            wait_for(
                lambda r=raised, w=worker_met: count(producers.raised_key(token)) > r and met_outage() > w,
                timeout=90,
                worker=outage_worker,
            )
            outage_redis.start()
        mark = count(producers.published_key(token))
        wait_for(lambda: count(producers.published_key(token)) >= mark + PUBLISHED_BETWEEN, timeout=60)
        group.stop(broker_client)
        seen = group.reports()
    finally:
        group.kill()

    published = Counter(task_id for r in seen for _, task_id in r["published"])
    believed = {task_id for r in seen for _, task_id, _ in r["returned"]}
    raised_items = {item for r in seen for item in r["raised_items"]}
    raised_by_type = sum((Counter(r["raised"]) for r in seen), Counter())
    calls = sum(len(r["returned"]) for r in seen) + sum(raised_by_type.values())
    settle(lambda: believed <= {e["id"] for e in starts(events())})
    ran = Counter(e["id"] for e in starts(events()))
    ran_items = {e["item"] for e in starts(events())}
    twice = sum(n - 1 for n in ran.values()) + sum(n - 1 for n in published.values())
    lost = len(believed - set(ran))
    report(
        "4 lock Redis crash and restart",
        f"{calls:,} delay() of new keys from 2 processes x 2 threads, a backlog of >= {BACKLOG}",
        f"{OUTAGES} SIGKILL + restart of the lock Redis (empty)",
        duplicates=twice,
        lost=lost,
        note=f"{sum(raised_by_type.values())} delay() raised {dict(raised_by_type)}, "
        f"{met_outage()} runs met the outage",
    )
    assert set(raised_by_type) == {"LockBackendError"}
    assert lost == 0
    assert twice == 0
    assert believed == set(published)  # every handle a producer got is a message that left
    assert not raised_items & ran_items  # a delay() that raised published nothing
    assert set(ran) <= believed
