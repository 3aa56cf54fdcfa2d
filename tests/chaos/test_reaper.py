"""Scenario 11: the reaper frees a lock whose message is gone, within
``unique_reap_interval``, and never the lock of a live message.

One scenario per way a message gets lost where no hook runs, each with real
workers (their own key prefix and queue, ``unique_reap_interval`` = 10 s):

(a) the producer is SIGKILLed between its acquire and its publish;
(b) the queue is purged, and another queue deleted;
(c) the whole worker is SIGKILLed while it runs a task acknowledged at its start;
(d) the Redis broker restarts without persistence;
(e) the whole worker is SIGKILLed while it runs an ``acks_late`` task: the broker
    delivers it again, and its lock is kept until then;
(f) the worker's release fails while the lock Redis stalls, and the worker is
    SIGKILLed before its background release could run.

Each measures the time from the loss to the lock's release (the bound is the
interval), watches every live lock for a moment without its holder, and counts
runs of one key that overlapped. The negative test holds 10,000 live messages
(queued, prefetched, eta-scheduled, running, waiting for a retry) across two
workers through 10 sweeps: not one lock may be freed; nor may (i) the lock of
a run that ``revoke(terminate=True)`` signalled and that handles SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from celery_unique.keys import reaper_key
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import Events, Report, chaos_env, chaos_worker, ends, overlapping, producing, starts
from tests.integration.conftest import ROOT, Worker, require_service, wait_for

pytestmark = pytest.mark.worker

INTERVAL = 10.0
LIVE_TASKS = 10_000 * int(os.environ.get("CHAOS_SCALE", "1"))
SWEEPS = 10

_freed: list[str] = []  # per cause, for the summary


@dataclass
class Reaping:
    """A scenario's servers, key prefix and queue."""

    token: str
    broker_url: str
    lock_url: str
    prefix: str
    queue: str
    app: Any
    events_url: str = ""  # where the tasks record their events, when not on the broker

    def worker(self, name: str, *extra: str, queue: str | None = None, **env: Any) -> Worker:
        settings = {"unique_reap_interval": INTERVAL, **env.pop("settings", {})}
        if self.events_url:
            env.setdefault("CHAOS_EVENTS_URL", self.events_url)
        return chaos_worker(
            self.broker_url, self.lock_url, name, "--queues", queue or self.queue, *extra,
            CHAOS_KEY_PREFIX=self.prefix, CHAOS_SETTINGS=json.dumps(settings), **env,
        )  # fmt: skip

    def host(self) -> Worker:
        """A worker that consumes nothing of the scenario's: it stays alive to reap."""
        return self.worker("host", queue=f"{self.queue}-host")

    def key(self, item: str, task: Any = chaos_app.lasting) -> str:
        return str(task.unique_lock_key((self.token,), {"item": item}))

    def send(self, item: str, task: Any = chaos_app.lasting, **options: Any) -> Any:
        return task.apply_async((self.token,), {"item": item}, **{"queue": self.queue, **options})

    def acknowledged(self, client: redis.Redis, owner: bytes) -> bool:
        """Whether a worker's latest beat lists ``owner``'s message as acknowledged."""
        for key in client.scan_iter(reaper_key(self.prefix, "worker:*")):
            record = json.loads(client.get(key) or "{}")
            if owner.decode() in record.get("acked", ()):
                return True
        return False

    def stats(self, client: redis.Redis) -> dict[str, int]:
        raw = client.hgetall(reaper_key(self.prefix, "stats"))
        return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def reaping(broker: RedisServer, lock_redis: RedisServer, token: str) -> Iterator[Reaping]:
    prefix = f"reap-{token[:10]}"
    with producing(broker.url, lock_redis.url, prefix) as app:
        yield Reaping(token, broker.url, lock_redis.url, prefix, f"reap-{token[:10]}", app)


