"""What the plugin leaves in Redis: every key ends with the TTL the settings give it.

20,000 unique tasks, 1,000 idempotent ones, 100 fan-ins and 100 contexts run
through a real worker with short TTLs (3 s). While they live, the keys are
counted and measured per kind (``MEMORY USAGE``); then the test waits for the
lock Redis to be empty, which it must become once every TTL has passed: no key
of ours lives longer than its settings say.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_unique import Context, fan_in
from celery_unique.conf import get_conf
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import chaos_worker, producing, settle
from tests.integration.conftest import Worker, read_events

QUEUE = "security-footprint"
TTL = 3  # seconds: every lock, outcome and context of this test
SCALE = float(os.environ.get("FOOTPRINT_SCALE", "1"))
UNIQUE, IDEMPOTENT, FAN_INS, CONTEXTS = (int(n * SCALE) for n in (20_000, 1_000, 100, 100))
SETTINGS = {"unique_lock_timeout": TTL, "unique_result_ttl": TTL}


@pytest.fixture(scope="module")
def app(broker: RedisServer, lock_redis: RedisServer) -> Iterator[Any]:
    with producing(broker.url, lock_redis.url, **SETTINGS) as app:
        yield app


@pytest.fixture(scope="module")
def worker(app: Any, broker: RedisServer, lock_redis: RedisServer) -> Iterator[Worker]:
    settings = json.dumps(SETTINGS)
    with chaos_worker(
        broker.url, lock_redis.url, "footprint", "--queues", QUEUE, CHAOS_SETTINGS=settings
    ) as w:
        yield w


def kind_of(key: bytes) -> str:
    name = key.decode()
    if "{fanin:" in name or "{fanin}" in name:
        return "fan-in " + name.rpartition(":")[2]
    if "{context:" in name:
        return "context " + name.rpartition(":")[2]
    return name.rpartition(":")[2]


@pytest.mark.worker
def test_no_key_outlives_its_ttl(
    app: Any, worker: Worker, broker: RedisServer, lock_redis: RedisServer
) -> None:
    token = uuid.uuid4().hex
    with redis.Redis.from_url(broker.url) as broker_client, redis.Redis.from_url(lock_redis.url) as client:
        peak: Counter[str] = Counter()
        sizes: defaultdict[str, list[int]] = defaultdict(list)

        def snapshot() -> None:
            """Count the keys per kind now (the peak over the snapshots is kept) and size some."""
            counted: Counter[str] = Counter()
            for key in client.scan_iter("*", count=1000):
                kind = kind_of(key)
                counted[kind] += 1
                if len(sizes[kind]) < 50:
                    sizes[kind].append(int(client.memory_usage(key) or 0))
            for kind, count in counted.items():
                peak[kind] = max(peak[kind], count)

        for n in range(UNIQUE):
            chaos_app.work.apply_async(
                (token,), {"seconds": 0, "item": str(n)}, queue=QUEUE, unique_options={"lock_timeout": TTL}
            )
        snapshot()
        for n in range(IDEMPOTENT):
            chaos_app.reveal.apply_async((f"{token}-{n}", "value"), queue=QUEUE)
        snapshot()
        for n in range(FAN_INS):
            fan_token = f"{token}-fan-{n}"
            parts = [chaos_app.fan_part.s(fan_token, p).set(queue=QUEUE) for p in range(3)]
            fan_in(parts, chaos_app.fan_callback.s(fan_token).set(queue=QUEUE), token=fan_token, app=app)
        snapshot()
        for n in range(CONTEXTS):
            context = Context(app, f"{token}-ctx-{n}", ttl=TTL)
            context.append({"n": n})
            context.append({"again": n})
            context.compact()
            context.append({"after": n})
        snapshot()

        def ran() -> int:
            return sum(
                1 for e in read_events(broker_client, chaos_app.events_key(token)) if e["event"] == "end"
            )

        def called_back() -> int:
            return sum(
                1
                for n in range(FAN_INS)
                for e in read_events(broker_client, chaos_app.events_key(f"{token}-fan-{n}"))
                if e["event"] == "callback"
            )

        settle(lambda: ran() == UNIQUE, progress=ran)
        settle(lambda: called_back() == FAN_INS, progress=called_back)
        snapshot()
        print(f"\nkeys of {UNIQUE:,} unique tasks, {IDEMPOTENT:,} idempotent tasks, {FAN_INS} fan-ins")
        print(f"and {CONTEXTS} contexts (the most seen at once; TTL {TTL} s):")
        for kind, count in sorted(peak.items()):
            print(f"  {kind:<18} {count:>7,} keys  ~{sum(sizes[kind]) // len(sizes[kind])} B each")
        # Then every key goes once its TTL has passed; none is left behind, but the
        # reaper's, which live while a worker does (each with a TTL, a day at most).
        reapers = f"{get_conf(app).key_prefix}:v1:{{reaper}}:*"

        def left() -> set[bytes]:
            return set(client.scan_iter("*")) - set(client.scan_iter(reapers))

        settle(lambda: not left(), timeout=TTL * 10)
        assert not left(), sorted({kind_of(k) for k in left()})
        assert all(0 < client.pttl(key) <= 86_400_000 for key in client.scan_iter(reapers))
    assert peak["fence"] and peak["done"] and peak["result"] and peak["fan-in ctx"] and peak["context base"]
