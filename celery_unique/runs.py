"""What the worker does around one run of a unique task.

:func:`begin` runs in ``before_start`` (inside Celery's trace, so ``Ignore``
and ``Retry`` raised there end the run as the task body would): it takes or
checks the lock the lifetime needs while the task runs, draws a fencing token
and starts lease renewal. :func:`end` runs from ``task_postrun`` and releases
what the lifetime says. :func:`release_abandoned` frees the locks of a task
that ended outside the pool child (revoked, hard time limit, killed child).

=============================  ===================  =====================  ==================
lifetime                       delay()              task start             task end
=============================  ===================  =====================  ==================
``until_executed``             takes ``:lock``      checks ``:lock``       releases ``:lock``
``until_executing``            takes ``:lock``      releases ``:lock``     —
``while_executing``            —                    takes ``:run``         releases ``:run``
``until_and_while_executing``  takes ``:lock``      swaps for ``:run``     releases ``:run``
``until_expired``              takes ``:lock``      —                      — (the TTL ends it)
=============================  ===================  =====================  ==================
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import states
from celery.exceptions import Ignore, Reject

from celery_unique import headers, idempotency, orphans, signals
from celery_unique.clients import REDIS_ERRORS, describe, refused_command
from celery_unique.conf import (
    HELD_WHILE_RUNNING,
    UNTIL_AND_WHILE_EXECUTING,
    UNTIL_EXECUTED,
    UNTIL_EXECUTING,
    UNTIL_EXPIRED,
    WHILE_EXECUTING,
    UniqueConf,
    get_conf,
)
from celery_unique.exceptions import LockBackendError, LockConflictError
from celery_unique.keys import args_key, digest_of_key, family_of, fence_key, lock_key, result_key, run_key
from celery_unique.lease import Lease, keeper
from celery_unique.locks import LockStore, NotReplicated, RunStart

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Lifetimes that take a lock in the worker even for messages sent by name.
WORKER_SIDE = (WHILE_EXECUTING, UNTIL_AND_WHILE_EXECUTING)

RELEASE_ATTEMPTS = 3
#: Seconds a run that can neither check its lock nor publish its retry waits for Redis.
OUTAGE_WAIT = 30.0
STATE = "_celery_unique"  # attribute of the request context that holds the run's Lease
PASSED_ON = "_celery_unique_passed_on"  # set when the run published its own lock onward
RAN = "_celery_unique_ran"  # set when begin() let the task body run

# What a run that did not start (conflict) or holds nothing leaves on its request.
NOTHING_HELD = Lease(store=None, key="", owner="", ttl_ms=0)


def _locks(
    task: Any, header: headers.LockHeader | None, run_owner: str, args: Any, kwargs: Any
) -> tuple[str, str]:
    """(family, owner) of a run: from the message's lock header, else from the
    arguments and ``run_owner`` (:func:`headers.run_owner`)."""
    if header is not None:
        return family_of(header["key"]), header["owner"]
    return family_of(task.unique_lock_key(args, kwargs)), run_owner


def begin(task: Any, task_id: str, args: Any, kwargs: Any) -> None:
    request = task.request
    lifetime = task.unique_lifetime
    header = headers.from_context(request)
    checks_outcome = task.idempotent
    if not checks_outcome and (lifetime == UNTIL_EXPIRED or (header is None and lifetime not in WORKER_SIDE)):
        return
    family, owner = _locks(task, header, headers.run_owner(request, task_id), args, kwargs)
    timeout = (header or {}).get("timeout") or task.unique_lock_timeout
    ttl_ms = int(timeout * 1000)
    conf = get_conf(task.app)

    def check() -> RunStart:
        locks: LockStore = task.unique_store()
        try:
            return locks.begin_run(
                lock_key(family),
                run_key(family),
                fence_key(family),
                owner,
                lifetime,
                ttl_ms,
                result=result_key(family) if checks_outcome else None,
                args=(args_key(family), _arguments_digest(task, request, header)) if checks_outcome else None,
                check_done=header is not None,
            )
        except NotReplicated as short:
            return _unreplicated(task, conf, family, lifetime, short)

    try:
        start = check()
    except REDIS_ERRORS as exc:
        setattr(request, STATE, NOTHING_HELD)
        if conf.on_redis_error == "allow":
            logger.warning(
                "%s[%s]: Redis failed (%s); runs without its lock (unique_on_redis_error = 'allow')",
                task.name,
                task_id,
                describe(exc, task.unique_location()),
            )
            setattr(request, RAN, True)
            return
        start = _when_redis_answers(task, task_id, family, exc, check)
    store = task.unique_store()
    if start.done:
        # A copy of a message that already ran to its end: its acknowledgement was
        # lost in a broker outage, or a retry was published while it was still held.
        setattr(request, STATE, NOTHING_HELD)
        logger.info(
            "%s[%s]: this message already ran to its end (key %s): not run again",
            task.name,
            task_id,
            digest_of_key(family)[:12],
        )
        raise Ignore(f"{task.name}[{task_id}] already ran to its end")
    if start.outcome is not None:
        # Already ran for this key (a redelivery, or a call sent by name):
        # the body is skipped and the stored outcome is the result.
        setattr(request, STATE, NOTHING_HELD)
        setattr(request, idempotency.REPLAY, idempotency.read(conf.sealer, family, start.outcome))
        logger.info(
            "%s[%s]: outcome stored for key %s replayed", task.name, task_id, digest_of_key(family)[:12]
        )
        return
    if not start.acquired:
        setattr(request, STATE, NOTHING_HELD)
        _conflict(task, family, start.holder_id, start.ttl)
        return
    held = lock_key(family) if lifetime == UNTIL_EXECUTED else run_key(family)
    companions = (args_key(family),) if task.idempotent else ()
    if start.released_queued:
        released(task, lock_key(family), owner, "started")
    lease = Lease(
        store=store, key=held, owner=owner, ttl_ms=ttl_ms, task=task, fence=start.fence, companions=companions
    )
    setattr(request, STATE, lease)
    setattr(request, RAN, True)
    if lifetime in HELD_WHILE_RUNNING and task.renew_lock:
        keeper.keep(lease)


def _when_redis_answers(
    task: Any, task_id: str, family: str, failure: BaseException, check: Callable[[], RunStart]
) -> RunStart:
    """A run could not check its lock: retry it through the broker, or, when that cannot
    be published either (one Redis for both, down), wait here for Redis.

    Failing would lose a message that was published and counted on (a Redis
    restart, a failover): the run is retried instead, like a conflict under
    ``on_conflict="retry"``, and fails with the error only once its retries are
    spent. A retry that cannot be published would make Celery reject the
    message for good; the run waits for Redis instead (:data:`OUTAGE_WAIT`),
    and, past that, leaves the message to the broker's redelivery.
    """
    where = task.unique_location()
    error = LockBackendError(
        f"{task.name}: could not check the lock {digest_of_key(family)[:12]} in Redis "
        f"({describe(failure, where)})"
    )
    error.__cause__ = failure
    logger.warning(
        "%s[%s]: Redis failed (%s); the run is retried in %ss",
        task.name,
        task_id,
        describe(failure, where),
        task.conflict_retry_countdown,
    )
    try:
        raise task.retry(countdown=task.conflict_retry_countdown, exc=error) from failure
    except Reject:
        pass  # the retry could not be published: the broker fails too
    logger.warning(
        "%s[%s]: the retry could not be published either; the run waits for Redis (up to %ss)",
        task.name,
        task_id,
        OUTAGE_WAIT,
    )
    deadline = time.monotonic() + OUTAGE_WAIT
    pause = 0.25
    while True:
        time.sleep(pause)
        try:
            return check()
        except REDIS_ERRORS as exc:
            if time.monotonic() + pause > deadline:
                logger.error(
                    "%s[%s]: Redis did not answer within %ss (%s); the message is left to the "
                    "broker's redelivery",
                    task.name,
                    task_id,
                    OUTAGE_WAIT,
                    describe(exc, where),
                )
                raise Reject(error, requeue=True) from exc
        pause = min(pause * 2, 2.0)


def _unreplicated(task: Any, conf: UniqueConf, family: str, lifetime: str, short: NotReplicated) -> RunStart:
    """A run's lock that the replicas did not confirm (``unique_lock_replicas``).

    A Redis error: raised again, and the run is retried, after the running
    lock it took is released (nobody else would free it). Under
    ``unique_on_redis_error = "allow"`` the run goes on with it, warned.
    """
    start = short.acquisition
    if conf.on_redis_error == "allow" and isinstance(start, RunStart):
        logger.warning(
            "%s[%s]: %s; runs with it all the same (unique_on_redis_error = 'allow')",
            task.name,
            task.request.id,
            short,
        )
        return start
    if isinstance(start, RunStart) and start.released_queued:
        released(task, lock_key(family), start.owner, "started")
    if lifetime in WORKER_SIDE:
        release(task, [run_key(family)], start.owner, "not replicated")
    raise short


def _conflict(task: Any, family: str, holder: str, ttl: float | None) -> None:
    policy = task.unique_on_conflict
    # A fan-in's callback is never given up: that would lose its fan-in's results.
    callback = policy != "raise" and headers.fan_in_callback(task.request) is not None
    if callback:
        policy = "retry"
    key_digest = digest_of_key(family)
    logger.info(
        "%s[%s]: lock %s is held by %s (ttl %ss): %s",
        task.name,
        task.request.id,
        key_digest[:12],
        holder,
        ttl,
        policy,
    )
    error = LockConflictError(task.name, key_digest, holder, ttl)
    signals.lock_conflict.send(
        sender=task, task_id=task.request.id, existing_id=holder, key_digest=key_digest, policy=policy
    )
    if policy == "discard":
        raise Ignore(str(error))
    if policy == "retry":
        # A callback waits past the task's max_retries too: the lock's TTL bounds the wait.
        limit = {"max_retries": sys.maxsize} if callback else {}
        try:
            raise task.retry(countdown=task.conflict_retry_countdown, exc=error, **limit)
        finally:
            if callback:
                vars(task).pop("override_max_retries", None)  # Celery keeps it on the task for autoretry
    raise error


def passed_on(request: Any) -> None:
    """The run published a message that took over its queued lock.

    A retry, a ``replace()`` or a task re-enqueueing itself: the queued lock
    now belongs to the new message, so the run neither renews nor releases it
    (its running lock, if any, is still its own).
    """
    setattr(request, PASSED_ON, True)
    lease: Lease | None = getattr(request, STATE, None)
    header = headers.from_context(request)
    if lease is not None and header is not None and lease.key == header.get("key"):
        keeper.drop(lease)


def end(task: Any, state: str | None, retval: Any) -> None:
    """Release what the run's lifetime releases at the end of a run (storing an outcome)."""
    request = task.request
    lease: Lease | None = getattr(request, STATE, None)
    if lease is not None:
        keeper.drop(lease)
    lifetime = task.unique_lifetime
    if lifetime in (UNTIL_EXECUTING, UNTIL_EXPIRED) and not task.idempotent:
        return
    header = headers.from_context(request)
    requeued = state == states.REJECTED and getattr(retval, "requeue", False)
    keeps_queued_lock = state == states.RETRY or requeued or getattr(request, PASSED_ON, False)
    why = state or "aborted"
    keys, owner = _ending_locks(lifetime, header, lease, keeps_queued_lock, request.id)
    if not task.idempotent:
        if keys:
            release(task, keys, owner, why, done_ttl_ms=_done_ttl_ms(state, header, request))
        return
    family = (
        family_of(header["key"])
        if header is not None
        else family_of(task.unique_lock_key(request.args, request.kwargs))
    )
    outcome = _outcome(task, state, retval, request, header)
    _store(task, family, keys, owner, outcome or "", why)


