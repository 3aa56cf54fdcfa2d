"""The message header that carries a lock from the producer to the worker.

The worker never recomputes a key: it reads the lock key and owner token from
this header (JSON would have turned tuples into lists, and per-call options
would be lost).
"""

from __future__ import annotations

from typing import Any, TypedDict

HEADER = "celery_unique"


class LockHeader(TypedDict, total=False):
    key: str
    owner: str  # the message's owner token (locks.new_owner): the lock's value while it holds it
    timeout: float  # the lock_timeout in force for this message, in seconds
    args: str  # an idempotent call's argument digest, as the producer computed it


def lock_header(key: str, owner: str, timeout: float, args: str | None = None) -> LockHeader:
    header: LockHeader = {"key": key, "owner": owner, "timeout": timeout}
    if args is not None:
        header["args"] = args
    return header


def _valid(value: Any) -> LockHeader | None:
    if isinstance(value, dict) and isinstance(value.get("key"), str) and isinstance(value.get("owner"), str):
        return value  # type: ignore[return-value]
    return None


def from_context(request: Any) -> LockHeader | None:
    """The lock header of a task request (``task.request``), if any.

    Custom headers become attributes of the worker's request context; an eager
    ``apply()`` keeps them under ``request.headers`` instead.
    """
    if request is None:
        return None
    found = _valid(getattr(request, HEADER, None))
    if found is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            found = _valid(headers.get(HEADER))
    return found


def from_message_headers(headers: Any) -> LockHeader | None:
    """The lock header of a worker's ``Request.request_dict``."""
    return _valid(headers.get(HEADER)) if isinstance(headers, dict) else None


# The owner token of the running lock of a message that takes no lock at delay()
# (while_executing): two messages a caller gave one task id are two owners, a
# message delivered again the same one. A message without it (sent by name, by
# another producer) owns its running lock by its bare task id.
RUN_OWNER_HEADER = "celery_unique_run_owner"


def run_owner(source: Any, task_id: str) -> str:
    """The owner of the running lock of a message without a lock header: its run
    owner token (from a task request, or a worker's ``Request.request_dict``) when
    it carries one of its own task id, else the task id."""
    if isinstance(source, dict):
        value = source.get(RUN_OWNER_HEADER)
    else:
        value = getattr(source, RUN_OWNER_HEADER, None)
        found = getattr(source, "headers", None)
        if value is None and isinstance(found, dict):
            value = found.get(RUN_OWNER_HEADER)
    if isinstance(value, str) and value.startswith(task_id + "#"):
        return value
    return task_id  # none, or another task's: what a message without one owns


# The header of a fan-in part: {"token": ..., "part": ...}.
FAN_IN_HEADER = "celery_unique_fan_in"


def fan_in_part(request: Any) -> dict[str, str] | None:
    """The fan-in token and part a task request reports to, if any."""
    value = getattr(request, FAN_IN_HEADER, None)
    if value is None:
        found = getattr(request, "headers", None)
        value = found.get(FAN_IN_HEADER) if isinstance(found, dict) else None
    if isinstance(value, dict) and isinstance(value.get("token"), str) and isinstance(value.get("part"), str):
        return value
    return None


# The header of a fan-in's callback or errback: the token whose context it closes.
FAN_IN_CALLBACK_HEADER = "celery_unique_fan_in_callback"


def fan_in_callback(request: Any) -> str | None:
    """The token of the fan-in whose callback or errback a task request is, if any."""
    value = getattr(request, FAN_IN_CALLBACK_HEADER, None)
    if value is None:
        found = getattr(request, "headers", None)
        value = found.get(FAN_IN_CALLBACK_HEADER) if isinstance(found, dict) else None
    return value if isinstance(value, str) else None
