"""The lock Redis behind TLS (``rediss://``) and an ACL user confined to the key prefix.

A real worker and this process both reach the locks only as that user, over
TLS: taking a lock, checking it at the start of a run (with its fencing
counter), renewing and releasing it all stay inside the prefix, or the ACL
would refuse them. Outside the prefix, and with a wrong password,
``delay()`` raises ``LockBackendError`` and publishes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError

from celery_unique import LockBackendError
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import chaos_worker, producing
from tests.integration.conftest import Worker, lock_holder, read_events, wait_for
from tests.security.conftest import tenant_url
from tests.security.servers import SecureRedisServer

QUEUE = "security-tls"


@pytest.fixture(scope="module")
def tls_worker(broker: RedisServer, secure_redis: SecureRedisServer) -> Iterator[Worker]:
    lock_url = tenant_url(secure_redis, "tenant-a")
    with (
        producing(broker.url, lock_url, prefix="tenant-a"),  # this process pings it through the broker
        chaos_worker(broker.url, lock_url, "tls", "--queues", QUEUE, CHAOS_KEY_PREFIX="tenant-a") as started,
    ):
        yield started


def events(broker: RedisServer, token: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(broker.url) as client:
        return read_events(client, chaos_app.events_key(token))


@pytest.mark.worker
def test_a_unique_task_runs_over_tls_as_an_acl_user_confined_to_its_prefix(
    tls_worker: Worker, broker: RedisServer, secure_redis: SecureRedisServer
) -> None:
    token = uuid.uuid4().hex
    admin = redis.Redis.from_url(secure_redis.url)
    with producing(broker.url, tenant_url(secure_redis, "tenant-a"), prefix="tenant-a"):
        task = chaos_app.work
        first = task.apply_async((token,), {"seconds": 1.0}, queue=QUEUE)
        wait_for(lambda: events(broker, token), worker=tls_worker)
        assert task.apply_async((token,), {"seconds": 1.0}, queue=QUEUE).id == first.id
        key = task.unique_lock_key((token,), {"seconds": 1.0})
        assert lock_holder(admin, key) == first.id
        wait_for(lambda: [e for e in events(broker, token) if e["event"] == "end"], worker=tls_worker)
        wait_for(lambda: admin.get(key) is None)  # released by the worker, as tenant-a
    # Every key the plugin wrote (lock, fence) is under the prefix: the ACL allows nothing else.
    assert {k.decode().split(":")[0] for k in admin.scan_iter("*")} <= {"tenant-a"}
    assert "NoPermission" not in tls_worker.log_text()
    admin.close()


def test_outside_its_prefix_the_acl_user_is_refused_and_nothing_is_published(
    broker: RedisServer, secure_redis: SecureRedisServer
) -> None:
    with (
        producing(broker.url, tenant_url(secure_redis, "tenant-a"), prefix="tenant-b"),
        redis.Redis.from_url(broker.url) as broker_client,
    ):
        before = broker_client.llen(QUEUE)
        with pytest.raises(LockBackendError) as info:
            chaos_app.work.apply_async((uuid.uuid4().hex,), queue=QUEUE)
        assert isinstance(info.value.__cause__, NoPermissionError)
        assert broker_client.llen(QUEUE) == before


def test_a_wrong_password_is_a_lock_backend_error_that_names_no_password(
    broker: RedisServer, secure_redis: SecureRedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = secure_redis.url_for("tenant-a", "not-the-password")
    with (
        producing(broker.url, url, prefix="tenant-a"),
        redis.Redis.from_url(broker.url) as broker_client,
        caplog.at_level(logging.DEBUG, logger="celery_unique"),
    ):
        before = broker_client.llen(QUEUE)
        with pytest.raises(LockBackendError) as info:
            chaos_app.work.apply_async((uuid.uuid4().hex,), queue=QUEUE)
        assert isinstance(info.value.__cause__, AuthenticationError)
        assert broker_client.llen(QUEUE) == before
    assert "not-the-password" not in str(info.value) + caplog.text
