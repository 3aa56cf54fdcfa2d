"""Scenario 1: 10,000 ``delay()`` calls of one key from 4 processes x 8 threads.

Exactly one message is published while the lock is held (counted where it
leaves, by ``after_task_publish`` in each producer process) and the worker runs
exactly one task; once it ends, the lock is free for the next call.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.chaos import chaos_app
from tests.chaos.conftest import SCALE, Events, Producers, Report, chaos_env, ends, starts
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
        duplicates=max(len(published) - 1, 0) + max(len(ran_ids) - 1, 0),
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
