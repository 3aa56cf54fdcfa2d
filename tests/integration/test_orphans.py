"""The background release of locks whose acquire went unanswered, against a real Redis."""

from __future__ import annotations

import gc
import os
import signal
import uuid

import pytest
import redis
from redis.sentinel import MasterNotFoundError

from celery_unique.clients import certainly_not_run
from celery_unique.locks import LockStore
from celery_unique.orphans import OrphanReleaser
from celery_unique.testing import RedisServer
from tests.integration.conftest import wait_for


def test_a_lock_that_lands_late_is_released_once_redis_answers() -> None:
    releaser = OrphanReleaser()
    key, owner = f"test:v1:{{orphans:{uuid.uuid4().hex}}}:lock", uuid.uuid4().hex
    with RedisServer() as server, redis.Redis.from_url(server.url) as client:
        store = LockStore(redis.Redis.from_url(server.url, socket_timeout=0.3))
        late = redis.Connection(port=server.port)
        late.connect()
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # a stall
        try:
            # The acquire whose caller gave up waits in Redis's socket buffer ...
            late.send_command("SET", key, owner, "PX", 60_000)
            releaser.release_later(store, key, owner)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert late.read_response() == b"OK"  # ... and ran when Redis resumed
        wait_for(lambda: client.get(key) is None and releaser.pending() == 0, timeout=10)
        late.disconnect()
        other = f"{key}-other"
        client.set(other, "another-owner", px=60_000)
        releaser.release_later(store, other, owner)
        wait_for(lambda: releaser.pending() == 0, timeout=10)
        assert client.get(other) == b"another-owner"  # owner-checked
        store.close()


def test_the_releases_of_a_closed_store_are_dropped() -> None:
    releaser = OrphanReleaser()
    with RedisServer() as server:
        store = LockStore(redis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3))
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # no answer, for as long as the test needs
        try:
            releaser.release_later(store, "test:v1:{orphans:closed}:lock", "owner")
            store.close()
            del store
            gc.collect()
            wait_for(lambda: releaser.pending() == 0, timeout=5)  # not retried for half a minute
        finally:
            os.kill(server.process.pid, signal.SIGCONT)


def test_nothing_is_retried_where_redis_certainly_did_not_run_it() -> None:
    releaser = OrphanReleaser()
    server = RedisServer().start()
    store = LockStore(redis.Redis.from_url(server.url))
    server.stop()  # down: what it had buffered is gone, and it refuses connections
    releaser.release_later(store, "test:v1:{orphans:down}:lock", "owner")
    wait_for(lambda: releaser.pending() == 0, timeout=5)
    store.close()
    with pytest.raises(redis.ConnectionError) as refused:
        redis.Redis.from_url(server.url).ping()
    assert certainly_not_run(refused.value)
    assert certainly_not_run(redis.AuthenticationError("invalid password"))
    assert certainly_not_run(MasterNotFoundError("No master found for 'mymaster'"))
    assert not certainly_not_run(redis.TimeoutError("Timeout reading from socket"))
    assert not certainly_not_run(refused.value, retried=True)  # a cluster client's last attempt only
    assert certainly_not_run(redis.ResponseError("NOPERM"), retried=True)


@pytest.mark.parametrize(
    "meanwhile",
    [
        redis.TimeoutError("Timeout reading from socket"),
        redis.ConnectionError("Connection closed by server."),
    ],
)
def test_a_refusal_the_caller_was_handling_says_nothing_of_redis(meanwhile: redis.RedisError) -> None:
    try:
        raise ConnectionRefusedError("the caller's own service")
    except ConnectionRefusedError:
        try:
            raise meanwhile  # from the lock Redis, while the caller handles its own error
        except redis.RedisError as exc:
            error = exc
    assert not certainly_not_run(error)


def test_a_release_that_fails_unexpectedly_does_not_stop_the_others() -> None:
    releaser = OrphanReleaser()
    with RedisServer() as server, redis.Redis.from_url(server.url) as client:
        store = LockStore(redis.Redis.from_url(server.url))
        broken, kept = (f"test:v1:{{orphans:{uuid.uuid4().hex}}}:lock" for _ in range(2))
        client.set(kept, "owner", px=60_000)
        real_release = store.release_all

        def release_all(keys: list[str], owner: str, done_ttl_ms: int | None = None) -> int:
            if keys == [broken]:
                raise ValueError("a bug")
            return real_release(keys, owner, done_ttl_ms)

        store.release_all = release_all  # type: ignore[method-assign]
        releaser.release_later(store, broken, "owner")
        releaser.release_later(store, kept, "owner")
        wait_for(lambda: releaser.pending() == 0, timeout=10)
        assert client.get(kept) is None  # released after the other one failed
        store.close()
