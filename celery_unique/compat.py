"""Drop-in classes for code written for celery-once and celery-singleton.

``QueueOnce`` takes celery-once's options (``once={"graceful", "timeout",
"keys", "unlock_before_run"}``, per task and ``graceful``/``timeout`` per
call) and raises ``AlreadyQueued`` (with ``.countdown``). ``Singleton`` takes
celery-singleton's (``unique_on``, ``raise_on_duplicate``, ``lock_expiry``,
and the ``singleton_raise_on_duplicate``/``singleton_lock_expiry`` settings).
Both run on celery-unique's locks: one round trip, owner-checked release,
TTLs, release on revoke and time limits.
"""

from __future__ import annotations

from typing import Any, ClassVar

from celery import states
from celery.result import EagerResult

from celery_unique.conf import UNTIL_EXECUTING, check_lock_timeout
from celery_unique.exceptions import DuplicateTaskError
from celery_unique.task import UniqueTask


class AlreadyQueued(DuplicateTaskError):
    """celery-once's error: the task is queued already; ``countdown`` is the lock's seconds left."""

    @property
    def countdown(self) -> float | None:
        return self.ttl


class QueueOnce(UniqueTask):
    """celery-once's ``QueueOnce`` on celery-unique."""

    once: ClassVar[dict[str, Any]] = {}
    on_duplicate = "raise"  # translated to AlreadyQueued, or graceful, below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        once = cls.__dict__.get("once") or {}
        if "keys" in once:
            cls.unique_on = tuple(once["keys"])
        if once.get("timeout"):
            cls.lock_timeout = once["timeout"]
        if once.get("unlock_before_run"):
            cls.lock = UNTIL_EXECUTING

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        once = {**self.once, **(options.pop("once", None) or {})}
        unique_options = dict(options.pop("unique_options", None) or {})
        if once.get("timeout"):
            unique_options.setdefault("lock_timeout", once["timeout"])
        try:
            return super().apply_async(
                args,
                kwargs,
                task_id,
                producer,
                link,
                link_error,
                shadow,
                unique_options=unique_options,
                **options,
            )
        except DuplicateTaskError as exc:
            if once.get("graceful"):
                return EagerResult(None, None, states.REJECTED)
            raise AlreadyQueued(exc.task_name, exc.key_digest, exc.existing_id, exc.ttl) from None


class Singleton(UniqueTask):
    """celery-singleton's ``Singleton`` on celery-unique.

    Its options feed UniqueTask's own resolution (per-call ``unique_options``
    still win), so no publishing code of its own is needed.
    """

    raise_on_duplicate: bool | None = None
    lock_expiry: float | None = None

    @property
    def on_duplicate(self) -> str:  # type: ignore[override]  # derived from celery-singleton's options
        raise_on_duplicate = self.raise_on_duplicate
        if raise_on_duplicate is None:
            raise_on_duplicate = bool(self._get_app().conf.get("singleton_raise_on_duplicate"))
        return "raise" if raise_on_duplicate else "return_existing"

    @property
    def unique_lock_timeout(self) -> float:
        expiry = self.lock_expiry
        if expiry is None:
            expiry = self._get_app().conf.get("singleton_lock_expiry")
        return check_lock_timeout(expiry) if expiry else super().unique_lock_timeout
