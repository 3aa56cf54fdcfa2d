"""A barrier task for the test workers' apps, so a test can wait until a worker has
run what was sent to it before (``drain`` in tests/integration/conftest.py).

Each round sends one barrier task per pool process. A barrier task counts itself
in at a Redis key, then waits until every one of the round has: all of them
running at once occupy every pool process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis


def barrier_key(name: str) -> str:
    return f"test-barrier:{name}"


def add_barrier(app: Any, client: Callable[[], redis.Redis]) -> Any:
    """Register ``tests.barrier`` on ``app``; ``client()`` is the Redis its count is kept in."""

    @app.task(name="tests.barrier", ignore_result=True, shared=False)
    def barrier(name: str, parties: int, timeout: float) -> None:
        key = barrier_key(name)
        counter = client()
        pipe = counter.pipeline()
        pipe.incr(key)
        pipe.expire(key, 600)
        pipe.execute()
        deadline = time.monotonic() + timeout
        while int(counter.get(key) or 0) < parties:
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {name}: not all {parties} arrived within {timeout}s")
            time.sleep(0.01)

    return barrier
