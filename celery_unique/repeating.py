"""Work a worker's main process repeats from a daemon thread: the fan-in sweep,
the beat, the reaper.

A Redis error is said once per outage (and once more when Redis answers
again), not once a tick; any other error with its traceback. The thread goes
on until stopped.
"""

from __future__ import annotations

import logging
import threading

from celery_unique.clients import REDIS_ERRORS, describe

logger = logging.getLogger(__name__)


class Repeating:
    """Calls :meth:`tick` every ``every`` seconds (the first time at once, or after
    ``every``) until :meth:`stop`."""

    def __init__(self, what: str, every: float, at_once: bool = False) -> None:
        self.what = what  # for the logs: "the fan-in sweep"
        self.every = every
        self._at_once = at_once
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"celery-unique {what}", daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def failed(self) -> None:
        """Called after a tick that raised (to drop a connection, say)."""

    def start(self) -> Repeating:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        failing = False
        if not self._at_once and self._stopped.wait(self.every):
            return
        while True:
            try:
                self.tick()
            except REDIS_ERRORS as exc:
                self.failed()
                if not failing:
                    logger.warning("%s failed (%s); it goes on trying", self.what, describe(exc))
                failing = True
            except Exception:
                self.failed()
                logger.exception("%s failed; it goes on", self.what)
            else:
                if failing:
                    logger.warning("%s reaches Redis again", self.what)
                failing = False
            if self._stopped.wait(self.every):
                return