class Watch:
    """Reads the given locks every 20 ms while the block runs: when each was first seen
    free (``time.time()``, as the tasks' events), and whether it ever held another owner
    than its first."""

    def __init__(self, client: redis.Redis, keys: list[str]) -> None:
        self.client, self.keys = client, keys
        self.first = {key: client.get(key) for key in keys}
        self.freed_at: dict[str, float] = {}
        self.changed: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            try:
                values = self.client.mget(self.keys)
            except redis.RedisError:
                continue  # a scenario that stalls the lock Redis
            now = time.time()
            for key, value in zip(self.keys, values, strict=True):
                if value is None:
                    self.freed_at.setdefault(key, now)
                elif value != self.first[key]:
                    self.changed.add(key)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def freed_in(watch: Watch, key: str, since: float, worker: Worker | None = None) -> float:
    """Seconds from ``since`` (the loss) to the lock's release, once it is released."""
    wait_for(lambda: key in watch.freed_at, timeout=3 * INTERVAL, worker=worker)
    return watch.freed_at[key] - since


def kept_until_the_end(watch: Watch, reaping: Reaping, seen: list[dict[str, Any]]) -> None:
    """Every lock whose run ended was free only after that end (the run's own release)."""
    for end in ends(seen):
        key = reaping.key(end["item"])
        if key in watch.freed_at:
            assert watch.freed_at[key] >= end["time"], f"{end['item']}: freed before its run ended"


