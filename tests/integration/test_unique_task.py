"""UniqueTask end to end: real Redis, real prefork worker subprocess."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from celery_unique.clients import is_cluster
from celery_unique.conf import get_conf
from celery_unique.hooks import CELERY_RETRIES_LOST_WORKERS
from tests.integration.conftest import Events, Worker, wait_for
from tests.integration.worker_app import failing, finished_key, flaky, sleeper, typed


def holder_of(task: Any, *args: Any, **kwargs: Any) -> str | None:
    return task.unique_store().holder(task.unique_lock_key(args, kwargs))[0]


def ended(events: Events, count: int = 1) -> Any:
    return lambda: len([e for e in events() if e["event"] == "end"]) >= count


@pytest.mark.worker
def test_concurrent_duplicates_publish_and_run_once(worker: Worker, token: str, events: Events) -> None:
    handles: list[Any] = []
    lock = threading.Lock()

    def producer() -> None:
        for _ in range(50):
            result = sleeper.delay(token, seconds=1.5)
            with lock:
                handles.append(result)

    threads = [threading.Thread(target=producer) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(handles) == 1000
    assert len({h.id for h in handles}) == 1
    assert sum(1 for h in handles if not h.duplicate) == 1
    wait_for(ended(events))
    worker.drain()  # a second execution, if any, has run by now
    starts = [e for e in events() if e["event"] == "start"]
    assert [e["id"] for e in starts] == [handles[0].id]


@pytest.mark.worker
def test_lock_is_released_after_the_task_and_a_new_delay_runs(
    worker: Worker, token: str, events: Events
) -> None:
    first = sleeper.delay(token)
    wait_for(ended(events))
    wait_for(lambda: holder_of(sleeper, token) is None, timeout=5)

    second = sleeper.delay(token)
    assert not second.duplicate
    assert second.id != first.id
    wait_for(ended(events, 2))
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id, second.id]


@pytest.mark.worker
def test_retry_keeps_the_lock_and_reenters_it(worker: Worker, token: str, events: Events) -> None:
    result = flaky.delay(token, failures=2, countdown=0.7)
    wait_for(lambda: len(events()) >= 1)
    during_retries = flaky.delay(token, failures=2, countdown=0.7)
    assert during_retries.duplicate
    assert during_retries.id == result.id

    wait_for(ended(events))
    starts = [e for e in events() if e["event"] == "start"]
    assert [e["retries"] for e in starts] == [0, 1, 2]
    assert {e["id"] for e in starts} == {result.id}
    wait_for(lambda: holder_of(flaky, token) is None, timeout=5)


@pytest.mark.worker
def test_failing_task_frees_its_lock(worker: Worker, token: str, events: Events) -> None:
    failing.delay(token)
    wait_for(lambda: events())
    wait_for(lambda: holder_of(failing, token) is None, timeout=5)
    assert not failing.delay(token).duplicate


@pytest.mark.worker
def test_expired_lock_taken_by_another_is_not_freed_by_the_first(
    worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = sleeper.apply_async((token, 2.5), unique_options={"lock_timeout": 1})
    wait_for(lambda: holder_of(sleeper, token, 2.5) is None, timeout=5)  # A's lock expired
    second = sleeper.apply_async((token, 2.5), unique_options={"lock_timeout": 30})
    assert not second.duplicate

    wait_for(lambda: redis_client.llen(finished_key(first.id)), worker=worker)  # A's task_postrun ran
    assert holder_of(sleeper, token, 2.5) == second.id
    wait_for(ended(events, 2))


@pytest.mark.worker
def test_revoking_a_queued_task_frees_its_lock(worker: Worker, token: str, events: Events) -> None:
    busy = [f"{token}-busy-{n}" for n in range(2)]
    for busy_token in busy:
        sleeper.delay(busy_token, seconds=1.5)
    queued = sleeper.delay(token)
    assert holder_of(sleeper, token) == queued.id
    queued.revoke()
    wait_for(lambda: holder_of(sleeper, token) is None, timeout=10)
    for busy_token in busy:
        wait_for(lambda t=busy_token: any(e["event"] == "end" for e in events(t)))  # type: ignore[misc]
    worker.drain()  # the revoked message has been taken and dropped
    assert events() == []  # the revoked task never ran


@pytest.mark.worker
def test_killed_pool_child_frees_its_lock(worker: Worker, token: str, events: Events) -> None:
    sleeper.delay(token, 30)
    started = wait_for(lambda: events())
    os.kill(started[0]["pid"], signal.SIGKILL)
    wait_for(lambda: holder_of(sleeper, token, 30) is None, timeout=10, worker=worker)
    assert not any(e["event"] == "end" for e in events())


@pytest.mark.worker
@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param({"value": (1, 2)}, {"value": (1, 2)}, id="tuple"),
        pytest.param({"ident": uuid.UUID(int=7)}, {"ident": uuid.UUID(int=7)}, id="uuid"),
        pytest.param(
            {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)},
            {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)},
            id="datetime",
        ),
        pytest.param({"value": "{tag}:lock\n}{"}, {"value": "{tag}:lock\n}{"}, id="braces-colons-newline"),
        pytest.param({"value": "x" * 1_000_000}, {"value": "x" * 1_000_000}, id="one-megabyte"),
        pytest.param({"value": "\udcff"}, {"value": "\udcff"}, id="lone-surrogate"),
        pytest.param({"value": b"\xff\xfe"}, {"value": b"\xff\xfe"}, id="non-utf8-bytes"),
    ],
)
def test_typed_arguments_deduplicate_across_the_worker_boundary(
    worker: Worker, token: str, events: Events, first: dict[str, Any], second: dict[str, Any]
) -> None:
    original = typed.apply_async((token,), first)
    wait_for(lambda: events())  # running in the worker, arguments decoded from JSON
    assert typed.apply_async((token,), second).id == original.id
    wait_for(ended(events))
    # The worker released the producer's key although JSON turned tuples into lists.
    wait_for(lambda: holder_of(typed, token, **first) is None, timeout=5)
    assert not typed.apply_async((token,), second).duplicate
    wait_for(ended(events, 2))


@pytest.mark.worker
def test_keyword_and_positional_calls_are_one_key(worker: Worker, token: str, events: Events) -> None:
    original = sleeper.delay(token, 0.5)
    assert sleeper.delay(seconds=0.5, token=token).id == original.id
    assert sleeper.apply_async(kwargs={"token": token, "seconds": 0.5}).id == original.id
    assert sleeper.s(token, 0.5).delay().id == original.id
    wait_for(ended(events))


def test_settings_come_from_app_conf(celery_app: Any, unique_redis: Any) -> None:
    conf = get_conf(celery_app)
    assert conf.redis_url == (unique_redis.url or celery_app.conf.broker_url)
    assert conf.lock_timeout == 3600.0
    # The locks are where this run (--unique-redis) puts them.
    pool = getattr(conf.locks.client, "connection_pool", None)
    assert is_cluster(conf.locks.client) == (unique_redis.topology == "cluster")
    assert isinstance(pool, SentinelConnectionPool) == (unique_redis.topology == "sentinel")


@pytest.mark.worker
@pytest.mark.skipif(
    not CELERY_RETRIES_LOST_WORKERS, reason="this Celery has no Task.retry_on_worker_lost (5.6+)"
)
def test_retry_on_worker_lost_keeps_the_lock_for_the_republished_message(
    worker: Worker, token: str, events: Events
) -> None:
    from tests.integration.worker_app import lost_then_retried

    first = lost_then_retried.delay(token)
    wait_for(lambda: events())  # the first run started and killed its child
    # The main process publishes it again (2 s countdown) as it handles the lost
    # child, where a release would be, and only after that, in the same thread,
    # receives the message: its second "received" line comes after the decision.
    received = f"Task {lost_then_retried.name}[{first.id}] received"
    wait_for(lambda: worker.whole_log().count(received) >= 2, worker=worker)
    assert holder_of(lost_then_retried, token) == first.id
    assert lost_then_retried.delay(token).id == first.id
    wait_for(lambda: any(e["event"] == "end" for e in events()), timeout=20, worker=worker)
    assert [e["retries"] for e in events() if e["event"] == "start"] == [0, 1]


@pytest.mark.worker
def test_a_copy_of_a_message_that_already_ran_to_its_end_is_not_run_again(
    worker: Worker, celery_app: Any, redis_client: redis.Redis, token: str, events: Events
) -> None:
    """The broker delivers a message a second time after its first delivery ran (an
    acknowledgement lost in an outage): the copy carries the same owner token and is
    discarded at its start. A new call of the key still runs."""
    parked = f"parked-{token}"
    first = sleeper.apply_async((token,), queue=parked)
    [raw] = redis_client.lrange(parked, 0, -1)
    celery_app.control.add_consumer(parked, destination=[worker.name], reply=True)
    try:
        wait_for(ended(events), worker=worker)
        redis_client.rpush(parked, raw)  # the copy, once the first delivery ran
        worker.drain(parked)  # the copy has been handled
    finally:
        celery_app.control.cancel_consumer(parked, destination=[worker.name], reply=True)
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id]
    assert f"{first.id}]: this message already ran to its end" in worker.whole_log()
    again = sleeper.delay(token)
    assert not again.duplicate
    wait_for(ended(events, 2), worker=worker)


@pytest.mark.worker
def test_a_copy_is_not_run_again_after_later_calls_of_its_key_ran(
    worker: Worker, celery_app: Any, redis_client: redis.Redis, token: str, events: Events
) -> None:
    """A hot key runs again and again before the broker delivers the copy of an
    earlier message (its acknowledgement lost in an outage): the copy is still
    known as run to its end, not only when its message was the key's last run."""
    parked = f"parked-{token}"
    first = sleeper.apply_async((token,), queue=parked)
    [raw] = redis_client.lrange(parked, 0, -1)
    celery_app.control.add_consumer(parked, destination=[worker.name], reply=True)
    try:
        wait_for(ended(events), worker=worker)
        for runs in (2, 3):  # later messages of the same key, each run to its end
            # Released after the body's "end" event (task_postrun): wait for it.
            wait_for(lambda: holder_of(sleeper, token) is None, worker=worker)
            assert not sleeper.delay(token).duplicate
            wait_for(ended(events, runs), worker=worker)
        redis_client.rpush(parked, raw)  # the copy of the first
        worker.drain(parked)
    finally:
        celery_app.control.cancel_consumer(parked, destination=[worker.name], reply=True)
    assert [e["id"] for e in events() if e["event"] == "start"].count(first.id) == 1
    assert f"{first.id}]: this message already ran to its end" in worker.whole_log()
