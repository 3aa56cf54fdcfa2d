"""The Celery app of the chaos and security suites' workers and producer processes.

It is configured from the environment, so each scenario can give its workers
their own broker, lock Redis, key prefix and broker transport options:

* ``CHAOS_BROKER_URL``: the broker (a private redis-server that is never
  stopped; the tasks' events are recorded there too, unless
  ``CHAOS_EVENTS_URL`` names another Redis: a scenario that restarts the
  broker keeps its events apart);
* ``CHAOS_LOCK_URL``: the Redis that holds the locks (may be stopped,
  restarted, or be a TLS/ACL server);
* ``CHAOS_KEY_PREFIX``: ``unique_key_prefix``;
* ``CHAOS_SOCKET_TIMEOUT``: the lock client's socket and connect timeouts;
* ``CHAOS_VISIBILITY_TIMEOUT``: the Redis broker's visibility timeout (a
  message not acknowledged within it is delivered again);
* ``CHAOS_BROKER_SOCKET_TIMEOUT``: the Redis broker connections' socket timeout;
* ``CHAOS_SETTINGS``: more settings, as a JSON object.

Each task records what happened (start, end, its id, pid and retries) in a
Redis list per test token, so tests compare what producers believe with what
workers ran.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis
from celery import Celery, signals

from celery_unique import UniqueTask, aggregate
from celery_unique import signals as unique_signals
from tests.barrier import add_barrier

app = Celery("celery_unique_chaos", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("CHAOS_BROKER_URL"),
    unique_redis_url=os.environ.get("CHAOS_LOCK_URL"),
    unique_key_prefix=os.environ.get("CHAOS_KEY_PREFIX", "celery_unique"),
    unique_redis_socket_timeout=float(os.environ.get("CHAOS_SOCKET_TIMEOUT", "5")),
    unique_redis_connect_timeout=float(os.environ.get("CHAOS_SOCKET_TIMEOUT", "5")),
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("CHAOS_VISIBILITY_TIMEOUT", "3600")),
        # Look for messages to deliver again every second, not every 100 s.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # Unset: kombu waits on a stalled broker for as long as it stalls.
        **(
            {"socket_timeout": float(os.environ["CHAOS_BROKER_SOCKET_TIMEOUT"])}
            if os.environ.get("CHAOS_BROKER_SOCKET_TIMEOUT")
            else {}
        ),
    },
    task_ignore_result=True,
    # A fan-in whose closer died is finished by the workers' sweep this soon after.
    unique_fan_in_claim_timeout=2,
    # A fan-in's callbacks are signed with it (a test key: never a real one in a repository).
    unique_signing_key="test-signing-key",
    worker_prefetch_multiplier=1,
    task_publish_retry=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # The logger's name on every line, so tests can pick celery-unique's lines.
    worker_log_format="[%(asctime)s: %(levelname)s/%(processName)s %(name)s] %(message)s",
    worker_task_log_format="[%(asctime)s: %(levelname)s/%(processName)s %(name)s] %(message)s",
)
app.conf.update(json.loads(os.environ.get("CHAOS_SETTINGS", "{}")))


def _restore_on_every_tick() -> None:
    """kombu before 5.7 has no ``unacked_restore_*`` options: it looks for messages
    to deliver again on every 10th tick of 10 s, so a message whose delivery was
    lost waits up to 100 s past its visibility timeout. Every tick here (10 s): the
    broker still redelivers everything, the suite waits less for it."""
    from kombu.transport import redis as kombu_redis

    if hasattr(kombu_redis.Channel, "unacked_restore_throttle"):
        return
    restore_visible = kombu_redis.QoS.restore_visible

    def on_every_tick(self: Any, start: int = 0, num: int = 10, interval: int = 10) -> Any:
        return restore_visible(self, start, num, 1)

    kombu_redis.QoS.restore_visible = on_every_tick


_restore_on_every_tick()

_events: redis.Redis | None = None


def events_key(token: str) -> str:
    return f"chaos-events:{token}"


def release_key(token: str) -> str:
    return f"chaos-release:{token}"


def broker_client() -> redis.Redis:
    """The Redis where tasks record events and tests keep their flags (the broker's,
    unless ``CHAOS_EVENTS_URL`` says otherwise)."""
    global _events
    if _events is None:
        _events = redis.Redis.from_url(os.environ.get("CHAOS_EVENTS_URL") or app.conf.broker_url)
    return _events


def record(token: str, event: str, **data: Any) -> None:
    entry = {"event": event, "pid": os.getpid(), "time": time.time(), **data}
    broker_client().rpush(events_key(token), json.dumps(entry))


barrier = add_barrier(app, broker_client)


def wait_released(token: str, limit: float = 120.0) -> None:
    """Block until the test sets the token's release key; a run not released within
    ``limit`` fails (recorded as a "failure" event) instead of ending as if released."""
    deadline = time.monotonic() + limit
    while not broker_client().exists(release_key(token)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{token} was not released within {limit}s")
        time.sleep(0.02)


def _task(name: str, **options: Any) -> Any:
    """A unique task keyed on ``token`` and ``item``: records its start (under
    the token), runs ``seconds`` or until released, records its end."""

    @app.task(base=UniqueTask, bind=True, name=name, unique_on=("token", "item"), shared=False, **options)
    def run(self: Any, token: str, seconds: float | None = None, item: str = "") -> None:
        record(token, "start", id=self.request.id, item=item, retries=self.request.retries)
        if seconds is None:
            wait_released(token)
        else:
            time.sleep(seconds)
        record(token, "end", id=self.request.id, item=item)

    return run


# Held until the test releases it (load, revoke).
hold = _task("chaos.hold", lock_timeout=60)
# Redelivered when its pool child is killed.
killable = _task("chaos.killable", acks_late=True, reject_on_worker_lost=True, lock_timeout=5)
# Short work, many keys (Redis outage, warm shutdown).
work = _task("chaos.work", lock_timeout=60, conflict_retry_countdown=0.5, max_retries=20)
# The reaper's scenarios: locks that live for the default hour, so that only the
# reaper frees them soon; acknowledged as they start, or when they end.
lasting = _task("chaos.lasting")
lasting_late = _task("chaos.lasting_late", acks_late=True)


@app.task(base=UniqueTask, bind=True, name="chaos.retrying", unique_on=("token", "item"), shared=False)
def retrying(self: Any, token: str, item: str = "") -> None:
    """Runs once, then waits an hour for its retry (the message waits in a worker's timer)."""
    record(token, "start", id=self.request.id, item=item, retries=self.request.retries)
    raise self.retry(countdown=3600)


# Stores its outcome and replays it (the security tests' stored-data checks).
idempotent = _task("chaos.idempotent", idempotent=True, lock_timeout=60)
# Lost with its worker and delivered again after the visibility timeout,
# its 1 s lock long expired: one per on_conflict policy.
REDELIVERED = {
    policy: _task(
        f"chaos.redelivered.{policy}",
        acks_late=True,
        lock_timeout=1,
        on_conflict=policy,
        conflict_retry_countdown=0.5,
        max_retries=20,
    )
    for policy in ("discard", "retry")
}


class _GatedStart(UniqueTask):  # type: ignore[misc]
    """Records "gated" and waits for ``release_key(f"{token}:start")`` before its run
    checks its lock: a test can make Redis fail at exactly that moment."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        token = args[0]
        record(token, "gated", id=task_id)
        wait_released(f"{token}:start")
        super().before_start(task_id, args, kwargs)


@app.task(base=_GatedStart, bind=True, name="chaos.gated_start", unique_on=("token",), lock_timeout=60)
def gated_start(self: Any, token: str) -> None:
    record(token, "start", id=self.request.id, item="")
    record(token, "end", id=self.request.id, item="")


@app.task(base=UniqueTask, bind=True, name="chaos.graceful", unique_on=("token", "item"), lock_timeout=60)
def graceful(self: Any, token: str, item: str = "") -> None:
    """Handles SIGTERM (records it) and finishes its work: a revoke(terminate=True) does
    not end it. Runs until released (``release_key(f"{token}:{item}")``)."""

    def terminated(signum: int, frame: Any) -> None:
        record(token, "sigterm", id=self.request.id, item=item)

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        record(token, "start", id=self.request.id, item=item)
        wait_released(f"{token}:{item}")
        record(token, "end", id=self.request.id, item=item)
    finally:
        signal.signal(signal.SIGTERM, before)


def alive_key(token: str) -> str:
    """When (time.time()) a run of ``hard_limited`` was last seen alive."""
    return f"chaos-alive:{token}"


@app.task(base=UniqueTask, bind=True, name="chaos.hard_limited", unique_on=("token",), time_limit=1)
def hard_limited(self: Any, token: str) -> None:
    # Only the pool's SIGKILL ends the child: no task_postrun runs in it,
    # the worker's main process must release the lock. It works on after the
    # pool's SIGTERM, as a task that handles SIGTERM does, and says so.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(token, "start", id=self.request.id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        broker_client().set(alive_key(token), repr(time.time()), ex=600)
        time.sleep(0.002)


# -- fan-in ----------------------------------------------------------------------


def fan_in_fault_key(token: str) -> str:
    """Set to "kill" to SIGKILL, once, the process that closes the token's fan-in,
    between its close and the publish of its callback."""
    return f"chaos-fan-in-fault:{token}"


def _fan_in_fault(token: str, kind: str) -> None:
    if not (os.environ.get("CHAOS_EVENTS_URL") or app.conf.broker_url):
        return  # a test process that has not configured this app: no fault of ours
    if broker_client().getdel(fan_in_fault_key(token)) == b"kill":
        record(token, "closer-killed", kind=kind)
        os.kill(os.getpid(), signal.SIGKILL)


aggregate.before_publish = _fan_in_fault


@app.task(name="chaos.fan_part")
def fan_part(token: str, number: int) -> int:
    return number


@app.task(name="chaos.fan_part_late", acks_late=True, reject_on_worker_lost=True)
def fan_part_late(token: str, number: int) -> int:
    """A part whose message is delivered again when its child dies."""
    return number


@app.task(base=UniqueTask, name="chaos.reveal", idempotent=True, unique_on=("token",), shared=False)
def reveal(token: str, secret: str) -> dict[str, str]:
    """An idempotent task whose stored outcome holds a secret (the security tests)."""
    return {"secret": secret}


@app.task(name="chaos.fan_secret")
def fan_secret(token: str, secret: str) -> str:
    """A fan-in part whose report holds a secret."""
    return secret


@app.task(name="chaos.fan_callback")
def fan_callback(results: dict[str, Any], token: str) -> None:
    record(token, "callback", results=results)


def _retried(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    """Record a retry with its reason, in the pool child that decided it."""
    if sender is None or request is None or not str(sender.name).startswith("chaos."):
        return
    args = request.args or ()
    token = args[0] if args else (request.kwargs or {}).get("token")
    if token:
        cause = getattr(reason, "exc", None) or reason  # the error a Retry carries
        record(str(token), "retry", id=request.id, reason=type(cause).__name__)


def _failed(sender: Any = None, task_id: str = "", exception: Any = None, args: Any = None, **_: Any) -> None:
    """Record a run that failed (in the body, or before it: a lock it could not check)."""
    if sender is not None and str(sender.name).startswith("chaos.") and args:
        record(str(args[0]), "failure", id=task_id, reason=type(exception).__name__)


def _conflict(
    sender: Any = None, task_id: str = "", existing_id: str = "", policy: str = "", **_: Any
) -> None:
    """Record a run that found its lock held by another task (the policy decides)."""
    args = (sender.request.args or ()) if sender is not None else ()
    if args:
        record(str(args[0]), "conflict", id=task_id, holder=existing_id, policy=policy)


signals.task_retry.connect(_retried, weak=False)
signals.task_failure.connect(_failed, weak=False)
unique_signals.lock_conflict.connect(_conflict, weak=False)
