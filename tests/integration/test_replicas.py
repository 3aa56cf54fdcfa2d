"""``unique_lock_replicas``: a lock counts as taken once the replicas hold it (Redis ``WAIT``).

A private primary with one replica (and a Sentinel, unused here but for the
Sentinel client test); the replica is frozen (``SIGSTOP``) to make it fall
behind. No worker: a run's start is tested in-process (``apply()``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import IdempotencyConflict, LockBackendError, UniqueTask
from celery_unique.checks import check_replicas
from celery_unique.clients import make_client
from celery_unique.conf import get_conf
from celery_unique.keys import run_key
from celery_unique.locks import LockStore, NotReplicated, new_owner
from celery_unique.testing import SentinelServers
from tests.integration.conftest import frozen

TIMEOUT_MS = 200  # the WAIT timeout of these tests (half their 0.4 s socket timeout)


@pytest.fixture(scope="module")
def servers() -> Iterator[SentinelServers]:
    with SentinelServers() as started:
        yield started


@pytest.fixture
def primary_url(servers: SentinelServers) -> str:
    return servers.primary.url


@pytest.fixture
def store(primary_url: str) -> Iterator[LockStore]:
    built = LockStore(make_client(primary_url, socket_timeout=0.4), replicas=1, replica_timeout_ms=TIMEOUT_MS)
    yield built
    built.close()


@pytest.fixture
def key() -> str:
    return f"test:v1:{{replicas:{uuid.uuid4().hex}}}:lock"


def on_replica(servers: SentinelServers, key: str) -> bytes | None:
    with redis.Redis(port=servers.replica.port) as replica:
        value: bytes | None = replica.get(key)
        return value


# -- the lock store -------------------------------------------------------------


def test_a_taken_lock_is_on_the_replica_when_acquire_returns(
    store: LockStore, servers: SentinelServers, key: str
) -> None:
    owner = new_owner("t")
    assert store.acquire(key, owner, 10_000).acquired
    assert on_replica(servers, key) == owner.encode()  # WAIT answered: no polling needed
    held = store.acquire(key, new_owner("u"), 10_000)
    assert not held.acquired and held.holder == owner
    assert 9_000 < held.ttl_ms <= 10_000  # written again for the WAIT, its TTL kept


def test_a_lock_the_replica_did_not_acknowledge_is_not_replicated(
    store: LockStore, servers: SentinelServers, key: str
) -> None:
    owner = new_owner("t")
    with frozen(servers.replica):
        started = time.monotonic()
        with pytest.raises(NotReplicated) as short:
            store.acquire(key, owner, 10_000)
        waited = time.monotonic() - started
        # A duplicate is not answered with a lock that a failover could still lose
        # (its holder may fail its own WAIT, and publish nothing).
        with pytest.raises(NotReplicated) as duplicate:
            store.acquire(key, new_owner("u"), 10_000)
    assert short.value.acquisition.acquired and short.value.acquisition.owner == owner
    assert (short.value.acknowledged, short.value.wanted) == (0, 1)
    # Answered once WAIT's timeout passed: a reply, not the socket's timeout (which would
    # raise a TimeoutError; no upper bound in time, which a loaded machine stretches).
    assert waited >= TIMEOUT_MS / 1000
    assert store.owner(key)[0] == owner  # taken: the caller knows it holds it
    assert not duplicate.value.acquisition.acquired and duplicate.value.acquisition.holder == owner
    # The replica back, the same lock is confirmed for a duplicate.
    held = store.acquire(key, new_owner("v"), 10_000)
    assert not held.acquired and held.holder == owner


def test_a_lock_taken_through_the_client_is_confirmed_on_a_connection_of_our_own(
    store: LockStore, servers: SentinelServers, key: str
) -> None:
    owner = new_owner("t")
    assert store.acquire_via_client(key, owner, 10_000).acquired
    assert on_replica(servers, key) == owner.encode()
    assert not store.acquire_via_client(key, new_owner("u"), 10_000).acquired  # a duplicate, confirmed
    store.release(key, owner)
    with frozen(servers.replica), pytest.raises(NotReplicated):
        store.acquire_via_client(key, owner, 10_000)
    # A lock no longer the holder's is not confirmed, whatever the replicas say.
    taken = store.acquire(key, owner, 10_000, handover=owner)
    store.release(key, owner)
    with pytest.raises(NotReplicated) as short:
        store.confirm(key, owner, taken)
    assert short.value.acknowledged is None


def test_a_run_that_holds_a_lock_waits_for_the_replica_and_one_that_does_not_never_does(
    store: LockStore, servers: SentinelServers, key: str
) -> None:
    family = key.removesuffix(":lock")
    keys = (key, f"{family}:run", f"{family}:fence")
    with frozen(servers.replica):
        with pytest.raises(NotReplicated) as short:
            store.begin_run(*keys, "run-1", "while_executing", 10_000)
        assert short.value.acquisition.acquired
        store.release_all([keys[1]], "run-1")
        # until_executing holds no lock while running: it takes nothing to wait for.
        assert store.begin_run(*keys, "run-2", "until_executing", 10_000).acquired
    assert store.begin_run(*keys, "run-3", "while_executing", 10_000).acquired
    assert on_replica(servers, keys[1]) == b"run-3"


def test_an_idempotent_acquire_waits_for_the_replica(
    store: LockStore, servers: SentinelServers, key: str
) -> None:
    family = key.removesuffix(":lock")
    keys = (key, f"{family}:result", f"{family}:args")
    with frozen(servers.replica), pytest.raises(NotReplicated):
        store.acquire_idempotent(*keys, "o", 10_000, "", "digest")
    store.release(key, "o")
    taken, stored, digest = store.acquire_idempotent(*keys, "p", 10_000, "", "digest")
    assert taken.acquired and stored is None and digest == "digest"
    assert on_replica(servers, key) == b"p"
    with frozen(servers.replica), pytest.raises(NotReplicated) as duplicate:
        store.acquire_idempotent(*keys, "q", 10_000, "", "digest")
    assert duplicate.value.acquisition.holder == "p"


def test_a_sentinel_client_waits_on_the_master_it_found(servers: SentinelServers, key: str) -> None:
    client = make_client(servers.url, servers.transport_options, socket_timeout=0.4)
    sentinel_store = LockStore(client, replicas=1, replica_timeout_ms=TIMEOUT_MS)
    try:
        assert sentinel_store.acquire(key, "o", 10_000).acquired
        assert on_replica(servers, key) == b"o"
        with frozen(servers.replica), pytest.raises(NotReplicated):
            sentinel_store.acquire(key, "p", 10_000, handover="o")
    finally:
        sentinel_store.close()


# -- delay() and a run's start --------------------------------------------------------


@pytest.fixture
def app(redis_url: str, primary_url: str) -> Iterator[Celery]:
    """A producer whose locks need the replica; its queue is read by no worker."""
    app = Celery(f"replicas-{uuid.uuid4().hex[:6]}", broker=redis_url, set_as_current=False)
    app.conf.update(
        unique_redis_url=primary_url,
        unique_lock_replicas=1,
        unique_redis_socket_timeout=0.4,
        task_default_queue=f"replicas-{uuid.uuid4().hex}",
        task_publish_retry=False,
    )

    @app.task(base=UniqueTask, name="replicas.job", shared=False)
    def job(item: str) -> str:
        return item

    @app.task(base=UniqueTask, name="replicas.stored", idempotent=True, shared=False)
    def stored(item: str) -> str:
        return item

    ran: list[str] = []

    @app.task(base=UniqueTask, name="replicas.running", lock="while_executing", shared=False)
    def running(item: str) -> None:
        ran.append(item)

    app.ran = ran  # type: ignore[attr-defined]
    yield app
    get_conf(app).close()
    app.close()


@pytest.fixture
def queue(app: Celery, redis_client: redis.Redis) -> Iterator[Any]:
    name = app.conf.task_default_queue
    yield lambda: redis_client.llen(name)
    redis_client.delete(name)


def test_the_wait_is_half_the_socket_timeout(app: Celery) -> None:
    store = get_conf(app).locks
    assert (store.replicas, store.replica_timeout_ms) == (1, 200)


def test_the_startup_check_counts_the_replicas(app: Celery) -> None:
    assert check_replicas(app) == []
    app.conf.unique_lock_replicas = 2
    get_conf(app).reload()
    [finding] = check_replicas(app)
    assert "unique_lock_replicas is 2" in finding.message and "it has 1 connected" in finding.message


@pytest.mark.parametrize("name", ["replicas.job", "replicas.stored"])
def test_delay_publishes_once_the_replica_holds_the_lock(
    app: Celery, queue: Any, servers: SentinelServers, name: str
) -> None:
    task = app.tasks[name]
    first = task.delay("a")
    assert task.delay("a").id == first.id
    assert queue() == 1
    assert on_replica(servers, task.unique_lock_key(("a",))) is not None


@pytest.mark.parametrize("name", ["replicas.job", "replicas.stored"])
def test_delay_raises_and_publishes_nothing_when_the_replica_falls_short(
    app: Celery, queue: Any, servers: SentinelServers, name: str
) -> None:
    task = app.tasks[name]
    with frozen(servers.replica), pytest.raises(LockBackendError, match="0 of 1 replicas") as raised:
        task.delay("b")
    assert isinstance(raised.value.__cause__, NotReplicated)
    assert queue() == 0
    # The lock it took is released at once (nothing was published for it) ...
    assert get_conf(app).locks.owner(task.unique_lock_key(("b",))) == (None, None)
    # ... and the next call takes it.
    assert not task.delay("b").duplicate
    assert queue() == 1


def test_a_duplicate_of_a_lock_the_replica_lacks_raises(
    app: Celery, queue: Any, servers: SentinelServers
) -> None:
    job = app.tasks["replicas.job"]
    first = job.delay("e")
    with frozen(servers.replica), pytest.raises(LockBackendError, match="0 of 1 replicas"):
        job.delay("e")
    assert queue() == 1
    assert get_conf(app).locks.holder(job.unique_lock_key(("e",)))[0] == first.id  # not the caller's to free
    assert job.delay("e").id == first.id


def test_under_allow_an_answer_that_falls_short_stands(
    app: Celery, queue: Any, servers: SentinelServers, caplog: pytest.LogCaptureFixture
) -> None:
    app.conf.unique_on_redis_error = "allow"
    get_conf(app).reload()
    job = app.tasks["replicas.job"]
    with frozen(servers.replica), caplog.at_level(logging.WARNING, logger="celery_unique"):
        first = job.delay("c")
        assert job.delay("c").id == first.id  # the lock, not confirmed on the replica, still deduplicates
    assert "0 of 1 replicas" in caplog.text and "the answer stands" in caplog.text
    assert queue() == 1
    assert get_conf(app).locks.holder(job.unique_lock_key(("c",)))[0] == first.id


def test_under_allow_an_idempotent_duplicate_that_falls_short_still_tells_a_reused_key(
    app: Celery, queue: Any, servers: SentinelServers
) -> None:
    app.conf.unique_on_redis_error = "allow"
    get_conf(app).reload()
    stored = app.tasks["replicas.stored"]
    first = stored.apply_async(("f",), idempotency_key="order-1")
    with frozen(servers.replica):
        assert stored.apply_async(("f",), idempotency_key="order-1").id == first.id
        with pytest.raises(IdempotencyConflict):
            stored.apply_async(("g",), idempotency_key="order-1")
    assert queue() == 1


def test_a_run_whose_lock_falls_short_is_retried_and_leaves_no_lock(
    app: Celery, servers: SentinelServers
) -> None:
    running = app.tasks["replicas.running"]
    family = running.unique_lock_key(("d",)).removesuffix(":lock")
    with frozen(servers.replica):
        # Eagerly, the retries run at once; the last one fails with the error.
        result = running.apply(("d",), retries=running.max_retries)
    assert isinstance(result.result, LockBackendError)
    assert isinstance(result.result.__cause__, NotReplicated)
    assert app.ran == []  # type: ignore[attr-defined]
    assert get_conf(app).locks.owner(run_key(family)) == (None, None)
    assert running.apply(("d",)).successful()
    assert app.ran == ["d"]  # type: ignore[attr-defined]
