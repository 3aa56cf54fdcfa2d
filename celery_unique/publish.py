"""Publishing a call that takes a lock: one entry point, :func:`publish`, and named paths.

``UniqueTask.apply_async`` resolves the options and builds the key
(:class:`LockedCall`); :func:`publish` takes it to Redis and the broker along
one of three paths, chosen per call:

==============  ========================================  =========================================
path            taken when                                does
==============  ========================================  =========================================
``idempotent``  the task is idempotent                    one script replays a stored outcome,
                                                          answers with the task in flight, or
                                                          takes the lock; then publishes
``sequential``  the message is published again (a         acquires and reads the answer first,
                retry: never dropped), eager mode, a      then publishes or answers the duplicate
                client without the lean path, or a key
                recently found held (likely a duplicate)
``gated``       every other call                          sends the acquire, lets Celery build the
                                                          message meanwhile, and reads the answer
                                                          just before the publish
                                                          (:class:`GatedProducer`)
==============  ========================================  =========================================

Every path ends in one of the same few outcomes: published (``lock_acquired``),
a duplicate (:func:`duplicate`, by ``on_duplicate``), a publish that raised
(the lock released again), or Redis failing (:func:`acquire_failed`: nothing
published and ``LockBackendError``, or published without a check under
``unique_on_redis_error = "allow"``; a retry is published all the same).

On the gated path the round trip costs almost nothing on top of Celery's own
work. A duplicate should not pay for building a message it will never send,
so :class:`DuplicateHints` remembers keys recently found held; for those the
reply is awaited first. The hints only choose the order of work: the decision
always comes from Redis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Any

from celery_unique import idempotency, orphans, signals
from celery_unique.clients import REDIS_ERRORS, certainly_not_run, describe
from celery_unique.conf import UniqueConf
from celery_unique.exceptions import DuplicateTaskError, LockBackendError
from celery_unique.keys import args_key, digest_of_key, family_of, result_key
from celery_unique.locks import Acquisition, LockStore, NotReplicated, PendingAcquire

logger = logging.getLogger(__name__)


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
    """Lock keys recently found held by another task, each with a short expiry of its
    own; the most recently held ``MAX_ENTRIES`` at most (least recently held first out:
    expired entries, which are the oldest, go before any live one)."""

    MAX_SECONDS = 5.0
    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def expects_duplicate(self, key: str) -> bool:
        until = self._until.get(key)
        return until is not None and until > monotonic()

    def held(self, key: str, ttl: float | None) -> None:
        seconds = self.MAX_SECONDS if ttl is None else min(ttl, self.MAX_SECONDS)
        with self._lock:
            self._until[key] = monotonic() + seconds
            self._until.move_to_end(key)
            if len(self._until) > self.MAX_ENTRIES:
                self._until.popitem(last=False)

    def free(self, key: str) -> None:
        if key not in self._until:  # the common case (a fresh call), seen without the lock
            return
        with self._lock:
            self._until.pop(key, None)

    def __len__(self) -> int:
        return len(self._until)


hints = DuplicateHints()


@dataclasses.dataclass(slots=True)  # not frozen: a frozen init costs 4 us a call, slots 0.5
class LockedCall:
    """One ``apply_async`` that takes a lock: what the lock and the message need (never changed)."""

    app: Any
    conf: UniqueConf
    key: str
    task_id: str
    owner: str  # the message's owner token: the lock's value while it holds it
    ttl_ms: int
    handover: str  # the owner the lock may be taken from ("" for none)
    republish: bool  # the message is published again (a retry): never dropped
    on_duplicate: str
    producer: Any  # the caller's producer, if any
    send: Callable[..., Any]  # publish the locked message (through a producer, if given)
    publish_unlocked: Callable[[], Any]  # publish without a lock (unique_on_redis_error = "allow")
    given: str | None = None  # an idempotent call's argument digest
    idempotency_key: str | None = None


def publish(task: Any, call: LockedCall) -> tuple[bool, Any]:
    """Take the lock and publish, along the path the call needs: (whether a locked
    message went out, what ``apply_async`` returns)."""
    if call.given is not None:
        return idempotent(task, call)
    try:
        store = task.unique_store()  # built at first use: a cluster client connects then
    except REDIS_ERRORS as exc:
        return acquire_failed(task, call, None, exc)
    # The hint first: a likely duplicate skips the lookup of the eager flag (5 us).
    if (
        call.republish
        or hints.expects_duplicate(call.key)
        or call.app.conf["task_always_eager"]  # as the attribute reads it, 2 us sooner
        or not store.lean
    ):
        return sequential(task, call, store)
    return gated(task, call, store)


def sequential(task: Any, call: LockedCall, store: LockStore) -> tuple[bool, Any]:
    """Acquire and read the answer, then publish (a republished message always)."""
    attempt: PendingAcquire | None = None
    try:
        attempt = store.begin_acquire(call.key, call.owner, call.ttl_ms, call.handover)
        acquisition = answer(task, call.conf, attempt)
    except REDIS_ERRORS as exc:
        return acquire_failed(task, call, store, exc, attempt)
    if not acquisition.acquired:
        if not call.republish:
            return False, duplicate(task, call.key, acquisition, call.on_duplicate)
        logger.warning(
            "%s[%s]: published again although lock %s is held by %s (never dropped)",
            task.name,
            call.task_id,
            digest_of_key(call.key)[:12],
            acquisition.holder_id,
        )
    return True, _send(task, call, None, call.producer)


def gated(task: Any, call: LockedCall, store: LockStore) -> tuple[bool, Any]:
    """Send the acquire, publish while its reply is in flight; the producer reads it last."""
    try:
        pending = store.begin_acquire(call.key, call.owner, call.ttl_ms, call.handover)
    except REDIS_ERRORS as exc:
        return acquire_failed(task, call, store, exc)

    def gate() -> None:
        try:
            found = answer(task, call.conf, pending)
        except REDIS_ERRORS as exc:
            raise GateFailed(exc) from exc
        if not found.acquired:
            raise DuplicateFound(found)

    try:
        return True, _publish_gated(task, call, pending, gate)
    except DuplicateFound as found:
        _forget_unpublished(task, call.task_id)
        return False, duplicate(task, call.key, found.acquisition, call.on_duplicate)
    except GateFailed as failed:
        return False, redis_failed(task, call, failed.error)


def _publish_gated(task: Any, call: LockedCall, pending: PendingAcquire, gate: Callable[[], None]) -> Any:
    try:
        with call.app.producer_or_acquire(call.producer) as real_producer:
            return _send(task, call, pending, GatedProducer(real_producer, gate))
    finally:
        # Every path must read the reply: that returns the connection to
        # the pool. Not asked again: after a failure, that would take a
        # lock for a message that is not published.
        pending.reply()


def idempotent(task: Any, call: LockedCall) -> tuple[bool, Any]:
    """Replay a stored outcome, return the in-flight task, or take the lock and publish."""
    given = call.given
    assert given is not None
    family = family_of(call.key)
    store: LockStore | None = None  # built at first use: a cluster client connects then
    try:
        store = task.unique_store()
        try:
            acquisition, stored, holder_digest = store.acquire_idempotent(
                call.key, result_key(family), args_key(family), call.owner, call.ttl_ms, call.handover, given
            )
        except NotReplicated as short:
            unreplicated(task, call.conf, short)
            acquisition, stored, holder_digest = short.answer
    except REDIS_ERRORS as exc:
        return acquire_failed(task, call, store, exc)
    if stored is not None:
        outcome = idempotency.read(call.conf.sealer, family, stored)
        idempotency.check_conflict(task.name, call.idempotency_key, outcome.args_digest, given)
        logger.info(
            "%s: outcome of %s replayed (key %s)", task.name, outcome.task_id, digest_of_key(call.key)[:12]
        )
        return False, outcome.handle()
    idempotency.check_conflict(task.name, call.idempotency_key, holder_digest, given)
    if not acquisition.acquired and not call.republish:
        in_flight = duplicate(task, call.key, acquisition, call.on_duplicate)
        if in_flight is not None:
            in_flight.replayed = False
        return False, in_flight
    result = _send(task, call, None, call.producer)
    result.replayed = False
    return True, result


def _send(task: Any, call: LockedCall, pending: PendingAcquire | None, via: Any) -> Any:
    """Publish the locked message; a publish that raises gives the lock back."""
    try:
        result = call.send(via)
    except DuplicateFound:
        raise
    except BaseException:
        # Read the acquire reply first, so the release cannot overtake it.
        if pending is None or _acquired_or_unknown(pending):
            release_after_failed_publish(task, call)
        raise
    hints.free(call.key)
    result.duplicate = False
    signals.lock_acquired.send(sender=task, task_id=call.task_id, key_digest=digest_of_key(call.key))
    return result


def _acquired_or_unknown(pending: PendingAcquire) -> bool:
    found = pending.reply()  # never asked again: that could take the lock now
    if found is None:
        return pending.may_have_run()
    return found.acquired


def _forget_unpublished(task: Any, task_id: str) -> None:
    """Undo what Celery did for a message the gate stopped (result subscription)."""
    consumer = getattr(task.backend, "result_consumer", None)
    if consumer is not None:
        with contextlib.suppress(Exception):
            consumer.cancel_for(task_id)


def answer(task: Any, conf: UniqueConf, pending: PendingAcquire) -> Acquisition:
    """The acquire's answer (a lock the replicas did not confirm: see :func:`unreplicated`)."""
    try:
        return pending.result()
    except NotReplicated as short:
        unreplicated(task, conf, short)
        return short.acquisition


