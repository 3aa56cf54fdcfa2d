"""Looking at the locks, stored outcomes and fan-ins in Redis: list them, release locks by hand.

Uses SCAN only (never KEYS), so it is safe on a busy production Redis.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from celery_unique import idempotency
from celery_unique.clients import text
from celery_unique.conf import UNTIL_AND_WHILE_EXECUTING, WHILE_EXECUTING, get_conf
from celery_unique.exceptions import ConfigurationError, LockBackendError, SealBroken
from celery_unique.keys import (
    KEY_VERSION,
    digest_of_key,
    family_of,
    fan_in_key,
    fence_key,
    glob_escape,
    tag_name,
    task_name_of_tag,
)
from celery_unique.locks import LockStore, task_id_of
from celery_unique.sealing import CALLBACK

KINDS = ("lock", "run", "result")
# The lifetimes whose run takes the running lock (``:run``). The begin_run
# script sets it and writes the fence, max(previous + 1, the server's time in
# µs), in one call; a run that meets another holder returns before writing
# either. Read at one moment with the lock, the fence is the start of its
# holder's run (the latest, when a redelivery re-entered it). The queued lock
# has no such companion: until_executed writes a fence at the start of each
# run, but while the holder waits in the queue the fence is an earlier run's.
_RUN_LOCK_LIFETIMES = (WHILE_EXECUTING, UNTIL_AND_WHILE_EXECUTING)
_UNKNOWN = UNKNOWN_LIFETIME = "?"


@dataclass(frozen=True)
class LockInfo:
    """One lock found in Redis."""

    key: str
    task_name: str
    digest: str
    kind: str  # "lock" (taken at delay()), "run" (taken as the run started) or "result" (an outcome)
    holder: str | None  # the holding task id (for "result": the task that stored it)
    ttl: float | None
    lifetime: str  # the task's lock lifetime in this app, "?" when it is not registered here
    age: float | None  # seconds since the holder's run started; None when not known for certain
    # When the run that stored an outcome started (epoch seconds): its family's fence,
    # which no later run moved (a stored outcome is replayed, not run again).
    started: float | None = None

    def line(self) -> str:
        """One line for a listing."""
        ttl = "-" if self.ttl is None else f"{self.ttl:.1f}s"
        age = "-" if self.age is None else f"{self.age:.1f}s"
        return (
            f"{self.key}  {self.kind}  holder={self.holder}  ttl={ttl}  age={age}  lifetime={self.lifetime}"
        )


def task_of(key: str) -> str:
    """The task name in a key of a lock family."""
    tag = key[key.index("{") + 1 : key.rindex("}")]
    return task_name_of_tag(tag.rpartition(":")[0])


# Exactly one SHA-256 hex digest: with "*" in its place, the tag pattern of task
# "a" also matched the keys of task "a:b" ("{a:b:<digest>}").
_DIGEST_PATTERN = "[0-9a-f]" * 64


def _tag_pattern(task_name: str | None) -> str:
    """The hash tag, as a SCAN pattern, of the keys of ``task_name`` (of every task without one)."""
    if not task_name:
        return "{*}"
    return f"{{{glob_escape(tag_name(task_name))}:{_DIGEST_PATTERN}}}"


def _scan(client: Any, pattern: str, count: int) -> Iterator[str]:
    """The keys matching ``pattern``, each once (SCAN may return a key twice)."""
    seen: set[str] = set()
    for raw in client.scan_iter(match=pattern, count=count):
        key = text(raw)
        if key not in seen:
            seen.add(key)
            yield key


def _pages(client: Any, pattern: str, count: int) -> Iterator[list[str]]:
    """:func:`_scan`, ``count`` keys at a time (one round trip reads a page)."""
    keys = _scan(client, pattern, count)
    while page := list(itertools.islice(keys, count)):
        yield page


def lifetime_of(app: Any, task_name: str) -> str:
    """The lock lifetime of a task in ``app``; "?" when it is not a unique task registered there."""
    task = app.tasks.get(task_name)
    if task is None or not hasattr(type(task), "unique_lifetime"):
        return _UNKNOWN
    try:
        return str(task.unique_lifetime)
    except ConfigurationError:
        return _UNKNOWN


def _read(client: Any, keys: list[str]) -> Iterator[tuple[str, Any, int, Any, int]]:
    """(key, value, pttl, its family's fence, server time in µs) of each key, all at one
    moment (MULTI): a fence read apart from its lock could be another holder's."""
    pipe = client.pipeline(transaction=True)
    for key in keys:
        pipe.get(key)
        pipe.pttl(key)
        pipe.get(fence_key(family_of(key)))
    pipe.time()
    *replies, (seconds, micros) = pipe.execute()
    now = int(seconds) * 1_000_000 + int(micros)
    for index, key in enumerate(keys):
        value, pttl, fence = replies[3 * index : 3 * index + 3]
        yield key, value, int(pttl), fence, now


def _node(cluster: Any, key: str) -> Any:
    """The cluster node serving ``key``."""
    return cluster.get_node_from_key(key)


def _routed(cluster: Any, key: str) -> tuple[str, Any, int, Any, int]:
    """:func:`_read` of one key through the cluster client's own commands, which follow
    ASK and MOVED and wait out TRYAGAIN; without the fence (so without an age): read in
    another round trip than the lock, it could be another holder's."""
    return key, cluster.get(key), int(cluster.pttl(key)), None, 0


def _read_on_node(cluster: Any, key: str) -> tuple[str, Any, int, Any, int]:
    """:func:`_read` of one key on the node serving it. A slot table gone stale (MOVED:
    a resharding, a failover) is read again, once; a slot mid-migration (ASK), mid-
    resharding (TRYAGAIN) or a second MOVED falls back to :func:`_routed`."""
    try:
        try:
            [found] = _read(cluster.get_redis_connection(_node(cluster, key)), [key])
        except MovedError:
            cluster.nodes_manager.initialize()
            [found] = _read(cluster.get_redis_connection(_node(cluster, key)), [key])
    except (AskError, TryAgainError, ClusterDownError):  # AskError: MOVED too
        return _routed(cluster, key)
    return found


def _snapshots(store: LockStore, keys: list[str]) -> Iterator[tuple[str, Any, int, Any, int]]:
    """:func:`_read` for a page of keys: one transaction on one Redis, one per key on a
    cluster (a transaction stays in one slot), sent to the node serving the key.

    A node that cannot be reached raises :class:`LockBackendError` naming it: a listing
    that left its keys out would look complete.
    """
    if not store.cluster:
        yield from _read(store.client, keys)
        return
    cluster = store.client
    for key in keys:
        try:
            found = _read_on_node(cluster, key)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            node = _node(cluster, key).name
            raise LockBackendError(f"cannot read {key} from the cluster node {node}: {exc}") from exc
        yield found


def _age(kind: str, lifetime: str, fence: Any, now: int) -> float | None:
    if kind != "run" or lifetime not in _RUN_LOCK_LIFETIMES or fence is None:
        return None  # nothing records when a queued lock or an outcome was written
    micros = now - int(fence)
    return micros / 1e6 if micros >= 0 else None  # a fence ahead of the clock is no start time


def locations(app: Any, task_name: str | None = None) -> list[tuple[LockStore, str]]:
    """Where ``app``'s locks live: (lock store, key prefix), each place once.

    The app's settings' place, and that of every unique task that keeps its
    locks elsewhere (a compat class, on its peer's setting); the app's own is
    left out when it has no Redis and the tasks have places of their own. With
    ``task_name``, that task's place (the app's, when it is not registered here).
    """
    conf = get_conf(app)
    if task_name:
        task = app.tasks.get(task_name)
        tasks = [task] if task is not None and hasattr(type(task), "unique_lifetime") else []
    else:
        tasks = [task for task in app.tasks.values() if hasattr(type(task), "unique_lifetime")]
    found: list[tuple[LockStore, str]] = []
    for store, prefix in ((task.unique_store(), task.unique_key_prefix) for task in tasks):
        if not any(store is seen and prefix == known for seen, known in found):
            found.append((store, prefix))
    if task_name and found:
        return found
    try:
        own = (conf.locks, conf.key_prefix)
    except ConfigurationError:
        if found:
            return found
        raise
    return found if own in found else [own, *found]


def iter_locks(app: Any, task_name: str | None = None, count: int = 500) -> Iterator[LockInfo]:
    """Every lock and stored outcome of ``app`` (optionally of one task), via SCAN, in
    each of its :func:`locations`.

    One round trip per ``count`` keys on one Redis, one per key on a cluster.
    """
    tag = _tag_pattern(task_name)
    lifetimes: dict[str, str] = {}
    for store, prefix in locations(app, task_name):
        yield from _locks_at(app, store, prefix, tag, lifetimes, count)


def _locks_at(
    app: Any, store: LockStore, prefix: str, tag: str, lifetimes: dict[str, str], count: int
) -> Iterator[LockInfo]:
    sealer = get_conf(app).sealer
    for kind in KINDS:
        pattern = f"{glob_escape(prefix)}:{KEY_VERSION}:{tag}:{kind}"
        for page in _pages(store.client, pattern, count):
            for key, value, pttl, fence, now in _snapshots(store, page):
                if value is not None:  # else gone between SCAN and GET
                    yield lock_info(sealer, key, text(value), pttl, fence, now, lifetimes, app)


def lock_info(
    sealer: Any, key: str, held: str, pttl: int, fence: Any, now: int, lifetimes: dict[str, str], app: Any
) -> LockInfo:
    """The info of a key read by :func:`_read`; ``lifetimes`` caches the tasks' lifetimes."""
    name = task_of(key)
    if name not in lifetimes:
        lifetimes[name] = lifetime_of(app, name)
    lifetime = lifetimes[name]
    kind = key.rpartition(":")[2]
    holder = _outcome_task(sealer, key, held) if kind == "result" else task_id_of(held)
    return LockInfo(
        key,
        name,
        digest_of_key(key),
        kind,
        holder,
        pttl / 1000.0 if pttl >= 0 else None,
        lifetime,
        _age(kind, lifetime, fence, now),
        int(fence) / 1e6 if kind == "result" and fence is not None else None,
    )


def held_locks(app: Any, task_name: str | None, count: int = 500) -> Iterator[tuple[LockStore, str, str]]:
    """(lock store, key, owner token) of every lock of one task (of every task without
    one), queued and running, via SCAN in its place: what an owner-checked release needs."""
    tag = _tag_pattern(task_name)
    for store, prefix in locations(app, task_name):
        # One pass over the keyspace for both kinds: of a family's suffixes (lock, run,
        # fence, result, args, done) only "lock" and "run" match [lr][ou][cn]*.
        pattern = f"{glob_escape(prefix)}:{KEY_VERSION}:{tag}:[lr][ou][cn]*"
        for page in _pages(store.client, pattern, count):
            # One MGET per page (per slot on a cluster): no TTL or fence is needed here.
            client = store.client
            values = client.mget_nonatomic(page) if store.cluster else client.mget(page)
            for key, value in zip(page, values, strict=True):
                if value is not None and key.endswith((":lock", ":run")):  # gone since SCAN, or not ours
                    yield store, key, text(value)


def _outcome_task(sealer: Any, key: str, stored: str) -> str:
    """The task id that stored an outcome; "?" when it does not open (another key) or parse."""
    try:
        return idempotency.read(sealer, family_of(key), stored).task_id
    except (SealBroken, ValueError, KeyError, TypeError):
        return _UNKNOWN


def open_fan_ins(app: Any, count: int = 500) -> Counter[str]:
    """How many fan-ins are open, per callback task name, via SCAN.

    A context closed (completed, failed, expired) but not yet deleted is not counted.
    """
    conf = get_conf(app)
    client = conf.locks.client
    found: Counter[str] = Counter()
    for page in _pages(client, fan_in_key(glob_escape(conf.key_prefix), "*"), count):
        pipe = client.pipeline(transaction=False)
        for key in page:
            pipe.hmget(key, "state", "callback")
        for key, (state, callback) in zip(page, pipe.execute(), strict=True):
            if state is not None and text(state) == "open":
                found[_callback_task(conf.sealer, key, callback)] += 1
    return found


def _callback_task(sealer: Any, key: str, callback: Any) -> str:
    """The task name of a fan-in's callback; "?" for a context that names none (written
    by hand, by a version that stored it otherwise, or sealed with another key)."""
    token = key[key.index("{") + 1 : key.rindex("}")].partition(":")[2]
    try:
        task = json.loads(sealer.open(CALLBACK, token, text(callback)))["task"]
    except (SealBroken, TypeError, ValueError, KeyError):  # none, not verified, not JSON, not an object
        return _UNKNOWN
    return task if isinstance(task, str) else _UNKNOWN


def store_of(app: Any, key: str) -> LockStore:
    """The lock store of a lock (or stored outcome) key of ``app``: the place of the task
    the key names (see :func:`locations`). :class:`ValueError` for any other key."""
    task_name = task_of(key) if "{" in key and "}" in key else None
    store, prefix = locations(app, task_name)[0]
    if not key.startswith(f"{prefix}:{KEY_VERSION}:{{") or not key.endswith((":lock", ":run", ":result")):
        raise ValueError(f"not a celery-unique lock key of this app: {key!r}")
    return store


def force_release(app: Any, key: str) -> bool:
    """Delete a lock (or a stored outcome) whoever holds it (an operator's decision); True if it existed."""
    return bool(store_of(app, key).client.delete(key))
