"""The compat classes' tasks, for a worker of their own.

They are registered on worker_app's app, so the worker and the test process
share its broker and lock Redis settings (the ``celery_app`` fixture and the
environment), and are routed to a queue of their own (by ``task_routes``: the
``queue`` task attribute is deprecated). Each records its start and end with
worker_app's helpers and waits at the test's gate in between. ``app`` is
what ``celery -A tests.integration.compat_app worker`` runs.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_unique.compat import QueueOnce, Singleton
from tests.integration.worker_app import app, record, wait_at_gate

QUEUE = "compat"
app.conf.task_routes = {"tests.compat.*": {"queue": QUEUE}}


def gated(name: str, base: type, on: Celery = app, **options: Any) -> Any:
    """A task of app ``on`` that retries once if asked, then waits at the gate (``note`` is
    an argument that changes nothing: keyed on ``token`` only, calls differing in it are one)."""

    @on.task(base=base, bind=True, name=name, shared=False, max_retries=3, **options)
    def run(self: Any, token: str, retry: bool = False, note: str = "") -> int:
        record(token, "start", id=self.request.id, retries=self.request.retries)
        if retry and not self.request.retries:
            raise self.retry(countdown=0.5)
        wait_at_gate(token)
        record(token, "end", id=self.request.id)
        return int(self.request.retries)

    return run


once = gated("tests.compat.once", QueueOnce, once={"keys": ["token"]})
once_unlocked = gated(
    "tests.compat.once_unlocked", QueueOnce, once={"keys": ["token"], "unlock_before_run": True}
)
singleton = gated("tests.compat.singleton", Singleton, unique_on=["token"])
once_expiring = gated("tests.compat.once_expiring", QueueOnce, once={"keys": ["token"], "timeout": 2})
once_graceful = gated("tests.compat.once_graceful", QueueOnce, once={"keys": ["token"], "graceful": True})
singleton_raising = gated(
    "tests.compat.singleton_raising", Singleton, unique_on=["token"], raise_on_duplicate=True
)
singleton_expiring = gated("tests.compat.singleton_expiring", Singleton, unique_on=["token"], lock_expiry=2)
