"""Scenario 6: a message delivered again after its lock was taken by another task.

Two ``acks_late`` tasks (``on_conflict="discard"`` and ``"retry"``) run on a
worker that is killed with ``SIGKILL`` (main process and children): their
messages stay unacknowledged in the Redis broker, their 1 s locks expire, and
a new ``delay()`` of each key (B) takes the lock. A second worker, whose
broker ``visibility_timeout`` is 2 s, delivers the lost messages (A) again.
They find their lock held by B:

* ``discard``: A ends without running, logged with B's id; B does the key's
  work (nothing is lost silently);
* ``retry``: A is retried until B has finished, then runs; never beside B.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import pytest
import redis

from tests.chaos import chaos_app
from tests.chaos.conftest import Events, Report, chaos_worker, completed_twice, ends, overlapping, starts
from tests.integration.conftest import lock_holder, wait_for

pytestmark = pytest.mark.worker

QUEUE = "chaos-redelivery"
LATER = "chaos-redelivery-later"  # B waits here until the test lets it run
VISIBILITY_TIMEOUT = 2  # of the second worker: it delivers the lost messages again


def unacknowledged_for(broker: redis.Redis) -> float:
    """Seconds since the newest unacknowledged message was delivered (kombu's index)."""
    delivered = [score for _, score in broker.zrange("unacked_index", 0, -1, withscores=True)]
    return time.time() - max(delivered) if delivered else 0.0


def test_redelivered_message_meets_the_new_holder_by_policy(
    app: Any, broker_client: redis.Redis, lock_client: redis.Redis, token: str, events: Events, report: Report
) -> None:
    tasks = chaos_app.REDELIVERED
    keys = {policy: str(task.unique_lock_key((token,), {"item": policy})) for policy, task in tasks.items()}
    servers = (app.conf.broker_url, app.conf.unique_redis_url)

    with chaos_worker(*servers, "doomed", "--queues", QUEUE) as first:
        lost = {p: task.apply_async((token,), {"item": p}, queue=QUEUE) for p, task in tasks.items()}
        wait_for(lambda: len(starts(events())) == 2, worker=first)
        os.killpg(first.process.pid, signal.SIGKILL)  # the whole worker: nothing acknowledges or releases
        first.process.wait()
        killed_at = time.time()
    wait_for(lambda: all(lock_client.get(key) is None for key in keys.values()), timeout=5)  # 1 s locks

    taken = {
        p: task.apply_async(
            (token,), {"item": p, "seconds": 0.5}, queue=LATER, unique_options={"lock_timeout": 60}
        )
        for p, task in tasks.items()
    }
    assert not any(handle.duplicate for handle in taken.values())
    # Older kombu looks for them when a consumer starts, then only every 100 s:
    # start it once they are older than its visibility timeout.
    wait_for(lambda: unacknowledged_for(broker_client) > VISIBILITY_TIMEOUT)
    with chaos_worker(
        *servers, "redelivers", "--queues", QUEUE, CHAOS_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT)
    ) as second:

        def conflicts(policy: str) -> list[dict[str, Any]]:
            return [e for e in events() if e["event"] == "conflict" and e["policy"] == policy]

        # Both lost messages come back and meet B's locks; "retry" keeps retrying.
        wait_for(lambda: conflicts("discard") and len(conflicts("retry")) >= 2, timeout=30, worker=second)
        assert all(lock_holder(lock_client, keys[p]) == taken[p].id for p in tasks)
        broker_client.set(chaos_app.release_key(token), 1)  # A's next run does not wait
        app.control.add_consumer(LATER, destination=[second.name], reply=True)  # now B runs
        wait_for(lambda: len(ends(events())) == 3, timeout=30, worker=second)
        wait_for(lambda: all(lock_client.get(key) is None for key in keys.values()))
        log = second.log_text()

    seen = events()
    runs = [(e["item"], e["id"]) for e in starts(seen)]
    finished = [(e["item"], e["id"]) for e in ends(seen)]
    retry_runs = [e for e in starts(seen) if e["item"] == "retry"]
    # The killed worker's runs have no end: they lasted until the kill.
    beside = overlapping(seen, unended=lambda start: killed_at if start["time"] < killed_at else math.inf)
    report(
        "6 redelivery after the lock changed hands",
        "2 acks_late tasks (on_conflict discard and retry) lost with their worker",
        "1 SIGKILL of the whole worker; 2 redeliveries (visibility timeout) after new holders took the locks",
        injected=1,
        overlapping=beside,
        completed_twice=completed_twice(seen),
        lost=sum(1 for p in tasks if not any(item == p for item, _ in finished)),
        note=f"discard: dropped and logged, the new holder ran; retry: {len(conflicts('retry'))} "
        "conflicts, then ran after the holder",
    )
    assert beside == 0
    # discard: the redelivered A never ran again; the conflict names B and is logged.
    assert [e["holder"] for e in conflicts("discard")] == [taken["discard"].id]
    assert f"is held by {taken['discard'].id}" in log
    assert ("discard", taken["discard"].id) in finished
    assert runs.count(("discard", lost["discard"].id)) == 1  # its first run, on the killed worker
    # retry: A ran after B had finished, never beside it.
    assert [e["id"] for e in retry_runs] == [lost["retry"].id, taken["retry"].id, lost["retry"].id]
    b_end = next(e["time"] for e in ends(seen) if e["id"] == taken["retry"].id)
    assert retry_runs[2]["time"] >= b_end
    assert ("retry", lost["retry"].id) in finished
