"""The Celery app that the integration tests' worker subprocess runs.

Each task records what it observes (start, end, its id, pid and the types of
its arguments) in a Redis list per test token, so tests assert on what really
happened in the worker.
"""

from __future__ import annotations

import json
import os
import signal
import time
from decimal import Decimal
from typing import Any

import redis
from celery import Celery, signals
from kombu.exceptions import OperationalError

from celery_unique import UniqueTask, aggregate
from celery_unique.contrib.django import UniqueDjangoTask
from tests.barrier import add_barrier

app = Celery("celery_unique_tests", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("REDIS_URL"),
    result_backend=os.environ.get("REDIS_URL"),
    worker_prefetch_multiplier=1,
    task_publish_retry=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # A fan-in whose closer died is finished by the sweep this soon after.
    unique_fan_in_claim_timeout=2,
    # A fan-in's callbacks are signed with it (a test key: never a real one in a repository).
    unique_signing_key="test-signing-key",
    # Set by the test run to put the locks on a Redis Cluster or behind a Sentinel.
    unique_redis_url=os.environ.get("UNIQUE_REDIS_URL") or None,
    unique_redis_transport_options=(
        {"master_name": os.environ["UNIQUE_REDIS_MASTER"]} if os.environ.get("UNIQUE_REDIS_MASTER") else None
    ),
)
if os.environ.get("TEST_VISIBILITY_TIMEOUT"):  # a worker that takes back unacknowledged messages soon
    app.conf.broker_transport_options = {"visibility_timeout": float(os.environ["TEST_VISIBILITY_TIMEOUT"])}

_events: redis.Redis | None = None


def events_client() -> redis.Redis:
    """The broker's Redis, where the tasks record what they observe."""
    global _events
    if _events is None:
        _events = redis.Redis.from_url(app.conf.broker_url)
    return _events


def events_key(token: str) -> str:
    return f"test-events:{token}"


def record(token: str, event: str, **data: Any) -> None:
    entry = {"event": event, "pid": os.getpid(), "time": time.time(), **data}
    events_client().rpush(events_key(token), json.dumps(entry))


barrier = add_barrier(app, events_client)


def finished_key(task_id: str) -> str:
    return f"test-finished:{task_id}"


