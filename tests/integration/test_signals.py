"""What observers see, against a real Redis: signals, the optional Prometheus
counters, and the log levels of decisions and anomalies."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import ConfigurationError, UniqueTask, metrics, signals
from celery_unique.aggregate import aggregator
from celery_unique.conf import get_conf
from celery_unique.keys import family_of, run_key
from celery_unique.lease import Lease, LeaseKeeper


@pytest.fixture
def app(redis_url: str, unique_redis: Any) -> Iterator[Celery]:
    app = Celery("signals", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"signals-{uuid.uuid4().hex[:6]}",
        task_always_eager=False,
        unique_signing_key="test-signing-key",
    )
    unique_redis.apply(app)  # the locks where this run keeps them (--unique-redis)

    @app.task(base=UniqueTask, shared=False, name="signals.job")
    def job(item: str) -> str:
        return item

    @app.task(base=UniqueTask, shared=False, name="signals.early", lock="until_executing")
    def early(item: str) -> str:
        return item

    @app.task(base=UniqueTask, shared=False, name="signals.once", idempotent=True)
    def once(item: str) -> str:
        return item

    @app.task(base=UniqueTask, shared=False, name="signals.guarded", lock="while_executing")
    def guarded(item: str) -> str:
        return item

    @app.task(shared=False, name="signals.callback")
    def callback(results: Any) -> None: ...

    yield app
    get_conf(app).close()
    app.close()


def lock_client(app: Celery) -> redis.Redis:
    """The client of the Redis that holds the locks (a cluster in the cluster run)."""
    client: redis.Redis = get_conf(app).locks.client
    return client


@pytest.fixture
def seen() -> Iterator[dict[str, list[dict[str, Any]]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    receivers = []
    for name in signals.__all__:

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


@pytest.fixture
def eager(app: Celery) -> Celery:
    """Tasks run at delay(), with their prerun and postrun signals: the worker's hooks run."""
    app.conf.task_always_eager = True
    get_conf(app).reload()
    return app


def test_every_release_is_signalled_with_its_task_as_sender(eager: Celery, seen: dict[str, Any]) -> None:
    names = ("signals.job", "signals.early", "signals.once")
    for name in names:
        eager.tasks[name].delay(uuid.uuid4().hex)
    # until_executed at the end of the run, until_executing at its start, an
    # idempotent task when its outcome is stored.
    assert [(r["sender"].name, r["why"]) for r in seen["lock_released"]] == [
        ("signals.job", "SUCCESS"),
        ("signals.early", "started"),
        ("signals.once", "SUCCESS"),
    ]
    acquired_by = [r["sender"] for r in seen["lock_acquired"]]
    assert acquired_by == [eager.tasks[name] for name in names]


