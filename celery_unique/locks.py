"""The lock primitive: acquire, release and extend, each one Lua call.

The lock value is an owner token: the task id and a random suffix made for
each message (:func:`new_owner`). The message carries it in its headers, so
the same message coming back (a retry, a redelivery) re-enters its own lock,
and only the owner can release or extend it. Because two calls never share a
token, a call can always tell its own acquire from another's, even when the
caller chose the task id and used it before (a reply lost in a stall, asked
again, names the call itself as the holder).

Acquiring sits on the hot path of ``delay()``, so it does not go through
redis-py's command machinery (pool bookkeeping, retries, instrumentation cost
more than the round trip itself). It keeps a few connections of its own, made
by the client's pool so they share its settings (TLS, ACL, database), sends a
pre-encoded ``EVALSHA`` and reads the reply, whose shape it knows, itself.
On a Redis Cluster it keeps connections per primary and sends to the one its
slot table names for the key. Anything unexpected (a ``MOVED`` after a
resharding, a ``READONLY`` after a failover, a dropped connection) falls back
to the client's own script call, which knows how to follow it.
:meth:`LockStore.begin_acquire` sends without waiting: the caller does its own
work (Celery builds the message) and reads the reply only when it needs it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from celery_unique import scripts
from celery_unique.clients import REDIS_ERRORS, certainly_not_run, text
from celery_unique.keys import done_key, family_of

# The suffix of an owner token: "#" and 12 hex digits (48 random bits, unique
# among the messages of one task id).
_SUFFIX = re.compile(r"#[0-9a-f]{12}\Z")


def new_owner(task_id: str) -> str:
    """A new owner token for a message with this task id."""
    return f"{task_id}#{os.urandom(6).hex()}"


def task_id_of(owner: str) -> str:
    """The task id in an owner token (a bare task id, as a run that took its own
    lock in the worker writes, is its own task id)."""
    return owner[:-13] if _SUFFIX.search(owner) else owner


@dataclass(frozen=True)
class Acquisition:
    """The answer of an acquire: who holds the lock now, and for how long."""

    owner: str  # our owner token
    holder: str  # the owner token in the lock now
    ttl_ms: int
    acquired: bool

    @property
    def holder_id(self) -> str:
        """The task id of the holder."""
        return task_id_of(self.holder)

    @property
    def ttl(self) -> float | None:
        """Seconds the lock has left (None when Redis reports no expiry)."""
        return self.ttl_ms / 1000.0 if self.ttl_ms >= 0 else None


@dataclass(frozen=True)
class RunStart(Acquisition):
    """The answer of :meth:`LockStore.begin_run`; ``fence`` is set when the run may go on."""

    fence: int | None = None
    outcome: str | None = None  # a stored outcome (JSON) found instead of running
    released_queued: bool = False  # the run gave up its queued lock (until_executing)
    done: bool = False  # this very message already ran to its end (a copy delivered again)


def _acquisition(owner: str, reply: Any) -> Acquisition:
    if isinstance(reply, int):
        return Acquisition(owner=owner, holder=owner, ttl_ms=reply, acquired=True)
    holder, ttl_ms = text(reply[0]), int(reply[1])
    # Our own token: an earlier attempt of this very call (its reply lost) took it.
    return Acquisition(owner=owner, holder=holder, ttl_ms=ttl_ms, acquired=holder == owner)


class Redirected(redis.ResponseError):
    """A cluster's MOVED, ASK or TRYAGAIN, read whole: the connection stays usable."""


