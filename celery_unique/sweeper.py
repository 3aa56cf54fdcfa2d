"""The workers' sweep of fan-ins: deadlines, and callbacks a closer left unpublished.

The main process of every worker looks, once a second, at the fan-ins that
are due (:meth:`celery_unique.aggregate.Aggregator.sweep`): it expires those
past their deadline (their errback fires) and takes over the publishing of a
callback or errback whose closer died or met a broker error. Deadlines live in
Redis, not in a message that a worker would hold unacknowledged for the whole
timeout. Several workers may sweep at once: each look is one Lua call that
claims what it then does.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery_unique.clients import REDIS_ERRORS, describe
from celery_unique.exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: Seconds between two sweeps of one worker.
INTERVAL = 1.0


class Sweeper:
    """Sweeps one app's fan-ins from a daemon thread until stopped."""

    def __init__(self, app: Any, interval: float = INTERVAL) -> None:
        self.app = app
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery-unique-sweep", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        from celery_unique.aggregate import aggregator

        failing = False
        while not self._stopped.wait(self.interval):
            try:
                aggregator(self.app).sweep()
            except REDIS_ERRORS as exc:
                if not failing:  # once per outage, not once a second
                    logger.warning("the fan-in sweep failed (%s); it goes on trying", describe(exc))
                failing = True
            except Exception:
                logger.exception("the fan-in sweep failed; it goes on")
            else:
                if failing:
                    logger.warning("the fan-in sweep reaches Redis again")
                failing = False


def start(app: Any) -> Sweeper | None:
    """Start sweeping ``app``'s fan-ins, unless it has no Redis for celery-unique."""
    from celery_unique.conf import get_conf

    try:
        _ = get_conf(app).redis_target
    except ConfigurationError:
        return None  # no fan-in can exist
    return Sweeper(app).start()
