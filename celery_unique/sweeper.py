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

from typing import Any

from celery_unique.exceptions import ConfigurationError
from celery_unique.repeating import Repeating

#: Seconds between two sweeps of one worker.
INTERVAL = 1.0


class Sweeper(Repeating):
    """Sweeps one app's fan-ins from a daemon thread until stopped."""

    def __init__(self, app: Any, interval: float = INTERVAL) -> None:
        super().__init__("the fan-in sweep", interval)
        self.app = app

    def tick(self) -> None:
        from celery_unique.aggregate import aggregator

        aggregator(self.app).sweep()


def start(app: Any) -> Sweeper | None:
    """Start sweeping ``app``'s fan-ins, unless it has no Redis for celery-unique."""
    from celery_unique.conf import get_conf

    try:
        _ = get_conf(app).redis_target
    except ConfigurationError:
        return None  # no fan-in can exist
    sweeper = Sweeper(app)
    sweeper.start()
    return sweeper
