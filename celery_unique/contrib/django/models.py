"""Models without tables: what the admin shows lives in Redis (:mod:`celery_unique.browse`).

They exist for Django's permissions and admin log: viewing needs the model's
view permission, each action its own (``celery_unique.release_lock``,
``celery_unique.forget_outcome``, ``celery_unique.expire_fan_in``), and
``LogEntry`` rows point at these content types.
"""

from __future__ import annotations

from django.db import models


class Lock(models.Model):  # type: ignore[misc]
    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = (("release_lock", "Can release a lock"),)
        verbose_name = "lock"


class Outcome(models.Model):  # type: ignore[misc]
    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = (("forget_outcome", "Can forget a stored outcome"),)
        verbose_name = "stored outcome"


class FanIn(models.Model):  # type: ignore[misc]
    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = (("expire_fan_in", "Can expire a fan-in"),)
        verbose_name = "open fan-in"
