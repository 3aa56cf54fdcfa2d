"""Publishing a message whose lock reply is still on the wire.

A fresh ``delay()`` sends the acquire script first and lets Celery build the
message meanwhile; :class:`GatedProducer` reads the reply just before the
message would be published and stops the publish when the lock is held by
another task. The round trip then costs almost nothing on top of Celery's own
work.

A duplicate should not pay for building a message it will never send, so
:class:`DuplicateHints` remembers keys recently found held; for those the reply
is awaited first. The hints only choose the order of work: the decision always
comes from Redis.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

from celery_unique.locks import Acquisition


class DuplicateFound(Exception):
    """Raised through Celery's publish path when the lock is held by another task."""

    def __init__(self, acquisition: Acquisition) -> None:
        super().__init__(acquisition.holder)
        self.acquisition = acquisition


class GateFailed(Exception):
    """Carries a Redis error through Celery's publish path.

    kombu re-raises its transport's connection errors as its own
    ``OperationalError``; a Redis broker shares redis-py's error classes, so a
    lock error must travel in a type of ours to stay recognisable.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class GatedProducer:
    """A kombu producer whose ``publish`` first passes a gate.

    Everything else is the wrapped producer's. The gate may be called more
    than once (Celery retries refused publishes); it must be idempotent.
    """

    def __init__(self, producer: Any, gate: Callable[[], None]) -> None:
        self._producer = producer
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        self._gate()
        return self._producer.publish(*args, **kwargs)


class DuplicateHints:
    """Lock keys recently found held by another task, with a short expiry."""

    MAX_SECONDS = 5.0
    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def expects_duplicate(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > monotonic()

    def held(self, key: str, ttl: float | None) -> None:
        seconds = self.MAX_SECONDS if ttl is None else min(ttl, self.MAX_SECONDS)
        with self._lock:
            if len(self._until) >= self.MAX_ENTRIES:
                self._until.clear()
            self._until[key] = monotonic() + seconds

    def free(self, key: str) -> None:
        self._until.pop(key, None)
