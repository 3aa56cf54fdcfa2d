"""Django system checks (``manage.py check``), with stable ids.

=======================  ===============================================================
id                       finds
=======================  ===============================================================
``celery_unique.E001``   the Redis that holds the locks cannot be reached
``celery_unique.W002``   its ``maxmemory-policy`` may evict lock keys
``celery_unique.W003``   lock timeouts inconsistent with time limits or the broker's
                         ``visibility_timeout``
``celery_unique.E004``   a ``CELERY_UNIQUE_*`` setting has an invalid value
``celery_unique.W005``   ``CELERY_UNIQUE_LOCK_REPLICAS`` above the replicas the lock
                         Redis has connected
=======================  ===============================================================

The checks look at the current Celery app (the one a Django project's
``celery.py`` creates) and are tagged ``celery_unique``, so
``manage.py check --tag celery_unique`` runs them alone. E001, W002 and W005
talk to Redis, so they run with ``manage.py check --deploy`` only.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

from celery_unique import checks as core_checks
from celery_unique.clients import REDIS_ERRORS, describe
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError

TAG = "celery_unique"


def celery_app() -> Any:
    """The project's Celery app: ``CELERY_UNIQUE_APP`` (a dotted path, such as
    ``"proj.celery.app"``) when set, else Celery's current app.

    Celery's current app is per thread: in a thread of a threaded web server (the
    admin's pages) it is Celery's fallback app, unless the project's app was made the
    default. Then the one app of this process that has unique tasks serves.
    """
    from celery import _state
    from django.conf import settings
    from django.utils.module_loading import import_string

    named = getattr(settings, "CELERY_UNIQUE_APP", None)
    if named:
        try:
            return import_string(named)
        except ImportError as exc:
            raise ConfigurationError(f"CELERY_UNIQUE_APP = {named!r} cannot be imported: {exc}") from exc
    current = _state.get_current_app()
    if current is not _state.default_app or current.main != "default":
        return current
    unique = [app for app in list(_state._get_active_apps()) if app is not current and _has_unique_tasks(app)]
    return unique[0] if len(unique) == 1 else current


def _has_unique_tasks(app: Any) -> bool:
    try:
        tasks = list(app.tasks.values())  # finalizes the app, as its first task call would
    except RuntimeError:  # autofinalize=False and not finalized: not the project's app
        return False
    return any(hasattr(type(task), "unique_lifetime") for task in tasks)


def check_settings(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    hint = "See the settings table in celery-unique's docs/settings.rst."
    try:
        errors = get_conf(celery_app()).errors()
    except ConfigurationError as exc:  # CELERY_UNIQUE_APP
        errors = [exc]
    return [checks.Error(str(exc), hint=hint, id="celery_unique.E004") for exc in errors]


def _app() -> Any:
    """The app, None when CELERY_UNIQUE_APP does not import (reported by E004)."""
    try:
        return celery_app()
    except ConfigurationError:
        return None


def check_redis(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    app = _app()
    if app is None:
        return []
    conf = get_conf(app)
    try:
        conf.locks.client.ping()
    except ConfigurationError:
        return []  # reported by E004
    except REDIS_ERRORS as exc:
        return [
            checks.Error(
                f"the Redis for celery-unique locks cannot be reached: {describe(exc, conf.location)}",
                hint="Check CELERY_UNIQUE_REDIS_URL (or the Redis broker URL).",
                id="celery_unique.E001",
            )
        ]
    return [
        checks.Warning(finding.message, id="celery_unique.W002")
        for finding in core_checks.check_eviction(app)
    ] + [
        checks.Warning(finding.message, id="celery_unique.W005")
        for finding in core_checks.check_replicas(app)
    ]


def check_timeouts(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    app = _app()
    if app is None:
        return []
    try:
        findings = core_checks.check_timeouts(app) + core_checks.check_visibility_timeout(app)
    except ConfigurationError:
        return []  # reported by E004
    return [checks.Warning(finding.message, id="celery_unique.W003") for finding in findings]


def register() -> None:
    checks.register(check_settings, TAG)
    checks.register(check_timeouts, TAG)
    # Reaching Redis is a network call: only with ``check --deploy``, so that
    # makemigrations and friends neither need Redis nor wait for it.
    checks.register(check_redis, TAG, deploy=True)
