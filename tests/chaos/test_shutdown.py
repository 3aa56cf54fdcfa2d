"""Scenario 5: warm shutdown (``SIGTERM``) of a worker with queued unique tasks.

The running tasks finish; the messages the worker had reserved go back to
the queue. While no worker runs, their locks stay with their own task ids (a
``delay()`` is a duplicate of them), and the next worker runs each one once,
re-entering its lock; afterwards no lock is left.
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
    Report,
    chaos_worker,
    completed_twice,
    ends,
    overlapping,
    starts,
)
from tests.integration.conftest import lock_holder, wait_for

pytestmark = pytest.mark.worker

QUEUE = "chaos-shutdown"
SHUTDOWNS = SCALE
TASKS = 4 + 4 * SHUTDOWNS
SECONDS = 0.5  # each task's run: long enough to be caught running by the SIGTERM


def test_warm_shutdown_restores_queued_tasks_with_their_locks(
    app: Any,
    broker_client: redis.Redis,
    lock_client: redis.Redis,
    token: str,
    events: Events,
    report: Report,
) -> None:
    task = chaos_app.work
    handles = {
        str(n): task.apply_async((token,), {"seconds": SECONDS, "item": str(n)}, queue=QUEUE)
        for n in range(TASKS)
    }
    keys = {item: str(task.unique_lock_key((token,), {"item": item})) for item in handles}
    shutdowns = 0
    for cycle in range(SHUTDOWNS + 1):
        before = len(starts(events()))  # counted before it starts: it consumes at once
        # Leaving the block stops it with SIGTERM: a warm shutdown, which waits for the running tasks.
        with chaos_worker(
            app.conf.broker_url, app.conf.unique_redis_url, "shutdown", "--queues", QUEUE
        ) as worker:
            if cycle == SHUTDOWNS:  # the last worker runs the rest
                wait_for(lambda: len(ends(events())) == TASKS, timeout=60, worker=worker)
                break
            # Two running, and as many reserved (prefetch): then SIGTERM.
            wait_for(lambda b=before: len(starts(events())) >= b + 2, worker=worker)
        shutdowns += 1
        ran = {e["item"] for e in ends(events())}
        assert {e["item"] for e in starts(events())} == ran  # every started task finished
        assert broker_client.llen(QUEUE) == TASKS - len(ran)  # the reserved ones are back in the queue
        for item, handle in handles.items():
            if item not in ran:
                # Not run yet: its lock is still its own, and a delay() is its duplicate.
                assert lock_holder(lock_client, keys[item]) == handle.id
                again = task.apply_async((token,), {"seconds": SECONDS, "item": item}, queue=QUEUE)
                assert again.id == handle.id
    wait_for(lambda: all(lock_client.get(key) is None for key in keys.values()))

    runs = Counter(e["id"] for e in starts(events()))
    report(
        "5 warm shutdown (SIGTERM)",
        f"{TASKS} unique tasks queued, {SECONDS}s each",
        f"{shutdowns} SIGTERM of the worker while it ran and held reserved tasks",
        injected=shutdowns,
        overlapping=overlapping(events()),
        completed_twice=completed_twice(events()),
        lost=len({h.id for h in handles.values()} - set(runs)),
    )
    assert shutdowns == SHUTDOWNS
    assert runs == Counter({h.id: 1 for h in handles.values()})
    assert len(ends(events())) == TASKS
