"""The reaper: frees a lock whose message no longer exists anywhere.

A lock outlives its message when the message is lost where no hook runs: a
producer killed between the acquire and the publish, a purged queue, a worker
killed while it ran a task it had already acknowledged, a broker restarted
without persistence, a release that failed while Redis was down. Until its
``lock_timeout`` every ``delay()`` of its key would be a duplicate of a task
that will never run.

The reaper decides from evidence, never from age. A lock is live while its
owner token (or, for a lock a run took without one, its task id) is found:

* in the broker: for a Redis broker, in a queue or in kombu's ``unacked`` hash
  (prefetched, eta-scheduled, or running with ``acks_late``), read in batches
  (:mod:`celery_unique.messages`);
* in the claims of a live worker: every message it holds, reserved,
  scheduled or running (:mod:`celery_unique.beats`), collected after the
  broker was read, so that a message moving from the broker to a worker
  meanwhile is seen in one or the other.

A lock without evidence is marked; it is freed (owner-checked) only when a
second sweep, at least :attr:`~celery_unique.beats.Timing.sweep_every` later,
still finds no evidence of the same owner. The time between the acquire and
the publish of a ``delay()`` is thus covered: a publish that takes longer
than that finds its lock freed, and its run checks the lock as it starts
(``until_executed`` and the ``*_while_executing`` lifetimes never run twice at
once).

A broker that cannot be read without consuming (RabbitMQ) gives no evidence
of queued messages, so only what is known is freed there: the lock of a
message that a worker had acknowledged (a task without ``acks_late``,
running) when it stopped beating. Every other lock waits for its release or
its timeout.

Locks of ``until_expired`` tasks (held for their TTL whatever happens), and
of tasks this app does not register, are never freed.

One reaper runs at a time across the workers, elected through Redis
(:data:`celery_unique.scripts.LEAD`); ``celery -A proj unique reap`` runs one
on demand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery_unique import scripts, signals
from celery_unique.beats import RECORD_TTL_MS, Timing, records, server_ms
from celery_unique.clients import REDIS_ERRORS
from celery_unique.conf import DEFAULTS, UNTIL_EXPIRED, get_conf
from celery_unique.inspect import UNKNOWN_LIFETIME, held_locks, lifetime_of, task_of
from celery_unique.keys import digest_of_key, reaper_key, record_key, workers_key
from celery_unique.locks import task_id_of
from celery_unique.messages import RedisBroker
from celery_unique.repeating import Repeating

logger = logging.getLogger(__name__)

NO_MESSAGE = "no_message"
WORKER_LOST = "worker_lost"
_REASONS = {
    NO_MESSAGE: "its message is in no queue, unacked by no worker, held by no live worker",
    WORKER_LOST: "its worker stopped beating while it ran (acknowledged: nothing redelivers it)",
}


@dataclass(frozen=True)
class Orphan:
    """A lock the reaper freed (or, in a dry run, would free)."""

    key: str
    owner: str
    task_name: str
    reason: str  # NO_MESSAGE or WORKER_LOST

    def line(self) -> str:
        return f"{self.key}  holder={task_id_of(self.owner)}  task={self.task_name}  reason={self.reason}"


@dataclass
class Sweep:
    """What one sweep saw and did."""

    locks: int = 0  # locks looked at
    messages: int = 0  # broker messages read (a Redis broker)
    workers: int = 0  # live workers
    suspects: int = 0  # locks without evidence
    reaped: list[Orphan] = field(default_factory=list)
    judged: bool = False  # the evidence was complete: suspects marked before could be freed
    seconds: float = 0.0


@dataclass
class _Workers:
    live: set[str] = field(default_factory=set)  # ids
    claims: set[str] = field(default_factory=set)  # held by live workers
    queues: set[str] = field(default_factory=set)
    lost: dict[str, set[str]] = field(default_factory=dict)  # dead worker id -> acknowledged owners
    stamps: dict[str, int] = field(default_factory=dict)  # live worker id -> its record's time
    every: float = 0.0  # the longest time between two records of a live worker


class Reaper:
    """Sweeps one app's locks; keeps the marks between its sweeps."""

    def __init__(
        self,
        app: Any,
        timing: Timing | None = None,
        dry_run: bool = False,
        stopped: threading.Event | None = None,
    ) -> None:
        self.app = app
        self._stopped = stopped or threading.Event()  # set: a sweep waits for nothing more
        conf = get_conf(app)
        # The CLI may reap for an app whose workers do not (unique_reap_interval = 0).
        self.timing = timing or Timing(conf.reap_interval or DEFAULTS["unique_reap_interval"])
        self.dry_run = dry_run
        self.prefix = conf.key_prefix
        self._marks: dict[tuple[str, str], float] = {}  # (key, owner) -> monotonic time first seen
        self._broker: RedisBroker | None = None
        self._connection: Any = None
        self._blind: bool | None = None  # the broker cannot be read (not Redis)

    # -- evidence ---------------------------------------------------------------

    def _broker_reader(self) -> RedisBroker | None:
        if self._blind is None:
            connection = self.app.connection_for_read()
            if getattr(connection.transport, "driver_type", "") != "redis":
                connection.release()
                self._blind = True
                return None
            self._connection = connection
            self._broker = RedisBroker(connection.default_channel)
            self._blind = False
        return self._broker

    def close(self) -> None:
        """Close the broker connection (it reopens on the next sweep)."""
        connection, self._connection, self._broker, self._blind = self._connection, None, None, None
        if connection is not None:
            connection.release()

    def _workers(self, client: Any) -> _Workers:
        found = _Workers()
        for beat in records(client, self.prefix):
            worker_id, record = beat.worker_id, beat.data
            if beat.alive:
                found.live.add(worker_id)
                found.claims.update(record.get("held", ()))
                found.queues.update(record.get("queues", ()))
                found.stamps[worker_id] = int(record.get("at", 0))
                found.every = max(found.every, float(record.get("every", 0)))
            else:
                found.lost[worker_id] = set(record.get("acked", ()))
        return found

    def _fresh_workers(self, client: Any, after_ms: int) -> _Workers | None:
        """The workers, once every live one has written claims stamped after ``after_ms``;
        None when one has not within two of its beats (a worker that stalls, or just died)."""
        started = time.monotonic()
        while True:
            workers = self._workers(client)
            if all(stamp > after_ms for stamp in workers.stamps.values()):
                return workers
            if time.monotonic() - started > 2 * workers.every + 0.5:
                return None
            if self._stopped.wait(min(workers.every / 4, 0.25)):
                return None  # the worker stops: judged at another time

    # -- the sweep ----------------------------------------------------------------

    def sweep(self) -> Sweep:
        """Look once: mark locks without evidence, free those marked a sweep before."""
        began = time.monotonic()
        result = Sweep()
        client = get_conf(self.app).locks.client
        locks = []
        lifetimes: dict[str, str] = {}  # read again each sweep: settings may change
        for store, key, owner in held_locks(self.app, None):
            name = task_of(key)
            if name not in lifetimes:
                lifetimes[name] = lifetime_of(self.app, name)
            if lifetimes[name] in (UNKNOWN_LIFETIME, UNTIL_EXPIRED):
                continue  # not ours to judge: unknown here, or held for its TTL by design
            locks.append((store, key, owner, name))
        result.locks = len(locks)
        before = self._workers(client)  # the queues they consume
        broker = self._broker_reader()
        evidence: set[str] = set()
        if broker is not None:
            queues = before.queues | broker.bound_queues() | set(self.app.amqp.queues)
            evidence, result.messages = broker.identities(queues)
        looked = server_ms(client, workers_key(self.prefix))
        workers = self._fresh_workers(client, looked)
        result.judged = workers is not None
        if workers is None:
            workers = self._workers(client)
        result.workers = len(workers.live)
        evidence |= workers.claims
        lost_by = set().union(*workers.lost.values())  # acknowledged by a worker that stopped beating
        now = time.monotonic()
        marks: dict[tuple[str, str], float] = {}
        for store, key, owner, name in locks:
            if owner in evidence or task_id_of(owner) in evidence:
                continue
            if broker is None and owner not in lost_by:
                continue  # a blind broker may hold it
            result.suspects += 1
            marked = marks[(key, owner)] = self._marks.get((key, owner), now)
            if not result.judged or now - marked < self.timing.sweep_every * 0.9:
                continue
            orphan = Orphan(key, owner, name, WORKER_LOST if owner in lost_by else NO_MESSAGE)
            if self.dry_run or store.release_all([key], owner):
                del marks[(key, owner)]
                result.reaped.append(orphan)
                if not self.dry_run:
                    self._said(orphan)
        self._marks = marks
        if result.judged and not self.dry_run:
            self._forget_lost(client, workers, {owner for _, _, owner, _ in locks})
        result.seconds = time.monotonic() - began
        if not self.dry_run:
            self._record(client, result)
        return result

    def _said(self, orphan: Orphan) -> None:
        logger.warning(
            "lock %s of %s[%s] reaped: %s",
            digest_of_key(orphan.key)[:12],
            orphan.task_name,
            task_id_of(orphan.owner),
            _REASONS[orphan.reason],
        )
        signals.lock_reaped.send(
            sender=self.app.tasks.get(orphan.task_name),
            owner=orphan.owner,
            key_digest=digest_of_key(orphan.key),
            task_name=orphan.task_name,
            reason=orphan.reason,
        )

    def _forget_lost(self, client: Any, workers: _Workers, held: set[str]) -> None:
        """Drop the records of dead workers whose acknowledged messages hold no lock any more."""
        for worker_id, owners in workers.lost.items():
            if owners & held:
                continue
            pipe = client.pipeline(transaction=False)
            pipe.delete(record_key(self.prefix, worker_id))
            pipe.srem(workers_key(self.prefix), worker_id)
            pipe.execute()

    def _record(self, client: Any, result: Sweep) -> None:
        """The figures of the sweeps, for operators and tests (``HGETALL <prefix>:v1:{reaper}:stats``)."""
        stats = reaper_key(self.prefix, "stats")
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(stats, "sweeps", 1)
        pipe.hincrby(stats, "reaped", len(result.reaped))
        pipe.hincrby(stats, "judged", int(result.judged))
        pipe.hset(
            stats,
            mapping={
                "last_locks": result.locks,
                "last_messages": result.messages,
                "last_suspects": result.suspects,
                "last_ms": int(result.seconds * 1000),
                "last_judged": int(result.judged),
            },
        )
        pipe.pexpire(stats, RECORD_TTL_MS)
        pipe.execute()


class Leader(Repeating):
    """The reaper of a worker: sweeps while it leads, from a daemon thread."""

    def __init__(self, app: Any, timing: Timing, candidate: str | None = None) -> None:
        super().__init__("the reaper's sweep", timing.sweep_every)
        self.app = app
        self.timing = timing
        self.candidate = candidate or f"{os.getpid()}/{os.urandom(3).hex()}"
        self.reaper = Reaper(app, timing, stopped=self._stopped)
        self._key = reaper_key(get_conf(app).key_prefix, "leader")
        self._lead = get_conf(app).locks.client.register_script(scripts.LEAD)

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(*REDIS_ERRORS):  # else its lease lapses
            self._lead(keys=[self._key], args=[self.candidate, 0])
        self.reaper.close()

    def leads(self) -> bool:
        lease_ms = int(self.timing.sweep_every * 3000)
        return bool(self._lead(keys=[self._key], args=[self.candidate, lease_ms]))

    def tick(self) -> None:
        if self.leads():
            self.reaper.sweep()

    def failed(self) -> None:
        self.reaper.close()  # the broker connection may be the one that failed
