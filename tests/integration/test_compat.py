"""celery-once and celery-singleton users' expectations, on celery-unique's locks.

Written from those packages' documented behaviour (no code copied).
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery, states

from celery_unique import UniqueTask, exceptions
from celery_unique.compat import AlreadyQueued, QueueOnce, Singleton, clear_locks
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError, DuplicateTaskError, LockBackendError, UniqueKeyError
from celery_unique.testing import RedisServer
from tests.integration import compat_app, compat_location_app
from tests.integration.compat_app import (
    once,
    once_expiring,
    once_graceful,
    once_unlocked,
    singleton,
    singleton_expiring,
    singleton_raising,
)
from tests.integration.conftest import Events, Worker, lock_holder, wait_for
from tests.integration.results import polling_backend_url
from tests.integration.worker_app import finished_key, open_gate


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
    error = AlreadyQueued(12.5, "proj.refresh", "ab" * 32, "task-id")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is AlreadyQueued and str(copy) == str(error) and vars(copy) == vars(error)
    assert copy.countdown == 12.5 and copy.existing_id == "task-id"
    assert "task-id" in str(error)


def test_already_queued_is_built_as_celery_once_builds_it() -> None:
    """Tests written for celery-once build it themselves (to stub a duplicate, say)."""
    for error in (AlreadyQueued(10), AlreadyQueued(countdown=10)):
        assert error.countdown == 10 and error.message == "Expires in 10 seconds" == str(error)
        assert isinstance(error, DuplicateTaskError) and error.existing_id == ""
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is AlreadyQueued and str(copy) == str(error) and vars(copy) == vars(error)
    with pytest.raises(AlreadyQueued) as raised:
        raise AlreadyQueued(2.5)
    assert raised.value.countdown == 2.5


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


class UUIDAsText(json.JSONEncoder):
    """A celery-singleton ``singleton_json_encoder_class``: a UUID is written as its text."""

    def default(self, o: Any) -> Any:
        return str(o) if isinstance(o, uuid.UUID) else super().default(o)


@pytest.mark.parametrize("encoder", [UUIDAsText, f"{__name__}.UUIDAsText"], ids=["class", "path"])
def test_singleton_json_encoder_class_decides_which_calls_are_the_same(
    app: Celery, encoder: Any, item: str
) -> None:
    app.conf.singleton_json_encoder_class = encoder

    @app.task(base=Singleton, shared=False, name="compat.singleton_encoder", unique_on=["ident"])
    def job(ident: Any, note: str = "") -> None: ...

    ident = uuid.UUID(item)
    first = job.delay(ident)
    assert job.delay(str(ident), note="another").id == first.id  # written alike: one call
    assert job.delay(ident.hex).id != first.id
    with pytest.raises(UniqueKeyError, match="singleton_json_encoder_class cannot write"):
        job.delay(object())


def test_without_an_encoder_singleton_keys_keep_their_types(app: Celery, item: str) -> None:
    @app.task(base=Singleton, shared=False, name="compat.singleton_typed")
    def job(ident: Any) -> None: ...

    ident = uuid.UUID(item)
    first = job.delay(ident)
    assert job.delay(str(ident)).id != first.id


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (
            {"singleton_backend_class": "myproject.locks.MemcachedBackend"},
            "singleton_backend_class is 'myproject",
        ),
        (
            {"singleton_backend_class": ConfigurationError},
            "singleton_backend_class is 'celery_unique.exceptions",
        ),
        ({"singleton_backend_kwargs": {"password": "hunter2"}}, "singleton_backend_kwargs is set"),
        ({"singleton_json_encoder_class": "json.NoSuchEncoder"}, "singleton_json_encoder_class 'json.NoSuch"),
        ({"singleton_json_encoder_class": dict}, "singleton_json_encoder_class must be a json.JSONEncoder"),
    ],
)
def test_singleton_settings_that_cannot_be_honoured_are_refused(
    app: Celery, item: str, settings: dict[str, Any], said: str
) -> None:
    from celery_unique.checks import configuration_errors

    app.conf.update(settings)

    @app.task(base=Singleton, shared=False, name="compat.singleton_refused")
    def job(value: str) -> None: ...

    @app.task(base=Singleton, shared=False, name="compat.singleton_refused_too")
    def other(value: str) -> None: ...

    with pytest.raises(ConfigurationError) as raised:
        job.delay(item)
    assert str(raised.value).startswith(said) and "hunter2" not in str(raised.value)
    assert [str(error) for error in configuration_errors(app)] == [str(raised.value)]  # said once


def test_celery_singletons_own_backend_is_accepted(app: Celery, item: str) -> None:
    class RedisBackend:  # celery-singleton's, as its class (it is not installed here)
        __module__ = "celery_singleton.backends.redis"
        __qualname__ = "RedisBackend"

    for n, backend in enumerate(("celery_singleton.backends.redis.RedisBackend", RedisBackend, None)):
        app.conf.update(singleton_backend_class=backend, singleton_backend_kwargs={})
        get_conf(app).reload()

        @app.task(base=Singleton, shared=False, name=f"compat.singleton_backend{n}")
        def job(value: str) -> None: ...

        first = job.delay(item)
        assert job.delay(item).id == first.id


# -- where the locks live ------------------------------------------------------------
#
# The peers' settings that say where locks live are honoured: a project whose
# locks are away from the broker's Redis changes its imports only.


@pytest.fixture(scope="module")
def other_redis() -> Iterator[str]:
    """A Redis server of its own: the peers' lock location, away from the broker's."""
    with RedisServer() as server:
        yield server.url


def held_in(url: str, key: str) -> str | None:
    """The task id holding lock ``key`` in the Redis at ``url``."""
    with redis.Redis.from_url(url) as client:
        return lock_holder(client, key)


def test_queue_once_takes_its_locks_in_the_redis_of_the_once_url(
    app: Celery, item: str, other_redis: str, redis_client: redis.Redis
) -> None:
    app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": other_redis}}

    @app.task(base=QueueOnce, shared=False, name="compat.once_other_url")
    def job(value: str) -> None: ...

    first = job.delay(item)
    key = job.unique_lock_key((item,))
    assert held_in(other_redis, key) == first.id
    assert not redis_client.exists(key)  # not in the broker's
    with pytest.raises(AlreadyQueued) as info:
        job.delay(item)
    assert info.value.existing_id == first.id


def test_singleton_takes_its_locks_in_the_backend_url_redis_under_its_prefix(
    app: Celery, item: str, other_redis: str, redis_client: redis.Redis
) -> None:
    app.conf.update(singleton_backend_url=other_redis, singleton_key_prefix="SINGLETONLOCK_")

    @app.task(base=Singleton, shared=False, name="compat.singleton_other_location")
    def job(value: str) -> None: ...

    first = job.delay(item)
    key = job.unique_lock_key((item,))
    assert key.startswith("SINGLETONLOCK_:v1:{compat.singleton_other_location:")
    assert held_in(other_redis, key) == first.id
    assert not redis_client.exists(key)
    assert job.delay(item).id == first.id


def test_the_peer_settings_of_one_class_leave_the_other_and_unique_tasks_alone(
    app: Celery, item: str, other_redis: str, redis_client: redis.Redis
) -> None:
    app.conf.update(singleton_backend_url=other_redis, singleton_key_prefix="SINGLETONLOCK_")

    @app.task(base=QueueOnce, shared=False, name="compat.once_beside_singleton")
    def job(value: str) -> None: ...

    @app.task(base=UniqueTask, shared=False, name="compat.unique_beside_singleton")
    def plain(value: str) -> None: ...

    for task in (job, plain):
        first = task.delay(item)
        key = task.unique_lock_key((item,))
        assert key.startswith("celery_unique:") and lock_holder(redis_client, key) == first.id


def test_our_lock_location_settings_win_over_the_peers_and_say_so(
    app: Celery, item: str, other_redis: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    secret_url = other_redis.replace("redis://", "redis://:hunter2@")
    app.conf.update(
        unique_redis_url=app.conf.broker_url,
        unique_key_prefix="ours",
        singleton_backend_url=secret_url,
        singleton_key_prefix="SINGLETONLOCK_",
    )

    @app.task(base=Singleton, shared=False, name="compat.singleton_ours_win")
    def job(value: str) -> None: ...

    with caplog.at_level(logging.WARNING, logger="celery_unique.compat"):
        first = job.delay(item)
        job.delay(item)
    key = job.unique_lock_key((item,))
    assert key.startswith("ours:") and lock_holder(redis_client, key) == first.id
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 2  # once each, not on every call
    assert said[0].startswith("singleton_backend_url is set, but so is unique_redis_url, which wins")
    assert said[1].startswith("singleton_key_prefix is set, but so is unique_key_prefix, which wins")
    assert "hunter2" not in " ".join(said)


def test_celery_unique_commands_list_and_release_locks_where_the_peers_settings_put_them(
    app: Celery, item: str, other_redis: str, redis_client: redis.Redis
) -> None:
    """What ``celery unique locks`` and ``release`` call, on the app's places and the peers'."""
    from celery_unique.inspect import force_release, iter_locks

    app.conf.update(singleton_backend_url=other_redis, singleton_key_prefix="SINGLETONLOCK_")

    @app.task(base=Singleton, shared=False, name="compat.singleton_listed")
    def job(value: str) -> None: ...

    @app.task(base=UniqueTask, shared=False, name="compat.unique_listed")
    def plain(value: str) -> None: ...

    ours, theirs = plain.delay(item), job.delay(item)
    [found] = iter_locks(app, job.name)
    assert (found.holder, found.key, found.lifetime) == (
        theirs.id,
        job.unique_lock_key((item,)),
        "until_executed",
    )
    listed = {lock.key: lock.holder for lock in iter_locks(app) if lock.holder in (ours.id, theirs.id)}
    assert listed[job.unique_lock_key((item,))] == theirs.id
    assert listed[plain.unique_lock_key((item,))] == ours.id
    assert force_release(app, found.key) and held_in(other_redis, found.key) is None
    assert force_release(app, plain.unique_lock_key((item,)))
    assert not redis_client.exists(plain.unique_lock_key((item,)))
    with pytest.raises(ValueError, match="not a celery-unique lock key"):
        force_release(app, found.key.replace("SINGLETONLOCK_", "celery_unique"))  # not where it lives


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"singleton_backend_url": "mongodb://:hunter2@127.0.0.1/0"}, "singleton_backend_url"),
        ({"singleton_backend_url": "redis://:hunter2@127.0.0.1:63x79/0"}, "singleton_backend_url"),
        ({"singleton_backend_url": 6379}, "singleton_backend_url"),
        ({"singleton_key_prefix": "SINGLETON{LOCK}"}, "singleton_key_prefix"),
        (
            {"ONCE": {"settings": {"url": "redis://:hunter2@127.0.0.1:6379/hunter2"}}},
            'ONCE["settings"]["url"]',
        ),
    ],
)
def test_an_unusable_peer_lock_location_is_refused_without_its_secret(
    app: Celery, item: str, settings: dict[str, Any], named: str
) -> None:
    from celery_unique.checks import configuration_errors

    app.conf.update(settings)
    base = QueueOnce if "ONCE" in settings else Singleton

    @app.task(base=base, shared=False, name="compat.unusable_location")
    def job(value: str) -> None: ...

    with pytest.raises(ConfigurationError) as raised:
        job.delay(item)
    assert str(raised.value).startswith(named) and "hunter2" not in str(raised.value)
    [error] = configuration_errors(app)  # and a worker refuses to start
    assert str(error) == str(raised.value)


@pytest.mark.parametrize("base", [QueueOnce, Singleton])
def test_a_compat_task_connects_to_its_redis_only_to_take_a_lock(app: Celery, item: str, base: type) -> None:
    """A cluster client connects as it is made: not while a key is built or the task checked,
    and an unreachable cluster is a LockBackendError of delay(), as for any unique task."""
    from celery_unique.checks import configuration_errors

    app.conf.unique_redis_url = "redis+cluster://127.0.0.1:1"  # nothing listens there

    @app.task(base=base, shared=False, name=f"compat.{base.__name__}.lazy")
    def job(value: str) -> None: ...

    assert job.unique_lock_key((item,)).startswith("celery_unique:")
    assert not [error for error in configuration_errors(app) if error.args[0].startswith(job.name)]
    with pytest.raises(LockBackendError):
        job.delay(item)


@pytest.mark.parametrize("base", [QueueOnce, Singleton])
def test_a_peer_redis_that_fails_is_the_one_named(app: Celery, item: str, base: type) -> None:
    """The error names where the compat task keeps its locks (the peer's Redis), not the
    app's; a timeout's own message names no server."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        peer = f"redis://:peer-secret@127.0.0.1:{port}/0"
        app.conf.update(
            ONCE={"settings": {"url": peer}},
            singleton_backend_url=peer,
            unique_redis_socket_timeout=0.3,
            unique_redis_connect_timeout=0.3,
        )

        @app.task(base=base, shared=False, name=f"compat.{base.__name__}.down")
        def job(value: str) -> None: ...

        with pytest.raises(LockBackendError) as raised:
            job.delay(item)
    said = str(raised.value)
    assert f"127.0.0.1:{port}" in said and "peer-secret" not in said, said


def test_the_startup_checks_look_at_a_peers_redis_too(app: Celery) -> None:
    from celery_unique.checks import check_eviction

    with RedisServer("--maxmemory-policy", "allkeys-lru") as evicting:
        app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": evicting.url}}

        @app.task(base=QueueOnce, shared=False, name="compat.once_evicting")
        def job(value: str) -> None: ...

        try:
            [finding] = check_eviction(app)
        finally:
            get_conf(app).close()
    assert finding.id == "eviction" and "maxmemory-policy allkeys-lru" in finding.message


def test_an_app_whose_locks_all_live_in_a_peers_redis_needs_no_redis_of_its_own(
    item: str, other_redis: str
) -> None:
    """celery-once's Redis URL with a broker that is not Redis: a worker starts."""
    from celery_unique.checks import configuration_errors
    from celery_unique.inspect import iter_locks

    app = Celery("compat-amqp", broker="amqp://guest@127.0.0.1:1//", set_as_current=False)
    app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": other_redis}}
    try:

        @app.task(base=QueueOnce, shared=False, name="compat.once_amqp")
        def job(value: str) -> None: ...

        for name, task in list(app.tasks.items()):  # the suite's shared tasks join every app
            if name != job.name and isinstance(task, UniqueTask):
                del app.tasks[name]
        assert configuration_errors(app) == []
        key = job.unique_lock_key((item,))
        assert job.unique_store().acquire(key, "owner", 60_000).acquired  # in the peer's Redis
        assert held_in(other_redis, key) == "owner"
        assert [lock.holder for lock in iter_locks(app) if lock.task_name == job.name] == ["owner"]

        def plain(value: str) -> None: ...

        for name in ("compat.unique_amqp", "compat.unique_amqp_too"):
            app.task(base=UniqueTask, shared=False, name=name)(plain)
        [error] = configuration_errors(app)  # said once, for the tasks that need it
        assert str(error).startswith("celery-unique needs a Redis")
    finally:
        get_conf(app).close()
        app.close()


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
        assert job.unique_store() is get_conf(app).locks  # one client


def test_singleton_lock_location_settings_equal_to_ours_are_accepted(
    app: Celery, item: str, redis_url: str
) -> None:
    for n, spelling in enumerate(spellings(redis_url)):
        app.conf.update(singleton_backend_url=spelling, singleton_key_prefix="celery_unique")

        @app.task(base=Singleton, shared=False, name=f"compat.singleton_same_location{n}")
        def job(value: str) -> None: ...

        first = job.delay(item)
        assert job.delay(item).id == first.id
        assert job.unique_store() is get_conf(app).locks


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


def finished(redis_client: redis.Redis, task_id: str) -> Callable[[], bool]:
    """Whether the worker's task_postrun for ``task_id`` is done (celery-unique's release among it)."""
    return lambda: bool(redis_client.exists(finished_key(task_id)))


def seen(events: Events, event: str, count: int = 1, of: str | None = None) -> Callable[[], bool]:
    """Whether ``event`` was recorded ``count`` times for the test's token (or ``of``)."""
    return lambda: len([e for e in events(of) if e["event"] == event]) >= count


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


@pytest.mark.worker
def test_queue_once_keys_and_already_queued_countdown(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    """once={"keys": ["token"]}: calls differing in other arguments are one; the
    AlreadyQueued of a duplicate tells the seconds its lock has left."""
    first = once.delay(token, note="first")
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    with pytest.raises(AlreadyQueued) as info:
        once.delay(token, note="another")
    assert info.value.existing_id == first.id
    assert info.value.countdown is not None and 3500 < info.value.countdown <= 3600  # celery-once's hour
    other = once.delay(f"{token}-other")  # another key: queued beside it
    open_gate(redis_client, token)
    open_gate(redis_client, f"{token}-other")
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=compat_worker)
    wait_for(finished(redis_client, other.id), timeout=WAIT, worker=compat_worker)
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id]
    assert holder(once, token) is None