def _done_ttl_ms(state: str | None, header: headers.LockHeader | None, request: Any) -> int | None:
    """How long to remember that this run's message ran to its end (None: not at all).

    A run that ended (success or failure) after taking its lock; not a retry, a
    replace() or a message that handed its lock on (the same token goes on), and
    not a message without a token. Remembered as long as its lock could have lived:
    the window in which a broker delivers a copy again.
    """
    if state not in (states.SUCCESS, states.FAILURE) or header is None:
        return None
    if not getattr(request, RAN, False) or getattr(request, PASSED_ON, False):
        return None
    return int(float(header.get("timeout") or 0) * 1000) or None


def _ending_locks(
    lifetime: str,
    header: headers.LockHeader | None,
    lease: Lease | None,
    keeps_queued_lock: bool,
    task_id: str,
) -> tuple[list[str], str]:
    """The locks a run gives back at its end, and their owner."""
    if lease is not None and lease is not NOTHING_HELD and lifetime != UNTIL_EXECUTED:
        return [lease.key], lease.owner  # a running lock ends with the run, retried or not
    if lifetime == UNTIL_EXPIRED or keeps_queued_lock:
        return [], task_id
    # until_executed holds its queued lock to the end; a run that did not
    # start (conflict, Redis failure, replay) gives its queued lock back too.
    # After a conflict that lock is another task's: the owner check keeps it.
    if header is not None:
        return [header["key"]], header["owner"]
    if lease is not None and lease is not NOTHING_HELD:
        return [lease.key], lease.owner  # a message sent by name took the lock in the worker
    return [], task_id


