"""A key prefix isolates tenants that share one Redis.

Two apps with the same task, called with the same arguments, on one Redis:
each tenant's ``delay()`` takes its own lock (neither is the other's
duplicate), its tools see and release only its own keys, and its ACL user
(confined to its prefix) could not touch the other's keys anyway.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.exceptions import NoPermissionError

from celery_unique.conf import get_conf
from celery_unique.inspect import force_release, iter_locks
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import producing
from tests.integration.conftest import lock_holder
from tests.security.conftest import tenant_url
from tests.security.servers import SecureRedisServer


def test_tenants_with_their_own_prefix_never_share_a_lock(
    broker: RedisServer, secure_redis: SecureRedisServer
) -> None:
    token = uuid.uuid4().hex
    task = chaos_app.hold
    taken = {}
    for tenant in ("tenant-a", "tenant-b"):
        with producing(broker.url, tenant_url(secure_redis, tenant), prefix=tenant):
            result = task.apply_async((token,), queue=f"{tenant}-queue")
            taken[tenant] = (result, task.unique_lock_key((token,)))
    (a, a_key), (b, b_key) = taken["tenant-a"], taken["tenant-b"]
    assert not a.duplicate and not b.duplicate and a.id != b.id
    assert a_key.startswith("tenant-a:") and b_key.startswith("tenant-b:")

    with producing(broker.url, tenant_url(secure_redis, "tenant-b"), prefix="tenant-b") as app:
        # Its tools list and release its own keys only ...
        assert [lock.key for lock in iter_locks(app, task.name) if lock.holder == b.id] == [b_key]
        assert all(lock.key.startswith("tenant-b:") for lock in iter_locks(app))
        with pytest.raises(ValueError, match="not a celery-unique lock key of this app"):
            force_release(app, a_key)
        # ... and its Redis user may not touch the other tenant's keys at all.
        with pytest.raises(NoPermissionError):
            get_conf(app).locks.release(a_key, "any owner")
        assert task.apply_async((token,), queue="tenant-b-queue").id == b.id

    with producing(broker.url, tenant_url(secure_redis, "tenant-a"), prefix="tenant-a"):
        assert task.apply_async((token,), queue="tenant-a-queue").id == a.id
    with redis.Redis.from_url(secure_redis.url) as admin:
        assert lock_holder(admin, a_key) == a.id and lock_holder(admin, b_key) == b.id
        admin.delete(a_key, b_key)
