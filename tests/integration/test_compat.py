"""celery-once and celery-singleton users' expectations, on celery-unique's locks.

Written from those packages' documented behaviour (no code copied).
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery, states

from celery_unique import exceptions
from celery_unique.compat import AlreadyQueued, QueueOnce, Singleton
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError, DuplicateTaskError
from tests.integration import compat_app
from tests.integration.compat_app import once, once_unlocked, singleton
from tests.integration.conftest import Events, Worker, wait_for
from tests.integration.worker_app import open_gate


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("compat", broker=redis_url, set_as_current=False)
    app.conf.task_default_queue = f"compat-{uuid.uuid4().hex[:8]}"
    yield app
    get_conf(app).close()
    app.close()


@pytest.fixture
def item() -> str:
    return uuid.uuid4().hex


# -- celery-once ---------------------------------------------------------------


def test_queue_once_raises_already_queued_with_a_countdown(app: Celery, item: str) -> None:
    @app.task(base=QueueOnce, shared=False, name="compat.once")
    def job(value: str) -> None: ...

    first = job.delay(item)
    with pytest.raises(AlreadyQueued) as info:
        job.delay(item)
    assert info.value.existing_id == first.id
    assert info.value.countdown is not None and 3590 < info.value.countdown <= 3600
    assert isinstance(info.value, DuplicateTaskError)


def test_already_queued_lives_with_the_other_errors_and_pickles() -> None:
    assert AlreadyQueued is exceptions.AlreadyQueued
    error = AlreadyQueued("proj.refresh", "ab" * 32, "task-id", 12.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is AlreadyQueued and str(copy) == str(error) and vars(copy) == vars(error)
    assert copy.countdown == 12.5 and copy.existing_id == "task-id"


def test_queue_once_graceful_returns_a_rejected_result(app: Celery, item: str) -> None:
    @app.task(base=QueueOnce, shared=False, name="compat.once_graceful", once={"graceful": True})
    def job(value: str) -> None: ...

    job.delay(item)
    again = job.delay(item)
    assert again.state == states.REJECTED and again.id is None


def test_queue_once_graceful_and_timeout_per_call(app: Celery, item: str) -> None:
    @app.task(base=QueueOnce, shared=False, name="compat.once_call")
    def job(value: str) -> None: ...

    job.apply_async((item,), once={"timeout": 30})
    assert job.unique_store().holder(job.unique_lock_key((item,)))[1] <= 30
    assert job.apply_async((item,), once={"graceful": True}).state == states.REJECTED


def test_queue_once_keys_and_timeout(app: Celery, item: str) -> None:
    @app.task(base=QueueOnce, shared=False, name="compat.once_keys", once={"keys": ["a"], "timeout": 60})
    def job(a: str, b: int) -> None: ...

    job.delay(item, 1)
    with pytest.raises(AlreadyQueued):
        job.delay(item, 2)  # b is not part of the key
    assert job.unique_store().holder(job.unique_lock_key((item, 1)))[1] <= 60
    assert job.unique_lifetime == "until_executed"


def test_queue_once_unlock_before_run_releases_at_start(app: Celery) -> None:
    @app.task(base=QueueOnce, shared=False, name="compat.once_unlock", once={"unlock_before_run": True})
    def job(value: str) -> None: ...

    assert job.unique_lifetime == "until_executing"


def test_queue_once_default_timeout_from_the_once_setting(app: Celery, item: str) -> None:
    app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"default_timeout": 40}}

    @app.task(base=QueueOnce, shared=False, name="compat.once_default")
    def job(value: str) -> None: ...

    @app.task(base=QueueOnce, shared=False, name="compat.once_own", once={"timeout": 20})
    def own(value: str) -> None: ...

    job.delay(item)
    assert 35 < job.unique_store().holder(job.unique_lock_key((item,)))[1] <= 40
    own.delay(item)
    assert own.unique_store().holder(own.unique_lock_key((item,)))[1] <= 20  # the task's own wins


@pytest.mark.parametrize(
    ("base", "peer_setting"),
    [
        (QueueOnce, {"ONCE": {"settings": {"default_timeout": 40}}}),
        (Singleton, {"singleton_lock_expiry": 40}),
    ],
)
def test_our_lock_timeout_setting_wins_over_the_peers_default(
    app: Celery, item: str, base: type, peer_setting: dict[str, Any]
) -> None:
    app.conf.update(unique_lock_timeout=25, **peer_setting)

    @app.task(base=base, shared=False, name=f"compat.{base.__name__}.ours_wins")
    def job(value: str) -> None: ...

    job.delay(item)
    ttl = job.unique_store().holder(job.unique_lock_key((item,)))[1]
    assert ttl is not None and 20 < ttl <= 25


def test_a_worker_refuses_a_peer_lock_location_it_would_ignore(app: Celery) -> None:
    from celery_unique.checks import configuration_errors

    app.conf.singleton_backend_url = "redis://:hunter2@127.0.0.1:1/0"

    @app.task(base=Singleton, shared=False, name="compat.singleton_startup")
    def job(value: str) -> None: ...

    [error] = configuration_errors(app)
    assert str(error).startswith("compat.singleton_startup: singleton_backend_url is set")
    assert "hunter2" not in str(error)


def spellings(url: str) -> list[str]:
    """``url`` (a Redis URL with a host and port), spelt in ways that name the same database."""
    parsed = urlsplit(url)
    base = f"{parsed.scheme}://{parsed.netloc}"
    database = int(parsed.path.strip("/") or 0)
    found = [url, f"{base}/{database}/", f"{base}/?db={database}"]
    return found + ([base, f"{base}/"] if database == 0 else [])


def test_queue_once_url_of_the_broker_redis_is_accepted_in_any_spelling(
    app: Celery, item: str, redis_url: str
) -> None:
    for n, spelling in enumerate(spellings(redis_url)):
        app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": spelling}}

        @app.task(base=QueueOnce, shared=False, name=f"compat.once_same_url{n}")
        def job(value: str) -> None: ...

        job.delay(item)
        with pytest.raises(AlreadyQueued):
            job.delay(item)


def test_queue_once_url_of_another_redis_is_refused(app: Celery, item: str) -> None:
    other = "redis://:hunter2@127.0.0.1:1/0"
    app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": other}}

    @app.task(base=QueueOnce, shared=False, name="compat.once_other_url")
    def job(value: str) -> None: ...

    with pytest.raises(ConfigurationError) as raised:
        job.delay(item)
    message = str(raised.value)
    assert 'ONCE["settings"]["url"]' in message and "unique_redis_url" in message
    assert "hunter2" not in message
    assert job.unique_store().holder(job.unique_lock_key((item,)))[0] is None  # nothing taken

    app.conf.unique_redis_url = app.conf.broker_url  # chosen explicitly: the peer's is not used
    get_conf(app).reload()
    job.delay(item)
    assert job.unique_store().holder(job.unique_lock_key((item,)))[0] is not None


# -- celery-singleton ------------------------------------------------------------


def test_singleton_returns_the_existing_result(app: Celery, item: str) -> None:
    @app.task(base=Singleton, shared=False, name="compat.singleton")
    def job(value: str) -> None: ...

    first = job.delay(item)
    assert job.delay(item).id == first.id


def test_singleton_raise_on_duplicate_carries_the_task_id(app: Celery, item: str) -> None:
    @app.task(base=Singleton, shared=False, name="compat.singleton_raise", raise_on_duplicate=True)
    def job(value: str) -> None: ...

    first = job.delay(item)
    with pytest.raises(DuplicateTaskError) as info:
        job.delay(item)
    assert info.value.task_id == first.id


def test_singleton_unique_on_and_settings(app: Celery, item: str) -> None:
    app.conf.update(singleton_raise_on_duplicate=True, singleton_lock_expiry=45)

    @app.task(base=Singleton, shared=False, name="compat.singleton_on", unique_on=["a"])
    def job(a: str, b: int) -> None: ...

    job.delay(item, 1)
    with pytest.raises(DuplicateTaskError):
        job.delay(a=item, b=2)
    assert job.unique_store().holder(job.unique_lock_key((item, 1)))[1] <= 45


def test_singleton_lock_expiry_attribute(app: Celery, item: str) -> None:
    @app.task(base=Singleton, shared=False, name="compat.singleton_expiry", lock_expiry=20)
    def job(value: str) -> None: ...

    job.delay(item)
    assert job.unique_store().holder(job.unique_lock_key((item,)))[1] <= 20


@pytest.mark.parametrize(
    ("setting", "value", "ours"),
    [
        ("singleton_backend_url", "redis://:hunter2@127.0.0.1:1/0", "unique_redis_url"),
        ("singleton_key_prefix", "SINGLETONLOCK_", "unique_key_prefix"),
    ],
)
def test_singleton_lock_location_settings_are_refused_unless_ours_is_set(
    app: Celery, item: str, setting: str, value: str, ours: str
) -> None:
    app.conf[setting] = value

    @app.task(base=Singleton, shared=False, name="compat.singleton_location")
    def job(value: str) -> None: ...

    with pytest.raises(ConfigurationError) as raised:
        job.delay(item)
    assert setting in str(raised.value) and ours in str(raised.value)
    assert "hunter2" not in str(raised.value)

    app.conf[ours] = app.conf.broker_url if ours == "unique_redis_url" else "migrated"
    get_conf(app).reload()
    first = job.delay(item)
    assert job.delay(item).id == first.id


def test_singleton_lock_location_settings_equal_to_ours_are_accepted(
    app: Celery, item: str, redis_url: str
) -> None:
    for n, spelling in enumerate(spellings(redis_url)):
        app.conf.update(singleton_backend_url=spelling, singleton_key_prefix="celery_unique")

        @app.task(base=Singleton, shared=False, name=f"compat.singleton_same_location{n}")
        def job(value: str) -> None: ...

        first = job.delay(item)
        assert job.delay(item).id == first.id


# -- with a worker -----------------------------------------------------------------
#
# The tasks of tests/integration/compat_app.py wait at a gate (a Redis key the
# test sets) between their "start" and "end" events, so "while running" holds
# for as long as the test needs, whatever the machine's speed.

WAIT = 60.0  # seconds: generous, the machine may be busy


@pytest.fixture(scope="module")
def compat_worker(celery_app: Celery, redis_url: str) -> Iterator[Worker]:
    queue = compat_app.QUEUE
    with Worker(redis_url, "compat", "--queues", queue, app="tests.integration.compat_app") as started:
        yield started


def holder(task: Any, token: str) -> str | None:
    found: str | None = task.unique_store().holder(task.unique_lock_key((token,)))[0]
    return found


def seen(events: Events, event: str, count: int = 1) -> Callable[[], bool]:
    return lambda: len([e for e in events() if e["event"] == event]) >= count


@pytest.mark.worker
def test_queue_once_lock_is_gone_after_the_run(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = once.delay(token)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    with pytest.raises(AlreadyQueued) as info:
        once.delay(token)
    assert info.value.existing_id == first.id
    open_gate(redis_client, token)
    wait_for(seen(events, "end"), timeout=WAIT, worker=compat_worker)
    wait_for(lambda: holder(once, token) is None, timeout=WAIT, worker=compat_worker)

    again = once.delay(token)
    assert again.id != first.id
    wait_for(seen(events, "end", 2), timeout=WAIT, worker=compat_worker)
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id, again.id]
    wait_for(lambda: holder(once, token) is None, timeout=WAIT, worker=compat_worker)


@pytest.mark.worker
def test_queue_once_unlock_before_run_frees_the_lock_when_the_run_starts(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = once_unlocked.delay(token)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    assert holder(once_unlocked, token) is None  # released before the body began
    second = once_unlocked.delay(token)  # no AlreadyQueued
    assert second.id != first.id
    assert not seen(events, "end")()  # the first run is still at its gate
    open_gate(redis_client, token)
    wait_for(seen(events, "end", 2), timeout=WAIT, worker=compat_worker)
    assert {e["id"] for e in events() if e["event"] == "end"} == {first.id, second.id}


@pytest.mark.worker
def test_singleton_returns_the_running_task_then_a_new_one(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = singleton.delay(token)
    queued = singleton.delay(token)
    assert (queued.id, queued.duplicate) == (first.id, True)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    running = singleton.delay(token)
    assert (running.id, running.duplicate) == (first.id, True)
    open_gate(redis_client, token)
    assert running.get(timeout=WAIT) == 0  # the existing handle gives the run's result
    wait_for(lambda: holder(singleton, token) is None, timeout=WAIT, worker=compat_worker)

    after = singleton.delay(token)
    assert after.id != first.id and not after.duplicate
    assert after.get(timeout=WAIT) == 0
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id, after.id]


@pytest.mark.worker
@pytest.mark.parametrize("task", [once, singleton], ids=["QueueOnce", "Singleton"])
def test_a_retry_is_not_its_own_duplicate(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis, task: Any
) -> None:
    first = task.delay(token, retry=True)
    wait_for(seen(events, "start", 2), timeout=WAIT, worker=compat_worker)
    starts = [(e["id"], e["retries"]) for e in events() if e["event"] == "start"]
    assert starts == [(first.id, 0), (first.id, 1)]
    assert holder(task, token) == first.id  # the retry kept the lock: new calls are its duplicates
    open_gate(redis_client, token)
    assert first.get(timeout=WAIT) == 1
    wait_for(lambda: holder(task, token) is None, timeout=WAIT, worker=compat_worker)
