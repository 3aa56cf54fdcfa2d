"""Pages of locks, stored outcomes and fan-ins for a person to look at (the Django admin),
and the actions taken from them.

Each page costs bounded work whatever the keyspace's size: SCAN from a cursor,
a pipelined read of the keys found, and a snapshot of the rows shown; it stops
with a page full or ``budget`` keys examined, and says where the next page
starts. Nothing counts every key. A page that a filter leaves short comes with
its cursor: the next page goes on from there.

A row names what it shows by a digest of the value that holds it, never the
value itself (an owner token, a stored outcome): an action checks that the key
still holds that value, so it acts on what the person saw or on nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from celery_unique import aggregate, idempotency
from celery_unique.beats import records
from celery_unique.clients import text
from celery_unique.conf import get_conf
from celery_unique.exceptions import SealBroken
from celery_unique.inspect import (
    LockInfo,
    _callback_task,
    _snapshots,
    _tag_pattern,
    locations,
    lock_info,
    store_of,
)
from celery_unique.keys import KEY_VERSION, family_of, fan_in_key, glob_escape
from celery_unique.locks import LockStore, task_id_of

Row = TypeVar("Row")

#: Keys one SCAN call examines at most (each call stays near a millisecond at 100,000 keys).
SCAN_COUNT = 500
#: Keys one page examines at most before it stops short.
BUDGET = 20_000
QUEUED, RESERVED, RUNNING = "queued", "reserved", "running"
STATES = (QUEUED, RESERVED, RUNNING)


def value_digest(value: str) -> str:
    """What a row shows of the value that holds a key (an owner token, an outcome)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Page(Generic[Row]):
    rows: list[Row]
    cursor: str | None  # where the next page starts; None: nothing is left
    scanned: int  # keys examined
    seconds: float


@dataclass(frozen=True)
class LockRow:
    info: LockInfo
    state: str  # queued, reserved (in a worker, not started) or running
    worker: str | None  # the host name of the worker that holds it, when one says so
    value_digest: str


@dataclass(frozen=True)
class OutcomeRow:
    info: LockInfo
    succeeded: bool | None  # None: the outcome does not open (another signing key)
    started: float | None  # when the run that stored it started (epoch seconds), when known
    value_digest: str


@dataclass(frozen=True)
class FanInRow:
    key: str
    token: str
    callback: str  # the callback's task name ("?" when it does not verify)
    parts: int | None  # None: made by a version that did not note the count
    reported: int | None
    failed: int
    deadline: float | None  # epoch seconds
    ttl: float | None


@dataclass(frozen=True)
class _Place:
    """One SCAN space: a lock store's client, or one primary of a cluster."""

    store: LockStore
    prefix: str
    client: Any


def _places(places: Iterable[tuple[LockStore, str]]) -> list[_Place]:
    """The SCAN spaces of (lock store, key prefix) pairs: a cluster's primaries one by one."""
    found = []
    for store, prefix in places:
        if store.cluster:
            for node in sorted(store.client.get_primaries(), key=lambda node: node.name):
                found.append(_Place(store, prefix, store.client.get_redis_connection(node)))
        else:
            found.append(_Place(store, prefix, store.client))
    return found


def parse_cursor(cursor: str) -> tuple[int, int]:
    """(place, SCAN cursor) of a page's cursor ("" is the start); :class:`ValueError` for
    anything else."""
    if not cursor:
        return 0, 0
    place, _, scan = cursor.partition("-")
    if not (place.isdigit() and scan.isdigit()):
        raise ValueError(f"not a page cursor: {cursor!r}")
    return int(place), int(scan)


