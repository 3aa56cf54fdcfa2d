"""Where the worker releases locks: receivers of Celery's signals.

=========================  ===========================  ==================================
signal                     process                      releases when
=========================  ===========================  ==================================
``task_postrun``           pool child (or eager call)   SUCCESS, FAILURE, IGNORED, REJECTED
                                                        without requeue; not RETRY (the
                                                        retried message re-enters the lock)
``task_revoked``           worker main process          revoked before start, expired,
                                                        ``terminate=True``
``UniqueRequest``          worker main process          hard time limit, WorkerLostError
                                                        (the child died; no postrun ran)
=========================  ===========================  ==================================

Every release is the owner-checked compare-and-delete, so a late or repeated
release never frees a lock that another task took meanwhile. When nothing
fires (SIGKILL with ``acks_late``, a lost host) the lock's TTL is the safety
net, and a redelivered message with the same task id re-enters its own lock.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import signals, states
from celery.worker.request import Request

from celery_unique import headers
from celery_unique.conf import get_conf
from celery_unique.keys import digest_of_key

logger = logging.getLogger(__name__)

RELEASE_ATTEMPTS = 3


def release(app: Any, lock: headers.LockHeader, why: str) -> bool:
    """Owner-checked release, retried a few times; the TTL is the backstop."""
    for attempt in range(1, RELEASE_ATTEMPTS + 1):
        try:
            released = get_conf(app).locks.release(lock["key"], lock["owner"])
        except redis.RedisError:
            if attempt == RELEASE_ATTEMPTS:
                logger.warning(
                    "could not release lock %s of %s (%s); it expires after its timeout",
                    digest_of_key(lock["key"])[:12],
                    lock["owner"],
                    why,
                    exc_info=True,
                )
                return False
            time.sleep(0.05 * attempt)
        else:
            logger.debug(
                "lock %s of %s %s (%s)",
                digest_of_key(lock["key"])[:12],
                lock["owner"],
                "released" if released else "was not held",
                why,
            )
            return released
    return False


def _release_after_run(
    sender: Any = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    if task is None or state == states.RETRY:
        return
    if state == states.REJECTED and getattr(retval, "requeue", False):
        return
    lock = headers.from_context(task.request)
    if lock is not None:
        release(task.app, lock, state or "aborted")


def _release_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    lock = headers.from_context(request)
    if sender is not None and lock is not None:
        release(sender.app, lock, "revoked")


signals.task_postrun.connect(_release_after_run, weak=False, dispatch_uid="celery_unique.release_after_run")
signals.task_revoked.connect(_release_revoked, weak=False, dispatch_uid="celery_unique.release_revoked")


def _unwrap(exc: Any) -> Any:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


class UniqueRequest(Request):  # type: ignore[misc]
    """The worker's request for unique tasks: releases when the child is gone.

    A hard time limit or a killed pool child ends the task in the main
    process, where no ``task_postrun`` runs. ``Task.Request`` is Celery's
    documented way to handle these on every supported version.
    """

    def _lock(self) -> headers.LockHeader | None:
        return headers.from_message_headers(self.request_dict)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return
        task = self.task
        if task.acks_late and not getattr(task, "acks_on_timeout", True):
            return  # requeued: the redelivery re-enters the lock
        lock = self._lock()
        if lock is not None:
            release(task.app, lock, "hard time limit")

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = _unwrap(exc_info.exception)
        if not isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            return  # failures in the task body are released by task_postrun
        if self._already_revoked or self._already_cancelled:
            return
        task = self.task
        if task.acks_late and task.reject_on_worker_lost:
            return  # requeued: the redelivery re-enters the lock
        lock = self._lock()
        if lock is not None:
            release(task.app, lock, "worker lost")
