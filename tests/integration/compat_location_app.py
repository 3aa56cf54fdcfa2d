"""A Celery app whose compat tasks keep their locks where the peers' settings say.

``QueueOnce`` locks live in another Redis than the broker's
(``ONCE["settings"]["url"]``); ``Singleton`` locks in another database of it,
under celery-singleton's prefix (``singleton_backend_url``,
``singleton_key_prefix``). Nothing else says where: the test process and the
worker both call :func:`configure` with the same URLs, and each derives the
locations from the app's configuration. The tasks are compat_app's gated
tasks, on a queue of their own. ``app`` is what
``celery -A tests.integration.compat_location_app worker`` runs, with the
broker in ``REDIS_URL`` and the peers' Redis in ``COMPAT_LOCKS_URL``.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from celery import Celery

from celery_unique.compat import QueueOnce, Singleton
from tests.integration.compat_app import gated

QUEUE = "compat-location"
SINGLETON_PREFIX = "SINGLETONLOCK_"

app = Celery("compat_location", set_as_current=False)
app.conf.update(
    task_routes={"tests.compat_location.*": {"queue": QUEUE}},
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def singleton_url(locks_url: str) -> str:
    """The Singleton tasks' lock URL: database 1 of the peers' Redis."""
    parsed = urlsplit(locks_url)
    return f"{parsed.scheme}://{parsed.netloc}/1"


def configure(broker_url: str, locks_url: str, result_backend: str | None = None) -> None:
    app.conf.update(
        broker_url=broker_url,
        result_backend=result_backend or broker_url,
        ONCE={"backend": "celery_once.backends.Redis", "settings": {"url": locks_url}},
        singleton_backend_url=singleton_url(locks_url),
        singleton_key_prefix=SINGLETON_PREFIX,
    )


if os.environ.get("COMPAT_LOCKS_URL"):  # in the worker
    configure(os.environ["REDIS_URL"], os.environ["COMPAT_LOCKS_URL"])

once = gated("tests.compat_location.once", QueueOnce, on=app, once={"keys": ["token"]})
singleton = gated("tests.compat_location.singleton", Singleton, on=app, unique_on=["token"])
