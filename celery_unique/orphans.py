"""Locks that may have been taken for a message that was never published.

When ``delay()`` cannot read the acquire reply (a socket timeout while Redis
stalls, a dropped connection), it raises ``LockBackendError`` and publishes
nothing. But the command may already sit in Redis's socket buffer and run
once Redis answers again, leaving a lock whose owner will never run: every
``delay()`` of that key would be its duplicate until the lock expires.

The owner token was made for that call and never published, so freeing its
lock is always right, whoever chose the task id. Until it is freed, a later
call of the same key in this process takes it over (:meth:`OrphanReleaser.abandoned`):
a caller that retries with its own task id is not told that its message is a
duplicate of itself. :data:`releaser` frees the locks from one daemon thread,
owner-checked, at growing intervals until Redis answers, and once more a
second later: Redis runs what it had buffered before it answers a new
connection. Nothing is retried when Redis certainly did not run the command
(:func:`certainly_not_run`). A process that exits first, or an app that
closes its lock store, leaves the lock to its TTL.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError

from celery_unique.clients import REDIS_ERRORS, certainly_not_run
from celery_unique.keys import digest_of_key

logger = logging.getLogger(__name__)

#: Seconds after the failure at which the release is tried, until Redis answers.
DELAYS = (0.5, 1.5, 3.5, 7.5, 15.0, 30.0)
#: Seconds after the first answer at which it is tried a last time.
CONFIRM_AFTER = 1.0
#: Seconds after the failure past which nothing is tried (slow attempts run late).
HORIZON = DELAYS[-1] + 10.0
#: Releases waiting at most; beyond this the TTL frees the locks.
MAX_PENDING = 10_000

_CONFIRMING = -1  # the attempt number of the last, confirming release


class OrphanReleaser:
    """Retries owner-checked releases of unconfirmed locks from one daemon thread."""

    def __init__(self) -> None:
        self._forget_parent()
        # A fork copies neither the thread nor a usable condition: start afresh.
        os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        # (when, order, store (weakly: a closed store's releases are dropped), key, owner,
        # attempt, failed at)
        self._due: list[tuple[float, int, weakref.ref[Any], str, str, int, float]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._trying = 0  # a release taken from _due and not finished yet
        self._abandoned: dict[str, str] = {}  # lock key -> the latest owner given up on

    def abandoned(self, key: str) -> str:
        """The owner token of a call of this process that gave up on ``key``'s lock
        and whose release is not settled yet ("" for none): a lock it holds has
        no message, so a new call may take it over."""
        return self._abandoned.get(key, "")

    def release_later(self, store: Any, key: str, owner: str) -> None:
        """Release ``key`` if ``owner`` holds it, soon and until Redis answers."""
        now = time.monotonic()
        with self._changed:
            if len(self._due) >= MAX_PENDING:
                return
            self._push(now + DELAYS[0], weakref.ref(store), key, owner, 0, now)
            self._abandoned[key] = owner
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-unique-orphans", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _push(
        self, when: float, store: weakref.ref[Any], key: str, owner: str, attempt: int, failed_at: float
    ) -> None:
        heapq.heappush(self._due, (when, next(self._order), store, key, owner, attempt, failed_at))

    def pending(self) -> int:
        """Releases still to try or being tried (for tests and tools)."""
        with self._changed:
            return len(self._due) + self._trying

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, ref, key, owner, attempt, failed_at = heapq.heappop(self._due)
                self._trying = 1
            late = time.monotonic() > failed_at + HORIZON  # slow attempts ran late: the TTL frees it
            answered = None if late else self._release(ref, key, owner)
            with self._changed:  # the next attempt is due before this one stops counting
                self._trying = 0
                if answered is None:
                    pass  # the TTL frees the lock, if it ever lands
                elif not answered and 0 <= attempt < len(DELAYS) - 1:
                    self._push(failed_at + DELAYS[attempt + 1], ref, key, owner, attempt + 1, failed_at)
                    continue
                elif answered and attempt != _CONFIRMING:
                    self._push(time.monotonic() + CONFIRM_AFTER, ref, key, owner, _CONFIRMING, failed_at)
                    continue
                if self._abandoned.get(key) == owner:
                    del self._abandoned[key]  # settled: released, or left to its TTL

    @staticmethod
    def _release(ref: weakref.ref[Any], key: str, owner: str) -> bool | None:
        """One owner-checked release: whether Redis answered; None when there is
        nothing more to do (the store is gone, or Redis is down).

        The store is held only during the call, so a closed one can go.
        """
        store = ref()
        if store is None:
            return None
        try:
            released = store.release(key, owner)
        except REDIS_ERRORS as exc:
            if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):
                return True  # Redis answered (and will not let this client release)
            if isinstance(exc, MasterNotFoundError):
                return False  # a failover: the new primary may hold a copy of the lock
            return None if certainly_not_run(exc, store.cluster) else False  # down: its buffer is gone
        except Exception:
            logger.exception("releasing lock %s of %s failed", digest_of_key(key)[:12], owner)
            return None  # the TTL frees it; the releaser goes on with the others
        if released:
            logger.warning(
                "lock %s taken for %s, which was never published, released", digest_of_key(key)[:12], owner
            )
        return True


releaser = OrphanReleaser()
