"""``UniqueDjangoTask``: unique tasks published when the transaction commits.

The lock is taken inside the commit callback, never before: Django has no
rollback hook, so a lock taken at ``delay_on_commit()`` time would leak when
the transaction rolls back. The call returns an :class:`OnCommitResult` whose
``id`` is known once the transaction has committed.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from celery_unique.task import UniqueTask

try:  # Celery >= 5.4
    from celery.contrib.django.task import DjangoTask
except ImportError:  # pragma: no cover - Celery 5.3
    from celery import Task as DjangoTask

logger = logging.getLogger(__name__)


class OnCommitResult:
    """The handle of a task that is published when the transaction commits.

    Before the commit ``id`` is None and ``published`` False; after it, ``id``
    is the published task's id, or the holder's when the call was a duplicate
    (``duplicate`` True). If the transaction rolled back nothing is ever
    published. Other attributes (``get``, ``state``, ...) are the
    ``AsyncResult``'s once published.
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.result: Any = None
        self.error: BaseException | None = None
        self.published = False

    @property
    def id(self) -> str | None:
        return None if self.result is None else self.result.id

    @property
    def duplicate(self) -> bool | None:
        return None if self.result is None else bool(getattr(self.result, "duplicate", False))

    def _publish(self, args: Any, kwargs: Any, options: dict[str, Any]) -> None:
        try:
            self.result = self.task.apply_async(args, kwargs, **options)
        except BaseException as exc:
            self.error = exc
            raise
        self.published = True

    def __getattr__(self, name: str) -> Any:
        result = self.__dict__.get("result")
        if result is None:
            error = self.__dict__.get("error")
            if error is not None:
                raise AttributeError(f"{name!r}: publishing at commit failed: {error!r}") from error
            raise AttributeError(f"{name!r}: the task is published when the transaction commits")
        return getattr(result, name)

    def __repr__(self) -> str:
        return f"<OnCommitResult {self.task.name} id={self.id} published={self.published}>"


class UniqueDjangoTask(UniqueTask, DjangoTask):  # type: ignore[misc]
    """A :class:`~celery_unique.UniqueTask` with Django's on-commit publishing."""

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> OnCommitResult:
        """``delay()`` when the current transaction of the default database commits."""
        return self.apply_async_on_commit(args, kwargs)

    def apply_async_on_commit(
        self, args: Any = None, kwargs: Any = None, using: str | None = None, **options: Any
    ) -> OnCommitResult:
        """``apply_async()`` when the transaction on ``using`` commits.

        Outside an atomic block it publishes at once, and errors
        (``DuplicateTaskError``, ``LockBackendError``) propagate as from
        ``apply_async()``. Inside one, the callback is registered ``robust``:
        if publishing fails at commit it is logged (and kept on the handle as
        ``error``) and the other on-commit callbacks still run.
        """
        handle = OnCommitResult(self)
        if not transaction.get_connection(using).in_atomic_block:
            handle._publish(args, kwargs, options)
            return handle

        def publish() -> None:
            handle._publish(args, kwargs, options)

        transaction.on_commit(publish, using=using, robust=True)
        return handle
