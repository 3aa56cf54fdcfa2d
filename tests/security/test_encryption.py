"""With ``unique_encryption_key``, no user data is left in clear in the lock Redis.

An idempotent task's stored outcome (its return value), a fan-in's part
reports and callback (whose arguments hold a secret) and a split context's
entries are written by a real worker and a producer; then every value of
every key in the lock Redis is read back raw: the secret is in none of them,
while the plugin's own API still reads it. Without the key, the same context
entry is found in clear (the scan is able to see it).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique import Context
from celery_unique.aggregate import aggregator
from celery_unique.headers import FAN_IN_HEADER
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import chaos_worker, producing
from tests.integration.conftest import Worker, wait_for

QUEUE = "security-encryption"
KEY = "an-encryption-key-for-tests-only"


@pytest.fixture(scope="module")
def app(broker: RedisServer, lock_redis: RedisServer) -> Iterator[Any]:
    with producing(broker.url, lock_redis.url, unique_encryption_key=KEY) as app:
        yield app


@pytest.fixture(scope="module")
def worker(app: Any, broker: RedisServer, lock_redis: RedisServer) -> Iterator[Worker]:
    settings = json.dumps({"unique_encryption_key": KEY})
    with chaos_worker(
        broker.url, lock_redis.url, "encrypting", "--queues", QUEUE, CHAOS_SETTINGS=settings
    ) as w:
        yield w


def every_value(client: redis.Redis) -> bytes:
    """Every key and value in a Redis, raw, as one blob."""
    found = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        if kind == b"string":
            found.append(client.get(key) or b"")
        elif kind == b"hash":
            found.extend(f + v for f, v in client.hgetall(key).items())
        elif kind == b"list":
            found.extend(client.lrange(key, 0, -1))
        elif kind == b"zset":
            found.extend(client.zrange(key, 0, -1))
        found.append(key)
    return b"\n".join(found)


@pytest.mark.worker
def test_outcomes_fan_ins_and_contexts_hold_no_plaintext(
    app: Any, worker: Worker, lock_redis: RedisServer
) -> None:
    token, secret = uuid.uuid4().hex, f"s3cr3t-{uuid.uuid4().hex}"
    # An idempotent outcome, stored by the worker.
    chaos_app.reveal.apply_async((token, secret), queue=QUEUE)
    wait_for(lambda: chaos_app.reveal.stored_outcome((token, secret)) is not None, worker=worker)
    # A fan-in still open: a callback whose keyword arguments hold the secret, two reports of three.
    agg = aggregator(app)
    agg.create(token, ["a", "b", "c"], chaos_app.fan_secret.s(secret=secret))
    for part in ("a", "b"):
        chaos_app.fan_secret.apply_async(
            (token, secret), queue=QUEUE, headers={FAN_IN_HEADER: {"token": token, "part": part}}
        )
    wait_for(lambda: len(agg.reports(token)) == 2, worker=worker)
    # A split context, appended to and compacted.
    context = Context(app, f"ctx-{token}", ttl=300)
    context.append({"secret": secret})
    context.compact()
    context.append({"again": secret})

    with redis.Redis.from_url(lock_redis.url) as client:
        raw = every_value(client)
    assert secret.encode() not in raw
    # What the plugin reads back, it reads whole.
    assert chaos_app.reveal.stored_outcome((token, secret)).result == {"secret": secret}
    assert {part["value"] for part in agg.reports(token).values()} == {secret}
    assert context.value() == {"secret": secret, "again": secret}
    agg.expire(token)


def test_without_an_encryption_key_the_scan_finds_the_plaintext(
    broker: RedisServer, lock_redis: RedisServer
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    with producing(broker.url, lock_redis.url, unique_encryption_key=None) as plain:
        context = Context(plain, f"ctx-{uuid.uuid4().hex}", ttl=300)
        context.append({"secret": secret})
        with redis.Redis.from_url(lock_redis.url) as client:
            assert secret.encode() in every_value(client)
        context.delete()
