"""Each worker's beat: that it is alive, and which messages it holds.

The main process of every worker writes, every :attr:`Timing.beat_every`
seconds, a record of the messages it holds (prefetched, eta-scheduled,
waiting for a pool process, running, and still running after a
``revoke(terminate=True)`` or a hard time limit let go of them), by owner
token and task id, and which of them are already acknowledged (a task
without ``acks_late`` is acknowledged as it starts: its message exists
nowhere else). A short-lived
key says that the worker is alive. The reaper (:mod:`celery_unique.reaper`)
keeps every lock that a live worker claims, and knows the running messages
of a worker that stopped beating.

The record holds task ids, owner tokens, queue names and the worker's host
name: no arguments, nothing executed. Each record is stamped with the lock
Redis's clock, read before the claims are collected, so the reaper can tell
claims collected after its look at the broker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery_unique import headers
from celery_unique.clients import REDIS_ERRORS, is_cluster, text
from celery_unique.conf import get_conf
from celery_unique.keys import alive_key, record_key, workers_key
from celery_unique.repeating import Repeating

#: A record outlives its worker's last beat this long (ms): the reaper reads a
#: dead worker's last claims, and forgets them once it has settled them. Every
#: key of the reaper's lives at most this long after the last worker stopped.
RECORD_TTL_MS = 86_400_000


@dataclass(frozen=True)
class Timing:
    """The reaper's pace, derived from ``unique_reap_interval``: a lock whose message is
    gone is freed within ``interval`` seconds (see :mod:`celery_unique.reaper`)."""

    interval: float

    @property
    def beat_every(self) -> float:
        return max(self.interval / 12, 0.25)

    @property
    def alive_ms(self) -> int:
        """A worker that has not beaten for this long is taken for dead."""
        return int(max(self.interval / 4, 3.0) * 1000)

    @property
    def sweep_every(self) -> float:
        return max(self.interval / 6, 0.5)


#: Runs that may go on in a pool child after Celery let go of their request:
#: ``revoke(terminate=True)`` and a hard time limit take it out of Celery's
#: active requests as the signal goes, and a run that handles SIGTERM goes on.
#: Each request, with a test of whether its run may still go on; claimed as
#: running meanwhile (filled by :class:`celery_unique.hooks.UniqueRequest`).
lingering: dict[Any, Callable[[], bool]] = {}


def linger(request: Any, running: Callable[[], bool]) -> None:
    """Claim ``request`` while ``running()`` says its run may go on."""
    _still_lingering()  # dropped here too: a worker without a beat never reads them
    lingering[request] = running


def _still_lingering() -> list[Any]:
    """The requests of :data:`lingering` whose run may still go on (the others, and
    any whose test fails, are dropped)."""
    found = []
    for request, running in list(lingering.items()):
        try:
            going_on = running()
        except Exception:
            going_on = False
        if going_on:
            found.append(request)
        else:
            lingering.pop(request, None)
    return found


def server_ms(client: Any, key: str) -> int:
    """The clock of the Redis server that holds ``key``, in milliseconds (on a cluster,
    every stamp the reaper compares comes from the node of its one slot)."""
    target = {"target_nodes": client.get_node_from_key(key)} if is_cluster(client) else {}
    seconds, micros = client.time(**target)
    return int(seconds) * 1000 + int(micros) // 1000


def _requests(consumer: Any, still_running: list[Any]) -> Iterator[Any]:
    """Every request the worker holds: reserved, active, ``still_running`` (those of
    :data:`lingering`), those that wait in its timer for their eta (Celery before
    5.6 records those nowhere else) and those a rate limit holds back.

    Not ``state.requests``: Celery before 5.7 leaves there, after a lost broker
    connection, the requests it dropped (their messages go back to the broker, or
    are lost with it), and they would hold their locks for as long as the worker
    lives. Read from another thread than the one that changes them: each
    collection is copied whole first (list() of a set or deque is one step under
    the GIL)."""
    from celery.worker import state
    from celery.worker.request import Request

    scheduled = getattr(state, "scheduled_requests", None)  # Celery 5.6+
    for requests in (state.active_requests, state.reserved_requests, scheduled):
        if requests is not None:
            for ref in list(requests.data):
                found = ref()
                if found is not None:
                    yield found
    yield from still_running
    timer = getattr(consumer, "timer", None)
    waiting = [getattr(item, "entry", item) for item in list(getattr(timer, "queue", None) or ())]
    for entry in waiting:
        yield from (arg for arg in getattr(entry, "args", None) or () if isinstance(arg, Request))
    for bucket in list((getattr(consumer, "task_buckets", None) or {}).values()):
        for item in list(getattr(bucket, "contents", None) or ()):  # (request, tokens)
            request = item[0] if isinstance(item, tuple) and item else item
            if isinstance(request, Request):
                yield request


def claims(consumer: Any) -> tuple[set[str], set[str], set[str]]:
    """(owner tokens and task ids of the messages the worker holds, owners of those
    already acknowledged, owners of those running)."""
    from celery.worker import state

    still_running = _still_lingering()
    active = {id(ref()) for ref in list(state.active_requests.data)} | {id(r) for r in still_running}
    held: set[str] = set()
    acked: set[str] = set()
    running: set[str] = set()
    for request in _requests(consumer, still_running):
        request_dict = getattr(request, "request_dict", None)
        header = headers.from_message_headers(request_dict)
        owner = header["owner"] if header is not None else headers.run_owner(request_dict, request.id)
        held.update((owner, request.id))
        if getattr(request, "acknowledged", False):
            acked.add(owner)
        if id(request) in active:
            running.add(owner)
    return held, acked, running


@dataclass(frozen=True)
class Record:
    """One worker's last record, as the reaper and the admin read it."""

    worker_id: str
    alive: bool
    data: dict[str, Any]


