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


def _done(run: str, count: int) -> None:
    client = redis.Redis.from_url(app.conf.broker_url)
    client.set(f"bench:done:{run}", f"{time.time()}:{count}")
    client.close()


@app.task(name="bench.part_chord")
def part_chord(n: int) -> int:
    return n


@app.task(name="bench.part_fan_in", ignore_result=True)
def part_fan_in(n: int) -> int:
    return n


@app.task(name="bench.callback")
def callback(results: Any, run: str) -> None:
    _done(run, len(results))