@pytest.mark.parametrize(
    ("name", "method"), [("signals.job", "release_all"), ("signals.once", "store_and_release")]
)
def test_a_release_that_meets_a_redis_error_is_tried_again(
    eager: Celery,
    seen: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    method: str,
) -> None:
    task = eager.tasks[name]
    locks = get_conf(eager).locks
    real = getattr(locks, method)
    calls: list[int] = []

    def flaky(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("a blip")
        return real(*args)

    monkeypatch.setattr(locks, method, flaky)
    item = uuid.uuid4().hex
    task.delay(item)
    assert len(calls) == 2
    assert lock_client(eager).exists(str(task.unique_lock_key((item,)))) == 0
    assert [(r["sender"], r["why"]) for r in seen["lock_released"]] == [(task, "SUCCESS")]


def test_conflict_signal(eager: Celery, seen: dict[str, Any]) -> None:
    task = eager.tasks["signals.guarded"]
    item = uuid.uuid4().hex
    run_lock = run_key(family_of(task.unique_lock_key((item,))))
    lock_client(eager).set(run_lock, "someone-else", px=60_000)  # another run holds it
    try:
        assert task.delay(item).state == "IGNORED"
    finally:
        lock_client(eager).delete(run_lock)
    [conflict] = seen["lock_conflict"]
    assert conflict["sender"] is task and conflict["existing_id"] == "someone-else"
    assert conflict["policy"] == "discard" and item not in repr(conflict)
    assert not seen.get("lock_released")  # another's lock is never released


def test_fan_in_signals(app: Celery, seen: dict[str, Any]) -> None:
    agg = aggregator(app)
    done, failed = uuid.uuid4().hex, uuid.uuid4().hex
    agg.create(done, ["a"], app.tasks["signals.callback"].s())
    agg.report(done, "a", value=1)
    agg.create(failed, ["a", "b"], app.tasks["signals.callback"].s())
    agg.report(failed, "a", error=ValueError("boom"), policy="fail")
    assert [(f["sender"], f["token"], f["parts"]) for f in seen["fan_in_completed"]] == [(app, done, 1)]
    assert [(f["sender"], f["token"]) for f in seen["fan_in_failed"]] == [(app, failed)]


def test_lock_lost_signal(app: Celery, seen: dict[str, Any]) -> None:
    store = get_conf(app).locks
    key = f"test:v1:{{signals:{uuid.uuid4().hex}}}:lock"
    store.acquire(key, "owner", 300)
    keeper = LeaseKeeper()
    lease = Lease(store=store, key=key, owner="owner", ttl_ms=300, task=app.tasks["signals.job"])
    keeper.keep(lease)
    lock_client(app).set(key, "someone-else")  # taken while "running"
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    assert [(s["sender"], s["owner"]) for s in seen["lock_lost"]] == [(app.tasks["signals.job"], "owner")]
    lock_client(app).delete(key)


def test_a_dropped_lease_is_never_reported_lost(app: Celery) -> None:
    key = f"test:v1:{{signals:{uuid.uuid4().hex}}}:lock"

    class SlowStore:
        """extend() is in flight when the run ends: it finds the lock gone (released
        meanwhile), and returns only once drop() has taken the lease out."""

        def __init__(self) -> None:
            self.started = threading.Event()

        def extend(self, *args: Any) -> bool:
            self.started.set()
            deadline = time.monotonic() + 10
            while lease in keeper._leases and time.monotonic() < deadline:
                time.sleep(0.01)
            return False

    store = SlowStore()
    keeper = LeaseKeeper()
    lease = Lease(store=store, key=key, owner="owner", ttl_ms=60)
    keeper.keep(lease)
    assert store.started.wait(5)
    keeper.drop(lease)  # the run ended while a renewal was in flight
    assert not lease.lost


def test_prometheus_counters(eager: Celery) -> None:
    from prometheus_client import CollectorRegistry

    from celery_unique.metrics import disable_prometheus, enable_prometheus

    registry = CollectorRegistry()
    counters = enable_prometheus(registry)
    assert enable_prometheus(registry) is counters  # once per registry
    try:
        app = eager
        job, guarded = app.tasks["signals.job"], app.tasks["signals.guarded"]
        item = uuid.uuid4().hex
        job.delay(item)  # acquired, run, released
        run_lock = run_key(family_of(guarded.unique_lock_key((item,))))
        lock_client(app).set(run_lock, "someone-else", px=60_000)
        guarded.delay(item)  # a conflict
        lock_client(app).delete(run_lock)
        app.conf.task_always_eager = False
        get_conf(app).reload()
        job.delay(item)
        job.delay(item)  # a duplicate
        lost_key = f"test:v1:{{signals:{item}}}:lock"
        lease = Lease(store=get_conf(app).locks, key=lost_key, owner="owner", ttl_ms=300, task=job)
        keeper = LeaseKeeper()
        keeper.keep(lease)  # its lock never existed: lost at the first renewal
        agg = aggregator(app)
        for token, report in ((f"{item}-1", {"value": 1}), (f"{item}-2", {"error": ValueError("x")})):
            agg.create(token, ["a"], app.tasks["signals.callback"].s())
            agg.report(token, "a", policy="fail", **report)
        agg.create(f"{item}-3", ["a"], app.tasks["signals.callback"].s())
        agg.client.hset(agg.key(f"{item}-3"), "callback", "a forged callback")
        agg.report(f"{item}-3", "a", value=1)  # refused: the seal is broken
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)

        def sample(metric: str, **labels: str) -> float | None:
            return registry.get_sample_value(f"celery_unique_{metric}_total", labels)

        assert sample("locks_acquired", task="signals.job") == 2.0
        assert sample("locks_released", task="signals.job", why="SUCCESS") == 1.0
        assert sample("duplicates", task="signals.job") == 1.0
        assert sample("conflicts", task="signals.guarded", policy="discard") == 1.0
        assert sample("locks_lost", task="signals.job") == 1.0
        assert sample("fan_ins_completed") == 1.0
        assert sample("fan_ins_failed", reason="failed") == 1.0
        assert sample("seals_broken", purpose="fan-in callback") == 1.0
    finally:
        disable_prometheus(registry)
    assert enable_prometheus(registry) is not counters  # registered again after being disabled
    disable_prometheus(registry)