def _outcome(
    task: Any, state: str | None, retval: Any, request: Any, header: headers.LockHeader | None
) -> str | None:
    """The outcome to store: only for a run whose body ran (not a replay, a
    conflict or a lock error)."""
    if not getattr(request, RAN, False) or getattr(request, idempotency.REPLAY, None) is not None:
        return None
    digest_of_args = _arguments_digest(task, request, header)
    task_id = request.id
    if state == states.SUCCESS:
        try:
            return idempotency.encode_success(task_id, digest_of_args, retval)
        except (TypeError, ValueError) as exc:
            logger.warning(
                "%s[%s]: the result (%s) is not JSON-serialisable, so it was not stored for replay: %s",
                task.name,
                task_id,
                type(retval).__name__,
                exc,
            )
            return None
    if state == states.FAILURE and task.idempotent_failures and isinstance(retval, BaseException):
        return idempotency.encode_failure(task_id, digest_of_args, retval)
    return None


def _arguments_digest(task: Any, request: Any, header: headers.LockHeader | None) -> str:
    """An idempotent call's argument digest: the producer's (JSON has turned tuples into lists since)."""
    return (header or {}).get("args") or str(task.arguments_digest(request.args, request.kwargs))


def _store(task: Any, family: str, keys: list[str], owner: str, outcome: str, why: str) -> None:
    ttl_ms = int(task.unique_result_ttl * 1000)
    conf = get_conf(task.app)
    locks = task.unique_store()
    outcome = idempotency.sealed(conf.sealer, family, outcome) if outcome else ""
    stored_and_released = _retried(
        lambda: locks.store_and_release(
            result_key(family), args_key(family), lock_key(family), keys, owner, outcome, ttl_ms
        ),
        RELEASE_ATTEMPTS,
        "%s: could not store the outcome for key %s (%s); its locks expire after their timeout",
        task.name,
        digest_of_key(family)[:12],
        owner,
    )
    if stored_and_released is not None and stored_and_released[1]:
        released(task, keys[0], owner, why)


