"""Idempotent tasks with a real worker: stored outcomes, replays, conflicts."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from celery_unique import IdempotencyConflict
from tests.integration.conftest import Events, Worker, wait_for
from tests.integration.worker_app import idempotent, idempotent_killed, idempotent_short

pytestmark = pytest.mark.worker


def starts(events: Events) -> int:
    return sum(1 for e in events() if e["event"] == "start")


def test_a_duplicate_after_the_run_gets_the_stored_outcome(
    worker: Worker, token: str, events: Events
) -> None:
    first = idempotent.delay(token, amount=5)
    assert first.get(timeout=20) == {"token": token, "charged": 5}
    wait_for(lambda: idempotent.stored_outcome((token,)) is not None, timeout=5)
    again = idempotent.delay(token, amount=5)
    assert again.replayed and again.duplicate and again.id == first.id
    assert again.get() == {"token": token, "charged": 5}
    worker.drain()  # a second run, if any, has happened by now
    assert starts(events) == 1


def test_100_concurrent_calls_with_one_idempotency_key_run_once(
    worker: Any, token: str, events: Events
) -> None:
    handles: list[Any] = []
    lock = threading.Lock()

    def call() -> None:
        result = idempotent.apply_async((token, 7, 0.5), idempotency_key=f"order-{token}")
        with lock:
            handles.append(result)

    threads = [threading.Thread(target=call) for _ in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(handles) == 100
    assert sum(1 for h in handles if not h.duplicate) == 1
    values = [h.get(timeout=20) for h in handles]
    assert values == [{"token": token, "charged": 7}] * 100
    worker.drain()  # a second run, if any, has run by now
    assert starts(events) == 1


def test_redelivery_after_the_outcome_was_stored_does_not_run_again(
    worker: Any, token: str, events: Events
) -> None:
    idempotent_killed.delay(token)
    wait_for(lambda: sum(1 for e in events() if e["event"] == "postrun") >= 2, timeout=30, worker=worker)
    postruns = [e for e in events() if e["event"] == "postrun"]
    assert [p["replayed"] for p in postruns] == [False, True]
    assert [p["state"] for p in postruns] == ["SUCCESS", "SUCCESS"]
    assert postruns[1]["retval"] == postruns[0]["retval"] == {"token": token, "value": 42}
    assert starts(events) == 1  # the body ran once; the redelivery replayed


def test_an_outcome_expires_after_result_ttl(worker: Any, token: str, events: Events) -> None:
    assert idempotent_short.delay(token).get(timeout=20) == token
    # .get() may return before task_postrun has stored the outcome.
    wait_for(lambda: idempotent_short.stored_outcome((token,)) is not None, timeout=5)
    replay = idempotent_short.delay(token)
    assert replay.replayed
    time.sleep(1.3)  # result_ttl is 1 s
    assert idempotent_short.stored_outcome((token,)) is None  # expired
    fresh = idempotent_short.delay(token)
    assert not fresh.duplicate and fresh.get(timeout=20) == token
    assert starts(events) == 2


def test_stored_failures_are_replayed_as_the_same_error(worker: Any, token: str, events: Events) -> None:
    with pytest.raises(Exception, match="no such account"):
        idempotent_short.delay(token, fail=True).get(timeout=20)
    wait_for(lambda: idempotent_short.stored_outcome((token,)) is not None, timeout=5)
    replay = idempotent_short.delay(token, fail=True)
    assert replay.replayed and replay.state == "FAILURE"
    with pytest.raises(KeyError, match="no such account"):
        replay.get()
    assert starts(events) == 1


def test_failures_are_not_stored_by_default(worker: Any, token: str, events: Events) -> None:
    with pytest.raises(ValueError):
        idempotent.delay(token, 3, 0.0, "fail").get(timeout=20)
    wait_for(lambda: idempotent.unique_store().holder(idempotent.unique_lock_key((token,)))[0] is None)
    assert idempotent.stored_outcome((token,)) is None
    with pytest.raises(ValueError):
        idempotent.delay(token, 3, 0.0, "fail").get(timeout=20)
    assert starts(events) == 2


def test_reusing_an_idempotency_key_with_other_arguments_is_a_conflict(worker: Any, token: str) -> None:
    key = f"charge-{token}"
    first = idempotent.apply_async((token, 10, 0.5), idempotency_key=key)
    with pytest.raises(IdempotencyConflict) as in_flight:
        idempotent.apply_async((token, 11, 0.5), idempotency_key=key)
    assert in_flight.value.idempotency_key == key
    assert in_flight.value.stored_digest != in_flight.value.given_digest
    first.get(timeout=20)
    wait_for(lambda: idempotent.stored_outcome(idempotency_key=key) is not None, timeout=5)
    with pytest.raises(IdempotencyConflict):
        idempotent.apply_async((token, 11, 0.5), idempotency_key=key)
    assert idempotent.apply_async((token, 10, 0.5), idempotency_key=key).replayed


def test_a_result_that_is_not_json_is_a_clear_error_and_not_stored(
    worker: Any, token: str, events: Events
) -> None:
    result = idempotent.delay(token, 4, 0.0, "decimal")
    wait_for(lambda: result.state == "SUCCESS", timeout=20)  # the task still ends as it ended
    wait_for(lambda: "not JSON-serialisable" in worker.log_text(), timeout=5)
    assert idempotent.stored_outcome((token,)) is None


def test_forget_lets_the_next_call_run(worker: Any, token: str, events: Events) -> None:
    idempotent.delay(token).get(timeout=20)
    wait_for(lambda: idempotent.stored_outcome((token,)) is not None, timeout=5)
    assert idempotent.forget_outcome((token,))
    assert not idempotent.forget_outcome((token,))
    assert not idempotent.delay(token).duplicate
    wait_for(lambda: starts(events) == 2, timeout=20)


def test_stored_outcomes_are_listed_with_the_locks(worker: Any, celery_app: Any, token: str) -> None:
    from celery_unique.inspect import iter_locks
    from celery_unique.keys import digest_of_key

    first = idempotent.delay(token)
    first.get(timeout=20)
    wait_for(lambda: idempotent.stored_outcome((token,)) is not None, timeout=5)
    found = [lock for lock in iter_locks(celery_app, idempotent.name) if lock.kind == "result"]
    assert [(lock.holder, lock.digest) for lock in found if lock.holder == first.id] == [
        (first.id, digest_of_key(idempotent.unique_lock_key((token,))))
    ]


def test_a_conflict_error_is_never_stored_as_the_outcome(worker: Any, token: str, events: Events) -> None:
    from tests.integration.worker_app import idempotent_conflicting

    first = idempotent_conflicting.delay(token, 1.5)
    wait_for(lambda: starts(events) == 1)
    second = idempotent_conflicting.delay(token, 1.5)  # queued lock free: published; conflicts at start
    assert not second.duplicate
    assert first.get(timeout=20) == "real result"
    wait_for(lambda: idempotent_conflicting.stored_outcome((token,)) is not None, timeout=5)
    stored = idempotent_conflicting.stored_outcome((token,))
    assert stored is not None and stored.state == "SUCCESS" and stored.result == "real result"
    assert idempotent_conflicting.delay(token, 1.5).get(timeout=5) == "real result"


def test_identical_calls_with_tuples_replay_without_a_conflict(worker: Any, token: str) -> None:
    from tests.integration.worker_app import idempotent_tuple

    key = f"pair-{token}"
    first = idempotent_tuple.apply_async((token, (1, 2)), idempotency_key=key)
    assert first.get(timeout=20) == [1, 2]
    wait_for(lambda: idempotent_tuple.stored_outcome(idempotency_key=key) is not None, timeout=5)
    again = idempotent_tuple.apply_async((token, (1, 2)), idempotency_key=key)
    assert again.replayed and again.get() == [1, 2]


def test_conflicts_are_detected_for_the_whole_of_a_long_run(worker: Any, token: str) -> None:
    from tests.integration.worker_app import idempotent_long

    key = f"long-{token}"
    first = idempotent_long.apply_async((token, 1, 3.0), idempotency_key=key)
    time.sleep(2.2)  # twice the 1 s lock_timeout: renewed, with its argument digest
    lock = idempotent_long.unique_lock_key((token, 1, 3.0), idempotency_key=key)
    holder, ttl = idempotent_long.unique_store().holder(lock)
    assert holder == first.id and ttl is not None and ttl <= 1.0  # past its first TTL: renewed
    with pytest.raises(IdempotencyConflict):
        idempotent_long.apply_async((token, 2, 3.0), idempotency_key=key)
    assert first.get(timeout=20) == 1


def test_by_name_idempotent_run_leaves_no_lock(
    worker: Any, celery_app: Any, token: str, events: Events
) -> None:
    celery_app.send_task("tests.idempotent", (token, 1, 0.3, "fail"))
    wait_for(lambda: starts(events) == 1, timeout=10)
    # The worker took the lock itself (no header), so it must give it back.
    assert idempotent.unique_store().holder(idempotent.unique_lock_key((token,)))[0] is not None
    wait_for(
        lambda: idempotent.unique_store().holder(idempotent.unique_lock_key((token,)))[0] is None, timeout=10
    )
    assert not idempotent.delay(token).duplicate


def test_a_retried_call_with_tuples_replays_without_a_conflict(worker: Any, token: str) -> None:
    from tests.integration.worker_app import idempotent_retry_tuple

    key = f"retried-{token}"
    first = idempotent_retry_tuple.apply_async((token, (3, 4)), idempotency_key=key)
    assert first.get(timeout=20) == [3, 4]
    wait_for(lambda: idempotent_retry_tuple.stored_outcome(idempotency_key=key) is not None, timeout=5)
    assert idempotent_retry_tuple.apply_async((token, (3, 4)), idempotency_key=key).replayed


def test_a_message_that_waited_past_its_lock_timeout_still_guards_its_arguments(
    worker: Any, celery_app: Any, token: str, events: Events, redis_client: Any
) -> None:
    """The message waits in a queue no worker reads until its 1 s lock and argument digest
    have expired; its run takes the lock again and must restore the digest with it."""
    from celery_unique.keys import args_key, family_of
    from tests.integration.worker_app import idempotent_long

    key = f"parked-{token}"
    parked = f"parked-{token}"
    first = idempotent_long.apply_async((token, 1, 3.0), idempotency_key=key, queue=parked)
    lock = idempotent_long.unique_lock_key(idempotency_key=key)
    wait_for(lambda: not redis_client.exists(lock, args_key(family_of(lock))), timeout=10)
    celery_app.control.add_consumer(parked, destination=[worker.name], reply=True)
    try:
        wait_for(lambda: starts(events) == 1, timeout=20, worker=worker)
        with pytest.raises(IdempotencyConflict):
            idempotent_long.apply_async((token, 2, 3.0), idempotency_key=key)
        assert first.get(timeout=20) == 1
    finally:
        celery_app.control.cancel_consumer(parked, destination=[worker.name], reply=True)
