"""What a Redis broker holds: the owners and task ids of its messages.

The reaper's evidence that a lock's message still exists. kombu's Redis
transport keeps a queued message in a list per queue (and per priority step)
and a delivered, unacknowledged one (prefetched, eta-scheduled, running with
``acks_late``) in the ``unacked`` hash until it is acknowledged or restored.
Both are read in batches (``HSCAN``, ``LRANGE``), never consumed; a batch
blocks the broker for about as long as a ``BRPOP`` of the same messages.

The hash is read before the lists: a message that moves from one to the other
meanwhile (a restore after the visibility timeout pushes it onto its queue,
then removes it from the hash) is found in one of them. A message that leaves
both for a worker meanwhile is in that worker's claims (:mod:`celery_unique.beats`),
which the reaper reads after this.

Each message is searched for the lock header (its owner token) and the task
id, without parsing the whole message: both are JSON keys of its ``headers``
object, and inside a JSON string every quote is escaped, so a key's quote
never follows a backslash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from celery_unique.clients import text
from celery_unique.headers import HEADER, RUN_OWNER_HEADER
from celery_unique.keys import glob_escape

#: Messages read per round trip.
BATCH = 1000

_decode = json.JSONDecoder().raw_decode
_LOCK = f'"{HEADER}": '
_RUN_OWNER = f'"{RUN_OWNER_HEADER}": '
_ID = '"id": '


def _values_after(message: str, marker: str) -> Iterator[Any]:
    """The JSON values that follow ``marker`` (a key) anywhere in ``message``."""
    at = message.find(marker)
    while at >= 0:
        if at == 0 or message[at - 1] != "\\":
            try:
                value = _decode(message, at + len(marker))[0]
            except ValueError:
                value = None  # not a value after all (cut short): nothing to add
            if value is not None:
                yield value
        at = message.find(marker, at + len(marker))


def identities(message: str) -> Iterator[str]:
    """The owner tokens and task ids a raw kombu message names."""
    for header in _values_after(message, _LOCK):
        if isinstance(header, dict) and isinstance(header.get("owner"), str):
            yield header["owner"]
    for owner in _values_after(message, _RUN_OWNER):
        if isinstance(owner, str):
            yield owner
    for task_id in _values_after(message, _ID):
        if isinstance(task_id, str):
            yield task_id


class RedisBroker:
    """Reads a kombu Redis broker's queues and unacked hash (never consumes).

    Built from a kombu channel: its key names, ``global_keyprefix``, priority
    steps and connection pool (a Sentinel's too), so it reads exactly what
    the workers consume.
    """

    def __init__(self, channel: Any) -> None:
        self.prefix = getattr(channel, "global_keyprefix", "") or ""
        self.unacked = self.prefix + channel.unacked_key
        self.bindings = glob_escape(self.prefix + channel.keyprefix_queue.replace("%s", "")) + "*"
        self.sep = channel.sep
        self.steps = tuple(channel.priority_steps)
        # A plain client on the channel's pool: kombu's own prefixes some commands itself.
        self.client = redis.Redis(connection_pool=channel.client.connection_pool)

    def bound_queues(self) -> set[str]:
        """Every queue bound to an exchange (kombu records bindings as it declares queues)."""
        found: set[str] = set()
        for key in self.client.scan_iter(match=self.bindings, count=BATCH):
            for member in self.client.sscan_iter(key, count=BATCH):
                queue = text(member).split(self.sep)[-1]
                if queue:
                    found.add(queue)
        return found

    def lists(self, queues: Iterable[str]) -> list[str]:
        """The list keys of ``queues``: one per priority step."""
        keys = []
        for queue in sorted(set(queues)):
            for step in self.steps:
                keys.append(self.prefix + (f"{queue}{self.sep}{step}" if step else queue))
        return keys

    def identities(self, queues: Iterable[str]) -> tuple[set[str], int]:
        """(owner tokens and task ids of every message held, messages read)."""
        found: set[str] = set()
        read = 0
        for _, value in self.client.hscan_iter(self.unacked, count=BATCH):
            read += 1
            found.update(identities(text(value)))
        for key in self.lists(queues):
            start = 0
            while True:
                # Producers push on the left and workers pop on the right: a
                # message keeps or raises its index while the batches are read.
                batch = self.client.lrange(key, start, start + BATCH - 1)
                for value in batch:
                    found.update(identities(text(value)))
                read += len(batch)
                if len(batch) < BATCH:
                    break
                start += BATCH
        return found, read
