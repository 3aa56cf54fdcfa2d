"""Drop-in classes for code written for celery-once and celery-singleton.

``QueueOnce`` takes celery-once's options (``once={"graceful", "timeout",
"keys", "unlock_before_run"}``, per task and ``graceful``/``timeout`` per
call, and ``ONCE["settings"]["default_timeout"]``) and raises
``AlreadyQueued`` (with ``.countdown``). ``Singleton`` takes
celery-singleton's (``unique_on``, ``raise_on_duplicate``, ``lock_expiry``,
and the ``singleton_raise_on_duplicate``/``singleton_lock_expiry``/
``singleton_json_encoder_class`` settings); :func:`clear_locks` stands for
its ``clear_locks``. Both run on celery-unique's locks: one round trip,
owner-checked release, TTLs, release on revoke and time limits. The peers'
timeouts stay expiries, as there (not renewed while the task runs).

Where the locks live follows the peers' settings too
(``ONCE["settings"]["url"]``, ``singleton_backend_url``,
``singleton_key_prefix``), so a project changes its imports only. Each class
reads them from the app's configuration through
:meth:`~celery_unique.task.UniqueTask.unique_store` and
:attr:`~celery_unique.task.UniqueTask.unique_key_prefix`, which ``delay()``
and the worker's hooks both use: the worker releases a lock where the producer
took it. A celery-unique setting that is set (``unique_redis_url``,
``unique_key_prefix``) wins over the peer's, as ``unique_lock_timeout`` wins
over the peers' default timeouts; a peer's setting that it overrides is
logged once. A peer's setting that cannot be honoured
(``singleton_backend_class`` other than its Redis backend,
``singleton_backend_kwargs``) is a :class:`ConfigurationError`.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from celery import states
from celery.result import EagerResult

from celery_unique.clients import SINGLE_SCHEMES, location, normalised_url
from celery_unique.conf import UNTIL_EXECUTING, UniqueConf, check_lock_timeout, get_conf
from celery_unique.exceptions import AlreadyQueued, ConfigurationError, DuplicateTaskError, UniqueKeyError
from celery_unique.inspect import held_locks
from celery_unique.keys import ArgumentKey, UniqueOn, validate_prefix
from celery_unique.locks import LockStore, task_id_of
from celery_unique.task import UniqueTask

__all__ = ["AlreadyQueued", "QueueOnce", "Singleton", "clear_locks"]

logger = logging.getLogger(__name__)


def _once_settings(app: Any) -> Mapping[str, Any]:
    """celery-once's ``ONCE["settings"]`` (``CELERY_ONCE`` under Django); empty when unset."""
    once = app.conf.get("ONCE")
    if once is None:
        return {}
    settings = once.get("settings", {}) if isinstance(once, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ConfigurationError('ONCE must be a dict whose "settings" is a dict, as celery-once reads it')
    return settings


# celery-singleton's Redis backend, by the import paths it is known under.
_SINGLETON_REDIS_BACKEND = (
    "celery_singleton.backends.redis.RedisBackend",
    "celery_singleton.backends.RedisBackend",
)


def _import_path(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"


def _encoder_class(value: Any) -> type[json.JSONEncoder] | None:
    """celery-singleton's ``singleton_json_encoder_class``: a class or its import path."""
    if value is None:
        return None
    found = value
    if isinstance(value, str):
        module, _, name = value.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigurationError(
                f"singleton_json_encoder_class {value!r} cannot be imported: {exc}"
            ) from None
    if not (isinstance(found, type) and issubclass(found, json.JSONEncoder)):
        raise ConfigurationError(
            "singleton_json_encoder_class must be a json.JSONEncoder subclass or its import path, "
            f"got {value!r}"
        )
    return found


class _EncodedArgumentKey(ArgumentKey):
    """Keys of calls whose chosen arguments are first written by celery-singleton's
    ``singleton_json_encoder_class`` and read back: what it writes alike (a UUID
    and its text, with an encoder that writes UUIDs as text) is one call, as with
    celery-singleton. The result is then keyed as any other."""

    def __init__(
        self, task_name: str, func: Any, unique_on: UniqueOn, encoder: type[json.JSONEncoder]
    ) -> None:
        super().__init__(task_name, func, unique_on)
        self.unique_on = unique_on
        self.encoder = encoder

    def material(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        chosen = super().material(args, kwargs)
        try:
            return json.loads(json.dumps(chosen, cls=self.encoder, sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise UniqueKeyError(
                f"{self.task_name}: singleton_json_encoder_class cannot write the arguments: {exc}"
            ) from None


@dataclass(frozen=True)
class _Location:
    """Where a compat class's locks live: a Redis URL (None: the app's) and a key prefix."""

    url: str | None
    prefix: str


class _PeerTask(UniqueTask):
    """What both classes share: their locks where the peer's settings put them."""

    #: The class it stands for, and the peer's settings that say where its
    #: locks live, as messages name them: the Redis URL's and the key prefix's.
    _peer_class: ClassVar[str] = ""
    _url_setting: ClassVar[str] = ""
    _prefix_setting: ClassVar[str] = ""

    def _peer_url(self, app: Any) -> Any:
        """The value of the peer's Redis URL setting (None when unset)."""
        return None

    def _peer_prefix(self, app: Any) -> Any:
        """The value of the peer's key prefix setting (None when unset)."""
        return None

    def unique_store(self) -> LockStore:
        conf = get_conf(self._get_app())
        url = self._location(conf).url
        if url is None:
            return conf.locks
        # Built at first use, like the app's own: a client is made here, not when checked.
        return conf.cached(f"compat:{self._peer_class}:store", lambda: conf.store_at(url, self._url_setting))

    def unique_location(self) -> str:
        try:
            url = self._location(get_conf(self._get_app())).url
        except ConfigurationError:
            return ""
        return location(url) if url is not None else super().unique_location()

    @property
    def unique_key_prefix(self) -> str:
        return self._location(get_conf(self._get_app())).prefix

    def check_unique_settings(self) -> None:
        if self._location(get_conf(self._get_app())).url is None:
            super().check_unique_settings()  # the app's Redis

    def _location(self, conf: UniqueConf) -> _Location:
        # One per class (all the Singleton tasks of an app share theirs), read once.
        return conf.cached(f"compat:{self._peer_class}", lambda: self._find_location(conf))

    def _check_peer_settings(self, conf: UniqueConf) -> None:
        """Raise :class:`ConfigurationError` for a peer's setting that cannot be honoured
        (checked with the location, so said once, by delay() and by a starting worker)."""

    def _find_location(self, conf: UniqueConf) -> _Location:
        self._check_peer_settings(conf)
        app = conf.app
        url = self._peer_url(app)
        if url is not None:
            if not (isinstance(url, str) and url.startswith(SINGLE_SCHEMES)):
                # Only the scheme: the rest may hold a password.
                scheme = url.partition("://")[0] if isinstance(url, str) and "://" in url else "none"
                raise ConfigurationError(
                    f"{self._url_setting} must be a Redis URL starting with one of "
                    f"{', '.join(SINGLE_SCHEMES)}; got scheme {scheme!r}"
                )
            wanted = normalised_url(url, self._url_setting)
            if app.conf.get("unique_redis_url") is not None:
                if wanted != normalised_url(conf.redis_url):
                    self._overridden(self._url_setting, "unique_redis_url")
                url = None
        prefix = conf.key_prefix
        theirs = self._peer_prefix(app)
        if theirs is not None:
            theirs = validate_prefix(theirs, self._prefix_setting)
            if app.conf.get("unique_key_prefix") is None:
                prefix = theirs
            elif theirs != prefix:
                self._overridden(self._prefix_setting, "unique_key_prefix")
        return _Location(url, prefix)

    def _overridden(self, theirs: str, ours: str) -> None:
        # Never the values: a URL may hold a password.
        logger.warning(
            "%s is set, but so is %s, which wins: the locks of %s tasks live where %s says",
            theirs,
            ours,
            self._peer_class,
            ours,
        )


class QueueOnce(_PeerTask):
    """celery-once's ``QueueOnce`` on celery-unique."""

    once: ClassVar[dict[str, Any]] = {}
    on_duplicate = "raise"  # translated to AlreadyQueued, or graceful, below
    _peer_class = "QueueOnce"
    _url_setting = 'ONCE["settings"]["url"]'

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
    def renew_lock(self) -> bool:  # type: ignore[override]  # derived from where the timeout comes from
        """Only for celery-unique's own ``lock_timeout`` (the task's, or ``unique_lock_timeout``).

        celery-once's timeout (``once={"timeout": s}``, ``default_timeout``, an
        hour by default) is the lock's expiry, running task or not, as there.
        """
        if self.once.get("timeout"):
            return False
        return self.lock_timeout is not None or self._get_app().conf.get("unique_lock_timeout") is not None

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

    def _peer_url(self, app: Any) -> Any:
        return _once_settings(app).get("url")

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
            raise AlreadyQueued(exc.ttl, exc.task_name, exc.key_digest, exc.existing_id) from None


class Singleton(_PeerTask):
    """celery-singleton's ``Singleton`` on celery-unique.

    Its options feed UniqueTask's own resolution (per-call ``unique_options``
    still win), so no publishing code of its own is needed.
    """

    raise_on_duplicate: bool | None = None
    lock_expiry: float | None = None
    _encoded_key: _EncodedArgumentKey | None = None
    _peer_class = "Singleton"
    _url_setting = "singleton_backend_url"
    _prefix_setting = "singleton_key_prefix"

    @property
    def on_duplicate(self) -> str:  # type: ignore[override]  # derived from celery-singleton's options
        raise_on_duplicate = self.raise_on_duplicate
        if raise_on_duplicate is None:
            raise_on_duplicate = bool(self._get_app().conf.get("singleton_raise_on_duplicate"))
        return "raise" if raise_on_duplicate else "return_existing"

    @property
    def renew_lock(self) -> bool:  # type: ignore[override]  # derived from where the timeout comes from
        """Unless celery-singleton's expiry is in force: its lock expires then, running
        task or not, as there (without one, celery-singleton's lock lived as long as
        the task: the renewed ``lock_timeout`` only bounds a crash)."""
        return self._peer_expiry() is None

    @property
    def unique_lock_timeout(self) -> float:
        """``lock_expiry``, else ``unique_lock_timeout`` when set, else
        ``singleton_lock_expiry``, else the default."""
        expiry = self._peer_expiry()
        return check_lock_timeout(expiry) if expiry else super().unique_lock_timeout

    def _peer_expiry(self) -> Any:
        """celery-singleton's expiry in force: ``lock_expiry``, else ``singleton_lock_expiry``
        unless ``unique_lock_timeout`` is set (None for none)."""
        expiry = self.lock_expiry
        conf = self._get_app().conf
        if expiry is None and conf.get("unique_lock_timeout") is None:
            expiry = conf.get("singleton_lock_expiry")
        return expiry or None

    def _peer_url(self, app: Any) -> Any:
        return app.conf.get("singleton_backend_url")

    def _check_peer_settings(self, conf: UniqueConf) -> None:
        settings = conf.app.conf
        backend = settings.get("singleton_backend_class")
        if backend is not None:
            path = backend if isinstance(backend, str) else _import_path(backend)
            if path not in _SINGLETON_REDIS_BACKEND:
                raise ConfigurationError(
                    f"singleton_backend_class is {path!r}, but celery-unique keeps locks in Redis "
                    "only: remove it (the locks live at singleton_backend_url, else in the broker's Redis)"
                )
        if settings.get("singleton_backend_kwargs"):
            # Never the values: they may hold a password.
            raise ConfigurationError(
                "singleton_backend_kwargs is set, but celery-unique makes its own Redis client: give "
                "connection options in the query string of singleton_backend_url, where redis-py reads "
                "them (timeouts: unique_redis_socket_timeout, unique_redis_connect_timeout), and remove it"
            )
        self._json_encoder(conf)

    def _json_encoder(self, conf: UniqueConf) -> type[json.JSONEncoder] | None:
        return conf.cached(
            "compat:Singleton:encoder",
            lambda: _encoder_class(conf.app.conf.get("singleton_json_encoder_class")),
        )

    def _argument_key(self, unique_on: UniqueOn) -> ArgumentKey:
        """Keys through ``singleton_json_encoder_class`` when it is set."""
        encoder = self._json_encoder(get_conf(self._get_app()))
        if encoder is None:
            return super()._argument_key(unique_on)
        built = self._encoded_key
        if built is None or built.encoder is not encoder or built.unique_on is not unique_on:
            built = _EncodedArgumentKey(self.name, self.run, unique_on, encoder)
            if unique_on is self.unique_on:  # kept, as UniqueTask keeps its own
                self._encoded_key = built
        return built

    def _peer_prefix(self, app: Any) -> Any:
        return app.conf.get("singleton_key_prefix")


def clear_locks(app: Any, *, all: bool = False, timeout: float = 1.0) -> int:
    """celery-singleton's ``clear_locks(app)``: free locks of ``app``'s ``Singleton`` tasks.

    celery-singleton deleted every lock, the held ones too. This frees only the
    locks that no task of a live worker holds: after reading the locks, it asks
    the workers (``app.control.inspect``, waiting ``timeout`` seconds for each of
    ``active``, ``reserved`` and ``scheduled``) which tasks they run, hold or
    have scheduled, and keeps the locks of those task ids. A message still in
    the broker's queue is not seen by any worker, so its lock is freed (and a
    duplicate of it may then be queued); so is the lock of a worker that did not
    answer in time. With ``all=True`` every lock is freed, as celery-singleton
    did. Each release is owner-checked: a lock taken again meanwhile is kept.
    Returns how many locks were freed.
    """
    names = [name for name, task in app.tasks.items() if isinstance(task, Singleton)]
    found = [held for name in names for held in held_locks(app, name)]
    if not found:
        return 0
    kept = set() if all else _held_by_workers(app, timeout)
    return sum(store.release(key, owner) for store, key, owner in found if task_id_of(owner) not in kept)


def _held_by_workers(app: Any, timeout: float) -> set[str]:
    """The ids of the tasks that the live workers run, hold (prefetched) or have scheduled."""
    inspector = app.control.inspect(timeout=timeout)
    requests = [
        request
        for replies in (inspector.active(), inspector.reserved())
        for listed in (replies or {}).values()
        for request in listed
    ]
    requests += [
        entry.get("request") or {} for entries in (inspector.scheduled() or {}).values() for entry in entries
    ]
    return {request["id"] for request in requests if request.get("id")}