_REDIRECTIONS = ("MOVED ", "ASK ", "TRYAGAIN")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _parse_acquire_reply(data: bytes) -> int | tuple[bytes, int] | None:
    """Parse the acquire script's reply; None while it is incomplete.

    The script answers ``:<ttl>`` or ``*2 $<n> <holder> :<pttl>`` (the same in
    RESP2 and RESP3). An error reply raises, NOSCRIPT as NoScriptError.
    """
    end = data.find(b"\r\n")
    if end < 0:
        return None
    kind = data[:1]
    if kind == b":":
        return int(data[1:end])
    if kind == b"-":
        message = data[1:end].decode(errors="replace")
        if message.startswith("NOSCRIPT"):
            raise NoScriptError(message)
        if message.startswith(_REDIRECTIONS):
            raise Redirected(message)
        raise redis.ResponseError(message)
    if kind != b"*" or data[1:end] != b"2":
        raise redis.ResponseError(f"unexpected acquire reply {data[:40]!r}")
    if len(data) < end + 3:
        return None
    if data[end + 2 : end + 3] != b"$":
        raise redis.ResponseError(f"unexpected acquire reply {data[:40]!r}")
    start = end + 3
    end = data.find(b"\r\n", start)
    if end < 0:
        return None
    size = int(data[start:end])
    holder_end = end + 2 + size
    ttl_end = data.find(b"\r\n", holder_end + 2)
    if ttl_end < 0:
        return None
    return data[end + 2 : holder_end], int(data[holder_end + 3 : ttl_end])


def _read_acquire_reply(connection: Any) -> int | tuple[bytes, int]:
    sock = connection._sock
    if sock is None:
        raise redis.ConnectionError("connection closed")
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except TimeoutError as exc:
            raise redis.TimeoutError("timeout reading the acquire reply") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"error reading the acquire reply: {exc}") from exc
        if not chunk:
            raise redis.ConnectionError("connection closed by server")
        data += chunk
        reply = _parse_acquire_reply(data)
        if reply is not None:
            return reply


class PendingAcquire:
    """An acquire that was sent and not yet read (on the lean path; otherwise
    :meth:`result` asks through the client).

    :meth:`result` or :meth:`reply` must be called in every path (they give
    the connection back); both are idempotent.
    """

    def __init__(self, store: LockStore, key: str, owner: str, ttl_ms: int, handover: str) -> None:
        self._store = store
        self._call = (key, owner, ttl_ms, handover)
        self._result: Acquisition | None = None
        self._node, self._connection = "", None
        #: Whether the first attempt went out (it may have run, answered or not).
        self.sent = False
        #: Why the reply is unknown, when asking again through the client failed.
        self.error: BaseException | None = None
        if not store.lean:
            return  # nothing sent now: result() asks through the client
        try:
            self._node, self._connection = store._take_connection(key)
            self._connection.send_packed_command(
                [store._encode_acquire(key, owner, ttl_ms, handover)], check_health=False
            )
            self.sent = True
        except REDIS_ERRORS:
            # A kept connection may be stale (the server restarted): the
            # result is then asked for again through the client.
            self._drop()
        except BaseException:
            self._drop()  # never leave a taken connection behind
            raise

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()

    def reply(self) -> Acquisition | None:
        """The reply if it was read or can be read now; None when it is unknown.

        Unlike :meth:`result` it never asks again: once the caller has given
        up, a second acquire could take a lock for a message never published.
        """
        connection = self._connection
        if self._result is None and connection is not None:
            try:
                reply = _read_acquire_reply(connection)
            except (NoScriptError, Redirected):
                # The client's own call loads the script or follows the
                # redirection; this connection is fine for other keys.
                self.sent = False  # refused unrun: the first attempt cannot land
                self._connection = None
                self._store._give_back(self._node, connection)
            except REDIS_ERRORS:
                self._drop()
            except BaseException:
                self._drop()
                raise
            else:
                self._connection = None
                self._store._give_back(self._node, connection)
                self._result = _acquisition(self._call[1], reply)
        return self._result

    def may_have_run(self) -> bool:
        """Without a reply: whether an attempt may still have taken the lock. It
        may unless none was sent and asking again was certainly refused."""
        return self.sent or self.error is None or not certainly_not_run(self.error, self._store.cluster)

    def result(self) -> Acquisition:
        """The reply, asking again through the client when it cannot be read.

        The script call loads the script when the server lost it. The first
        attempt may still have run: the answer then names our own token as
        the holder, which is taken as acquired.
        """
        found = self.reply()
        if found is None:
            try:
                found = self._result = self._store.acquire_via_client(*self._call)
            except REDIS_ERRORS as exc:
                self.error = exc
                raise
        return found


