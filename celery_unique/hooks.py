"""Where the worker hooks in: Celery's signals and the worker's request class.

=========================  ===========================  ==================================
hook                       process                      does
=========================  ===========================  ==================================
``Task.before_start``      pool child                   :func:`runs.begin`: take or check
                                                        the lock a run needs, fence, lease
``task_postrun``           pool child (or eager call)   :func:`runs.end`: release what the
                                                        lifetime releases at the end;
                                                        a fan-in part reports itself
``task_revoked``           worker main process          revoked before start, expired
``UniqueRequest``          worker main process          hard time limit (once the child
                                                        stopped), killed pool child,
                                                        the child's exit after
                                                        ``revoke(terminate=True)``
                                                        (no postrun runs there)
``worker_init``            worker main process          refuse to start with settings or
                                                        task options that cannot work
``worker_ready``           worker main process          log :mod:`checks` findings; start
                                                        the fan-in sweep (:mod:`sweeper`),
                                                        the beat (:mod:`beats`) and the
                                                        reaper (:mod:`reaper`)
``task_prerun``            pool child                   a fan-in's callback notes that it
                                                        began to run
=========================  ===========================  ==================================

Every release is the owner-checked compare-and-delete, so a late or repeated
release never frees a lock that another task took meanwhile. When nothing
fires (SIGKILL with ``acks_late``, a lost host) the lock's TTL is the safety
net, and a redelivered message with the same task id re-enters its own lock.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import Terminated, WorkerLostError
from celery import Task, signals
from celery.worker.request import Request

from celery_unique import aggregate, beats, checks, children, headers, reaper, runs, sweeper
from celery_unique.clients import REDIS_ERRORS, describe
from celery_unique.conf import get_conf
from celery_unique.repeating import Repeating

logger = logging.getLogger(__name__)

# Celery 5.6+ can publish a lost worker's task again (Task.retry_on_worker_lost);
# older versions ignore the option.
CELERY_RETRIES_LOST_WORKERS = hasattr(Task, "retry_on_worker_lost")


def _is_unique(task: Any) -> bool:
    return hasattr(task, "unique_lifetime")


def _end_of_run(
    sender: Any = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    if task is None:
        return
    if _is_unique(task):
        runs.end(task, state, retval)
    try:
        aggregate.report_from_worker(task, state, retval)
    except REDIS_ERRORS as exc:
        # Said once, plainly, not as Celery's "Signal handler raised" and a traceback:
        # a Redis user without a command (the error names it), or Redis down.
        logger.error(
            "%s[%s]: its fan-in report could not be recorded: %s", task.name, task.request.id, describe(exc)
        )


def _revoked(sender: Any = None, request: Any = None, terminated: bool = False, **_: Any) -> None:
    if sender is None or request is None or not _is_unique(sender):
        return
    if terminated:
        # Celery sends this as it signals the running child (revoke with
        # terminate=True), not when the child is gone: a task that handles
        # SIGTERM goes on. The run releases at its end (task_postrun), or
        # UniqueRequest when the child exits.
        return
    header = headers.from_context(request)
    owner = headers.run_owner(request, request.id)
    runs.release_abandoned(sender, header, owner, request.args, request.kwargs, "revoked")


def _callback_started(sender: Any = None, task: Any = None, **_: Any) -> None:
    if task is not None:
        aggregate.callback_started(task)


_running: list[Repeating] = []


def _start_sweeping(sender: Any = None, **_: Any) -> None:
    """The fan-in sweep, and, unless ``unique_reap_interval`` is 0, the worker's beat
    and its candidacy for the reaper (``sender``: the worker's consumer)."""
    app = getattr(sender, "app", None)
    started = sweeper.start(app) if app is not None else None
    if started is None:
        return  # no Redis for celery-unique
    _running.append(started)
    interval = get_conf(app).reap_interval
    if interval:
        timing = beats.Timing(interval)
        beat = beats.Beat(app, sender, timing)
        _running.extend((beat.start(), reaper.Leader(app, timing, beat.worker_id).start()))


def _stop_sweeping(**_: Any) -> None:
    while _running:
        _running.pop().stop()  # the reaper first, the beat after it


def _refuse_invalid_configuration(sender: Any = None, **_: Any) -> None:
    """A worker does not start with settings or task options that cannot work.

    Raised as SystemExit: Celery's signal dispatch would log and swallow any
    Exception, and the worker would then fail every unique task instead.
    """
    app = getattr(sender, "app", None)
    errors = checks.configuration_errors(app) if app is not None else []
    for error in errors:
        logger.critical("celery-unique: %s", error)
    if errors:
        raise SystemExit(f"celery-unique: invalid configuration: {'; '.join(map(str, errors))}")


def _check_configuration(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    for finding in checks.check_app(app) if app is not None else []:
        logger.warning("celery-unique check %s: %s", finding.id, finding.message)


signals.worker_init.connect(
    _refuse_invalid_configuration, weak=False, dispatch_uid="celery_unique.configuration"
)
signals.worker_ready.connect(_check_configuration, weak=False, dispatch_uid="celery_unique.checks")
signals.task_postrun.connect(_end_of_run, weak=False, dispatch_uid="celery_unique.end_of_run")
signals.task_revoked.connect(_revoked, weak=False, dispatch_uid="celery_unique.revoked")
signals.task_prerun.connect(_callback_started, weak=False, dispatch_uid="celery_unique.callback_started")
signals.worker_ready.connect(_start_sweeping, weak=False, dispatch_uid="celery_unique.sweep")
signals.worker_shutdown.connect(_stop_sweeping, weak=False, dispatch_uid="celery_unique.stop_sweep")


def _retries_lost_workers(task: Any) -> bool:
    """Whether Celery publishes this task again when its worker is lost (5.6+)."""
    if not CELERY_RETRIES_LOST_WORKERS:
        return False  # older Celery ignores the option
    value = task.retry_on_worker_lost
    if value is None:
        value = task.app.conf.get("task_retry_on_worker_lost")
    return bool(value)


def _unwrap(exc: Any) -> Any:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc


class UniqueRequest(Request):  # type: ignore[misc]
    """The worker's request for unique tasks: releases when the child is gone.

    A hard time limit or a killed pool child ends the task in the main
    process, where no ``task_postrun`` runs. ``Task.Request`` is Celery's
    documented way to handle these on every supported version.
    """

    def _release(self, why: str) -> None:
        header = headers.from_message_headers(self.request_dict)
        owner = headers.run_owner(self.request_dict, self.id)
        runs.release_abandoned(self.task, header, owner, self.args, self.kwargs, why)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        task = self.task
        # Called before billiard stops the child: a run that handles SIGTERM goes on.
        # Claimed from before Celery lets go of the request until the child stopped.
        hard_end = not soft and not (task.acks_late and not getattr(task, "acks_on_timeout", True))
        pid = self.worker_pid
        if hard_end and pid:
            beats.linger(self, lambda: not children.stopped(pid))
        super().on_timeout(soft, timeout)
        if not hard_end:
            return  # soft, or requeued (the redelivery re-enters the lock)

        def release() -> None:
            try:
                self._release("hard time limit")
            finally:
                beats.lingering.pop(self, None)

        children.after_exit(pid, release, f"the lock of {self.id}")

    def terminate(self, pool: Any, signal: Any = None) -> None:
        if self.time_start and self._apply_result is not None:
            # Celery lets go of the request as it sends the signal; a run that
            # handles it goes on until its job has a result (or its child died).
            job = self._apply_result()
            ready = getattr(job, "ready", None)  # a prefork job's (an eventlet greenthread has none)
            if callable(ready):
                beats.linger(self, lambda: not ready())
        super().terminate(pool, signal)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = _unwrap(exc_info.exception)
        if not isinstance(exc, (WorkerLostError, Terminated, SystemExit, KeyboardInterrupt)):
            return  # failures in the task body are released by task_postrun
        if getattr(self, "_already_cancelled", False):
            return  # cancelled (the broker connection was lost): the message is delivered again
        if isinstance(exc, Terminated) or getattr(self, "_already_revoked", False):
            # The child is gone after a revoke(terminate=True) (or a signal from elsewhere):
            # the message is acknowledged, nothing runs it again.
            self._release("terminated")
            return
        task = self.task
        # As Celery decides (worker/request.py, on_failure): a lost worker's
        # task is published again (retry_on_worker_lost) or requeued unless
        # its retries are exhausted; that message re-enters the lock.
        retries_left = task.max_retries is None or self._context.retries < task.max_retries
        retries_lost = _retries_lost_workers(task)
        if retries_lost and retries_left:
            return
        if task.acks_late and task.reject_on_worker_lost and (retries_left or not retries_lost):
            return
        self._release("worker lost")
