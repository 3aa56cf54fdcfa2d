"""Settings of the example Django project.

SQLite by default (``EXAMPLE_SQLITE_PATH``, a file the demo creates);
PostgreSQL or another database when ``DATABASE_URL`` is set
(``postgres://user@host:port/name``). Redis from ``REDIS_URL``.
"""

from __future__ import annotations

import os
import tempfile
from urllib.parse import urlparse

import django

SECRET_KEY = "example-project-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "example_project.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.admin",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_unique.contrib.django",
    "example_project.loans",
]
# The admin's (python -m example_project demo --admin). The payments view is
# called by the demo's own clients: it is exempt from CSRF (views.py).
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
# The app whose locks the admin shows (in a web server's threads, Celery's current
# app is its fallback app, not the project's).
CELERY_UNIQUE_APP = "example_project.celery_app.app"


def _database(url: str | None) -> dict[str, object]:
    if not url:
        path = os.environ.get("EXAMPLE_SQLITE_PATH") or os.path.join(tempfile.gettempdir(), "example.sqlite3")
        options: dict[str, object] = {"timeout": 30}
        if django.VERSION >= (5, 1):
            # Concurrent writers (web threads, the worker): take the write lock
            # at BEGIN, so no transaction fails upgrading a read lock.
            options.update(transaction_mode="IMMEDIATE", init_command="PRAGMA journal_mode=WAL;")
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": path, "OPTIONS": options}
    parsed = urlparse(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parsed.path.lstrip("/"),
        "USER": parsed.username or "",
        "PASSWORD": parsed.password or "",
        "HOST": parsed.hostname or "",
        "PORT": parsed.port or "",
    }


DATABASES = {"default": _database(os.environ.get("DATABASE_URL"))}

# Celery reads these through config_from_object(..., namespace="CELERY").
CELERY_BROKER_URL = os.environ.get("REDIS_URL")
# A queue of its own: the demo purges it at its start (demo.clear_leftovers).
CELERY_TASK_DEFAULT_QUEUE = "example_project"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_UNIQUE_LOCK_TIMEOUT = 60
