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

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import shared_task, signature, states

from celery_unique import headers, scripts, signals
from celery_unique.clients import describe, text
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError, SealBroken
from celery_unique.keys import fan_in_due_key, fan_in_key
from celery_unique.sealing import CALLBACK, PART

logger = logging.getLogger(__name__)

POLICIES = ("fail", "collect", "ignore")
#: How long a context without a timeout may wait for its parts.
DEFAULT_TTL = 7 * 86400.0
DEADLINE_TASK = "celery_unique.fan_in_deadline"

COMPLETED, FAILED, EXPIRED, RECORDED, DUPLICATE, UNKNOWN_PART, CLOSED = 1, 2, 3, 0, -1, -2, -3
# What a report or a sweep may hand its caller: a claim to publish the callback or errback.
_ACTIONS = (COMPLETED, FAILED, EXPIRED)
#: Parts a single Redis call of :meth:`Aggregator.create` writes (about 3 ms of the server's time).
PARTS_PER_CALL = 2000
#: Seconds between two looks of the sweep at an open fan-in without a deadline
#: (a closer that died before it put the context on the sweep is found then).
RECHECK = 300.0

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


def _part_binding(token: str, part: str) -> str:
    return f"{token}\x00{part}"


class Aggregator:
    """The low-level fan-in API on one Celery app's Redis."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.conf = get_conf(app)
        self.client = self.conf.locks.client
        self.due = fan_in_due_key(self.conf.key_prefix)
        self._create = self.client.register_script(scripts.FAN_IN_CREATE)
        self._add = self.client.register_script(scripts.FAN_IN_ADD)
        self._report = self.client.register_script(scripts.FAN_IN_REPORT)
        self._expire = self.client.register_script(scripts.FAN_IN_EXPIRE)
        self._sweep = self.client.register_script(scripts.FAN_IN_SWEEP)
        self._finish = self.client.register_script(scripts.FAN_IN_FINISH)
        self._unclaim = self.client.register_script(scripts.FAN_IN_UNCLAIM)
        self._started = self.client.register_script(scripts.FAN_IN_STARTED)
        self._refused = self.client.register_script(scripts.FAN_IN_REFUSE)

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
        """Create the context for ``token`` expecting ``parts``, and put it on the sweep."""
        names = [str(part) for part in parts]
        if not names or len(set(names)) != len(names):
            raise ConfigurationError("a fan-in needs at least one part, with distinct names")
        if policy not in POLICIES:
            raise ConfigurationError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        key = self.key(token)
        sealer = self.conf.sealer
        fields: dict[str, Any] = {
            "parts": len(names),  # for a person's look at the progress (the admin)
            "remaining": len(names),
            "failed": 0,
            "state": "open",
            "policy": policy,
            # Signed (or encrypted): a worker publishes what these say.
            "callback": sealer.seal(CALLBACK, token, _json(dict(signature(callback, app=self.app)))),
            "errback": (
                sealer.seal(CALLBACK, token, _json(dict(signature(errback, app=self.app))))
                if errback is not None
                else ""
            ),
        }
        ttl_ms = int(((timeout or DEFAULT_TTL) + 3600) * 1000)
        timeout_ms = "" if timeout is None else int(timeout * 1000)
        pairs = [item for field in fields.items() for item in field]
        expected = [item for name in names for item in (f"e:{name}", 1)]
        # The creator's id makes a retried call (its reply lost) find its own context.
        creator = uuid.uuid4().hex
        chunk = 2 * PARTS_PER_CALL
        first = [ttl_ms, creator, timeout_ms, *pairs, *expected[:chunk]]
        if not self._create(keys=[key], args=first):
            raise ConfigurationError(f"a fan-in context for token {token!r} exists already")
        if len(expected) > chunk:
            # The rest in calls of PARTS_PER_CALL parts: one call for a hundred thousand
            # parts held the server for 50 ms. (Not pipelined: a cluster's pipeline
            # does not load a script its node lacks.)
            for start in range(chunk, len(expected), chunk):
                if not self._add(keys=[key], args=[creator, *expected[start : start + chunk]]):
                    raise ConfigurationError(f"the fan-in context for token {token!r} was replaced meanwhile")
        # Before any part is published: the sweep expires it at its deadline,
        # and looks again now and then at one without a deadline.
        self._look_at(token, time.time() + (RECHECK if timeout is None else timeout))
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

        When this report closes the set (completes it, or fails a ``fail``
        fan-in), this call also publishes the callback (or errback) and cleans up.
        """
        if error is None:
            try:
                payload, ok = _json({"ok": True, "value": value}), "1"
            except (TypeError, ValueError) as exc:
                error = TypeError(f"the result of part {part!r} is not JSON-serialisable: {exc}")
        if error is not None:
            failure = {"type": type(error).__name__, "message": str(error)}
            payload, ok = _json({"ok": False, "error": failure}), "0"
        # Signed (or encrypted): the callback's arguments are made of the reports.
        payload = self.conf.sealer.seal(PART, _part_binding(token, part), payload)
        claimant = uuid.uuid4().hex
        # The lean way, as a lock is taken: one report per part is the fan-in's hot path. A
        # report sent again with the same claimant counts once and keeps its claim.
        status = int(
            self.conf.locks.call_lean(
                self._report, self.key(token), [part, payload, ok, policy, claimant, self._claim_ms()]
            )
        )
        if status in _ACTIONS:
            self._publish(token, claimant)
        elif status == UNKNOWN_PART:
            logger.warning("fan-in %s has no part %r (or is gone): report ignored", token, part)
        elif status == CLOSED:
            logger.info("fan-in %s is closed or gone: report of part %r ignored", token, part)
        return status

    def reports(self, token: str) -> dict[str, dict[str, Any]]:
        return self._meta(token)[1]

    def expire(self, token: str) -> list[str] | None:
        """Close the context if still open; fire the errback with the missing parts."""
        claimant = uuid.uuid4().hex
        if int(self._expire(keys=[self.key(token)], args=[claimant, self._claim_ms()])) != EXPIRED:
            return None
        return self._publish(token, claimant)

    def sweep(self, limit: int = 100) -> int:
        """Look at the fan-ins that are due: expire those past their deadline, and
        publish what a closer left unpublished (it died, or the broker refused).
        How many were due. The workers call it every second (:mod:`celery_unique.sweeper`)."""
        due = self.client.zrangebyscore(self.due, "-inf", time.time(), start=0, num=limit)
        for raw in due:
            token = text(raw)
            claimant = uuid.uuid4().hex
            reply = self._sweep(keys=[self.key(token)], args=[claimant, self._claim_ms()])
            action = int(reply[0])
            if action in _ACTIONS:
                self._publish(token, claimant)
            elif action == UNKNOWN_PART:
                self.client.zrem(self.due, token)  # gone: finished, or its TTL passed
            else:
                when = text(reply[1])
                self._look_at(token, int(when) / 1000 if when else time.time() + RECHECK)
        return len(due)

    def started(self, token: str) -> None:
        """Note that the callback or errback of ``token`` began to run."""
        self._started(keys=[self.key(token)])

    def _refuse(self, token: str, claimant: str, broken: SealBroken) -> None:
        """A closed context that holds a value that does not verify: nothing is published,
        and nothing tries again (its TTL ends it). Loud: an error, a signal, a count."""
        self._refused(keys=[self.key(token)], args=[claimant])
        self.client.zrem(self.due, token)
        logger.error("fan-in %s: nothing published: %s", token, broken)
        signals.seal_broken.send(sender=self.app, purpose=broken.purpose)

    def _claim_ms(self) -> int:
        return int(self.conf.fan_in_claim_timeout * 1000)

    def _look_at(self, token: str, when: float) -> None:
        self.client.zadd(self.due, {token: when})

    def _meta(self, token: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """(the context's own fields, the parts reported) of a context; both empty once it is
        gone. A part's report that does not verify raises :class:`SealBroken`."""
        meta, parts = {}, {}
        sealer = self.conf.sealer
        # HSCAN, a thousand fields a call: HGETALL of a 100,000-part context (300,000
        # fields) blocked Redis for its whole length. A field met twice reads the same.
        for field, value in self.client.hscan_iter(self.key(token), count=1000):
            name, content = text(field), text(value)
            if name.startswith("p:"):
                parts[name[2:]] = json.loads(sealer.open(PART, _part_binding(token, name[2:]), content))
            elif name.startswith("e:"):
                meta[name] = ""
            else:
                meta[name] = content
        return meta, parts

    def _publish(self, token: str, claimant: str) -> list[str] | None:
        """Publish the callback or errback of a closed context the claimant holds, then
        delete the context. The errback's missing parts (None for a callback)."""
        key = self.key(token)
        # If this process dies from here on, the sweep takes the claim over once it lapses.
        self._look_at(token, time.time() + self.conf.fan_in_claim_timeout)
        try:
            meta, parts = self._meta(token)
            opened = {
                field: self.conf.sealer.open(CALLBACK, token, meta[field]) if meta.get(field) else ""
                for field in ("callback", "errback")
            }
        except SealBroken as broken:
            self._refuse(token, claimant, broken)
            return None
        state = meta.get("state")
        if state not in ("completed", "failed", "expired"):
            return None  # gone meanwhile (finished by another after our claim lapsed)
        kind = "callback" if state == "completed" else "errback"
        if before_publish is not None:
            before_publish(token, kind)
        missing = sorted(name[2:] for name in meta if name.startswith("e:") and name[2:] not in parts)
        failed = {name: part["error"] for name, part in parts.items() if not part["ok"]}
        if state == "completed":
            if meta.get("policy") == "collect":
                results: dict[str, Any] = parts
            else:
                results = {name: part["value"] for name, part in parts.items() if part["ok"]}
            message: Any = signature(json.loads(opened["callback"]), app=self.app)
            arguments: Any = results
        elif opened["errback"]:
            message = signature(json.loads(opened["errback"]), app=self.app)
            arguments = {"token": token, "reason": state, "failed": failed, "missing": missing}
        else:
            message = None
        try:
            if message is not None:
                message.apply_async(
                    (arguments,),
                    task_id=f"{token}-{kind}",
                    headers={**(message.options.get("headers") or {}), headers.FAN_IN_CALLBACK_HEADER: token},
                )
        except Exception as exc:
            # Let the sweep try again at once; the error, not its traceback.
            self._unclaim(keys=[key], args=[claimant])
            self._look_at(token, time.time())
            logger.warning(
                "fan-in %s: its %s could not be published (%s); tried again soon", token, kind, describe(exc)
            )
            return None
        if self._finish(keys=[key], args=[claimant]):
            self.client.zrem(self.due, token)
        if state == "completed":
            logger.info("fan-in %s completed: callback %s published", token, message.task)
            signals.fan_in_completed.send(sender=self.app, token=token, parts=len(parts))
        else:
            logger.warning(
                "fan-in %s %s (failed parts: %s, missing: %s)", token, state, sorted(failed), missing
            )
            signals.fan_in_failed.send(sender=self.app, token=token, reason=state)
        return missing


def aggregator(app: Any) -> Aggregator:
    """The app's :class:`Aggregator` (made once per settings load)."""
    return get_conf(app).cached("_aggregator", lambda: Aggregator(app))


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
    with app.producer_or_acquire() as producer, _batch(producer):
        for part, member in named.items():
            member = signature(member, app=app).clone()
            # The context carries each part's result to the callback: none is stored in
            # the result backend (Celery honours a message's ignore_result) unless asked for.
            member.options.setdefault("ignore_result", True)
            member.options["headers"] = {
                **(member.options.get("headers") or {}),
                headers.FAN_IN_HEADER: {"token": token, "part": part, "policy": policy},
            }
            member.apply_async(producer=producer)
    return handle


def _batch(producer: Any) -> Any:
    """Kombu 5.7's publish batch (one pipeline per thousand messages on Redis, and
    one by one where the transport has none); one by one on an older kombu."""
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else contextlib.nullcontext()


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


def callback_started(task: Any) -> None:
    """task_prerun: a fan-in's callback or errback notes that it began to run."""
    token = headers.fan_in_callback(task.request)
    if token is not None:
        aggregator(task.app).started(token)


def _deadline(token: str) -> list[str] | None:
    """Closes a fan-in if parts are still missing. Deadlines are now swept from Redis
    (:mod:`celery_unique.sweeper`); this task only serves messages that an earlier
    version scheduled."""
    from celery import current_app

    return aggregator(current_app).expire(token)


# A shared task: every app (and so every worker) that imports celery_unique knows it.
fan_in_deadline = shared_task(name=DEADLINE_TASK, ignore_result=True)(_deadline)
