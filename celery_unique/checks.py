"""Configuration checks, run when a worker starts (see hooks).

:func:`configuration_errors` finds settings and task options that cannot
work; the worker refuses to start with them. The other checks are logged as
warnings; each finds a setting that lets a duplicate run or a lock vanish:

* a lock held while the task runs, not renewed, shorter than the task's hard
  ``time_limit``: the lock expires while the task still runs;
* a Redis broker ``visibility_timeout`` shorter than the longest lock: an
  unacknowledged message is redelivered (and run again) while its lock lives;
* a ``maxmemory-policy`` other than ``noeviction``: Redis may evict lock keys;
* ``unique_lock_replicas`` above the replicas connected to the lock Redis
  (to one of its primaries): every lock then falls short of it.

:func:`check_app` returns the findings, so other front ends (Django's system
checks) can report them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoPermissionError

from celery_unique.clients import REDIS_ERRORS, is_cluster, text
from celery_unique.conf import HELD_WHILE_RUNNING, get_conf
from celery_unique.exceptions import ConfigurationError, UniqueError
from celery_unique.inspect import locations


@dataclass(frozen=True)
class Finding:
    """One problem found in the configuration, with a stable id."""

    id: str
    message: str


def _unique_tasks(app: Any) -> list[Any]:
    # On the class: the instance's property would check the option (and may raise).
    return [task for task in app.tasks.values() if hasattr(type(task), "unique_lifetime")]


def configuration_errors(app: Any) -> list[ConfigurationError]:
    """Invalid settings, and unique tasks whose options cannot work (none without unique tasks)."""
    tasks = _unique_tasks(app)
    if not tasks:
        return []
    # Where locks live is checked per task: a task may keep them away from the
    # app's Redis (a compat class, on its peer's setting), and an app whose
    # tasks all do needs none. A setting that cannot work is said once.
    errors = get_conf(app).errors(skip=("redis_target",))
    settings: dict[str, ConfigurationError] = {}
    for task in tasks:
        try:
            task.check_unique_settings()
        except ConfigurationError as exc:
            settings.setdefault(str(exc), exc)
        try:
            task.check_unique_options()
        except ConfigurationError as exc:
            message = str(exc)
            if message in settings:
                continue  # the same setting, met again through the task's options
            named = message if message.startswith(f"{task.name}: ") else f"{task.name}: {message}"
            errors.append(ConfigurationError(named))
    return [*settings.values(), *errors]


def check_timeouts(app: Any) -> list[Finding]:
    findings = []
    for task in _unique_tasks(app):
        time_limit = task.time_limit or app.conf.task_time_limit
        if (
            time_limit
            and task.unique_lifetime in HELD_WHILE_RUNNING
            and not task.renew_lock
            and task.unique_lock_timeout < time_limit
        ):
            findings.append(
                Finding(
                    "lock_timeout",
                    f"{task.name}: lock_timeout {task.unique_lock_timeout:g}s is shorter than its "
                    f"hard time_limit {time_limit:g}s and renew_lock is off: the lock can expire "
                    "while the task still runs",
                )
            )
    return findings


def check_visibility_timeout(app: Any) -> list[Finding]:
    broker = app.conf.broker_url or ""
    if not isinstance(broker, str) or not broker.startswith(
        ("redis://", "rediss://", "redis+socket://", "sentinel://")
    ):
        return []
    visibility = (app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    tasks = _unique_tasks(app)
    if not tasks:
        return []
    longest = max(tasks, key=lambda task: task.unique_lock_timeout)
    if visibility < longest.unique_lock_timeout:
        return [
            Finding(
                "visibility_timeout",
                f"the Redis broker's visibility_timeout ({visibility:g}s) is shorter than the lock "
                f"of {longest.name} ({longest.unique_lock_timeout:g}s): an unacknowledged message "
                "is redelivered and run again while its lock lives",
            )
        ]
    return []


# Redis unreachable, or no lock Redis configured.
_UNREADABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, UniqueError)


def _lock_clients(app: Any) -> list[Any]:
    """The client of every Redis that holds ``app``'s locks: its own, and those of
    tasks that keep theirs elsewhere (a compat class, on its peer's setting)."""
    found: list[Any] = []
    for store, _ in locations(app):
        if not any(store.client is client for client in found):
            found.append(store.client)
    return found


def _replies(client: Any, ask: Callable[..., Any]) -> list[Any]:
    """``ask``'s reply from one Redis, or from every primary of a cluster (each holds locks)."""
    if is_cluster(client):
        return [ask(client, target_nodes=node) for node in client.get_primaries()]
    return [ask(client)]


def check_eviction(app: Any) -> list[Finding]:
    findings: list[Finding] = []
    try:
        for client in _lock_clients(app):
            findings += _eviction(client)
    except NoPermissionError as exc:
        findings.append(
            Finding(
                "eviction",
                f"cannot read the lock Redis's maxmemory-policy ({exc}): allow its user "
                "CONFIG GET, or make sure yourself that it is noeviction",
            )
        )
    except _UNREADABLE:
        pass  # unreachable, or no lock Redis: said elsewhere
    return list(dict.fromkeys(findings))  # two lock Redis alike are said once


def _eviction(client: Any) -> list[Finding]:
    replies = _replies(client, lambda on, **node: on.config_get("maxmemory-policy", **node))
    policies = {text(reply.get("maxmemory-policy") or "") for reply in replies}
    policy = next((found for found in sorted(policies) if found and found != "noeviction"), None)
    if policy:
        return [
            Finding(
                "eviction",
                f"the lock Redis has maxmemory-policy {policy}: under memory pressure it may evict "
                "lock keys and let duplicates run; use noeviction",
            )
        ]
    return []


def check_replicas(app: Any) -> list[Finding]:
    try:
        conf = get_conf(app)
        wanted = conf.lock_replicas
        if not wanted:
            return []
        replies = [
            reply
            for client in _lock_clients(app)
            for reply in _replies(client, lambda on, **node: on.info("replication", **node))
        ]
    except _UNREADABLE:
        return []
    connected = min(int(reply.get("connected_slaves") or 0) for reply in replies)
    if connected < wanted:
        where = "one of its primaries has" if len(replies) > 1 else "it has"
        return [
            Finding(
                "replicas",
                f"unique_lock_replicas is {wanted} but the lock Redis has fewer replicas: {where} "
                f"{connected} connected. Every lock falls short: delay() and runs that take a lock wait "
                f"{conf.replica_timeout_ms} ms for them, then fail",
            )
        ]
    return []


def check_app(app: Any) -> list[Finding]:
    """Every finding for ``app`` (an empty list when all is well)."""
    return check_timeouts(app) + check_visibility_timeout(app) + check_eviction(app) + check_replicas(app)