class LockStore:
    """Locks in one Redis, through one client (any redis-py client class)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._release_all = client.register_script(scripts.RELEASE_ALL)
        self._extend = client.register_script(scripts.EXTEND)
        self._begin_run = client.register_script(scripts.BEGIN_RUN)
        self._acquire_idempotent = client.register_script(scripts.ACQUIRE_IDEMPOTENT)
        self._store_and_release = client.register_script(scripts.STORE_AND_RELEASE)
        # The lean path needs a client whose pools it can copy connections from.
        self.cluster = isinstance(client, RedisCluster)
        self.lean = self.cluster or (isinstance(client, redis.Redis) and hasattr(client, "connection_pool"))
        self._evalsha_head = b"*7\r\n$7\r\nEVALSHA\r\n" + _bulk(self._acquire.sha.encode()) + b"$1\r\n1\r\n"
        self._idle: dict[str, list[Any]] = {}  # by cluster node ("" for one server)
        self._pid = os.getpid()

    # -- connections of the lean path ------------------------------------

    def _take_connection(self, key: str) -> tuple[Any, Any]:
        """(the node, a connection to it) for ``key``."""
        if self._pid != os.getpid():
            # After a fork the parent's sockets are not ours to use or close.
            self._idle = {}
            self._pid = os.getpid()
        if self.cluster:
            node = self.client.get_node_from_key(key)
            # get_redis_connection: a node learnt from a MOVED has no client yet.
            name, pool = node.name, self.client.get_redis_connection(node).connection_pool
        else:
            name, pool = "", self.client.connection_pool
        try:
            return name, self._idle[name].pop()
        except (KeyError, IndexError):
            # Built like the pool's own connections (same class and settings)
            # but not counted against its max_connections: these never return
            # to it. connect() now, as the pool does: a Sentinel-managed
            # connection finds its master there (a lazy connect on the first
            # send would go to the class's default address instead).
            connection = pool.connection_class(**pool.connection_kwargs)
            connection.connect()
            return name, connection

    def _give_back(self, node: str, connection: Any) -> None:
        if self._pid == os.getpid():
            self._idle.setdefault(node, []).append(connection)

    def _encode_acquire(self, key: str, owner: str, ttl_ms: int, handover: str) -> bytes:
        return b"".join(
            (
                self._evalsha_head,
                _bulk(key.encode()),
                _bulk(owner.encode()),
                _bulk(b"%d" % ttl_ms),
                _bulk(handover.encode()),
            )
        )

    def close(self) -> None:
        """Disconnect the kept connections and the client's pool."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.disconnect()
        self.client.close()

    # -- the operations ---------------------------------------------------

    def acquire(self, key: str, owner: str, ttl_ms: int, handover: str = "") -> Acquisition:
        """Take the lock in one round trip, or report who holds it.

        A held lock is taken only from ``handover``: pass the owner itself to
        re-enter (a retried message), or the running task's id to hand over.
        """
        return PendingAcquire(self, key, owner, ttl_ms, handover).result()

    def acquire_via_client(self, key: str, owner: str, ttl_ms: int, handover: str = "") -> Acquisition:
        """:meth:`acquire` through redis-py's client (its retries and script loading)."""
        return _acquisition(owner, self._acquire(keys=[key], args=[owner, ttl_ms, handover]))

    def begin_acquire(self, key: str, owner: str, ttl_ms: int, handover: str = "") -> PendingAcquire:
        """Send an acquire now (on the lean path); read it later with :meth:`PendingAcquire.result`."""
        return PendingAcquire(self, key, owner, ttl_ms, handover)

    def release(self, key: str, owner: str) -> bool:
        """Delete the lock if ``owner`` holds it; True when it did."""
        return self.release_all([key], owner) == 1

    def release_all(self, keys: list[str], owner: str, done_ttl_ms: int | None = None) -> int:
        """Delete those of ``keys`` (one family) that ``owner`` holds; how many. With
        ``done_ttl_ms``, also note for that long that the owner's message ran to its end."""
        done = done_key(family_of(keys[0]))
        return int(
            self._release_all(keys=[done, *keys], args=[owner, "" if done_ttl_ms is None else done_ttl_ms])
        )

    def begin_run(
        self,
        lock: str,
        run: str,
        fence: str,
        owner: str,
        mode: str,
        ttl_ms: int,
        result: str | None = None,
        args: tuple[str, str] | None = None,
        check_done: bool = False,
    ) -> RunStart:
        """Check or take the locks of a starting run and draw a fencing token.

        With ``result`` (an idempotent task) a stored outcome comes back as
        ``RunStart.outcome`` and nothing is taken; ``args`` (its key, the
        call's argument digest) is written with a queued lock the run holds.
        With ``check_done``, a message that already ran to its end comes back
        as ``RunStart.done`` and nothing is taken.
        """
        args_at, digest = args or (fence, "")
        reply = self._begin_run(
            keys=[lock, run, fence, result or fence, args_at, done_key(family_of(lock))],
            args=[owner, mode, ttl_ms, "1" if result else "", digest, "1" if check_done else ""],
        )
        if int(reply[0]) == 3:
            return RunStart(owner=owner, holder=owner, ttl_ms=0, acquired=False, done=True)
        if int(reply[0]) == 2:
            return RunStart(owner=owner, holder=owner, ttl_ms=0, acquired=False, outcome=text(reply[1]))
        if int(reply[0]) == 1:
            return RunStart(
                owner=owner,
                holder=owner,
                ttl_ms=ttl_ms,
                acquired=True,
                fence=int(reply[1]),
                released_queued=bool(int(reply[2])),
            )
        return RunStart(owner=owner, holder=text(reply[1]), ttl_ms=int(reply[2]), acquired=False)

    def acquire_idempotent(
        self, lock: str, result: str, args: str, owner: str, ttl_ms: int, handover: str, args_digest: str
    ) -> tuple[Acquisition, str | None, str]:
        """Acquire for an idempotent task: (acquisition, stored outcome, holder's argument digest)."""
        reply = self._acquire_idempotent(
            keys=[lock, result, args], args=[owner, ttl_ms, handover, args_digest]
        )
        if isinstance(reply, int):
            return Acquisition(owner, owner, reply, acquired=True), None, args_digest
        if int(reply[0]) == 2:
            return Acquisition(owner, "", 0, acquired=False), text(reply[1]), ""
        holder = text(reply[1])
        holding = Acquisition(owner, holder, int(reply[2]), acquired=holder == owner)
        return holding, None, text(reply[3])

    def store_and_release(
        self, result: str, args: str, queued: str, locks: list[str], owner: str, outcome: str, ttl_ms: int
    ) -> tuple[bool, int]:
        """Store an outcome (unless one is stored, or it is "") and release the owner's
        ``locks``, and the argument digest once the ``queued`` lock is free:
        (whether stored, how many locks released)."""
        stored, released = self._store_and_release(
            keys=[result, args, queued, *locks], args=[owner, outcome, ttl_ms]
        )
        return bool(stored), int(released)

    def extend(self, key: str, owner: str, ttl_ms: int, companions: tuple[str, ...] = ()) -> bool:
        """Renew the lock (and companion keys) to at least ``ttl_ms`` if ``owner`` holds it."""
        return bool(self._extend(keys=[key, *companions], args=[owner, ttl_ms]))

    def holder(self, key: str) -> tuple[str | None, float | None]:
        """The task id holding the lock and its seconds left (for tools and tests)."""
        owner, ttl = self.owner(key)
        return (task_id_of(owner) if owner is not None else None), ttl

    def owner(self, key: str) -> tuple[str | None, float | None]:
        """The owner token in the lock and its seconds left (for tools and tests)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        owner, pttl = pipe.execute()
        if owner is None:
            return None, None
        return text(owner), (pttl / 1000.0 if pttl >= 0 else None)
