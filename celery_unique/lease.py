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

from celery_unique import signals
from celery_unique.clients import REDIS_ERRORS, describe
from celery_unique.keys import digest_of_key

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One held lock of a running task, and what the task may know about it."""

    store: Any
    key: str
    owner: str
    ttl_ms: int
    task: Any = None  # the signals' sender
    fence: int | None = None
    lost: bool = False
    #: Keys renewed along with the lock (an idempotent call's argument digest).
    companions: tuple[str, ...] = ()
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
        self._renewing: Lease | None = None
        self._pid = 0
        # A fork while another thread holds the condition's lock would leave
        # the child's copy locked forever: the child starts afresh.
        os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        self._leases = set()
        self._changed = threading.Condition()
        self._thread = None
        self._renewing = None
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
        """Stop renewing; returns once no renewal of this lease is in flight."""
        with self._changed:
            self._leases.discard(lease)
            while self._renewing is lease:
                self._changed.wait()

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
                with self._changed:
                    if lease not in self._leases:
                        continue  # dropped meanwhile
                    self._renewing = lease
                try:
                    kept = self._renew(lease)
                finally:
                    with self._changed:
                        self._renewing = None
                        still_kept = lease in self._leases
                        if not kept and still_kept:
                            self._leases.discard(lease)
                        self._changed.notify_all()
                if not kept and still_kept:
                    self._report_lost(lease)

    def _renew(self, lease: Lease) -> bool:
        """Extend one lease; False when the lock is no longer the owner's."""
        try:
            kept = lease.store.extend(lease.key, lease.owner, lease.ttl_ms, lease.companions)
        except REDIS_ERRORS as exc:
            # Try again soon; the TTL still has two thirds left.
            lease.due = time.monotonic() + min(lease.interval, 1.0)
            logger.warning(
                "could not renew lock %s: %s",
                digest_of_key(lease.key)[:12],
                describe(exc, lease.store.location),
            )
            return True
        lease.due = time.monotonic() + lease.interval
        return bool(kept)

    def _report_lost(self, lease: Lease) -> None:
        lease.lost = True
        signals.lock_lost.send(sender=lease.task, owner=lease.owner, key_digest=digest_of_key(lease.key))
        logger.warning(
            "lock %s of %s was lost while the task ran (expired and taken, or released)",
            digest_of_key(lease.key)[:12],
            lease.owner,
        )


keeper = LeaseKeeper()
