"""Settings: one lazily read property per setting, every default in one place.

Settings live in ``app.conf`` under lowercase ``unique_*`` names (under Django
with the ``CELERY`` namespace they are ``CELERY_UNIQUE_*``). Resolution order
for task options: per-call ``unique_options`` > task attribute > ``app.conf`` >
:data:`DEFAULTS`.

They are read lazily, at their first use, and then kept: a lookup in
``app.conf`` costs several microseconds (Celery tries every key spelling in
every layer), which ``delay()`` cannot afford on each call. :meth:`UniqueConf.reload`
reads them again; the Django integration calls it on ``setting_changed``, so
``override_settings`` works.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from celery_unique import metrics, sealing
from celery_unique.clients import (
    SCHEMES,
    SENTINEL_SCHEMES,
    check_target,
    location,
    make_client,
    normalised_url,
)
from celery_unique.exceptions import ConfigurationError
from celery_unique.keys import validate_prefix
from celery_unique.locks import LockStore

T = TypeVar("T")

UNTIL_EXECUTED = "until_executed"
UNTIL_EXECUTING = "until_executing"
WHILE_EXECUTING = "while_executing"
UNTIL_AND_WHILE_EXECUTING = "until_and_while_executing"
UNTIL_EXPIRED = "until_expired"
LIFETIMES = (UNTIL_EXECUTED, UNTIL_EXECUTING, WHILE_EXECUTING, UNTIL_AND_WHILE_EXECUTING, UNTIL_EXPIRED)
# Lifetimes whose lock is held while the task runs (and so is renewed).
HELD_WHILE_RUNNING = (UNTIL_EXECUTED, WHILE_EXECUTING, UNTIL_AND_WHILE_EXECUTING)
ON_CONFLICT = ("discard", "retry", "raise")
ON_DUPLICATE = ("return_existing", "raise", "ignore")
ON_REDIS_ERROR = ("raise", "allow")
ON_CANVAS = ("bypass", "dedupe", "raise")

DEFAULTS: dict[str, Any] = {
    "unique_lock_timeout": 3600.0,
    "unique_redis_url": None,
    "unique_redis_transport_options": None,
    "unique_key_prefix": "celery_unique",
    "unique_default_on_duplicate": "return_existing",
    "unique_default_lock": UNTIL_EXECUTED,
    "unique_default_on_conflict": "discard",
    "unique_result_ttl": 86400.0,
    "unique_on_redis_error": "raise",
    "unique_on_canvas": "bypass",
    "unique_redis_socket_timeout": 5.0,
    "unique_redis_connect_timeout": 5.0,
    "unique_prometheus": None,
    "unique_fan_in_claim_timeout": 30.0,
    "unique_signing_key": None,
    "unique_signing_key_fallbacks": (),
    "unique_encryption_key": None,
    "unique_encryption_key_fallbacks": (),
    "unique_lock_replicas": 0,
    "unique_reap_interval": 60.0,
}


def check_lock_timeout(value: Any, name: str = "lock_timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _first_url(url: Any) -> str | None:
    """The Redis URL in a broker or backend setting (a string or a list, maybe ``;``-joined)."""
    if isinstance(url, (list, tuple)):
        url = ";".join(part for part in url if isinstance(part, str))
    if isinstance(url, str):
        first = url.split(";")[0].strip()
        if first.startswith(SENTINEL_SCHEMES):
            return url  # every Sentinel of the list
        if first.startswith(SCHEMES):
            return first  # a failover list of servers: the first, as Celery starts with it
    return None


class UniqueConf:
    """The celery-unique view of one Celery app's configuration."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._stores: dict[tuple[Any, ...], LockStore] = {}
        self._values: dict[str, Any] = {}
        #: Changes whenever the settings are read anew: what a task resolved from
        #: them before is stale then.
        self.generation = 0

    def reload(self) -> None:
        """Forget the settings read so far; the next use reads ``app.conf`` again."""
        self._values = {}
        self.generation += 1

    def close(self) -> None:
        """Close the Redis connections of this app (they reopen on next use)."""
        with self._lock:
            stores, self._stores = self._stores, {}
            self._values = {}
            self.generation += 1
        for store in stores.values():
            store.close()

    def _get(self, name: str) -> Any:
        values = self._values
        try:
            return values[name]
        except KeyError:
            value = self.app.conf.get(name)
            values[name] = value = DEFAULTS[name] if value is None else value
            return value

    @property
    def lock_timeout(self) -> float:
        return check_lock_timeout(self._get("unique_lock_timeout"), "unique_lock_timeout")

    @property
    def result_ttl(self) -> float:
        return check_lock_timeout(self._get("unique_result_ttl"), "unique_result_ttl")

    @property
    def key_prefix(self) -> str:
        # Checked once per settings load: every delay() reads it.
        return self.cached("_key_prefix", lambda: validate_prefix(self._get("unique_key_prefix")))

    @property
    def default_on_duplicate(self) -> str:
        return check_choice(
            self._get("unique_default_on_duplicate"), ON_DUPLICATE, "unique_default_on_duplicate"
        )

    @property
    def default_lock(self) -> str:
        return check_choice(self._get("unique_default_lock"), LIFETIMES, "unique_default_lock")

    @property
    def default_on_conflict(self) -> str:
        return check_choice(
            self._get("unique_default_on_conflict"), ON_CONFLICT, "unique_default_on_conflict"
        )

    @property
    def on_redis_error(self) -> str:
        return check_choice(self._get("unique_on_redis_error"), ON_REDIS_ERROR, "unique_on_redis_error")

    @property
    def on_canvas(self) -> str:
        return check_choice(self._get("unique_on_canvas"), ON_CANVAS, "unique_on_canvas")

    @property
    def redis_url(self) -> str:
        """``unique_redis_url``, else the broker or result backend URL when it is Redis."""
        return self.redis_target[0]

    @property
    def redis_target(self) -> tuple[str, dict[str, Any]]:
        """The Redis URL and its transport options (a Sentinel master's name).

        Without ``unique_redis_url``, the broker's or result backend's Redis,
        with the transport options Celery has for it.
        """
        url = self._get("unique_redis_url")
        options = self._get("unique_redis_transport_options")
        if options is not None and not isinstance(options, dict):
            raise ConfigurationError(f"unique_redis_transport_options must be a dict, got {options!r}")
        if url:
            if not isinstance(url, str):
                raise ConfigurationError(f"unique_redis_url must be a string, got {type(url).__name__}")
            check_target(url, options or {})
            return url, options or {}
        conf = self.app.conf
        for candidate, their_options in (
            (conf.broker_url, conf.broker_transport_options),
            (conf.result_backend, conf.result_backend_transport_options),
        ):
            found = _first_url(candidate)
            if found:
                check_target(found, options or their_options or {})
                return found, options or their_options or {}
        raise ConfigurationError(
            "celery-unique needs a Redis: set unique_redis_url "
            "(CELERY_UNIQUE_REDIS_URL under Django), or use a Redis broker"
        )

    @property
    def lock_replicas(self) -> int:
        """Replicas that must acknowledge a lock before it counts as taken (``WAIT``)."""
        value = self._get("unique_lock_replicas")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"unique_lock_replicas must be a non-negative integer, got {value!r}")
        return value

    @property
    def replica_timeout_ms(self) -> int:
        """How long ``WAIT`` waits for the replicas: half the socket timeout.

        Not a setting of its own: the answer must come before the socket
        gives up, so that a lock the replicas did not confirm is known to be
        taken (and released at once) rather than left unknown; the other half
        is the round trip's.
        """
        return max(int(self.socket_timeout * 500), 1)

    @property
    def socket_timeout(self) -> float:
        value = self._get("unique_redis_socket_timeout")
        return check_lock_timeout(value, "unique_redis_socket_timeout")

    @property
    def connect_timeout(self) -> float:
        value = self._get("unique_redis_connect_timeout")
        return check_lock_timeout(value, "unique_redis_connect_timeout")

    def errors(self, skip: tuple[str, ...] = ()) -> list[ConfigurationError]:
        """What is wrong with the settings: one error per invalid setting (but
        those of the properties named in ``skip``)."""
        found = []
        for name in _VALIDATED:
            if name in skip:
                continue
            try:
                getattr(self, name)
            except ConfigurationError as exc:
                found.append(exc)
        return found

    @property
    def reap_interval(self) -> float:
        """Seconds within which the reaper frees a lock whose message is gone; 0: no reaper."""
        value = self._get("unique_reap_interval")
        if value is False or value == 0:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
            raise ConfigurationError(
                f"unique_reap_interval must be a number of seconds of at least 1, or 0 (off); got {value!r}"
            )
        return float(value)

    @property
    def fan_in_claim_timeout(self) -> float:
        """Seconds a fan-in's closer has to publish its callback before another takes over."""
        value = self._get("unique_fan_in_claim_timeout")
        return check_lock_timeout(value, "unique_fan_in_claim_timeout")

    def _keys(self, name: str, default: bytes | None = None) -> list[bytes]:
        """A key setting and its fallbacks, as bytes (the first one seals)."""
        first = self._get(name)
        fallbacks = self._get(f"{name}_fallbacks")
        if isinstance(fallbacks, (str, bytes)) or not isinstance(fallbacks, (list, tuple)):
            raise ConfigurationError(f"{name}_fallbacks must be a list of keys")
        keys = [sealing.as_key(first, name)] if first is not None else ([default] if default else [])
        return keys + [sealing.as_key(key, f"{name}_fallbacks") for key in fallbacks]

    @property
    def sealer(self) -> sealing.Sealer:
        """Seals what the plugin stores and later trusts (:mod:`celery_unique.sealing`)."""
        return self.cached("_sealer", self._new_sealer)

    def _new_sealer(self) -> sealing.Sealer:
        provider = sealing.default_signing_key
        default = provider() if provider is not None else None
        signing = self._keys("unique_signing_key", default)
        return sealing.Sealer(signing, self._keys("unique_encryption_key"))

    @property
    def prometheus(self) -> bool | None:
        value = self._get("unique_prometheus")
        if not (value is None or isinstance(value, bool)):
            raise ConfigurationError(f"unique_prometheus must be True, False or None, got {value!r}")
        if value and not metrics.installed():
            raise ConfigurationError(
                "unique_prometheus = True needs prometheus_client: pip install celery-unique[prometheus]"
            )
        return value

    @property
    def location(self) -> str:
        """Where the lock Redis is, for messages (never a password)."""
        return location(self.redis_target[0])

    @property
    def locks(self) -> LockStore:
        """The lock store for the configured Redis (one client per URL and timeouts)."""
        return self.cached("_locks", lambda: self._store(*self.redis_target))

    def store_at(self, url: Any, setting: str) -> LockStore:
        """The lock store of the Redis at ``url``, which ``setting`` names (a peer
        package's setting, read by a compat class), with this app's timeouts and
        replicas: :attr:`locks` itself when ``url`` is the same Redis in any spelling.

        A URL that cannot be used is a :class:`ConfigurationError` naming ``setting``,
        never the URL (it may hold a password).
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"{setting} must be a string, got {type(url).__name__}")
        check_target(url, {}, setting)
        wanted = normalised_url(url, setting)
        with contextlib.suppress(ConfigurationError):  # no Redis of ours: another, then
            if wanted == normalised_url(self.redis_url):
                return self.locks
        return self._store(url, {})

    def _store(self, url: str, options: dict[str, Any]) -> LockStore:
        timeouts = {"socket_timeout": self.socket_timeout, "socket_connect_timeout": self.connect_timeout}
        replicas = self.lock_replicas
        # Equivalent spellings of one URL share one client.
        ident = (normalised_url(url), repr(sorted(options.items())), *timeouts.values(), replicas)
        store = self._stores.get(ident)
        if store is None:
            # Built outside the lock: a cluster client connects now, and
            # during an outage threads must not queue behind one another.
            client = make_client(url, options, **timeouts)
            built = LockStore(client, replicas, self.replica_timeout_ms, location(url))
            with self._lock:
                store = self._stores.setdefault(ident, built)
            if store is not built:
                built.close()  # another thread was first
        # The first use of the locks in this process: counters from now
        # on (before the store is kept, so a setting that fails fails again).
        metrics.enable_as_configured(self.prometheus)
        return store

    def cached(self, name: str, compute: Callable[[], T]) -> T:
        """``compute()``, a value derived from the settings (by a task class, say),
        computed once and kept until :meth:`reload`."""
        values = self._values  # one dict: what a reload meanwhile overtakes is dropped with it
        try:
            found: T = values[name]
        except KeyError:
            found = values[name] = compute()
        return found


# The properties that read and check a setting (what errors() looks at).
_VALIDATED = (
    "lock_timeout",
    "result_ttl",
    "key_prefix",
    "default_on_duplicate",
    "default_lock",
    "default_on_conflict",
    "on_redis_error",
    "on_canvas",
    "redis_target",
    "socket_timeout",
    "connect_timeout",
    "fan_in_claim_timeout",
    "sealer",
    "prometheus",
    "lock_replicas",
    "reap_interval",
)


_creating = threading.Lock()


def get_conf(app: Any) -> UniqueConf:
    """The :class:`UniqueConf` of ``app``, created once and cached on the app."""
    conf: UniqueConf | None = getattr(app, "_celery_unique_conf", None)
    if conf is None:
        with _creating:  # the first calls may come from many threads at once
            conf = getattr(app, "_celery_unique_conf", None)
            if conf is None:
                conf = app._celery_unique_conf = UniqueConf(app)
    return conf
