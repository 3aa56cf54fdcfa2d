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

The end of a run whose release failed (Redis down as the task ended) is
handed here too: its lock is released, and its message noted as run to its
end, once Redis answers, instead of holding the key for ``lock_timeout``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError

from celery_unique.clients import REDIS_ERRORS, certainly_not_run
from celery_unique.keys import digest_of_key

logger = logging.getLogger(__name__)

#: Seconds after the failure at which the release is tried, until Redis answers;
#: then every DELAYS[-1] seconds, for as long as the lock could live.
DELAYS = (0.5, 1.5, 3.5, 7.5, 15.0, 30.0)
#: Seconds after the first answer at which it is tried a last time.
CONFIRM_AFTER = 1.0
#: Seconds after the failure past which nothing is tried, when the lock's TTL is not known.
HORIZON = DELAYS[-1] + 10.0
#: Releases waiting at most; beyond this the TTL frees the locks.
MAX_PENDING = 10_000

_CONFIRMING = -1  # the attempt number of the last, confirming release


@dataclass(frozen=True)
class _Release:
    """One release to try until Redis answers."""

    store: weakref.ref[Any]  # weakly: a closed store's releases are dropped
    key: str
    owner: str
    failed_at: float
    give_up_at: float  # the lock is gone by then (its TTL), or nothing is known of it
    #: A run that ended (its release failed): the lock exists for sure, so a refused
    #: connection (a Redis restarting) is tried again. Otherwise an acquire that may
    #: never have run: a Redis that refuses connections lost what it had buffered.
    after_run: bool = False
    #: The run's message is noted as run to its end for this long, with the release.
    done_ttl_ms: int | None = None


class OrphanReleaser:
    """Retries owner-checked releases of unconfirmed locks from one daemon thread."""

    def __init__(self) -> None:
        self._forget_parent()
        # A fork copies neither the thread nor a usable condition: start afresh.
        os.register_at_fork(after_in_child=self._forget_parent)

    def _forget_parent(self) -> None:
        self._due: list[tuple[float, int, int, _Release]] = []  # (when, order, attempt, release)
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

    def release_later(
        self,
        store: Any,
        key: str,
        owner: str,
        ttl_ms: int | None = None,
        after_run: bool = False,
        done_ttl_ms: int | None = None,
    ) -> None:
        """Release ``key`` if ``owner`` holds it, soon and until Redis answers (for as long
        as its ``ttl_ms`` lets it live); ``after_run`` for the end of a run whose release
        failed (see :class:`_Release`)."""
        now = time.monotonic()
        with self._changed:
            if len(self._due) >= MAX_PENDING:
                return
            give_up_at = now + max(HORIZON, (ttl_ms or 0) / 1000.0)
            release = _Release(weakref.ref(store), key, owner, now, give_up_at, after_run, done_ttl_ms)
            self._push(now + DELAYS[0], 0, release)
            self._abandoned[key] = owner
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-unique-orphans", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _push(self, when: float, attempt: int, release: _Release) -> None:
        heapq.heappush(self._due, (when, next(self._order), attempt, release))

    def pending(self) -> int:
        """Releases still to try or being tried (for tests and tools)."""
        with self._changed:
            return len(self._due) + self._trying

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, attempt, release = heapq.heappop(self._due)
                self._trying = 1
            late = time.monotonic() > release.give_up_at  # the TTL has freed it (if it ever landed)
            answered = None if late else self._release(release)
            with self._changed:  # the next attempt is due before this one stops counting
                self._trying = 0
                if answered is None:
                    pass  # the TTL frees the lock, if it ever lands
                elif not answered and attempt >= 0:
                    after = DELAYS[attempt + 1] if attempt + 1 < len(DELAYS) else None
                    when = release.failed_at + after if after else time.monotonic() + DELAYS[-1]
                    self._push(when, attempt + 1, release)
                    continue
                elif answered and attempt != _CONFIRMING and not release.after_run:
                    self._push(time.monotonic() + CONFIRM_AFTER, _CONFIRMING, release)
                    continue
                if self._abandoned.get(release.key) == release.owner:
                    del self._abandoned[release.key]  # settled: released, or left to its TTL

    @staticmethod
    def _release(release: _Release) -> bool | None:
        """One owner-checked release: whether Redis answered; None when there is
        nothing more to do (the store is gone, or Redis is down and lost what it had).

        The store is held only during the call, so a closed one can go.
        """
        store = release.store()
        if store is None:
            return None
        key, owner = release.key, release.owner
        try:
            released = store.release_all([key], owner, release.done_ttl_ms)
        except REDIS_ERRORS as exc:
            if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):
                return True  # Redis answered (and will not let this client release)
            if isinstance(exc, MasterNotFoundError) or release.after_run:
                return False  # a failover, or a restart: the lock may well be there after it
            return None if certainly_not_run(exc, store.cluster) else False  # down: its buffer is gone
        except Exception:
            logger.exception("releasing lock %s of %s failed", digest_of_key(key)[:12], owner)
            return None  # the TTL frees it; the releaser goes on with the others
        if released and release.after_run:
            logger.warning("lock %s of %s, whose run had ended, released", digest_of_key(key)[:12], owner)
        elif released:
            logger.warning(
                "lock %s taken for %s, which was never published, released", digest_of_key(key)[:12], owner
            )
        return True


releaser = OrphanReleaser()