def _finished(sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    """Record that a run's task_postrun is done, celery-unique's receiver (connected
    first, when celery_unique was imported) and its release among it: a test waits
    for this instead of sleeping through a release that must not free a lock."""
    if task_id:
        pipe = events_client().pipeline()
        pipe.rpush(finished_key(task_id), state or "")
        pipe.expire(finished_key(task_id), 600)
        pipe.execute()


signals.task_postrun.connect(_finished, weak=False)


@app.task(base=UniqueTask, bind=True, name="tests.sleeper")
def sleeper(self: Any, token: str, seconds: float = 0.0) -> str:
    record(token, "start", id=self.request.id)
    time.sleep(seconds)
    record(token, "end", id=self.request.id)
    return token


@app.task(base=UniqueTask, bind=True, name="tests.flaky", max_retries=5)
def flaky(self: Any, token: str, failures: int = 2, countdown: float = 0.5) -> int:
    record(token, "start", id=self.request.id, retries=self.request.retries)
    if self.request.retries < failures:
        raise self.retry(countdown=countdown)
    record(token, "end", id=self.request.id)
    return int(self.request.retries)


@app.task(base=UniqueTask, bind=True, name="tests.failing")
def failing(self: Any, token: str) -> None:
    record(token, "start", id=self.request.id)
    raise ValueError("this task always fails")


@app.task(base=UniqueTask, bind=True, name="tests.typed", unique_on=("token", "value", "when", "ident"))
def typed(
    self: Any, token: str, value: Any = None, when: Any = None, ident: Any = None, seconds: float = 1.0
) -> None:
    record(
        token,
        "start",
        id=self.request.id,
        types=[type(value).__name__, type(when).__name__, type(ident).__name__],
    )
    time.sleep(seconds)
    record(token, "end", id=self.request.id)


def _lifetime_task(name: str, lifetime: str, **options: Any) -> Any:
    @app.task(
        base=UniqueTask,
        bind=True,
        name=name,
        lock=lifetime,
        unique_on=("token",),
        shared=False,
        **options,
    )
    def run(self: Any, token: str, seconds: float = 0.0, gated: bool = False) -> None:
        record(token, "start", id=self.request.id, fence=self.unique.fence)
        if gated:
            wait_at_gate(token)
        time.sleep(seconds)
        record(token, "end", id=self.request.id, lost=self.unique.lost)

    return run


LIFETIME_TASKS = {
    lifetime: _lifetime_task(
        f"tests.lifetime.{lifetime}", lifetime, lock_timeout=2 if lifetime == "until_expired" else 30
    )
    for lifetime in (
        "until_executed",
        "until_executing",
        "while_executing",
        "until_and_while_executing",
        "until_expired",
    )
}
CONFLICT_TASKS = {
    policy: _lifetime_task(
        f"tests.conflict.{policy}",
        "while_executing",
        on_conflict=policy,
        conflict_retry_countdown=0.3,
        max_retries=50,
    )
    for policy in ("discard", "retry", "raise")
}


@app.task(base=UniqueTask, bind=True, name="tests.renewed", lock_timeout=1)
def renewed(self: Any, token: str, seconds: float) -> bool:
    record(token, "start", id=self.request.id)
    time.sleep(seconds)
    record(token, "end", id=self.request.id, lost=self.unique.lost)
    return bool(self.unique.lost)


def _rescheduler_task(name: str, **options: Any) -> Any:
    """A task that re-enqueues itself ``times`` times with the same key."""

    @app.task(base=UniqueTask, bind=True, name=name, unique_on=("token",), shared=False, **options)
    def run(self: Any, token: str, times: int) -> None:
        record(token, "start", id=self.request.id)
        if times > 0:
            # Starts well after this run ends (a running lock would discard it).
            again = self.apply_async((token, times - 1), countdown=0.8)
            record(token, "rescheduled", id=again.id, duplicate=again.duplicate)
        time.sleep(0.2)
        record(token, "end", id=self.request.id)

    return run


rescheduler = _rescheduler_task("tests.rescheduler")
rescheduler_while = _rescheduler_task("tests.rescheduler_while", lock="until_and_while_executing")


@app.task(base=UniqueTask, bind=True, name="tests.replacer", unique_on=("token",))
def replacer(self: Any, token: str, replace: bool = True) -> Any:
    record(token, "start", id=self.request.id, replace=replace)
    if replace:
        return self.replace(replacer.s(token, False).set(countdown=1.0))
    record(token, "end", id=self.request.id)
    return None


def gate_key(token: str) -> str:
    return f"test-gate:{token}"


def open_gate(client: redis.Redis, token: str, seconds: int = 600) -> None:
    """Let the token's runs waiting at the gate go on (from the test process)."""
    client.set(gate_key(token), 1, ex=seconds)


def wait_at_gate(token: str, timeout: float = 60.0) -> None:
    """Block until the test sets the token's gate key (a run that outlasts the test's calls).

    A gate not opened within ``timeout`` fails the run: going on would let a test
    pass whose order of events it never caused."""
    deadline = time.monotonic() + timeout
    while not events_client().exists(gate_key(token)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate of {token} was not opened within {timeout}s")
        time.sleep(0.05)


@app.task(base=UniqueDjangoTask, bind=True, name="tests.django_recompute", unique_on=("token",))
def django_recompute(self: Any, token: str, seconds: float = 0.0, gated: bool = False) -> None:
    record(token, "start", id=self.request.id)
    if gated:
        wait_at_gate(token)
    time.sleep(seconds)
    record(token, "end", id=self.request.id)


@app.task(base=UniqueTask, bind=True, name="tests.idempotent", idempotent=True, unique_on=("token",))
def idempotent(self: Any, token: str, amount: int = 1, seconds: float = 0.0, result: str = "json") -> Any:
    record(token, "start", id=self.request.id)
    time.sleep(seconds)
    if result == "decimal":
        return Decimal(amount)  # Celery's JSON carries it; plain JSON (ours) does not
    if result == "fail":
        raise ValueError(f"declined {amount}")
    return {"token": token, "charged": amount}


@app.task(
    base=UniqueTask,
    bind=True,
    name="tests.idempotent_short",
    idempotent=True,
    idempotent_failures=True,
    result_ttl=1,
    unique_on=("token",),
)
def idempotent_short(self: Any, token: str, fail: bool = False) -> str:
    record(token, "start", id=self.request.id)
    if fail:
        raise KeyError("no such account")
    return token


@app.task(
    base=UniqueTask,
    bind=True,
    name="tests.idempotent_killed",
    idempotent=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,  # so Celery itself does not see a stored SUCCESS and skip the redelivery
)
def idempotent_killed(self: Any, token: str) -> dict[str, Any]:
    record(token, "start", id=self.request.id)
    return {"token": token, "value": 42}


def _after_idempotent_killed(
    sender: Any = None, task: Any = None, retval: Any = None, state: Any = None, **_: Any
) -> None:
    if task is None or task.name != "tests.idempotent_killed":
        return
    from celery_unique.idempotency import REPLAY

    token = task.request.args[0]
    replayed = getattr(task.request, REPLAY, None) is not None
    record(token, "postrun", state=state, retval=retval, replayed=replayed)
    if not replayed:
        # The outcome is stored (celery-unique's receiver ran first); the
        # message is not acknowledged yet: die now.
        os.kill(os.getpid(), signal.SIGKILL)


signals.task_postrun.connect(_after_idempotent_killed, weak=False)


# -- fan-in ------------------------------------------------------------------------


def fan_in_fault_key(token: str) -> str:
    """What the fan-in of a token meets once, before its callback or errback is published:
    "kill" (the completing process is SIGKILLed) or "refuse" (the broker refuses it)."""
    return f"fan-in-fault:{token}"


def _fan_in_fault(token: str, kind: str) -> None:
    if app.conf.broker_url is None:
        return  # a test process that has not configured this app: no fault of ours
    fault = events_client().getdel(fan_in_fault_key(token))
    if fault == b"kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == b"refuse":
        raise OperationalError(f"the broker refused the {kind} (a test fault)")


aggregate.before_publish = _fan_in_fault


@app.task(bind=True, name="tests.fan.part")
def fan_part(self: Any, token: str, number: int, fail: bool = False) -> int:
    if fail:
        raise ValueError(f"part {number} failed")
    return number * 2


@app.task(bind=True, name="tests.fan.part_killed_once", acks_late=True, reject_on_worker_lost=True)
def fan_part_killed_once(self: Any, token: str, number: int) -> int:
    record(token, "part-start", number=number)
    if events_client().set(f"killed-once:{token}", 1, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-part: the message is not acknowledged
    return number * 2


@app.task(name="tests.fan.key_info")
def fan_key_info(token: str) -> dict[str, str]:
    return {"key": f"k-{token}"}


@app.task(name="tests.fan.worker")
def fan_worker(token: str, which: int) -> str:
    return f"worker{which} done"


@app.task(name="tests.fan.collect")
def fan_collect(results: dict[str, Any], token: str) -> None:
    record(token, "callback", results=results)


@app.task(name="tests.fan.errback")
def fan_errback(info: dict[str, Any], token: str) -> None:
    record(token, "errback", info=info)


def _unique_fan_collect(lifetime: str) -> Any:
    """A fan-in callback that is a UniqueTask: one key per token, whatever its results."""

    @app.task(
        base=UniqueTask,
        bind=True,
        name=f"tests.fan.unique_collect.{lifetime}",
        lock=lifetime,
        unique_on=("token",),
        shared=False,
        conflict_retry_countdown=0.3,
    )
    def collect(self: Any, results: dict[str, Any], token: str, gated: bool = False) -> None:
        record(token, "callback", results=results, id=self.request.id)
        if gated:
            wait_at_gate(token)

    return collect


FAN_UNIQUE_COLLECT = {
    lifetime: _unique_fan_collect(lifetime)
    for lifetime in ("until_executed", "while_executing", "until_and_while_executing")
}


@app.task(
    base=UniqueTask,
    bind=True,
    name="tests.idempotent_conflicting",
    idempotent=True,
    idempotent_failures=True,
    lock="until_and_while_executing",
    on_conflict="raise",
    unique_on=("token",),
)
def idempotent_conflicting(self: Any, token: str, seconds: float = 0.0) -> str:
    record(token, "start", id=self.request.id)
    time.sleep(seconds)
    return "real result"


@app.task(base=UniqueTask, bind=True, name="tests.idempotent_tuple", idempotent=True)
def idempotent_tuple(self: Any, token: str, pair: Any) -> list[Any]:
    record(token, "start", id=self.request.id)
    return list(pair)


@app.task(base=UniqueTask, bind=True, name="tests.idempotent_long", idempotent=True, lock_timeout=1)
def idempotent_long(self: Any, token: str, amount: int, seconds: float) -> int:
    record(token, "start", id=self.request.id)
    time.sleep(seconds)
    return amount


@app.task(
    base=UniqueTask,
    bind=True,
    name="tests.lost_then_retried",
    retry_on_worker_lost=True,
    default_retry_delay=2,
    max_retries=3,
    unique_on=("token",),
)
def lost_then_retried(self: Any, token: str) -> None:
    record(token, "start", id=self.request.id, retries=self.request.retries)
    if events_client().set(f"lost-once:{token}", 1, nx=True):
        os.kill(os.getpid(), signal.SIGKILL)
    record(token, "end", id=self.request.id)


@app.task(base=UniqueTask, bind=True, name="tests.idempotent_retry_tuple", idempotent=True, max_retries=2)
def idempotent_retry_tuple(self: Any, token: str, pair: Any) -> list[Any]:
    record(token, "start", id=self.request.id, retries=self.request.retries)
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    return list(pair)