def test_prometheus_counters_are_on_by_default_with_the_extra(app: Celery) -> None:
    from prometheus_client import REGISTRY

    metrics.disable_prometheus()  # whatever an earlier use in this process enabled

    def acquired() -> float | None:
        return REGISTRY.get_sample_value("celery_unique_locks_acquired_total", {"task": "signals.job"})

    assert acquired() is None
    app.tasks["signals.job"].delay(uuid.uuid4().hex)  # the first use of the locks enables them
    assert acquired() == 1.0


@pytest.mark.parametrize(("setting", "enabled"), [(None, [None]), (True, [None]), (False, [])])
def test_unique_prometheus_setting(
    app: Celery, monkeypatch: pytest.MonkeyPatch, setting: bool | None, enabled: list[Any]
) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(metrics, "enable_prometheus", lambda registry=None: calls.append(registry))
    app.conf.unique_prometheus = setting
    get_conf(app).reload()
    app.tasks["signals.job"].delay(uuid.uuid4().hex)
    assert calls == enabled


@pytest.mark.parametrize("value", ["yes", 1])
def test_unique_prometheus_must_be_a_boolean(app: Celery, value: Any) -> None:
    app.conf.unique_prometheus = value
    get_conf(app).reload()
    assert [str(e) for e in get_conf(app).errors()] == [
        f"unique_prometheus must be True, False or None, got {value!r}"
    ]


def test_unique_prometheus_true_without_the_extra_is_refused_every_time(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "installed", lambda: False)
    app.conf.unique_prometheus = True
    conf = get_conf(app)
    conf.reload()
    message = "unique_prometheus = True needs prometheus_client: pip install celery-unique[prometheus]"
    assert [str(e) for e in conf.errors()] == [message]  # a worker refuses to start
    for _ in range(2):
        with pytest.raises(ConfigurationError, match="needs prometheus_client"):
            conf.locks  # noqa: B018 - the first use of the locks
    app.conf.unique_prometheus = None
    conf.reload()
    assert conf.locks is not None  # not installed: simply off


def test_decisions_log_at_info_and_anomalies_at_warning(
    eager: Celery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = eager
    secret = f"secret-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger="celery_unique")
    job, guarded = app.tasks["signals.job"], app.tasks["signals.guarded"]
    run_lock = run_key(family_of(guarded.unique_lock_key((secret,))))
    lock_client(app).set(run_lock, "someone-else", px=60_000)
    guarded.delay(secret)  # a conflict: a decision
    lock_client(app).delete(run_lock)
    locks = get_conf(app).locks

    def down(*args: Any) -> Any:
        raise redis.ConnectionError("down")

    monkeypatch.setattr(locks, "release_all", down)
    job.delay(secret)  # runs, and its release fails every time: an anomaly
    monkeypatch.undo()
    # Held by another call: a duplicate, a decision.
    lock_client(app).set(job.unique_lock_key((secret,)), "another-call#0123456789ab", px=60_000)
    assert job.delay(secret).id == "another-call"
    lock_client(app).delete(job.unique_lock_key((secret,)))

    def levels(fragment: str) -> set[tuple[str, int]]:
        return {(r.name, r.levelno) for r in caplog.records if fragment in r.getMessage()}

    assert levels("duplicate of") == {("celery_unique.publish", logging.INFO)}
    assert levels("is held by someone-else") == {("celery_unique.runs", logging.INFO)}
    assert levels("could not release lock") == {("celery_unique.runs", logging.WARNING)}
    assert all(secret not in r.getMessage() for r in caplog.records)