def records(client: Any, prefix: str) -> list[Record]:
    """Every worker's last record (alive or not), in two round trips."""
    ids = sorted(text(member) for member in client.smembers(workers_key(prefix)))
    pipe = client.pipeline(transaction=False)
    for worker_id in ids:
        pipe.exists(alive_key(prefix, worker_id))
        pipe.get(record_key(prefix, worker_id))
    replies = pipe.execute()
    return [
        Record(worker_id, bool(replies[2 * n]), json.loads(replies[2 * n + 1] or "{}"))
        for n, worker_id in enumerate(ids)
    ]


def queues(consumer: Any) -> list[str]:
    """The queues the worker consumes from."""
    task_consumer = getattr(consumer, "task_consumer", None)
    return sorted({queue.name for queue in getattr(task_consumer, "queues", None) or ()})


class Beat(Repeating):
    """Writes one worker's record from a daemon thread until stopped."""

    def __init__(self, app: Any, consumer: Any, timing: Timing) -> None:
        super().__init__("the worker's beat", timing.beat_every, at_once=True)
        self.app = app
        self.consumer = consumer
        self.timing = timing
        hostname = getattr(consumer, "hostname", None) or "worker"
        self.worker_id = f"{hostname}/{os.getpid()}/{os.urandom(3).hex()}"
        prefix = get_conf(app).key_prefix
        self.alive_key = alive_key(prefix, self.worker_id)
        self.record_key = record_key(prefix, self.worker_id)
        self.workers_key = workers_key(prefix)

    def stop(self) -> None:
        """Stop beating and say so: a worker that stops warmly has given its messages back."""
        super().stop()
        try:
            client = self._client()
            pipe = client.pipeline(transaction=False)
            pipe.delete(self.alive_key)
            pipe.delete(self.record_key)
            pipe.srem(self.workers_key, self.worker_id)
            pipe.execute()
        except REDIS_ERRORS:
            pass  # its alive key lapses; the reaper settles its record

    def _client(self) -> Any:
        return get_conf(self.app).locks.client

    def tick(self) -> None:
        """Write the record once: the clock first, then the claims."""
        client = self._client()
        now = server_ms(client, self.workers_key)
        held, acked, running = claims(self.consumer)
        record = {
            "at": now,
            "every": self.timing.beat_every,  # how long the reaper waits for the next record
            "hostname": getattr(self.consumer, "hostname", None),
            "held": sorted(held),
            "acked": sorted(acked),
            "running": sorted(running),  # shown in the admin (queued, reserved or running)
            "queues": queues(self.consumer),
        }
        pipe = client.pipeline(transaction=False)
        pipe.set(self.record_key, json.dumps(record), px=RECORD_TTL_MS)
        pipe.set(self.alive_key, now, px=self.timing.alive_ms)
        pipe.sadd(self.workers_key, self.worker_id)
        pipe.pexpire(self.workers_key, RECORD_TTL_MS)
        pipe.execute()