def check_state(state: str | None) -> None:
    """:class:`ValueError` unless ``state`` is one of :data:`STATES` (or None)."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")


def _walk(
    places: Sequence[_Place],
    pattern: Callable[[_Place], str],
    matches: Callable[[_Place, list[str]], list[Any]],
    cursor: str,
    size: int,
    budget: int,
) -> tuple[list[tuple[_Place, Any]], str | None, int]:
    """About ``size`` matches from ``cursor`` on, with at most about ``budget`` keys
    examined: (the (place, match) pairs, the next cursor, keys examined).

    A page holds whole SCAN calls, never part of one: a cursor is a plain SCAN
    cursor, so every key present from the first page to the last is shown (SCAN's
    promise), once or, after a rehash, twice. Resuming inside a call's batch
    cannot be done: released keys change what the same call returns.

    So each call's COUNT keeps the page near ``size``: the first call in a place
    asks for no more keys than the room left (a call returns about COUNT keys,
    matching or not); a later one aims at half the room left, at the share of
    keys that matched in that place so far (places differ: a cluster's nodes hold
    other keys). An estimate that is off overshoots by a fraction of the room left.
    """
    place_at, scan = parse_cursor(cursor)
    found: list[tuple[_Place, Any]] = []
    scanned = 0
    here_found = here_scanned = 0  # in the current place
    count = min(size, SCAN_COUNT)
    while place_at < len(places):
        place = places[place_at]
        following, raw = place.client.scan(scan, match=pattern(place), count=count)
        keys = list(dict.fromkeys(text(key) for key in raw))  # a SCAN call may repeat a key
        matched = matches(place, keys) if keys else []
        found.extend((place, match) for match in matched)
        scanned += count
        here_scanned += count
        here_found += len(matched)
        scan = int(following)
        room = size - len(found)
        if scan == 0:
            place_at += 1
            here_found = here_scanned = 0
        if place_at < len(places) and (room <= 0 or scanned >= budget):
            return found, f"{place_at}-{scan}", scanned
        if here_scanned == 0:  # a new place: nothing known of it yet
            count = max(min(room, SCAN_COUNT), 1)
        else:
            share = max(here_found / here_scanned, 1 / SCAN_COUNT)
            count = int(min(max(room / 2 / share, 10), SCAN_COUNT))
    return found, None, scanned


def _values(place: _Place, keys: list[str]) -> list[Any]:
    """The value of each key, in one round trip: one MGET, or on a cluster node a
    pipeline of GETs (the keys of one node may lie in several slots)."""
    if not place.store.cluster:
        return list(place.client.mget(keys))
    pipe = place.client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return list(pipe.execute())


def _worker_states(app: Any) -> dict[str, tuple[str, str | None]]:
    """owner -> (reserved or running, the worker's host name), from the live workers' beats."""
    conf = get_conf(app)
    found: dict[str, tuple[str, str | None]] = {}
    for beat in records(conf.locks.client, conf.key_prefix):
        if beat.alive:
            hostname = beat.data.get("hostname")
            for owner in beat.data.get("held", ()):
                found.setdefault(owner, (RESERVED, hostname))
            for owner in beat.data.get("running", ()):
                found[owner] = (RUNNING, hostname)
    return found


def _lock_state(kind: str, owner: str, workers: dict[str, tuple[str, str | None]]) -> tuple[str, str | None]:
    if owner in workers:
        return workers[owner]
    return (RUNNING, None) if kind == "run" else (QUEUED, None)


def lock_page(
    app: Any,
    task_name: str | None = None,
    state: str | None = None,
    holder: str | None = None,
    cursor: str = "",
    size: int = 100,
    budget: int = BUDGET,
) -> Page[LockRow]:
    """A page of the locks (queued and running), optionally of one task, in one state,
    or held by one task id.

    The state comes from the workers' beats (the reaper's, ``unique_reap_interval``):
    a message a live worker holds is reserved, or running once it started; a run lock
    is running; any other lock waits in the broker (or its worker does not beat).
    """
    check_state(state)
    started = time.perf_counter()
    workers = _worker_states(app)
    tag = _tag_pattern(task_name)

    def matches(place: _Place, keys: list[str]) -> list[tuple[str, str]]:
        keys = [key for key in keys if key.endswith((":lock", ":run"))]
        if not keys:
            return []
        found = []
        for key, value in zip(keys, _values(place, keys), strict=True):
            if value is None:
                continue
            owner = text(value)
            if holder and task_id_of(owner) != holder:
                continue
            if state and _lock_state(key.rpartition(":")[2], owner, workers)[0] != state:
                continue
            found.append((key, owner))
        return found

    def pattern(place: _Place) -> str:
        # lock and run, in one pass (see inspect.held_locks)
        return f"{glob_escape(place.prefix)}:{KEY_VERSION}:{tag}:[lr][ou][cn]*"

    found, following, scanned = _walk(
        _places(locations(app, task_name)), pattern, matches, cursor, size, budget
    )
    rows = []
    for info, value in _infos(app, _found_keys(found)):
        row_state, worker = _lock_state(info.kind, value, workers)
        rows.append(LockRow(info, row_state, worker, value_digest(value)))
    return Page(rows, following, scanned, time.perf_counter() - started)


def _infos(app: Any, found: Iterable[tuple[LockStore, str]]) -> Iterator[tuple[LockInfo, str]]:
    """(the key's info, its value) of each (store, key) still there, read at one moment
    with its fence (a MULTI per store; per key on a cluster)."""
    by_store: dict[int, tuple[LockStore, list[str]]] = {}
    for store, key in found:
        by_store.setdefault(id(store), (store, []))[1].append(key)
    lifetimes: dict[str, str] = {}
    sealer = get_conf(app).sealer
    for store, keys in by_store.values():
        for key, raw, pttl, fence, now in _snapshots(store, keys):
            if raw is not None:
                value = text(raw)
                yield lock_info(sealer, key, value, pttl, fence, now, lifetimes, app), value


def _found_keys(found: list[tuple[_Place, Any]]) -> Iterator[tuple[LockStore, str]]:
    """(store, key) of what :func:`_walk` found (each match's first item is its key)."""
    return ((place.store, match[0]) for place, match in found)


def lock(app: Any, key: str) -> LockRow | None:
    """One lock's row, None when it is gone (:class:`ValueError` for a key not of ``app``)."""
    found = list(_infos(app, [(store_of(app, key), key)]))
    if not found:
        return None
    info, value = found[0]
    row_state, worker = _lock_state(info.kind, value, _worker_states(app))
    return LockRow(info, row_state, worker, value_digest(value))


def outcome_page(
    app: Any, task_name: str | None = None, cursor: str = "", size: int = 100, budget: int = BUDGET
) -> Page[OutcomeRow]:
    """A page of the stored outcomes of idempotent tasks, optionally of one task."""
    started = time.perf_counter()
    tag = _tag_pattern(task_name)

    def matches(place: _Place, keys: list[str]) -> list[tuple[str, None]]:
        return [(key, None) for key in keys if key.endswith(":result")]

    def pattern(place: _Place) -> str:
        return f"{glob_escape(place.prefix)}:{KEY_VERSION}:{tag}:result"

    found, following, scanned = _walk(
        _places(locations(app, task_name)), pattern, matches, cursor, size, budget
    )
    sealer = get_conf(app).sealer
    rows = []
    for info, value in _infos(app, _found_keys(found)):
        try:
            outcome: idempotency.Outcome | None = idempotency.read(sealer, family_of(info.key), value)
        except (SealBroken, ValueError, KeyError, TypeError):
            outcome = None
        rows.append(
            OutcomeRow(
                info,
                None if outcome is None else outcome.state == "SUCCESS",
                info.started,
                value_digest(value),
            )
        )
    return Page(rows, following, scanned, time.perf_counter() - started)


_FAN_IN_FIELDS = ("state", "callback", "parts", "remaining", "failed", "deadline")


def fan_in_page(app: Any, cursor: str = "", size: int = 100, budget: int = BUDGET) -> Page[FanInRow]:
    """A page of the open fan-ins, with their progress."""
    started = time.perf_counter()
    conf = get_conf(app)

    def matches(place: _Place, keys: list[str]) -> list[tuple[str, FanInRow]]:
        pipe = place.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, *_FAN_IN_FIELDS)
            pipe.pttl(key)
        replies = pipe.execute()
        found = []
        for n, key in enumerate(keys):
            fields, pttl = replies[2 * n], int(replies[2 * n + 1])
            row = _fan_in_row(conf.sealer, key, fields, pttl)
            if row is not None:
                found.append((key, row))
        return found

    def pattern(place: _Place) -> str:
        return fan_in_key(glob_escape(place.prefix), "*")

    found, following, scanned = _walk(
        _places([(conf.locks, conf.key_prefix)]), pattern, matches, cursor, size, budget
    )
    return Page([row for _, (_, row) in found], following, scanned, time.perf_counter() - started)


def _fan_in_row(sealer: Any, key: str, fields: list[Any], pttl: int) -> FanInRow | None:
    state, callback, parts, remaining, failed, deadline = (None if f is None else text(f) for f in fields)
    if state != "open":
        return None  # closed (completed, failed, expired), being cleaned up
    total = int(parts) if parts else None
    return FanInRow(
        key=key,
        token=key[key.index("{") + 1 : key.rindex("}")].partition(":")[2],
        callback=_callback_task(sealer, key, callback),
        parts=total,
        reported=None if total is None or remaining is None else total - int(remaining),
        failed=int(failed or 0),
        deadline=int(deadline) / 1000 if deadline else None,
        ttl=pttl / 1000 if pttl >= 0 else None,
    )


# -- actions ------------------------------------------------------------------


def release_if_held(app: Any, key: str, digest: str) -> bool:
    """Release a lock, or forget an outcome, if the key still holds the value whose
    :func:`value_digest` is ``digest`` (what the person saw); True when it did."""
    store = store_of(app, key)
    value = store.client.get(key)
    if value is None or value_digest(text(value)) != digest:
        return False
    # Owner-checked in one script: a value that changed since the GET is left alone.
    return store.release(key, text(value))


def expire_fan_in(app: Any, token: str) -> list[str] | None:
    """Close an open fan-in now, as its deadline would: its errback fires with the parts
    still missing (returned); None when it was not open."""
    return aggregate.aggregator(app).expire(token)


def task_names(app: Any) -> list[str]:
    """The unique tasks registered in ``app``, for a filter."""
    return sorted(name for name, task in app.tasks.items() if hasattr(type(task), "unique_lifetime"))
