"""Every error celery-unique raises, in one place.

All of them derive from :class:`UniqueError` and carry their data as
attributes. Their ``args`` are their constructor's arguments (``str()`` is
the message): Celery rebuilds an exception as ``type(*args)``, from pickle
and from a JSON result backend alike, so a caller's ``get()`` raises the
error the worker raised.
"""

from __future__ import annotations

from typing import Any


class UniqueError(Exception):
    """Base class of every celery-unique error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _rebuilt_from(self, *arguments: Any) -> None:
        """Say the constructor's arguments (a subclass that takes others than the message)."""
        self.args = arguments

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


class ConfigurationError(UniqueError, ValueError):
    """A setting or task option has a value that cannot work."""


class UniqueKeyError(UniqueError, TypeError):
    """The arguments of a call cannot be turned into a lock key."""


class LockBackendError(UniqueError):
    """Redis could not be reached or answered with an error.

    Raised by ``delay()``/``apply_async()`` under the default
    ``unique_on_redis_error = "raise"``: nothing was published. The Redis error
    is chained as ``__cause__``.
    """


class _HeldLockError(UniqueError):
    """A lock is held by another task: who, for how long, and for which key."""

    def __init__(
        self,
        task_name: str,
        key_digest: str,
        existing_id: str,
        ttl: float | None,
    ) -> None:
        self.task_name = task_name
        self.key_digest = key_digest
        self.existing_id = existing_id
        self.ttl = ttl
        super().__init__(self.describe())
        self._rebuilt_from(task_name, key_digest, existing_id, ttl)

    def describe(self) -> str:
        raise NotImplementedError


class DuplicateTaskError(_HeldLockError):
    """A task with the same key is already queued or running (producer side).

    ``existing_id`` is the task id that holds the lock, ``ttl`` the seconds the
    lock has left (``None`` when unknown) and ``key_digest`` the argument digest
    (never the raw arguments). ``task_id`` is ``existing_id`` under the name
    celery-singleton used.
    """

    @property
    def task_id(self) -> str:
        return self.existing_id

    def describe(self) -> str:
        return (
            f"{self.task_name} is already queued or running as {self.existing_id} "
            f"(key {self.key_digest[:12]}, lock ttl {self.ttl}s)"
        )


class AlreadyQueued(DuplicateTaskError):
    """celery-once's error, raised by :class:`celery_unique.compat.QueueOnce`.

    A :class:`DuplicateTaskError` that also carries the lock's seconds left
    under celery-once's name, ``countdown``. It is built as celery-once's is,
    ``AlreadyQueued(countdown)`` (as tests written for celery-once do), with
    the message celery-once gives it; ``QueueOnce`` adds the task, key digest
    and holder it knows.
    """

    def __init__(
        self, countdown: float | None, task_name: str = "", key_digest: str = "", existing_id: str = ""
    ) -> None:
        super().__init__(task_name, key_digest, existing_id, countdown)
        self._rebuilt_from(countdown, task_name, key_digest, existing_id)

    @property
    def countdown(self) -> float | None:
        return self.ttl

    def describe(self) -> str:
        return super().describe() if self.existing_id else f"Expires in {self.ttl} seconds"


class LockConflictError(_HeldLockError):
    """A starting run found its lock held by another task (worker side).

    Raised with ``on_conflict="raise"``, and the ``exc`` of the retry with
    ``on_conflict="retry"``. Same attributes as :class:`DuplicateTaskError`.
    """

    def describe(self) -> str:
        return (
            f"{self.task_name} did not run: lock {self.key_digest[:12]} is held by "
            f"{self.existing_id} (ttl {self.ttl}s)"
        )


class IdempotencyConflict(UniqueError):
    """An explicit ``idempotency_key`` was reused with other arguments.

    Carries the key and both argument digests (the stored call's and this one's).
    """

    def __init__(self, task_name: str, idempotency_key: str, stored_digest: str, given_digest: str) -> None:
        self.task_name = task_name
        self.idempotency_key = idempotency_key
        self.stored_digest = stored_digest
        self.given_digest = given_digest
        super().__init__(
            f"{task_name}: idempotency key {idempotency_key!r} was used with other arguments "
            f"(stored {stored_digest[:12]}, given {given_digest[:12]})"
        )
        self._rebuilt_from(task_name, idempotency_key, stored_digest, given_digest)


class ReplayedError(UniqueError):
    """A stored failure replayed for a duplicate call, when its type is not a built-in."""

    def __init__(self, error_type: str, error_message: str) -> None:
        self.error_type = error_type
        self.error_message = error_message
        super().__init__(f"{error_type}: {error_message}")
        self._rebuilt_from(error_type, error_message)


class SealBroken(UniqueError):
    """A value celery-unique stored in Redis did not open with the configured keys.

    It was written by someone without ``unique_signing_key`` (or
    ``unique_encryption_key``): a forgery, or a process configured with
    another key. ``purpose`` names what the value was (a fan-in's callback,
    a part's report, an outcome, a context entry). Nothing is done with it.
    """

    def __init__(self, purpose: str) -> None:
        self.purpose = purpose
        super().__init__(
            f"a stored {purpose} did not verify with unique_signing_key or unique_encryption_key "
            "(nor their fallbacks): it was written without the key, or by a process configured "
            "with another one; it was not used"
        )
        self._rebuilt_from(purpose)
