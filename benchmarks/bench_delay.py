"""Cost of ``delay()``: plain Celery vs UniqueTask vs celery-once vs celery-singleton.

Every contender publishes to the same Redis broker in one run, in interleaved
rounds (the machines are shared and noisy, so only ratios taken side by side
mean anything). Two cases:

* fresh: every call has new arguments, so every call is published;
* duplicate: every call repeats held arguments, so nothing is published.

Each case is timed by the wall clock and by this process's CPU time. Then
each contender makes a few calls under ``MONITOR`` to count Redis round
trips (commands sent by the client, not the ones a Lua script runs inside).

The contender "floor" is no library: a plain task's publish with one
``SET NX`` overlapped, or for a key known held that ``SET NX`` and a handle
(what a unique ``delay()`` cannot go below; see :class:`Floor`).

One more contender, "unique, 1 replica", is UniqueTask with
``unique_lock_replicas = 1``, its locks on a private primary with one replica:
its ``delay()`` returns once the replica acknowledged the lock (``WAIT``). Its
``WAIT`` rides in the acquire's own write, so it is not counted as a round
trip; its round trips are counted on the broker and on that primary.

    python benchmarks/bench_delay.py [--calls 2000] [--rounds 5] [--locks cluster|sentinel]

``--locks`` puts UniqueTask's locks on a private Redis Cluster (3 primaries)
or behind a Sentinel, the broker and the peers staying on the one Redis (the
peers support neither); round trips are then counted on the broker only.

A private redis-server is started unless REDIS_URL is set. Needs the ``bench``
extra (``pip install -e '.[bench]'``) for the peers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from itertools import count
from typing import Any

import redis
from celery import Celery
from celery.utils import uuid

from celery_unique import UniqueTask
from celery_unique.testing import ClusterServers, RedisServer, SentinelServers


def build_app(url: str, locks: Any = None) -> tuple[Celery, dict[str, Any]]:
    app = Celery("bench", broker=url, set_as_current=False)
    if locks is not None:
        app.conf.unique_redis_url = locks.url
        app.conf.unique_redis_transport_options = getattr(locks, "transport_options", None)
    app.conf.update(
        ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": url, "default_timeout": 3600}},
        singleton_backend_url=url,
        singleton_lock_expiry=3600,
    )
    tasks: dict[str, Any] = {}

    @app.task(name="bench.plain")
    def plain(x: int) -> int:
        return x

    @app.task(name="bench.unique", base=UniqueTask)
    def unique(x: int) -> int:
        return x

    tasks.update(plain=plain, unique=unique)
    try:
        from celery_once import QueueOnce

        @app.task(name="bench.once", base=QueueOnce, once={"graceful": True})
        def once(x: int) -> int:
            return x

        tasks["celery-once"] = once
    except ImportError:
        print("celery_once not installed: skipped", file=sys.stderr)
    try:
        from celery_singleton import Singleton

        @app.task(name="bench.singleton", base=Singleton)
        def singleton(x: int) -> int:
            return x

        tasks["celery-singleton"] = singleton
    except ImportError:
        print("celery-singleton not installed: skipped", file=sys.stderr)
    return app, tasks


class Floor:
    """What ``delay()`` of a unique task cannot go below, with no celery-unique code: a
    plain task's publish with one ``SET NX`` overlapped (sent first, read after the
    publish), or for a key known held, the ``SET NX`` read first and a handle on the
    holder (task id, key, one round trip, ``AsyncResult``)."""

    def __init__(self, plain: Any, url: str) -> None:
        self.plain = plain
        pool = redis.Redis.from_url(url).connection_pool
        self.connection = pool.connection_class(**pool.connection_kwargs)
        self.connection.connect()
        self.held: set[str] = set()

    def delay(self, x: int) -> Any:
        task_id = uuid()
        key = "bench-floor:" + hashlib.sha256(json.dumps([[x], {}]).encode()).hexdigest()
        parts = (b"SET", key.encode(), task_id.encode(), b"NX", b"PX", b"3600000")
        self.connection.send_packed_command(
            [b"*6\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)], check_health=False
        )
        if key in self.held:
            if self.connection.read_response() is None:
                return self.plain.AsyncResult(task_id)
            self.held.discard(key)
        result = self.plain.apply_async((x,), task_id=task_id)
        if self.connection.read_response() is None:
            self.held.add(key)
        return result


def build_replicated(url: str, primary_url: str) -> tuple[Celery, Any]:
    """An app whose UniqueTask waits for one replica to hold each lock."""
    app = Celery("bench-replicas", broker=url, set_as_current=False)
    app.conf.update(unique_redis_url=primary_url, unique_lock_replicas=1)

    @app.task(name="bench.unique_replicas", base=UniqueTask)
    def unique(x: int) -> int:
        return x

    return app, unique


def per_call_us(call: Callable[[int], Any], args: Callable[[], int], calls: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per call. CPU time is this process's: scheduling
    noise on a shared machine moves it less than the wall clock."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call(args())
    return (time.perf_counter() - started) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def watch(url: str, seen: list[str]) -> Callable[[], None]:
    """Record in ``seen`` the commands clients send to ``url`` (through MONITOR; script
    internals excluded, and a WAIT or the PTTL after a ``SET ... NX GET``, which are
    sent in one write with the acquire before them); the function returned stops watching."""
    client = redis.Redis.from_url(url)
    ready, stopped = threading.Event(), threading.Event()
    last: dict[Any, str] = {}  # each client's last command

    def listen() -> None:
        with client.monitor() as monitor:
            ready.set()
            for entry in monitor.listen():
                command = entry["command"]
                if command.startswith("PING") and "bench-stop" in command:
                    stopped.set()
                    return
                if entry.get("client_type") == "lua" or command.startswith("WAIT"):
                    continue
                client_of = (entry.get("client_address"), entry.get("client_port"))
                if (
                    command.startswith("PTTL")
                    and last.get(client_of, "").startswith("SET")
                    and " NX GET " in last[client_of]
                ):
                    continue
                last[client_of] = command
                seen.append(command)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(5)

    def stop() -> None:
        client.execute_command("PING", "bench-stop")
        stopped.wait(5)
        thread.join(5)
        client.close()

    return stop


def count_round_trips(
    urls: list[str], call: Callable[[int], Any], args: Callable[[], int], calls: int
) -> float:
    """Round trips per call to the Redis servers at ``urls``."""
    seen: list[str] = []
    stops = [watch(url, seen) for url in urls]
    time.sleep(0.1)
    for _ in range(calls):
        call(args())
    for stop in stops:
        stop()
    return len(seen) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--locks", choices=("single", "cluster", "sentinel"), default="single")
    options = parser.parse_args()

    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(RedisServer()).url
        locks = None
        if options.locks != "single":
            servers = ClusterServers() if options.locks == "cluster" else SentinelServers()
            locks = stack.enter_context(servers)
        app, tasks = build_app(url, locks)
        tasks["floor"] = Floor(tasks["plain"], url)
        # A primary with one replica for "unique, 1 replica" (the Sentinel's, when there is one).
        replicated = locks if isinstance(locks, SentinelServers) else stack.enter_context(SentinelServers())
        replica_app, tasks["unique, 1 replica"] = build_replicated(url, replicated.primary.url)
        watched = {"unique, 1 replica": [url, replicated.primary.url]}
        # New numbers on every run: against a REDIS_URL reused from an earlier run, the
        # same numbers would meet that run's locks (held for an hour) and be duplicates.
        fresh_numbers = count(random.SystemRandom().randrange(1, 10**9) * 10**8)
        for task in tasks.values():
            task.delay(-1)  # warm up connections, scripts and the duplicate key
            task.delay(-1)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(options.rounds):
            for name, task in tasks.items():
                for case, args in (("fresh", fresh_numbers.__next__), ("duplicate", lambda: -1)):
                    us = per_call_us(task.delay, args, options.calls)
                    results.setdefault((name, case), []).append(us)
        trips = {
            (name, case): count_round_trips(watched.get(name, [url]), task.delay, args, 100)
            for name, task in tasks.items()
            for case, args in (("fresh", fresh_numbers.__next__), ("duplicate", lambda: -1))
        }
        app.close()
        replica_app.close()

    def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)

    plain_wall, plain_cpu = medians(results[("plain", "fresh")])
    print(
        f"delay() cost, median of {options.rounds} rounds x {options.calls} calls; "
        f"ratio = cost / plain Celery delay() ({plain_wall:.0f} us wall, {plain_cpu:.0f} us CPU); "
        f"UniqueTask's locks: {options.locks}"
    )
    print(f"{'task':<18}{'case':<11}{'us/call':>9}{'ratio':>8}{'CPU ratio':>11}{'round trips':>13}")
    for (name, case), samples in results.items():
        wall, cpu = medians(samples)
        print(
            f"{name:<18}{case:<11}{wall:>9.0f}{wall / plain_wall:>8.2f}{cpu / plain_cpu:>11.2f}"
            f"{trips[(name, case)]:>13.2f}"
        )


if __name__ == "__main__":
    main()
