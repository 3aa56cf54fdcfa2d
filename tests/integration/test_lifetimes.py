"""Lock lifetimes, worker-side conflicts, renewal and fencing, with a real worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique.exceptions import LockConflictError
from celery_unique.keys import family_of, lock_key, run_key
from tests.integration.conftest import Events, Worker, wait_for
from tests.integration.worker_app import (
    CONFLICT_TASKS,
    LIFETIME_TASKS,
    finished_key,
    renewed,
    replacer,
    rescheduler,
    rescheduler_while,
    sleeper,
)

pytestmark = pytest.mark.worker


def locks_free(task: Any, *args: Any) -> bool:
    store = task.unique_store()
    family = family_of(task.unique_lock_key(args))
    return store.holder(lock_key(family))[0] is None and store.holder(run_key(family))[0] is None


def settle(
    task: Any, token: str, events: Events, runs: int, worker: Worker, countdown: float = 0.0
) -> list[dict[str, Any]]:
    """Wait until ``runs`` runs have ended and no run of this token is left or queued:
    every message sent so far (``countdown``: the longest countdown one may have) has
    run, so a run that should not happen has happened by then."""

    def done() -> bool:
        seen = events()
        ends = sum(1 for e in seen if e["event"] == "end")
        starts = sum(1 for e in seen if e["event"] == "start")
        return ends >= runs and starts == ends

    wait_for(done, timeout=20)
    if task.unique_lifetime != "until_expired":
        wait_for(lambda: locks_free(task, token), timeout=5)
    worker.drain(countdown=countdown)
    return events()


# lifetime -> phase -> (is a second delay() accepted, how many runs happen)
EXPECTED = {
    "until_executed": {"queued": (False, 1), "running": (False, 1), "finished": (True, 2)},
    "until_executing": {"queued": (False, 1), "running": (True, 2), "finished": (True, 2)},
    "while_executing": {"queued": (True, 2), "running": (True, 1), "finished": (True, 2)},
    "until_and_while_executing": {"queued": (False, 1), "running": (True, 1), "finished": (True, 2)},
    "until_expired": {"queued": (False, 1), "running": (False, 1), "finished": (False, 1)},
}


@pytest.mark.parametrize("phase", ["queued", "running", "finished"])
@pytest.mark.parametrize("lifetime", list(EXPECTED))
def test_when_a_second_delay_is_accepted(
    worker: Worker, token: str, events: Events, lifetime: str, phase: str
) -> None:
    task = LIFETIME_TASKS[lifetime]
    countdown = 1.0 if phase == "queued" else 0.0
    if phase == "queued":
        task.apply_async((token, 0.2), countdown=countdown)
    elif phase == "running":
        task.delay(token, 1.5)
        wait_for(lambda: events())
    else:
        task.delay(token, 0.0)
        wait_for(lambda: any(e["event"] == "end" for e in events()))
        if lifetime != "until_expired":
            wait_for(lambda: locks_free(task, token), timeout=5)

    second = task.delay(token, 0.0)

    accepted, runs = EXPECTED[lifetime][phase]
    assert (not second.duplicate) is accepted
    seen = settle(task, token, events, runs, worker, countdown)
    assert sum(1 for e in seen if e["event"] == "start") == runs


def test_until_expired_is_accepted_again_after_its_ttl(worker: Worker, token: str, events: Events) -> None:
    task = LIFETIME_TASKS["until_expired"]
    first = task.delay(token)
    wait_for(lambda: any(e["event"] == "end" for e in events()))
    assert task.delay(token).id == first.id  # finished, but the throttle holds
    wait_for(lambda: locks_free(task, token), timeout=5)  # lock_timeout is 2 s
    assert not task.delay(token).duplicate
    settle(task, token, events, 2, worker)


def test_while_executing_sent_by_name_runs_once_and_discards_the_other(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    for _ in range(2):
        celery_app.send_task("tests.conflict.discard", (token, 1.0))
    seen = settle(CONFLICT_TASKS["discard"], token, events, 1, worker)
    assert sum(1 for e in seen if e["event"] == "start") == 1
    assert "is held by" in worker.log_text()


def test_on_conflict_raise_gives_the_caller_a_lock_conflict_error(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    """Through the result backend (JSON, Celery's default), as the worker raised it."""
    first = celery_app.send_task("tests.conflict.raise", (token, 1.0))
    wait_for(lambda: any(e["event"] == "start" for e in events()), worker=worker)
    second = celery_app.send_task("tests.conflict.raise", (token, 1.0))
    with pytest.raises(LockConflictError) as raised:
        second.get(timeout=20)
    assert (raised.value.task_name, raised.value.existing_id) == ("tests.conflict.raise", first.id)
    assert first.get(timeout=20) is None


def test_while_executing_retry_runs_the_other_after(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    for _ in range(2):
        celery_app.send_task("tests.conflict.retry", (token, 1.0))
    task = CONFLICT_TASKS["retry"]
    seen = settle(task, token, events, 2, worker, task.conflict_retry_countdown)
    starts = [e for e in seen if e["event"] == "start"]
    ends = [e for e in seen if e["event"] == "end"]
    assert len(starts) == 2
    assert starts[1]["time"] >= ends[0]["time"]  # never two at once


def test_while_executing_messages_of_one_caller_chosen_task_id_never_overlap(
    worker: Worker, token: str, events: Events
) -> None:
    """Two messages a caller gave one task id are two messages, not one delivered
    again: the second's run waits for the first's running lock."""
    task = CONFLICT_TASKS["retry"]
    fixed = f"fixed-{token}"
    task.apply_async((token, 1.0), task_id=fixed)
    wait_for(lambda: any(e["event"] == "start" for e in events()), worker=worker)
    task.apply_async((token, 1.0), task_id=fixed)
    seen = settle(task, token, events, 2, worker, task.conflict_retry_countdown)
    starts = [e for e in seen if e["event"] == "start"]
    ends = [e for e in seen if e["event"] == "end"]
    assert len(starts) == 2
    assert starts[1]["time"] >= ends[0]["time"], "two runs of one key at once"


@pytest.mark.parametrize("lifetime", ["while_executing", "until_executed", "until_and_while_executing"])
def test_fencing_token_increases_across_holders(
    worker: Worker, token: str, events: Events, lifetime: str
) -> None:
    task = LIFETIME_TASKS[lifetime]
    for run in range(1, 4):
        task.delay(token)
        wait_for(lambda n=run: sum(1 for e in events() if e["event"] == "end") == n)  # type: ignore[misc]
        wait_for(lambda: locks_free(task, token), timeout=5)
    fences = [e["fence"] for e in events() if e["event"] == "start"]
    assert len(fences) == 3
    assert all(isinstance(f, int) for f in fences)
    assert fences[0] < fences[1] < fences[2]


def test_self_rescheduling_hands_the_lock_over(worker: Worker, token: str, events: Events) -> None:
    rescheduler.delay(token, 2)
    wait_for(lambda: sum(1 for e in events() if e["event"] == "end") == 3, timeout=20)
    rescheduled = [e for e in events() if e["event"] == "rescheduled"]
    assert [e["duplicate"] for e in rescheduled] == [False, False]
    wait_for(lambda: locks_free(rescheduler, token, 0), timeout=5)
    assert "was lost" not in worker.log_text()


def test_self_rescheduling_keeps_the_running_lock_of_until_and_while(
    worker: Worker, token: str, events: Events
) -> None:
    rescheduler_while.delay(token, 1)
    wait_for(lambda: sum(1 for e in events() if e["event"] == "end") == 2, timeout=20)
    assert [e["duplicate"] for e in events() if e["event"] == "rescheduled"] == [False]
    # The second run started (its run lock was released by the first) ...
    assert sum(1 for e in events() if e["event"] == "start") == 2
    # ... and nothing is left held afterwards.
    wait_for(lambda: locks_free(rescheduler_while, token, 0), timeout=5)
    assert not rescheduler_while.delay(token, 0).duplicate
    wait_for(lambda: sum(1 for e in events() if e["event"] == "end") == 3, timeout=20)


def test_replace_with_the_same_task_keeps_the_lock(
    worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = replacer.delay(token)
    wait_for(lambda: events())  # the first run replaced itself; the replacement waits 1 s
    # The first run's task_postrun, where a release would free the lock, is done.
    wait_for(lambda: redis_client.llen(finished_key(first.id)), worker=worker)
    key = replacer.unique_lock_key((token,))
    assert replacer.unique_store().holder(key)[0] == first.id
    assert replacer.delay(token).id == first.id
    wait_for(lambda: any(e["event"] == "end" for e in events()), timeout=20)
    assert [e["replace"] for e in events() if e["event"] == "start"] == [True, False]
    wait_for(lambda: locks_free(replacer, token), timeout=5)


def test_per_call_lock_timeout_is_kept_when_the_run_starts(
    worker: Worker, token: str, events: Events
) -> None:
    sleeper.apply_async((token, 1.0), unique_options={"lock_timeout": 30})
    wait_for(lambda: events())
    ttl = sleeper.unique_store().holder(sleeper.unique_lock_key((token, 1.0)))[1]
    assert ttl is not None and 25 < ttl <= 30
    wait_for(lambda: any(e["event"] == "end" for e in events()))


@pytest.fixture
def own_worker(celery_app: Any, redis_url: str) -> Iterator[Worker]:
    """A worker of its own on its own queue, for tests that kill it."""
    with Worker(redis_url, "own", "--queues", "own") as started:
        yield started


def test_renewal_keeps_a_lock_three_times_its_timeout(own_worker: Worker, token: str, events: Events) -> None:
    first = renewed.apply_async((token, 3.5), queue="own")
    wait_for(lambda: events())
    time.sleep(2.5)  # more than twice the 1 s lock_timeout
    holder, ttl = renewed.unique_store().holder(renewed.unique_lock_key((token, 3.5)))
    assert holder == first.id and ttl is not None and ttl <= 1.0  # past its first TTL: renewed
    assert renewed.apply_async((token, 3.5), queue="own").id == first.id
    wait_for(lambda: any(e["event"] == "end" for e in events()), timeout=10)
    assert [e["lost"] for e in events() if e["event"] == "end"] == [False]


def test_killed_worker_lock_expires_within_one_ttl(own_worker: Worker, token: str, events: Events) -> None:
    renewed.apply_async((token, 30), queue="own")
    wait_for(lambda: events())
    time.sleep(1.5)  # renewed past its first TTL
    key = renewed.unique_lock_key((token, 30))
    holder, ttl = renewed.unique_store().holder(key)
    assert holder is not None and ttl is not None and ttl <= 1.0  # past its first TTL: renewed
    os.killpg(own_worker.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: renewed.unique_store().holder(key)[0] is None, timeout=3)
    assert time.monotonic() - killed_at <= 1.2  # lock_timeout is 1 s
