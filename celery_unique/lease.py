"""Lease renewal: keep the lock of a running task alive while it runs.

A lock's TTL must cover a crash, not the longest run. While a task runs, one
daemon thread per worker process extends its lock every third of the TTL
(owner-checked). If an extension finds the lock gone or taken by another task,
the lease is marked lost, which the task sees as ``self.unique.lost``, and a
warning is logged; renewal of that lease stops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from celery_unique.keys import digest_of_key

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One held lock of a running task, and what the task may know about it."""

    store: Any
    key: str
    owner: str
    ttl_ms: int
    fence: int | None = None
    lost: bool = False
    due: float = field(default=0.0, repr=False)

    @property
    def interval(self) -> float:
        return self.ttl_ms / 3000.0


class LeaseKeeper:
    """Renews the leases of one process from a single daemon thread."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def keep(self, lease: Lease) -> None:
        lease.due = time.monotonic() + lease.interval
        with self._changed:
            if self._pid != os.getpid() or self._thread is None:
                # A forked pool child inherits no thread: start its own.
                self._pid = os.getpid()
                self._leases = set()
                self._thread = threading.Thread(target=self._run, name="celery-unique-leases", daemon=True)
                self._thread.start()
            self._leases.add(lease)
            self._changed.notify()

    def drop(self, lease: Lease) -> None:
        with self._changed:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [lease for lease in self._leases if lease.due <= now]
                if not due:
                    wait = min((lease.due for lease in self._leases), default=now + 60) - now
                    self._changed.wait(max(wait, 0.01))
                    continue
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        try:
            kept = lease.store.extend(lease.key, lease.owner, lease.ttl_ms)
        except redis.RedisError as exc:
            # Try again soon; the TTL still has two thirds left.
            lease.due = time.monotonic() + min(lease.interval, 1.0)
            logger.warning("could not renew lock %s: %r", digest_of_key(lease.key)[:12], exc)
            return
        if kept:
            lease.due = time.monotonic() + lease.interval
            return
        lease.lost = True
        self.drop(lease)
        logger.warning(
            "lock %s of %s was lost while the task ran (expired and taken, or released)",
            digest_of_key(lease.key)[:12],
            lease.owner,
        )


keeper = LeaseKeeper()
