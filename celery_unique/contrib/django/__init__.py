"""Django integration: on-commit unique tasks, system checks, settings, a management command.

Add ``"celery_unique.contrib.django"`` to ``INSTALLED_APPS`` and use
``base=UniqueDjangoTask`` (or make it the project's default task class).
"""

from celery_unique.contrib.django.task import OnCommitResult, UniqueDjangoTask

__all__ = ["OnCommitResult", "UniqueDjangoTask"]
