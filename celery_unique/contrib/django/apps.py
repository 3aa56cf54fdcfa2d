"""The Django app: system checks and settings reloads."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed


def _reload_settings(setting: str = "", **_: Any) -> None:
    # override_settings(CELERY_UNIQUE_...) must take effect at once.
    if setting == "CELERY_UNIQUE_APP":
        return  # which app, not its settings
    if setting.upper().startswith(("CELERY_UNIQUE_", "CELERY_BROKER", "CELERY_RESULT_BACKEND")):
        from celery_unique.conf import get_conf
        from celery_unique.contrib.django.checks import celery_app
        from celery_unique.exceptions import ConfigurationError

        try:
            app = celery_app()
        except ConfigurationError:
            return  # E004 says so
        get_conf(app).reload()


def _secret_key() -> bytes | None:
    from django.conf import settings

    secret = getattr(settings, "SECRET_KEY", None)
    return secret.encode() if isinstance(secret, str) and secret else None


class CeleryUniqueConfig(AppConfig):  # type: ignore[misc]
    name = "celery_unique.contrib.django"
    label = "celery_unique"
    default_auto_field = "django.db.models.AutoField"  # the admin's models, which have no table
    verbose_name = "celery-unique"

    def ready(self) -> None:
        from celery_unique import sealing
        from celery_unique.contrib.django import checks

        checks.register()
        # Fan-in callbacks are signed: without CELERY_UNIQUE_SIGNING_KEY, with a key
        # derived from SECRET_KEY (the sealer derives one per use from it).
        sealing.default_signing_key = _secret_key
        setting_changed.connect(_reload_settings, dispatch_uid="celery_unique.reload_settings")