@pytest.mark.worker
def test_queue_once_graceful_returns_none_for_a_running_duplicate(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = once_graceful.delay(token)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    again = once_graceful.delay(token)
    assert (again.id, again.state, again.result) == (None, states.REJECTED, None)  # nothing published
    open_gate(redis_client, token)
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=compat_worker)
    after = once_graceful.delay(token)
    assert after.id not in (None, first.id)
    wait_for(finished(redis_client, after.id), timeout=WAIT, worker=compat_worker)
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id, after.id]


@pytest.mark.worker
def test_singleton_unique_on_returns_the_running_task_for_other_arguments(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = singleton.delay(token, note="first")
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    same = singleton.delay(token=token, note="another")
    assert (same.id, same.duplicate) == (first.id, True)
    open_gate(redis_client, token)
    assert same.get(timeout=WAIT) == 0  # the first run's result
    assert [e["id"] for e in events() if e["event"] == "start"] == [first.id]


@pytest.mark.worker
def test_singleton_raise_on_duplicate_names_the_running_task(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis
) -> None:
    first = singleton_raising.delay(token)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    with pytest.raises(DuplicateTaskError) as info:
        singleton_raising.delay(token, note="another")
    assert info.value.task_id == first.id  # celery-singleton's attribute
    open_gate(redis_client, token)
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=compat_worker)
    after = singleton_raising.delay(token)
    assert after.id != first.id and after.get(timeout=WAIT) == 0