def noted(cause: str, seconds: list[float], report: Report, seen: list[dict[str, Any]], **more: Any) -> None:
    freed = ", ".join(f"{s:.1f}" for s in seconds)
    _freed.append(f"{cause}: freed in {freed} s")
    report(
        f"11{cause[1]} reaper: {cause}",
        more.pop("load"),
        more.pop("faults"),
        injected=more.pop("injected", 1),
        overlapping=overlapping(seen, unended=more.pop("unended", None)),
        note=more.pop("note", f"lock(s) freed {freed} s after the loss (bound {INTERVAL:.0f} s)"),
        **more,
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:  # pragma: no cover - summary only
    for line in _freed:
        terminalreporter.write_line(line)


# A first delay() warms the process up (on a Redis that never ran the acquire script,
# the first acquire goes out at the publish); the second dies at its publish.
KILLED_PRODUCER = """
import os, signal, sys
from celery import signals
from tests.chaos import chaos_app

chaos_app.lasting.apply_async((sys.argv[1],), {"item": "warm", "seconds": 0}, queue=sys.argv[2])
signals.before_task_publish.connect(lambda **_: os.kill(os.getpid(), signal.SIGKILL), weak=False)
chaos_app.lasting.apply_async((sys.argv[1],), {"item": "a"}, queue=sys.argv[2])
"""


def test_a_producer_killed_between_its_lock_and_its_publish(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    key = reaping.key("a")
    env = chaos_env(reaping.broker_url, reaping.lock_url, CHAOS_KEY_PREFIX=reaping.prefix)
    with reaping.worker("a") as worker:
        producer = subprocess.run(
            [sys.executable, "-c", KILLED_PRODUCER, reaping.token, reaping.queue],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
        )  # fmt: skip
        killed_at = time.time()
        assert producer.returncode == -signal.SIGKILL, producer.stderr
        wait_for(lambda: lock_client.get(key) is not None)  # its acquire landed, nothing was published
        with Watch(lock_client, [key]) as watch:
            seconds = freed_in(watch, key, killed_at, worker)
        # The key works again: the next delay() publishes, and it runs.
        broker_client.set(chaos_app.release_key(reaping.token), 1)
        handle = reaping.send("a")
        assert not handle.duplicate
        wait_for(lambda: len(ends(events())) == 2, worker=worker)  # "warm", then "a"
    noted("(a) producer killed before its publish", [seconds], report, events(), load="1 delay()",
          faults="1 SIGKILL of the producer between acquire and publish", lost=0)  # fmt: skip
    assert seconds <= INTERVAL


def test_a_purged_queue_and_a_deleted_queue(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    other = f"{reaping.queue}-other"
    with reaping.worker("b") as worker:
        running = [reaping.send(f"run{n}") for n in range(2)]
        wait_for(lambda: len(starts(events())) == 2, worker=worker)
        waiting = [reaping.send(f"wait{n}") for n in range(6)]  # 2 prefetched, 4 queued
        elsewhere = [reaping.send(f"other{n}", queue=other) for n in range(2)]
        wait_for(lambda: broker_client.llen(reaping.queue) == 4)
        keys = [reaping.key(f"{kind}{n}") for kind, count in (("run", 2), ("wait", 6), ("other", 2))
                for n in range(count)]  # fmt: skip
        assert all(lock_client.get(key) for key in keys)
        with Watch(lock_client, keys) as watch, reaping.app.connection_for_write() as connection:
            purged = connection.default_channel.queue_purge(reaping.queue)
            deleted = reaping.app.amqp.queues[other].bind(connection.default_channel)
            deleted.declare()  # kombu deletes the bindings this channel knows
            deleted.delete()
            lost_at = time.time()
            assert purged == 4 and not broker_client.exists(other)
            lost = [reaping.key(f"wait{n}") for n in range(6) if n >= 2] + [
                reaping.key(f"other{n}") for n in range(2)
            ]
            seconds = [freed_in(watch, key, lost_at, worker) for key in lost]
            broker_client.set(chaos_app.release_key(reaping.token), 1)
            wait_for(lambda: len(ends(events())) == 4, worker=worker)  # the 2 running, the 2 prefetched
        ran = {e["item"] for e in ends(events())}
    # The live ones kept their lock until their own run ended.
    assert ran == {"run0", "run1", "wait0", "wait1"}, ran
    assert not watch.changed
    kept_until_the_end(watch, reaping, events())
    assert {e["id"] for e in starts(events())} <= {h.id for h in running + waiting}
    assert not any(e["id"] in {h.id for h in elsewhere} for e in starts(events()))
    noted("(b) purge and queue deleted", seconds, report, events(), load="2 running, 2 prefetched, 6 queued",
          faults="4 messages purged, 1 queue of 2 deleted", lost=0)  # fmt: skip
    assert max(seconds) <= INTERVAL


def kill_whole(worker: Worker) -> float:
    """SIGKILL a worker and its pool: nothing it held acknowledges or releases. When (time.time())."""
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
    return time.time()


def test_a_worker_killed_while_it_ran_a_task_it_had_acknowledged(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    key = reaping.key("c")
    with reaping.host() as host:
        with reaping.worker("doomed") as doomed:
            reaping.send("c")
            wait_for(lambda: starts(events()), worker=doomed)
            with Watch(lock_client, [key]) as watch:
                killed_at = kill_whole(doomed)
                seconds = freed_in(watch, key, killed_at, host)
        broker_client.set(chaos_app.release_key(reaping.token), 1)
        assert not reaping.send("c").duplicate  # the key works again
        with reaping.worker("next") as worker:
            wait_for(lambda: ends(events()), worker=worker)
    noted("(c) worker killed, task acknowledged", [seconds], report, events(),
          load="1 running task (acks_late=False)", faults="1 SIGKILL of the whole worker",
          unended=lambda start: killed_at if start["time"] < killed_at else float("inf"), lost=0)  # fmt: skip
    assert seconds <= INTERVAL


def test_a_redis_broker_restarted_without_persistence(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    """The events stay on the suite's broker; the workers' broker is restarted empty."""
    events_url = reaping.broker_url
    with RedisServer() as own:
        reaping.broker_url = own.url
        with producing(own.url, reaping.lock_url, reaping.prefix) as app:
            reaping.app = app
            with reaping.worker("d", CHAOS_EVENTS_URL=events_url) as worker:
                for n in range(2):
                    reaping.send(f"run{n}")
                wait_for(lambda: len(starts(events())) == 2, worker=worker)
                for n in range(6):
                    reaping.send(f"wait{n}")  # 2 prefetched, 4 queued
                own_client = redis.Redis.from_url(own.url)
                wait_for(lambda: own_client.llen(reaping.queue) == 4)
                keys = [
                    reaping.key(f"{kind}{n}")
                    for kind, count in (("run", 2), ("wait", 6))
                    for n in range(count)
                ]
                with Watch(lock_client, keys) as watch:
                    own.crash()
                    own.start()  # empty: no persistence
                    lost_at = time.time()
                    # Lost: the 4 queued. The 2 prefetched are lost too when the worker drops
                    # them with the connection (kombu 5.7); older kombu pushes them back onto
                    # the new broker's queue as it reconnects: live again, their locks stay.
                    seconds = [freed_in(watch, reaping.key(f"wait{n}"), lost_at, worker) for n in range(2, 6)]
                    prefetched = [reaping.key(f"wait{n}") for n in range(2)]

                    def settled() -> bool:
                        freed = sum(key in watch.freed_at for key in prefetched)
                        return freed + own_client.llen(reaping.queue) == len(prefetched)

                    wait_for(settled, timeout=3 * INTERVAL, worker=worker)
                    restored = own_client.llen(reaping.queue)
                    seconds += [watch.freed_at[key] - lost_at for key in prefetched if key in watch.freed_at]
                    assert all(lock_client.get(reaping.key(f"run{n}")) for n in range(2))
                    broker_client.set(chaos_app.release_key(reaping.token), 1)
                    wait_for(lambda: len(ends(events())) >= 2, worker=worker)
                    kept = [key for key in prefetched if key not in watch.freed_at]
                    assert len(kept) == restored and all(lock_client.get(key) for key in kept)
                own_client.close()
    assert {"run0", "run1"} <= {e["item"] for e in ends(events())}
    kept_until_the_end(watch, reaping, events())
    assert not watch.changed
    noted("(d) Redis broker restarted empty", seconds, report, events(),
          load="2 running, 2 prefetched, 4 queued", faults="1 restart of the broker without persistence",
          lost=0, note=f"{len(seconds)} locks freed {max(seconds):.1f} s after the loss at most (bound "
          f"{INTERVAL:.0f} s); {restored} prefetched message(s) pushed back by the worker kept "
          "theirs")  # fmt: skip
    assert max(seconds) <= INTERVAL


def test_a_worker_killed_under_an_acks_late_task_keeps_its_lock_until_the_redelivery(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    visibility = 2 * INTERVAL  # the broker delivers it again after this: the reaper sweeps meanwhile
    key = reaping.key("e", chaos_app.lasting_late)
    redelivering = {"CHAOS_VISIBILITY_TIMEOUT": str(visibility)}
    with reaping.host() as host, reaping.worker("doomed", **redelivering) as doomed:
        reaping.send("e", chaos_app.lasting_late)
        wait_for(lambda: starts(events()), worker=doomed)
        with Watch(lock_client, [key]) as watch:
            killed_at = kill_whole(doomed)
            sweeps = reaping.stats(lock_client).get("judged", 0)
            broker_client.set(chaos_app.release_key(reaping.token), 1)  # the redelivery ends at once
            with reaping.worker("redelivers", **redelivering) as second:
                wait_for(lambda: ends(events()), timeout=4 * visibility, worker=second)
                swept = reaping.stats(lock_client)["judged"] - sweeps
                wait_for(lambda: key in watch.freed_at)  # released by the redelivered run
    seen = events()
    [end] = ends(seen)
    assert len(starts(seen)) == 2 and {e["id"] for e in starts(seen)} == {end["id"]}
    assert watch.freed_at[key] >= end["time"], "freed before the redelivered run ended"
    assert not watch.changed
    assert swept >= 4, host.log_text()
    held = watch.freed_at[key] - killed_at
    noted("(e) worker killed, acks_late: kept", [held], report, seen,
          load="1 running task (acks_late=True)", faults="1 SIGKILL of the whole worker",
          unended=lambda start: killed_at if start["time"] < killed_at else float("inf"), lost=0,
          note=f"lock kept through {swept} sweeps until the redelivered run released it, {held:.1f} s "
          f"after the kill (visibility timeout {visibility:.0f} s)")  # fmt: skip


def test_a_revoked_run_that_handles_sigterm_keeps_its_lock_through_sweeps(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    """revoke(terminate=True) takes the request out of Celery's active ones as the signal
    goes, and acknowledges it; a run that handles SIGTERM goes on. Its worker claims
    its lock until the run ends: the reaper never frees it meanwhile."""
    task = chaos_app.graceful
    key = reaping.key("g", task)
    with reaping.worker("graceful") as worker:
        first = reaping.send("g", task)
        wait_for(lambda: starts(events()), worker=worker)
        with Watch(lock_client, [key]) as watch:
            first.revoke(terminate=True)
            wait_for(lambda: [e for e in events() if e["event"] == "sigterm"], worker=worker)
            judged = reaping.stats(lock_client).get("judged", 0)
            wait_for(lambda: reaping.stats(lock_client).get("judged", 0) >= judged + 3, worker=worker)
            again = reaping.send("g", task)
            assert not ends(events())  # asked while the revoked run still ran
            broker_client.set(chaos_app.release_key(f"{reaping.token}:g"), 1)
            assert again.duplicate and again.id == first.id, worker.log_text()
            [end] = wait_for(lambda: ends(events()), worker=worker)
            wait_for(lambda: key in watch.freed_at, worker=worker)  # released by the run's own end
    assert watch.freed_at[key] >= end["time"], "freed before the revoked run ended"
    assert not watch.changed
    noted("(i) revoked run handling SIGTERM: kept", [watch.freed_at[key] - end["time"]], report, events(),
          load="1 running task that handles SIGTERM", faults="1 revoke(terminate=True)", lost=0,
          note="lock kept through 3 sweeps while the revoked run went on, freed by its end")  # fmt: skip


def test_a_release_that_failed_while_redis_stalled_and_its_worker_died(
    reaping: Reaping, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    with RedisServer() as locks, producing(reaping.broker_url, locks.url, reaping.prefix) as app:
        reaping.lock_url, reaping.app = locks.url, app
        client = redis.Redis.from_url(locks.url)
        key = reaping.key("f")
        with reaping.host() as host, reaping.worker("doomed", CHAOS_SOCKET_TIMEOUT="0.5") as doomed:
            reaping.send("f")
            wait_for(lambda: starts(events()), worker=doomed)
            with Watch(client, [key]) as watch:
                assert locks.process is not None
                os.kill(locks.process.pid, signal.SIGSTOP)
                try:
                    broker_client.set(chaos_app.release_key(reaping.token), 1)
                    wait_for(
                        lambda: "retried in the background" in doomed.whole_log(), timeout=30, worker=doomed
                    )
                    kill_whole(doomed)
                finally:
                    os.kill(locks.process.pid, signal.SIGCONT)
                back_at = time.time()
                seconds = freed_in(watch, key, back_at, host)
        client.close()
    assert [e["item"] for e in ends(events())] == ["f"]
    noted("(f) release failed in an outage, worker died", [seconds], report, events(), load="1 task ending",
          faults="1 SIGSTOP of the lock Redis, 1 SIGKILL of the worker", lost=0)  # fmt: skip
    assert seconds <= INTERVAL


def test_no_live_lock_is_freed_through_ten_sweeps(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    """10,000 live messages across 2 workers: running (acknowledged or not), waiting for a
    retry, eta-scheduled, prefetched and queued. Not one lock is freed."""
    retrying, running, scheduled = 200, 4, 2000
    queued = LIVE_TASKS - retrying - running - scheduled
    prefetching = {"settings": {"worker_prefetch_multiplier": 50}}
    one, two = f"{reaping.queue}-1", f"{reaping.queue}-2"
    with (
        reaping.worker("one", queue=f"{reaping.queue},{one}", **prefetching) as first,
        reaping.worker("two", queue=f"{reaping.queue},{two}", **prefetching) as second,
    ):
        for n in range(retrying):
            chaos_app.retrying.apply_async((reaping.token,), {"item": f"retry{n}"}, queue=reaping.queue)
        wait_for(lambda: sum(e["event"] == "retry" for e in events()) == retrying, timeout=120, worker=first)
        # Each worker runs two, one acknowledged at its start and one acks_late.
        for queue in (one, two):
            reaping.send(f"run-{queue}", queue=queue)
            reaping.send(f"late-{queue}", chaos_app.lasting_late, queue=queue)
        wait_for(lambda: len(starts(events())) == retrying + running, timeout=60, worker=first)
        for n in range(scheduled):
            reaping.send(f"eta{n}", countdown=3600)
        for n in range(queued):
            reaping.send(f"queued{n}")
        wait_for(lambda: broker_client.llen(reaping.queue) < queued)  # the workers prefetched theirs
        pattern = f"{reaping.prefix}:*:lock"
        held = {key: lock_client.get(key) for key in lock_client.scan_iter(pattern, count=1000)}
        assert len(held) == LIVE_TASKS and all(held.values())
        before = reaping.stats(lock_client)
        wait_for(
            lambda: reaping.stats(lock_client).get("judged", 0) >= before.get("judged", 0) + SWEEPS,
            timeout=30 * SWEEPS,
            worker=first,
        )
        after = reaping.stats(lock_client)
        now = {key: lock_client.get(key) for key in held}
        logs = first.whole_log() + second.whole_log()
        in_queue = broker_client.llen(reaping.queue)
        broker_client.delete(reaping.queue)  # what the workers would run for hours
    freed = [key for key, owner in held.items() if now[key] != owner]
    sweeps, judged = after["sweeps"] - before.get("sweeps", 0), after["judged"] - before.get("judged", 0)
    report(
        "11g reaper: live locks through 10 sweeps",
        f"{LIVE_TASKS} live messages on 2 workers: {running} running, {retrying} waiting for a retry, "
        f"{scheduled} eta-scheduled, {queued - in_queue} prefetched, {in_queue} queued",
        f"{sweeps} sweeps ({judged} judged)",
        injected=0,
        overlapping=overlapping(events()),
        lost=len(freed),
        note=f"{len(freed)} live lock(s) freed; the last sweep read {after['last_locks']} locks and "
        f"{after['last_messages']} messages in {after['last_ms']} ms",
    )
    assert not freed
    assert after.get("reaped", 0) == before.get("reaped", 0)
    assert "reaped:" not in logs
    for key in lock_client.scan_iter(f"{reaping.prefix}:*", count=1000):
        lock_client.delete(key)


AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def test_with_rabbitmq_only_the_acknowledged_run_of_a_lost_worker_is_freed(
    reaping: Reaping, lock_client: redis.Redis, broker_client: redis.Redis, events: Events, report: Report
) -> None:
    """RabbitMQ cannot be read without consuming: a lock without a worker's claim may be
    queued there, so it stays; a running task's lock, acknowledged at its start, is freed
    once its worker stopped beating."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    reaping.events_url = reaping.broker_url
    with producing(AMQP_URL, reaping.lock_url, reaping.prefix) as app:
        reaping.app, reaping.broker_url = app, AMQP_URL
        key, unknown = reaping.key("c"), reaping.key("unknown")
        unseen = f"unknown#{os.urandom(6).hex()}"
        assert lock_client.set(unknown, unseen, px=3_600_000)  # a message RabbitMQ may hold
        try:
            with reaping.host() as host:
                with reaping.worker("doomed") as doomed:
                    reaping.send("c")
                    wait_for(lambda: starts(events()), worker=doomed)
                    # Known once the worker's beat has said so: a kill before that is not.
                    owner = lock_client.get(key)
                    assert owner is not None
                    wait_for(lambda: reaping.acknowledged(lock_client, owner), worker=doomed)
                    with Watch(lock_client, [key, unknown]) as watch:
                        killed_at = kill_whole(doomed)
                        judged = reaping.stats(lock_client).get("judged", 0)
                        seconds = freed_in(watch, key, killed_at, host)
                        wait_for(
                            lambda: reaping.stats(lock_client).get("judged", 0) >= judged + 4, worker=host
                        )
                assert unknown not in watch.freed_at
        finally:
            with app.connection_for_write() as connection:
                queue = app.amqp.queues[reaping.queue].bind(connection.default_channel)
                queue.delete()
            lock_client.delete(unknown)
    noted("(h) RabbitMQ: worker killed, task acknowledged", [seconds], report, events(),
          load="1 running task (acks_late=False), 1 lock without a worker's claim",
          faults="1 SIGKILL of the whole worker",
          unended=lambda start: killed_at if start["time"] < killed_at else float("inf"), lost=0)  # fmt: skip
    assert seconds <= INTERVAL