def unreplicated(task: Any, conf: UniqueConf, short: NotReplicated) -> None:
    """An answer whose lock the replicas did not confirm (a lock taken, or the
    holder's lock of a duplicate) is a Redis error, raised again; under
    ``unique_on_redis_error = "allow"`` it stands, with a warning."""
    if conf.on_redis_error != "allow":
        raise short
    logger.warning(
        "%s: %s; the answer stands as without unique_lock_replicas (unique_on_redis_error = 'allow')",
        task.name,
        short,
    )


def release_after_failed_publish(task: Any, call: LockedCall) -> None:
    store: LockStore = task.unique_store()
    try:
        store.release(call.key, call.owner)
    except REDIS_ERRORS as exc:
        if not call.republish:  # a republished message's lock is its earlier message's too
            orphans.releaser.release_later(store, call.key, call.owner, call.ttl_ms)
        # The error, not its traceback: on an outage every call lands here.
        logger.warning(
            "%s: the message was not published and its lock %s could not be released (%s); %s",
            task.name,
            digest_of_key(call.key)[:12],
            describe(exc, store.location),
            "it expires after its timeout" if call.republish else "retried in the background",
        )


def duplicate(task: Any, key: str, acquisition: Acquisition, on_duplicate: str) -> Any:
    """What a duplicate call returns (or raises), by ``on_duplicate``."""
    hints.held(key, acquisition.ttl)
    key_digest = digest_of_key(key)
    holder = acquisition.holder_id
    signals.duplicate_rejected.send(sender=task, existing_id=holder, key_digest=key_digest)
    logger.info(
        "%s: duplicate of %s (key %s, lock ttl %ss): not published",
        task.name,
        holder,
        key_digest[:12],
        acquisition.ttl,
    )
    if on_duplicate == "raise":
        raise DuplicateTaskError(task.name, key_digest, holder, acquisition.ttl)
    if on_duplicate == "ignore":
        return None
    result = task.AsyncResult(holder)
    result.duplicate = True
    return result