@pytest.mark.worker
@pytest.mark.parametrize(
    "task", [once_expiring, singleton_expiring], ids=["QueueOnce-timeout", "Singleton-lock_expiry"]
)
def test_the_peers_timeout_is_an_expiry_even_while_the_task_runs(
    compat_worker: Worker, token: str, events: Events, redis_client: redis.Redis, task: Any
) -> None:
    """As celery-once's timeout and celery-singleton's lock_expiry: the lock is not
    renewed, so an identical task may be queued once it expired, the first still running."""
    first = task.delay(token)
    wait_for(seen(events, "start"), timeout=WAIT, worker=compat_worker)
    ttl = task.unique_store().holder(task.unique_lock_key((token,)))[1]
    assert ttl is not None and ttl <= 2
    wait_for(lambda: holder(task, token) is None, timeout=WAIT, worker=compat_worker)  # expired
    second = task.delay(token)  # neither AlreadyQueued nor the first's result
    assert second.id not in (None, first.id)
    assert holder(task, token) == second.id
    open_gate(redis_client, token)
    wait_for(seen(events, "end", 2), timeout=WAIT, worker=compat_worker)
    assert {e["id"] for e in events() if e["event"] == "end"} == {first.id, second.id}
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=compat_worker)
    wait_for(finished(redis_client, second.id), timeout=WAIT, worker=compat_worker)
    assert holder(task, token) is None


