"""The test process's result backend: Celery's Redis backend, read by polling.

The worker stores results with Celery's Redis backend as usual; the test
process reads the same keys with GETs instead of Celery's pub/sub result
consumer. That consumer subscribes on every ``send_task()`` and unsubscribes
from ``AsyncResult.__del__``. In Celery 5.3 and 5.5 (fixed in 5.7), when the
garbage collector runs that ``__del__`` in the middle of a subscribe, the
nested unsubscribe waits for the PubSub lock its own thread holds (not
reentrant from redis-py 5.3 until 6.4) and the test process hangs
(celery/celery#10477). The suite leaves results in reference cycles, in the
tracebacks that ``pytest.raises`` keeps for one.
"""

from __future__ import annotations

from typing import Any

from celery.backends.base import SyncBackendMixin
from celery.backends.redis import RedisBackend


class PollingRedisBackend(SyncBackendMixin, RedisBackend):
    """Celery's Redis result backend without its pub/sub result consumer."""

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Do not subscribe to the result of every task sent."""


def polling_backend_url(redis_url: str) -> str:
    """A ``result_backend`` setting: this backend on ``redis_url``."""
    return f"{__name__}:{PollingRedisBackend.__name__}+{redis_url}"
