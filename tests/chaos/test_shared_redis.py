"""Scenario 8: the one Redis that is both the broker and the lock store restarts under load.

The default set-up: queue and locks in one Redis, run as a user who cares runs
it (AOF, ``appendfsync always``). Producers call ``delay()`` (one with a new
key per call, one hammering 20 keys; every other task id caller-chosen) while
a worker runs the tasks; the Redis is killed with SIGKILL and restarted from
its AOF. Runs that start while it is down can neither check their lock nor
publish a retry. Nothing published may be lost, and no key may run twice at
once; a call that raised publishes nothing.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique.testing import RedisServer
from tests.chaos import chaos_app, producers
from tests.chaos.conftest import (
    SCALE,
    Events,
    Producers,
    Report,
    account,
    chaos_env,
    chaos_worker,
    check,
    ends,
    producing,
    starts,
)
from tests.chaos.test_redis_outage import BACKLOG, HAMMERED, PUBLISHED_BETWEEN
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.worker

QUEUE = "chaos-shared"
CRASHES = SCALE
SOCKET_TIMEOUT = "0.5"
# Messages that were delivered to a worker and never acknowledged (the Redis
# died first) are delivered again after this; soon, so the test waits little.
VISIBILITY_TIMEOUT = "10"


def outage_seen(log: str) -> int:
    """How often a worker's log says it met the outage: a run that could not check its
    lock, or its consumer losing the broker (when it held no message to run)."""
    return log.count("Redis failed") + log.count("consumer: Cannot connect to")


@pytest.fixture
def shared() -> Iterator[RedisServer]:
    """The one Redis of a test (a scenario restarts it: the next one starts afresh)."""
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


def test_the_shared_redis_restarted_from_its_aof_loses_nothing_and_runs_no_key_twice_at_once(
    app: Any,
    shared: RedisServer,
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
) -> None:
    # The events and the producers' counters stay on the suite's own broker, which never stops.
    events_url = app.conf.broker_url
    env = chaos_env(shared.url, shared.url, CHAOS_EVENTS_URL=events_url, CHAOS_SOCKET_TIMEOUT=SOCKET_TIMEOUT)
    group = Producers(
        env, token, 2,
        "--task", "chaos.work", "--queue", QUEUE, "--threads", "2", "--until-stopped",
        "--seconds", "0.05", "--pause", "0.02", "--fixed-ids",
        variants=[[], ["--keys", str(HAMMERED)]],
    )  # fmt: skip

    def count(key: str) -> int:
        return int(broker_client.get(key) or 0)

    def publishing() -> None:
        mark = count(producers.published_key(token))
        wait_for(lambda: count(producers.published_key(token)) >= mark + PUBLISHED_BETWEEN, timeout=60)

    crashed = 0
    with (
        producing(shared.url, shared.url),  # this process's app too: it pings the worker there
        chaos_worker(
            shared.url, shared.url, "shared", "--queues", QUEUE,
            CHAOS_EVENTS_URL=events_url, CHAOS_SOCKET_TIMEOUT=SOCKET_TIMEOUT,
            CHAOS_VISIBILITY_TIMEOUT=VISIBILITY_TIMEOUT,
            # As a user who cares sets it: a stalled broker fails calls instead of hanging them.
            CHAOS_BROKER_SOCKET_TIMEOUT="1",
            # Celery's default prefetch: messages the worker holds start while the Redis is down.
            CHAOS_SETTINGS=json.dumps({"worker_prefetch_multiplier": 4}),
        ) as worker,
        redis.Redis.from_url(shared.url) as client,
    ):  # fmt: skip
        try:
            group.go(broker_client)
            for _ in range(CRASHES):
                publishing()
                wait_for(lambda: client.llen(QUEUE) >= BACKLOG, timeout=60)
                raised, noticed = count(producers.raised_key(token)), outage_seen(worker.whole_log())
                # Frozen first (a host's hiccup, or a Redis loading a large AOF): the worker goes on
                # with the messages it holds, until a delay() has met the outage and the worker
                # too (a run that could not check its lock, or its consumer losing the broker);
                # then killed and restarted from its AOF.
                assert shared.process is not None
                os.kill(shared.process.pid, signal.SIGSTOP)
                crashed += 1
                wait_for(
                    lambda r=raised, n=noticed: (
                        count(producers.raised_key(token)) > r and outage_seen(worker.whole_log()) > n
                    ),
                    timeout=90,
                    worker=worker,
                )
                shared.crash()
                shared.start()
            publishing()
            group.stop(broker_client)
            seen = group.reports()
        finally:
            group.kill()
        figures, raised_by = account(seen, events, client)
        log = worker.whole_log()
    # kombu's Redis transport pops a message (BRPOP), then records it as unacknowledged
    # in a second command: a Redis killed between the two has persisted the pop only,
    # and the worker drops what it could not record. Such a message never reached
    # Celery (no "received" line): the broker lost it, counted apart. A message that
    # celery-unique could lose was received first.
    never_received = [i for i in figures["lost ids"] if f"[{i}] received" not in log]
    report(
        "8 shared broker and lock Redis restarted (AOF, appendfsync always)",
        f"{figures['calls']:,} delay() from 2 processes x 2 threads (new keys, and {HAMMERED} keys "
        f"hammered; every other id caller-chosen), a backlog of >= {BACKLOG}",
        f"{crashed} SIGSTOP, then SIGKILL + restart from the AOF of the one Redis",
        injected=crashed,
        overlapping=figures["overlapping"],
        completed_twice=figures["completed twice"],
        lost=figures["lost"],
        note=f"{sum(raised_by.values())} delay() raised {dict(raised_by)}, "
        f"{log.count('Redis failed')} runs met the outage, {log.count('reject requeue=False')} rejected, "
        f"{figures['ran after a broker error']} ran after their delay() met a broker error (a publish "
        f"whose reply was lost landed), {figures['orphan locks']} orphan locks left, "
        f"{len(never_received)} lost by the broker "
        "between kombu's pop and its unacked record",
    )
    assert "reject requeue=False" not in log
    ours = {**figures, "lost": figures["lost"] - len(never_received)}
    check(ours, raised_by, allowed=frozenset({"LockBackendError", "OperationalError"}))


def test_a_run_that_can_neither_check_its_lock_nor_publish_its_retry_waits_for_redis(
    app: Any,
    shared: RedisServer,
    broker_client: redis.Redis,
    token: str,
    events: Events,
) -> None:
    """Its message was accepted (and acknowledged); the one Redis then stalls just as the run
    checks its lock. The retry cannot be published either: the run must wait for Redis, not
    have Celery reject its message for good."""
    events_url = app.conf.broker_url
    with (
        producing(shared.url, shared.url),
        chaos_worker(
            shared.url, shared.url, "shared-gated", "--queues", QUEUE,
            CHAOS_EVENTS_URL=events_url, CHAOS_SOCKET_TIMEOUT=SOCKET_TIMEOUT, CHAOS_BROKER_SOCKET_TIMEOUT="1",
        ) as worker,
    ):  # fmt: skip
        handle = chaos_app.gated_start.apply_async((token,), queue=QUEUE)
        wait_for(lambda: [e for e in events() if e["event"] == "gated"], worker=worker)
        assert shared.process is not None
        os.kill(shared.process.pid, signal.SIGSTOP)
        try:
            broker_client.set(chaos_app.release_key(f"{token}:start"), 1)  # the run checks its lock now
            wait_for(lambda: "could not be published either" in worker.whole_log(), timeout=30, worker=worker)
        finally:
            shared.crash()
            shared.start()
        wait_for(lambda: ends(events()), timeout=60, worker=worker)
        log = worker.whole_log()
    assert [e["id"] for e in starts(events())] == [handle.id]
    assert "left to the broker's redelivery" not in log