def scheduled_ids(app: Celery) -> set[str]:
    """The ids of the tasks the live workers have scheduled (an eta, a countdown)."""
    replies = app.control.inspect(timeout=0.5).scheduled() or {}
    return {entry["request"]["id"] for entries in replies.values() for entry in entries}


@pytest.mark.worker
def test_clear_locks_frees_the_locks_no_live_worker_holds(
    compat_worker: Worker, celery_app: Celery, token: str, events: Events, redis_client: redis.Redis
) -> None:
    from celery_unique.locks import new_owner

    running, scheduled, queued, orphaned = (f"{token}-{n}" for n in range(4))
    nobody = f"nobody-{token}"  # a queue no worker consumes: a message the workers cannot see
    first = singleton.delay(running)
    later = singleton.apply_async((scheduled,), countdown=600)
    waiting = singleton.apply_async((queued,), queue=nobody)
    store = singleton.unique_store()
    assert store.acquire(
        singleton.unique_lock_key((orphaned,)), new_owner("lost-in-a-crash"), 600_000
    ).acquired
    try:
        wait_for(seen(events, "start", of=running), timeout=WAIT, worker=compat_worker)
        wait_for(lambda: later.id in scheduled_ids(celery_app), timeout=WAIT, worker=compat_worker)

        assert clear_locks(celery_app) >= 2
        assert holder(singleton, running) == first.id  # running on a live worker
        assert holder(singleton, scheduled) == later.id  # scheduled on a live worker
        assert holder(singleton, queued) is None  # its message waits in the broker: not seen, freed
        assert holder(singleton, orphaned) is None
        assert waiting.id not in scheduled_ids(celery_app)

        assert clear_locks(celery_app, all=True) >= 2  # as celery-singleton did: every lock
        assert holder(singleton, running) is None and holder(singleton, scheduled) is None
    finally:
        celery_app.control.revoke(later.id)
        open_gate(redis_client, running)
        redis_client.delete(nobody)
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=compat_worker)


