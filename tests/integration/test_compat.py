"""celery-once and celery-singleton users' expectations, on celery-unique's locks.

Written from those packages' documented behaviour (no code copied).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery, states

from celery_unique.compat import AlreadyQueued, QueueOnce, Singleton
from celery_unique.conf import get_conf
from celery_unique.exceptions import DuplicateTaskError


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
