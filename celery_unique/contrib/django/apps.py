"""The Django app: system checks and settings reloads."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core.signals import setting_changed


def _reload_settings(setting: str = "", **_: Any) -> None:
    # override_settings(CELERY_UNIQUE_...) must take effect at once.
    if setting.upper().startswith(("CELERY_UNIQUE_", "CELERY_BROKER", "CELERY_RESULT_BACKEND")):
        from celery_unique.conf import get_conf
        from celery_unique.contrib.django.checks import celery_app

        app = celery_app()
        if app is not None:
            get_conf(app).reload()


class CeleryUniqueConfig(AppConfig):  # type: ignore[misc]
    name = "celery_unique.contrib.django"
    label = "celery_unique"
    verbose_name = "celery-unique"

    def ready(self) -> None:
        from celery_unique.contrib.django import checks

        checks.register()
        setting_changed.connect(_reload_settings, dispatch_uid="celery_unique.reload_settings")
