"""Chord-free fan-in: wait for several tasks, then run a callback exactly once.

A master creates a context for a token, listing the parts it expects; each
part reports when done, in one Lua call that records its payload (a part
reported twice, by a redelivery or a retry, counts once) and says whether it
completed the set. The report that completes the set flips the context's state
in that same call, so exactly one reporter publishes the callback, with every
payload, and then deletes the context. No result backend, no chord, no
polling: the context is one Redis hash (one hash tag, one cluster slot).

Failure policies: ``fail`` (the first failed part fires the errback once; the
callback never runs), ``collect`` (the callback gets successes and failures),
``ignore`` (failed parts are left out). With a ``timeout``, a deadline task
fires the errback with the parts still missing: nothing waits forever.

:func:`fan_in` is the common case: it creates the context and publishes the
header signatures with a message header naming their token and part; the
worker reports each part's outcome itself (:mod:`celery_unique.hooks`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import shared_task, signature, states

from celery_unique import headers, scripts, signals
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError
from celery_unique.keys import fan_in_key

logger = logging.getLogger(__name__)

POLICIES = ("fail", "collect", "ignore")
#: How long a context without a timeout may wait for its parts.
DEFAULT_TTL = 7 * 86400.0
DEADLINE_TASK = "celery_unique.fan_in_deadline"

COMPLETED, FAILED, RECORDED, DUPLICATE, UNKNOWN_PART, CLOSED = 1, 2, 0, -1, -2, -3

#: A fault-injection point for tests: called with (token, "callback" | "errback")
#: after a fan-in was closed and before its callback or errback is published.
before_publish: Callable[[str, str], None] | None = None


@dataclass(frozen=True)
class FanIn:
    """A handle on a fan-in context."""

    app: Any
    token: str

    @property
    def state(self) -> str | None:
        """``open``, ``completed``, ``failed``, ``expired``, or None once cleaned up."""
        value = aggregator(self.app).client.hget(self.key, "state")
        return value.decode() if isinstance(value, bytes) else value

    @property
    def key(self) -> str:
        return fan_in_key(get_conf(self.app).key_prefix, self.token)

    def reports(self) -> dict[str, dict[str, Any]]:
        """The parts reported so far (empty once the context is cleaned up)."""
        return aggregator(self.app).reports(self.token)


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


class Aggregator:
    """The low-level fan-in API on one Celery app's Redis."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.conf = get_conf(app)
        self.client = self.conf.locks.client
        self._create = self.client.register_script(scripts.FAN_IN_CREATE)
        self._report = self.client.register_script(scripts.FAN_IN_REPORT)
        self._expire = self.client.register_script(scripts.FAN_IN_EXPIRE)

    def key(self, token: str) -> str:
        return fan_in_key(self.conf.key_prefix, token)

    def create(
        self,
        token: str,
        parts: Iterable[str],
        callback: Any,
        errback: Any = None,
        policy: str = "fail",
        timeout: float | None = None,
    ) -> FanIn:
        """Create the context for ``token`` expecting ``parts``; schedule the deadline."""
        names = [str(part) for part in parts]
        if not names or len(set(names)) != len(names):
            raise ConfigurationError("a fan-in needs at least one part, with distinct names")
        if policy not in POLICIES:
            raise ConfigurationError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        key = self.key(token)
        fields: dict[str, Any] = {
            "remaining": len(names),
            "failed": 0,
            "state": "open",
            "policy": policy,
            "callback": _json(dict(signature(callback, app=self.app))),
            "errback": _json(dict(signature(errback, app=self.app))) if errback is not None else "",
        }
        fields.update({f"e:{name}": 1 for name in names})
        ttl_ms = int(((timeout or DEFAULT_TTL) + 3600) * 1000)
        pairs = [item for field in fields.items() for item in field]
        # The creator's id makes a retried call (its reply lost) find its own context.
        if not self._create(keys=[key], args=[ttl_ms, uuid.uuid4().hex, *pairs]):
            raise ConfigurationError(f"a fan-in context for token {token!r} exists already")
        if timeout is not None:
            self.app.tasks[DEADLINE_TASK].apply_async((token,), countdown=timeout)
        return FanIn(self.app, token)

    def report(
        self,
        token: str,
        part: str,
        value: Any = None,
        error: BaseException | None = None,
        policy: str = "",
    ) -> int:
        """Record a part (a success ``value`` or a failure ``error``); one round trip.

        When this report completes the set (or fails a ``fail`` fan-in), this
        call also publishes the callback (or errback) and cleans up.
        """
        if error is None:
            try:
                payload, ok = _json({"ok": True, "value": value}), "1"
            except (TypeError, ValueError) as exc:
                error = TypeError(f"the result of part {part!r} is not JSON-serialisable: {exc}")
        if error is not None:
            failure = {"type": type(error).__name__, "message": str(error)}
            payload, ok = _json({"ok": False, "error": failure}), "0"
        status = int(self._report(keys=[self.key(token)], args=[part, payload, ok, policy]))
        if status == COMPLETED:
            self._complete(token)
        elif status == FAILED:
            self._fail(token, "failed")
        elif status == UNKNOWN_PART:
            logger.warning("fan-in %s has no part %r (or is gone): report ignored", token, part)
        elif status == CLOSED:
            logger.info("fan-in %s is closed or gone: report of part %r ignored", token, part)
        return status

    def reports(self, token: str) -> dict[str, dict[str, Any]]:
        raw = self.client.hgetall(self.key(token))
        found = {}
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            if name.startswith("p:"):
                found[name[2:]] = json.loads(value)
        return found

    def expire(self, token: str) -> list[str] | None:
        """Close the context if still open; fire the errback with the missing parts."""
        missing = self._expire(keys=[self.key(token)])
        if missing is None:
            return None
        names = sorted(m.decode() if isinstance(m, bytes) else m for m in missing)
        self._fail(token, "expired", missing=names)
        return names

    def _meta(self, token: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        raw = self.client.hgetall(self.key(token))
        meta, parts = {}, {}
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            text = value.decode() if isinstance(value, bytes) else value
            if name.startswith("p:"):
                parts[name[2:]] = json.loads(text)
            elif not name.startswith("e:"):
                meta[name] = text
        return meta, parts

    def _complete(self, token: str) -> None:
        if before_publish is not None:
            before_publish(token, "callback")
        meta, parts = self._meta(token)
        if meta.get("policy") == "collect":
            results: dict[str, Any] = parts
        else:
            results = {name: part["value"] for name, part in parts.items() if part["ok"]}
        callback = signature(json.loads(meta["callback"]), app=self.app)
        callback.apply_async((results,), task_id=f"{token}-callback")
        self.client.delete(self.key(token))
        logger.info("fan-in %s completed: callback %s published", token, callback.task)
        signals.fan_in_completed.send(sender=self.app, token=token, parts=len(parts))

    def _fail(self, token: str, reason: str, missing: list[str] | None = None) -> None:
        if before_publish is not None:
            before_publish(token, "errback")
        meta, parts = self._meta(token)
        failed = {name: part["error"] for name, part in parts.items() if not part["ok"]}
        if meta.get("errback"):
            errback = signature(json.loads(meta["errback"]), app=self.app)
            info = {"token": token, "reason": reason, "failed": failed, "missing": missing or []}
            errback.apply_async((info,), task_id=f"{token}-errback")
        self.client.delete(self.key(token))
        logger.warning("fan-in %s %s (failed parts: %s, missing: %s)", token, reason, sorted(failed), missing)
        signals.fan_in_failed.send(sender=self.app, token=token, reason=reason)


def aggregator(app: Any) -> Aggregator:
    """The app's :class:`Aggregator` (made once per settings load)."""
    values = get_conf(app)._values
    found: Aggregator | None = values.get("_aggregator")
    if found is None:
        found = values["_aggregator"] = Aggregator(app)
    return found


def fan_in(
    header: Iterable[Any] | Mapping[str, Any],
    callback: Any,
    errback: Any = None,
    policy: str = "fail",
    timeout: float | None = None,
    token: str | None = None,
    app: Any = None,
) -> FanIn:
    """Run ``header`` (signatures, or a mapping part name -> signature) and then
    ``callback`` once with ``{part: result}``; parts report themselves.

    Unnamed parts are named by position (``"0"``, ``"1"``, ...).
    """
    named = dict(header) if isinstance(header, Mapping) else {str(n): s for n, s in enumerate(header)}
    if not named:
        raise ConfigurationError("fan_in needs at least one header signature")
    first = next(iter(named.values()))
    app = app or signature(first).app
    token = token or uuid.uuid4().hex
    handle = aggregator(app).create(token, named, callback, errback, policy, timeout)
    with app.producer_or_acquire() as producer:
        for part, member in named.items():
            member = signature(member, app=app).clone()
            member.options["headers"] = {
                **(member.options.get("headers") or {}),
                headers.FAN_IN_HEADER: {"token": token, "part": part, "policy": policy},
            }
            member.apply_async(producer=producer)
    return handle


def report_from_worker(task: Any, state: str | None, retval: Any) -> None:
    """task_postrun: report the outcome of a run that is a fan-in part."""
    part = headers.fan_in_part(task.request)
    if part is None or state in (states.RETRY, None):
        return
    if state == states.REJECTED and getattr(retval, "requeue", False):
        return
    policy = part.get("policy", "")
    if state == states.SUCCESS:
        aggregator(task.app).report(part["token"], part["part"], value=retval, policy=policy)
    else:
        error = retval if isinstance(retval, BaseException) else RuntimeError(f"part ended {state}")
        aggregator(task.app).report(part["token"], part["part"], error=error, policy=policy)


def _deadline(token: str) -> list[str] | None:
    """Fires when a fan-in's timeout passes: closes it if parts are still missing."""
    from celery import current_app

    return aggregator(current_app).expire(token)


# A shared task: every app (and so every worker) that imports celery_unique knows it.
fan_in_deadline = shared_task(name=DEADLINE_TASK, ignore_result=True)(_deadline)