# -- with a worker, locks where the peers' settings put them --------------------------


@pytest.fixture(scope="module")
def location_worker(celery_app: Celery, redis_url: str, other_redis: str) -> Iterator[Worker]:
    compat_location_app.configure(redis_url, other_redis, polling_backend_url(redis_url))
    with Worker(
        redis_url,
        "compat-location",
        "--queues",
        compat_location_app.QUEUE,
        app="tests.integration.compat_location_app",
        env={"COMPAT_LOCKS_URL": other_redis},
    ) as started:
        yield started
    get_conf(compat_location_app.app).close()


@pytest.mark.worker
@pytest.mark.parametrize("name", ["once", "singleton"])
def test_the_worker_releases_a_lock_where_the_peers_settings_put_it(
    location_worker: Worker,
    token: str,
    events: Events,
    redis_client: redis.Redis,
    other_redis: str,
    name: str,
) -> None:
    task = getattr(compat_location_app, name)
    locks_url = other_redis if name == "once" else compat_location_app.singleton_url(other_redis)
    first = task.delay(token)
    key = task.unique_lock_key((token,))
    prefix = "celery_unique" if name == "once" else compat_location_app.SINGLETON_PREFIX
    assert key.startswith(f"{prefix}:v1:")
    wait_for(seen(events, "start"), timeout=WAIT, worker=location_worker)
    assert held_in(locks_url, key) == first.id  # the run checked its lock there and holds it
    assert not redis_client.exists(key)
    duplicate = task.apply_async((token,), once={"graceful": True}) if name == "once" else task.delay(token)
    assert duplicate.id in (None, first.id)
    open_gate(redis_client, token)
    wait_for(finished(redis_client, first.id), timeout=WAIT, worker=location_worker)
    assert held_in(locks_url, key) is None  # released there by the worker

    again = task.delay(token)
    assert again.id != first.id
    wait_for(finished(redis_client, again.id), timeout=WAIT, worker=location_worker)
    assert held_in(locks_url, key) is None
    assert [e["id"] for e in events() if e["event"] == "end"] == [first.id, again.id]
