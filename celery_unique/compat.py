"""Drop-in classes for code written for celery-once and celery-singleton.

``QueueOnce`` takes celery-once's options (``once={"graceful", "timeout",
"keys", "unlock_before_run"}``, per task and ``graceful``/``timeout`` per
call, and ``ONCE["settings"]["default_timeout"]``) and raises
``AlreadyQueued`` (with ``.countdown``). ``Singleton`` takes
celery-singleton's (``unique_on``, ``raise_on_duplicate``, ``lock_expiry``,
and the ``singleton_raise_on_duplicate``/``singleton_lock_expiry`` settings).
Both run on celery-unique's locks: one round trip, owner-checked release,
TTLs, release on revoke and time limits.

The peers' settings that say where locks live (``ONCE["settings"]["url"]``,
``singleton_backend_url``, ``singleton_key_prefix``) are not read: an app has
one lock store, shared by every unique task, the worker's release and the
``celery unique`` command, so a class of its own cannot move its locks. When
one of them differs from what celery-unique uses and its counterpart
(``unique_redis_url``, ``unique_key_prefix``) is not set, the task's first
``apply_async()`` raises :class:`~celery_unique.exceptions.ConfigurationError`
instead of putting the locks elsewhere unnoticed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar

from celery import states
from celery.result import EagerResult

from celery_unique.clients import normalised_url
from celery_unique.conf import UNTIL_EXECUTING, check_lock_timeout, get_conf
from celery_unique.exceptions import AlreadyQueued, ConfigurationError, DuplicateTaskError
from celery_unique.task import UniqueTask

__all__ = ["AlreadyQueued", "QueueOnce", "Singleton"]

# Our settings that say where locks live, and the UniqueConf property that resolves each.
_LOCATION_SETTINGS = {"unique_redis_url": "redis_url", "unique_key_prefix": "key_prefix"}


def _once_settings(app: Any) -> Mapping[str, Any]:
    """celery-once's ``ONCE["settings"]`` (``CELERY_ONCE`` under Django); empty when unset."""
    once = app.conf.get("ONCE")
    if once is None:
        return {}
    settings = once.get("settings", {}) if isinstance(once, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigurationError('ONCE must be a dict whose "settings" is a dict, as celery-once reads it')
    return settings


class _PeerTask(UniqueTask):
    """What both classes share: refusing a peer's lock location that would be ignored."""

    _peer_settings_checked = False

    def _peer_locations(self, app: Any) -> list[tuple[str, Any, str]]:
        """(the peer's setting, its value, our setting) for each that says where locks live."""
        raise NotImplementedError

    def check_unique_options(self) -> None:
        super().check_unique_options()
        self._check_peer_locations()

    def apply_async(self, *args: Any, **options: Any) -> Any:
        if not self._peer_settings_checked:
            try:
                self._check_peer_locations()
            except ConfigurationError as exc:
                raise ConfigurationError(f"{self.name}: {exc}") from None
            self._peer_settings_checked = True
        return super().apply_async(*args, **options)

    def _check_peer_locations(self) -> None:
        app = self._get_app()
        conf = get_conf(app)
        for theirs, value, ours in self._peer_locations(app):
            if value is None or app.conf.get(ours) is not None:
                continue
            # The same as what celery-unique uses (a lock URL that is the
            # broker's, in any spelling, say) changes nothing. An unusable
            # Redis setting is reported below, with the peer's setting named.
            with contextlib.suppress(ConfigurationError):
                used = getattr(conf, _LOCATION_SETTINGS[ours])
                if ours == "unique_redis_url" and isinstance(value, str):
                    value, used = normalised_url(value, theirs), normalised_url(used)
                if value == used:
                    continue
            # Never the value: a URL may hold a password.
            raise ConfigurationError(
                f"{theirs} is set, but celery-unique does not read it and uses another "
                f"{ours}: set {ours} (CELERY_{ours.upper()} under Django) to its value, or remove it"
            )


class QueueOnce(_PeerTask):
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

    @property
    def unique_lock_timeout(self) -> float:
        """``once={"timeout": s}``, else ``unique_lock_timeout`` when set, else
        ``ONCE["settings"]["default_timeout"]``, else the default."""
        app = self._get_app()
        if self.lock_timeout or app.conf.get("unique_lock_timeout") is not None:
            return super().unique_lock_timeout
        default = _once_settings(app).get("default_timeout")
        if default is None:
            return super().unique_lock_timeout
        return check_lock_timeout(default, 'ONCE["settings"]["default_timeout"]')

    def _peer_locations(self, app: Any) -> list[tuple[str, Any, str]]:
        return [('ONCE["settings"]["url"]', _once_settings(app).get("url"), "unique_redis_url")]

    def apply_async(self, args: Any = None, kwargs: Any = None, *positional: Any, **options: Any) -> Any:
        once = {**self.once, **(options.pop("once", None) or {})}
        unique_options = dict(options.pop("unique_options", None) or {})
        if once.get("timeout"):
            unique_options.setdefault("lock_timeout", once["timeout"])
        try:
            return super().apply_async(args, kwargs, *positional, unique_options=unique_options, **options)
        except DuplicateTaskError as exc:
            if once.get("graceful"):
                return EagerResult(None, None, states.REJECTED)
            raise AlreadyQueued(exc.task_name, exc.key_digest, exc.existing_id, exc.ttl) from None


class Singleton(_PeerTask):
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
        """``lock_expiry``, else ``unique_lock_timeout`` when set, else
        ``singleton_lock_expiry``, else the default."""
        expiry = self.lock_expiry
        conf = self._get_app().conf
        if expiry is None and conf.get("unique_lock_timeout") is None:
            expiry = conf.get("singleton_lock_expiry")
        return check_lock_timeout(expiry) if expiry else super().unique_lock_timeout

    def _peer_locations(self, app: Any) -> list[tuple[str, Any, str]]:
        return [
            ("singleton_backend_url", app.conf.get("singleton_backend_url"), "unique_redis_url"),
            ("singleton_key_prefix", app.conf.get("singleton_key_prefix"), "unique_key_prefix"),
        ]
