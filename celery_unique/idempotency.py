"""Idempotent tasks: the stored outcome of a key and its replay.

An outcome is JSON (never pickle), encrypted when ``unique_encryption_key`` is set::

    {"id": <task id>, "a": <argument digest>, "s": "SUCCESS", "r": <return value>}
    {"id": <task id>, "a": <argument digest>, "s": "FAILURE",
     "e": {"type": "ValueError", "message": "..."}}

A replayed failure raises the same built-in exception type with the same
message; any other type is raised as :class:`ReplayedError`, since no class is
ever imported on the strength of what Redis holds.
"""

from __future__ import annotations

import builtins
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import states
from celery._state import get_current_task
from celery.result import EagerResult

from celery_unique.exceptions import IdempotencyConflict, ReplayedError
from celery_unique.sealing import OUTCOME, Sealer


@dataclass(frozen=True)
class Outcome:
    """A stored outcome."""

    task_id: str
    args_digest: str
    state: str
    result: Any = None
    error_type: str = ""
    error_message: str = ""

    def exception(self) -> BaseException:
        kind = getattr(builtins, self.error_type, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                return kind(self.error_message)
            except Exception:
                pass
        return ReplayedError(self.error_type, self.error_message)

    def value(self) -> Any:
        """The stored return value, or raise the stored failure."""
        if self.state == states.SUCCESS:
            return self.result
        raise self.exception()

    def handle(self) -> Any:
        """A result handle that yields the outcome at once (``.replayed`` is True)."""
        if self.state == states.SUCCESS:
            result = EagerResult(self.task_id, self.result, states.SUCCESS)
        else:
            result = EagerResult(self.task_id, self.exception(), states.FAILURE)
        result.duplicate = True
        result.replayed = True
        return result


def encode_success(task_id: str, args_digest: str, value: Any) -> str:
    """The outcome of a success; raises TypeError/ValueError when ``value`` is not JSON."""
    return json.dumps({"id": task_id, "a": args_digest, "s": states.SUCCESS, "r": value}, allow_nan=False)


def encode_failure(task_id: str, args_digest: str, exc: BaseException) -> str:
    error = {"type": type(exc).__name__, "message": str(exc)}
    return json.dumps({"id": task_id, "a": args_digest, "s": states.FAILURE, "e": error})


def decode(text: str) -> Outcome:
    data = json.loads(text)
    error = data.get("e") or {}
    return Outcome(
        task_id=data["id"],
        args_digest=data.get("a", ""),
        state=data["s"],
        result=data.get("r"),
        error_type=error.get("type", ""),
        error_message=error.get("message", ""),
    )


def sealed(sealer: Sealer, family: str, outcome: str) -> str:
    """An outcome as stored: encrypted when ``unique_encryption_key`` is set (it holds the
    task's return value or error message), else as it is."""
    return sealer.maybe_seal(OUTCOME, family, outcome)


def read(sealer: Sealer, family: str, stored: str) -> Outcome:
    """The outcome stored for a family (:func:`sealed`)."""
    return decode(sealer.maybe_open(OUTCOME, family, stored))


def check_conflict(task_name: str, idempotency_key: str | None, stored: str, given: str) -> None:
    """An explicit key reused with other arguments is an error."""
    if idempotency_key is not None and stored and stored != given:
        raise IdempotencyConflict(task_name, idempotency_key, stored, given)


# Attribute of the request context holding the Outcome a run replays.
REPLAY = "_celery_unique_replay"
# Marks a run that is already wrapped (a subclass of a wrapped class).
_WRAPPED = "_celery_unique_replaying"


def replaying(run: Any) -> Any:
    """Wrap a task's ``run`` so a run with a stored outcome returns it instead.

    The worker finds the outcome in ``before_start`` (one Redis call with the
    lock check) and leaves it on the request; the task then ends SUCCESS with
    the stored value (or FAILURE with the stored error) without its body.
    """
    is_static = isinstance(run, staticmethod)
    func: Callable[..., Any] = run.__func__ if is_static else run
    if getattr(func, _WRAPPED, False):
        return run  # wrapped already (by a base class)

    @functools.wraps(func)
    def replay_or_run(*args: Any, **kwargs: Any) -> Any:
        task = get_current_task()
        outcome: Outcome | None = getattr(task.request, REPLAY, None) if task is not None else None
        if outcome is not None:
            return outcome.value()
        return func(*args, **kwargs)

    setattr(replay_or_run, _WRAPPED, True)
    return staticmethod(replay_or_run) if is_static else replay_or_run
