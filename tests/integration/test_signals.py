"""Observer signals and the optional Prometheus counters, against a real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import UniqueTask, signals
from celery_unique.aggregate import aggregator
from celery_unique.conf import get_conf
from celery_unique.lease import Lease, LeaseKeeper


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery("signals", broker=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=f"signals-{uuid.uuid4().hex[:6]}", task_always_eager=False)

    @app.task(base=UniqueTask, shared=False, name="signals.job")
    def job(item: str) -> str:
        return item

    @app.task(shared=False, name="signals.callback")
    def callback(results: Any) -> None: ...

    yield app
    get_conf(app).close()
    app.close()


@pytest.fixture
def seen() -> Iterator[dict[str, list[dict[str, Any]]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    receivers = []
    for name in ("lock_acquired", "duplicate_rejected", "lock_released", "lock_lost", "fan_in_completed"):

        def receiver(sender: Any = None, _name: str = name, **kwargs: Any) -> None:
            found.setdefault(_name, []).append({"sender": sender, **kwargs})

        getattr(signals, name).connect(receiver, weak=False)
        receivers.append((name, receiver))
    yield found
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver)


def test_producer_signals_carry_digests_not_arguments(app: Celery, seen: dict[str, Any]) -> None:
    item = f"secret-{uuid.uuid4().hex}"
    first = app.tasks["signals.job"].delay(item)
    app.tasks["signals.job"].delay(item)
    [acquired] = seen["lock_acquired"]
    [duplicate] = seen["duplicate_rejected"]
    assert acquired["task_id"] == first.id and duplicate["existing_id"] == first.id
    assert acquired["key_digest"] == duplicate["key_digest"] and len(acquired["key_digest"]) == 64
    assert item not in repr(acquired) + repr(duplicate)


def test_release_and_fan_in_signals(app: Celery, seen: dict[str, Any]) -> None:
    app.conf.task_always_eager = True
    get_conf(app).reload()
    app.tasks["signals.job"].delay("eager")  # runs now: task_postrun releases
    assert [r["why"] for r in seen["lock_released"]] == ["SUCCESS"]
    token = uuid.uuid4().hex
    agg = aggregator(app)
    agg.create(token, ["a"], app.tasks["signals.callback"].s())
    agg.report(token, "a", value=1)
    assert [(f["token"], f["parts"]) for f in seen["fan_in_completed"]] == [(token, 1)]


def test_lock_lost_signal(app: Celery, seen: dict[str, Any], redis_client: redis.Redis) -> None:
    store = get_conf(app).locks
    key = f"test:v1:{{signals:{uuid.uuid4().hex}}}:lock"
    store.acquire(key, "owner", 300)
    keeper = LeaseKeeper()
    lease = Lease(store=store, key=key, owner="owner", ttl_ms=300)
    keeper.keep(lease)
    redis_client.set(key, "someone-else")  # taken while "running"
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    assert [s["owner"] for s in seen["lock_lost"]] == ["owner"]
    redis_client.delete(key)


def test_a_dropped_lease_is_never_reported_lost(app: Celery, redis_client: redis.Redis) -> None:
    key = f"test:v1:{{signals:{uuid.uuid4().hex}}}:lock"

    class SlowStore:
        """extend() takes a while and finds the lock gone (released meanwhile)."""

        def __init__(self) -> None:
            self.started = threading.Event()

        def extend(self, *args: Any) -> bool:
            self.started.set()
            time.sleep(0.3)
            return False

    store = SlowStore()
    keeper = LeaseKeeper()
    lease = Lease(store=store, key=key, owner="owner", ttl_ms=60)
    keeper.keep(lease)
    assert store.started.wait(5)
    keeper.drop(lease)  # the run ended while a renewal was in flight
    assert not lease.lost


def test_prometheus_counters(app: Celery) -> None:
    from prometheus_client import CollectorRegistry

    from celery_unique.metrics import enable_prometheus

    registry = CollectorRegistry()
    counters = enable_prometheus(registry)
    try:
        item = uuid.uuid4().hex
        app.tasks["signals.job"].delay(item)
        app.tasks["signals.job"].delay(item)
        assert registry.get_sample_value("celery_unique_duplicates_total", {"task": "signals.job"}) == 1.0
        assert registry.get_sample_value("celery_unique_locks_acquired_total", {"task": "signals.job"}) == 1.0
    finally:
        for name, counter in counters.items():
            getattr(signals, name).disconnect(dispatch_uid=f"celery_unique.metrics.{counter._name}")
