"""Scenario 1: 10,000 ``delay()`` calls of one key from 4 processes x 8 threads.

Exactly one message is published while the lock is held (counted where it
leaves, by ``after_task_publish`` in each producer process) and the worker runs
exactly one task; once it ends, the lock is free for the next call.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis

from tests.chaos import chaos_app
from tests.chaos.conftest import (
    SCALE,
    Events,
    Producers,
    Report,
    chaos_env,
    completed_twice,
    ends,
    overlapping,
    settle,
    starts,
)
from tests.integration.conftest import Worker, wait_for

pytestmark = pytest.mark.worker

PROCESSES, THREADS = 4, 8
CALLS = 10_000 * SCALE


def test_one_key_from_many_processes_is_published_and_run_once(
    worker: Worker,
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
    app: Any,
) -> None:
    env = chaos_env(app.conf.broker_url, app.conf.unique_redis_url)
    group = Producers(env, token, PROCESSES, "--threads", str(THREADS), "--calls", str(CALLS))
    try:
        group.go(broker_client)
        seen = group.reports()
    finally:
        group.kill()

    published = [task_id for r in seen for _, task_id in r["published"]]
    returned = [entry for r in seen for entry in r["returned"]]
    raised = sum(sum(r["raised"].values()) for r in seen)
    wait_for(lambda: starts(events()), worker=worker)
    holder = chaos_app.hold.unique_store().holder(chaos_app.hold.unique_lock_key((token,)))[0]
    ran = starts(events())
    ran_ids = [e["id"] for e in ran]
    report(
        "1 load: one key",
        f"{len(returned) + raised:,} delay() of one key, {PROCESSES} processes x {THREADS} threads",
        "none (contention only)",
        injected=0,
        overlapping=overlapping(events()),
        completed_twice=completed_twice(events()),
        lost=len(set(published) - set(ran_ids)),
    )

    assert raised == 0
    assert len(returned) == CALLS
    assert len(published) == 1
    assert {task_id for _, task_id, _ in returned} == set(published)
    assert sum(1 for *_, duplicate in returned if not duplicate) == 1
    # The lock is held by the one message while it runs; nothing else ran.
    assert holder == published[0]
    assert [e["id"] for e in ran] == published

    broker_client.set(chaos_app.release_key(token), 1)
    wait_for(lambda: ends(events()), worker=worker)
    wait_for(
        lambda: chaos_app.hold.unique_store().holder(chaos_app.hold.unique_lock_key((token,)))[0] is None
    )
    assert [e["id"] for e in starts(events())] == published


HAMMERED = 20
HAMMER_CALLS = 3_000 * SCALE


def test_a_few_keys_hammered_from_many_processes_never_run_twice_at_once(
    worker: Worker,
    broker_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
    app: Any,
) -> None:
    """Every thread of every producer calls the same 20 keys while the worker runs and frees
    them; every other call chooses its task id. Per key, runs never overlap; every message
    published runs once; every handle a call returned names a published message."""
    env = chaos_env(app.conf.broker_url, app.conf.unique_redis_url)
    group = Producers(
        env, token, PROCESSES,
        "--task", "chaos.work", "--threads", str(THREADS), "--calls", str(HAMMER_CALLS),
        "--keys", str(HAMMERED), "--fixed-ids", "--seconds", "0.01", "--pause", "0.02",
    )  # fmt: skip
    try:
        group.go(broker_client)
        seen = group.reports()
    finally:
        group.kill()
    published = Counter(task_id for r in seen for _, task_id in r["published"])
    returned = {task_id for r in seen for _, task_id, _ in r["returned"]}
    raised = sum(sum(r["raised"].values()) for r in seen)
    settle(lambda: set(published) <= {e["id"] for e in ends(events())}, progress=lambda: len(events()))
    ran = Counter(e["id"] for e in starts(events()))
    report(
        "1b load: 20 keys hammered",
        f"{HAMMER_CALLS:,} delay() of {HAMMERED} keys, {PROCESSES} processes x {THREADS} threads, "
        "every other id caller-chosen",
        "none (contention only)",
        injected=0,
        overlapping=overlapping(events()),
        completed_twice=completed_twice(events()),
        lost=len(set(published) - set(ran)),
        note=f"{sum(published.values())} published, "
        f"{len(returned - set(published))} handles without a message",
    )
    assert raised == 0
    assert overlapping(events()) == 0
    assert max(published.values()) == 1 and ran == published  # each published message ran once
    assert returned <= set(published)