def release_abandoned(
    task: Any, header: headers.LockHeader | None, run_owner: str, args: Any, kwargs: Any, why: str
) -> None:
    """Free every lock of a task that ended outside its pool child (``run_owner``:
    :func:`headers.run_owner` of its message)."""
    lifetime = getattr(task, "unique_lifetime", None)
    if lifetime is None or lifetime == UNTIL_EXPIRED:
        return
    if header is None and lifetime not in WORKER_SIDE:
        return
    family, owner = _locks(task, header, run_owner, args, kwargs)
    # One attempt: this runs in the worker's main process, which must not
    # stall its consumer on a Redis outage; the TTL is the backstop.
    release(task, [lock_key(family), run_key(family)], owner, why, attempts=1)


def release(
    task: Any,
    keys: list[str],
    owner: str,
    why: str,
    attempts: int = RELEASE_ATTEMPTS,
    done_ttl_ms: int | None = None,
) -> int:
    """Owner-checked release, retried a few times; the TTL is the backstop. With
    ``done_ttl_ms``, the owner's message is noted as run to its end."""
    locks = task.unique_store()
    count = _retried(
        lambda: locks.release_all(keys, owner, done_ttl_ms),
        attempts,
        "could not release lock %s of %s (%s); it is retried in the background",
        digest_of_key(keys[0])[:12],
        owner,
        why,
    )
    if count is None:
        # Redis did not answer: the lock of a run that has ended would hold its key until
        # its timeout, and a copy of its message could run again. Once Redis is back.
        for n, key in enumerate(keys):
            orphans.releaser.release_later(
                locks, key, owner, done_ttl_ms, after_run=True, done_ttl_ms=done_ttl_ms if n == 0 else None
            )
    if count:
        released(task, keys[0], owner, why)
    return count or 0


def released(task: Any, key: str, owner: str, why: str) -> None:
    """Tell observers that the owner's lock was released (lock_released)."""
    logger.debug("lock %s of %s released (%s)", digest_of_key(key)[:12], owner, why)
    signals.lock_released.send(sender=task, owner=owner, key_digest=digest_of_key(key), why=why)


def _retried(call: Callable[[], T], attempts: int, failure: str, *args: Any) -> T | None:
    """``call()``, tried up to ``attempts`` times on a Redis error; None (and
    ``failure`` logged) when every attempt failed."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except REDIS_ERRORS as exc:
            if refused_command(exc):
                # Redis answered: asking again changes nothing. One line saying why.
                logger.error(failure + ": %s", *args, describe(exc))
                return None
            if attempt == attempts:
                logger.warning(failure, *args, exc_info=True)
                return None
            time.sleep(0.25 * attempt * attempt)  # 0.25 s, then 1 s: a restart's worth
    return None
