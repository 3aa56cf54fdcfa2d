"""The worker side of benchmarks/bench_fan_in.py (a Celery app with both variants)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import celery_unique  # noqa: F401  (registers the fan-in worker hooks)

app = Celery("bench_fan_in", broker=os.environ.get("REDIS_URL"), backend=os.environ.get("REDIS_URL"))
app.conf.update(
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
    unique_signing_key="bench-signing-key",  # a fan-in's callbacks are signed
)


_clients: dict[int, redis.Redis] = {}


def _client() -> redis.Redis:
    """One client per worker process (made after the fork)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(app.conf.broker_url)
    return _clients[pid]


def _done(run: str, count: int) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    client.set(f"bench:done:{run}", f"{time.time()}:{count}")
    client.close()


@app.task(name="bench.part_chord")
def part_chord(n: int) -> int:
    return n


@app.task(name="bench.part_stored")
def part_stored(n: int) -> int:
    """A part as most users write it: its result would be stored (fan_in asks it not to be)."""
    return n


@app.task(name="bench.part_ignored", ignore_result=True)
def part_ignored(n: int) -> int:
    """A part whose author turned results off."""
    return n


@app.task(name="bench.callback")
def callback(results: Any, run: str) -> None:
    _done(run, len(results))


@app.task(name="bench.part_counted", ignore_result=True)
def part_counted(run: str, parts: int) -> None:
    """The floor: a plain task that counts itself in one round trip (no chord, no fan-in);
    the last one marks the run done."""
    client = _client()
    if client.incr(f"bench:count:{run}") == parts:
        client.set(f"bench:done:{run}", f"{time.time()}:{parts}")
