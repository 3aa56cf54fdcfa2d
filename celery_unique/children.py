"""Pool children seen from the worker's main process: act once one has stopped.

billiard ends a run past its hard time limit in this order: the job's timeout
callback (where :class:`~celery_unique.hooks.UniqueRequest` learns of it), then
SIGTERM to the child, 0.1 s, SIGKILL. A run that handles SIGTERM goes on
meanwhile, so what frees its lock must wait for the child to stop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: How long :func:`after_exit` waits for a child to stop (billiard's SIGKILL
#: comes 0.1 s after its SIGTERM). Past it the callback is not called.
EXIT_WAIT = 10.0


#: Linux's process table, where a zombie is told from a running process.
_PROC = os.path.isdir("/proc/self")


def stopped(pid: int) -> bool:
    """Whether process ``pid`` runs no more: gone, or a zombie not yet reaped."""
    if _PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # "pid (name) state ...": the name may hold ")" itself.
                return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
        except FileNotFoundError:
            return True
        except (OSError, IndexError):
            pass
    # Without /proc (macOS, the BSDs) a zombie counts as running till it is reaped.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def after_exit(pid: int | None, then: Callable[[], None], what: str) -> None:
    """Call ``then`` once the pool child ``pid`` has stopped, from a thread of its own
    (the main process's event loop must not wait); at once without a pid. A child
    still running after :data:`EXIT_WAIT` is logged and ``then`` is not called:
    ``what`` (its lock) is left to its timeout."""
    if not pid:
        then()
        return

    def wait() -> None:
        deadline = time.monotonic() + EXIT_WAIT
        while not stopped(pid):
            if time.monotonic() > deadline:
                logger.warning(
                    "pool child %s still runs %ss after it was told to stop: %s is left to its timeout",
                    pid,
                    EXIT_WAIT,
                    what,
                )
                return
            time.sleep(0.005)
        then()

    threading.Thread(target=wait, name=f"celery-unique-after-exit-{pid}", daemon=True).start()
