"""The reaper's judgement, sweep by sweep, on a real Redis broker and lock Redis.

Each test has an app of its own (its own key prefix, so no worker of the
session judges its locks) whose messages sit in queues that no worker
consumes. A lock is taken the way ``delay()`` takes it; a lock without a
message is taken through the lock store, as a producer killed between its
acquire and its publish leaves it. Real workers are in tests/chaos/test_reaper.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_unique import UniqueTask
from celery_unique import signals as unique_signals
from celery_unique.beats import Timing
from celery_unique.conf import get_conf
from celery_unique.locks import new_owner, task_id_of
from celery_unique.reaper import NO_MESSAGE, Reaper, Sweep

TIMING = Timing(3.0)  # sweeps at least 0.5 s apart


def make_app(redis_url: str, unique_redis: Any, token: str) -> Celery:
    app = Celery(f"reaper-{token}", set_as_current=False)
    app.conf.update(broker_url=redis_url, unique_key_prefix=f"reaper-{token}", task_ignore_result=True)
    unique_redis.apply(app)

    @app.task(base=UniqueTask, name="reaper.hold", unique_on=("item",), shared=False)
    def hold(item: str) -> None:
        pass

    @app.task(base=UniqueTask, name="reaper.throttle", lock="until_expired", shared=False)
    def throttle(item: str) -> None:
        pass

    return app


@pytest.fixture
def app(redis_url: str, unique_redis: Any, token: str) -> Iterator[Celery]:
    app = make_app(redis_url, unique_redis, token)
    yield app
    get_conf(app).close()
    app.close()


@pytest.fixture
def worker_side(redis_url: str, unique_redis: Any, token: str) -> Iterator[Celery]:
    """The same app as a worker process has it: it never routed a message to a queue of
    its own, so it knows of such a queue only from the broker."""
    app = make_app(redis_url, unique_redis, token)
    yield app
    get_conf(app).close()
    app.close()


def orphan(app: Celery, item: str, task: str = "reaper.hold") -> tuple[str, str]:
    """A lock taken as delay() takes it, for a message that is never published: (key, owner)."""
    key = app.tasks[task].unique_lock_key((item,))
    owner = new_owner(f"orphan-{item}")
    assert get_conf(app).locks.acquire(key, owner, 600_000).acquired
    return key, owner


def holder(app: Celery, key: str) -> str | None:
    owner, _ = get_conf(app).locks.owner(key)
    return owner


def sweep_until_reaped(reaper: Reaper, key: str, sweeps: int = 20) -> list[Sweep]:
    """Sweep until ``key`` is reaped (the event tests wait for); every sweep's figures."""
    seen: list[Sweep] = []
    for _ in range(sweeps):
        seen.append(reaper.sweep())
        if any(found.key == key for found in seen[-1].reaped):
            return seen
        # Marks count from the sweep that made them: a second look must come later.
        reaper_pause(reaper)
    pytest.fail(f"not reaped in {sweeps} sweeps: {seen}")


def reaper_pause(reaper: Reaper) -> None:
    time.sleep(reaper.timing.sweep_every)


def test_a_lock_without_a_message_is_freed_at_the_second_sweep_not_the_first(app: Celery, token: str) -> None:
    from prometheus_client import CollectorRegistry

    from celery_unique.metrics import disable_prometheus, enable_prometheus

    key, owner = orphan(app, token)
    reaped: list[dict[str, Any]] = []

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        reaped.append({"task": sender.name, **kwargs})

    registry = CollectorRegistry()
    enable_prometheus(registry)
    unique_signals.lock_reaped.connect(receiver, weak=False, dispatch_uid=token)
    try:
        sweeps = sweep_until_reaped(Reaper(app, TIMING), key)
        counted = registry.get_sample_value(
            "celery_unique_locks_reaped_total", {"task": "reaper.hold", "reason": NO_MESSAGE}
        )
    finally:
        unique_signals.lock_reaped.disconnect(dispatch_uid=token)
        disable_prometheus(registry)
    assert counted == 1
    assert sweeps[0].suspects == 1 and not sweeps[0].reaped  # marked, not freed
    assert [o.reason for o in sweeps[-1].reaped] == [NO_MESSAGE]
    assert holder(app, key) is None
    assert [(r["task"], r["owner"], r["reason"]) for r in reaped] == [("reaper.hold", owner, NO_MESSAGE)]


@pytest.mark.parametrize(
    "task_id",
    [
        "plain-{token}",
        'quote"{token}',
        "back\\slash\\{token}\\",
        "brace{{{token}}}:*[x]",
        "é-ünïcode-{token}",
        '"id": "{token}"',
    ],
)
def test_a_lock_whose_message_is_queued_is_kept(
    app: Celery, worker_side: Celery, token: str, task_id: str
) -> None:
    """Queued in a queue no worker consumes, under a caller-chosen task id that JSON
    escapes (or that looks like the JSON the reaper searches): found in the broker."""
    queue = f"nobody-{token}"
    result = app.tasks["reaper.hold"].apply_async(
        ("queued",), task_id=task_id.format(token=token), queue=queue
    )
    queued = app.tasks["reaper.hold"].unique_lock_key(("queued",))
    assert task_id_of(holder(app, queued) or "") == result.id
    control, _ = orphan(app, token)  # the reaper frees this one: it judged
    assert queue not in worker_side.amqp.queues
    sweeps = sweep_until_reaped(Reaper(worker_side, TIMING), control)
    assert task_id_of(holder(app, queued) or "") == result.id
    assert sweeps[-1].messages >= 1


def test_a_lock_taken_again_between_two_sweeps_is_not_freed(app: Celery, token: str) -> None:
    key, first = orphan(app, token)
    reaper = Reaper(app, TIMING)
    assert reaper.sweep().suspects == 1  # the first owner is marked
    store = get_conf(app).locks
    assert store.release(key, first)
    second = new_owner("second")
    assert store.acquire(key, second, 600_000).acquired
    reaper_pause(reaper)
    swept = reaper.sweep()
    assert swept.judged and not swept.reaped  # a new owner: marked afresh
    assert holder(app, key) == second
    sweep_until_reaped(reaper, key)


def test_an_until_expired_lock_is_never_freed(app: Celery, token: str) -> None:
    """A throttle is held for its TTL by design, whatever became of its message."""
    throttled, owner = orphan(app, token, task="reaper.throttle")
    control, _ = orphan(app, f"control-{token}")
    sweep_until_reaped(Reaper(app, TIMING), control)
    assert holder(app, throttled) == owner


def test_a_dry_run_frees_nothing(app: Celery, token: str) -> None:
    key, owner = orphan(app, token)
    reaper = Reaper(app, TIMING, dry_run=True)
    sweeps = sweep_until_reaped(reaper, key)
    assert [o.owner for o in sweeps[-1].reaped] == [owner]
    assert holder(app, key) == owner