def acquire_failed(
    task: Any,
    call: LockedCall,
    store: LockStore | None,
    error: BaseException,
    attempt: PendingAcquire | None = None,
) -> tuple[bool, Any]:
    """Redis failed while taking the lock: (whether a message went out, what to return)."""
    if call.republish:
        return True, _republish_unchecked(task, call, error)
    if isinstance(error, NotReplicated) and store is not None:
        if error.acquisition.acquired:
            # Taken, and nothing is published: released now (or in the background).
            release_after_failed_publish(task, call)
        return False, redis_failed(task, call, error)
    if store is None:
        may_have_run = False  # no client: nothing was sent
    elif attempt is not None:
        may_have_run = attempt.may_have_run()
    else:
        may_have_run = not certainly_not_run(error, store.cluster)
    if may_have_run:
        orphans.releaser.release_later(store, call.key, call.owner, call.ttl_ms)  # it may still land
    return False, redis_failed(task, call, error)


def _republish_unchecked(task: Any, call: LockedCall, error: BaseException) -> Any:
    """Publish a message again (a retry) although Redis failed.

    A message published again is never dropped: Celery would turn a
    retry that cannot publish into a rejection and lose the task. It
    keeps its lock header, and its run checks the lock when it starts.
    """
    logger.warning(
        "%s[%s]: Redis failed (%s); published again without renewing lock %s (its run checks the lock)",
        task.name,
        call.task_id,
        describe(error, task.unique_location()),
        digest_of_key(call.key)[:12],
    )
    result = call.send(call.producer)
    result.duplicate = result.replayed = False
    return result


def redis_failed(task: Any, call: LockedCall, error: BaseException) -> Any:
    """Nothing was published: ``LockBackendError``, or, under ``unique_on_redis_error =
    "allow"``, the call published without a lock."""
    if call.conf.on_redis_error == "allow":
        logger.warning(
            "%s: Redis failed (%s); published without a uniqueness check (unique_on_redis_error = 'allow')",
            task.name,
            describe(error, task.unique_location()),
        )
        return call.publish_unlocked()
    raise LockBackendError(
        f"{task.name}: could not take the lock {digest_of_key(call.key)[:12]} in Redis "
        f"({describe(error, task.unique_location())}); nothing was published"
    ) from error
