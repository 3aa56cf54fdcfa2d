"""The lock primitive: acquire, release and extend, each one round trip.

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
pre-encoded ``EVALSHA`` and reads the reply, whose shape it knows, itself. A
plain acquire (no handover, no replicas) on Redis 7.0+ needs no script: it is
``SET key owner NX GET PX ttl`` and a ``PTTL`` in one write (a nil reply: taken;
else the holder and its TTL), which costs the server about 1 µs against the
script's 6; a server that refuses it (Redis 6.2: a syntax error, nothing run)
turns the store to the script for good.
On a Redis Cluster it keeps connections per primary and sends to the one its
slot table names for the key. Anything unexpected (a ``MOVED`` after a
resharding, a ``READONLY`` after a failover, a dropped connection) falls back
to the client's own script call, which knows how to follow it.
:meth:`LockStore.begin_acquire` sends without waiting: the caller does its own
work (Celery builds the message) and reads the reply only when it needs it.

With ``replicas`` (``unique_lock_replicas``) an answer counts only once that
many replicas hold the lock it names: Redis's ``WAIT`` follows the acquire in
the same write on the same connection, so it adds the replication's latency
and no round trip. ``WAIT`` counts the replicas that have what *its*
connection wrote: a lock taken is that write; a lock found held is written
again unchanged by the script, so that a duplicate is never answered with a
lock that a failover could still lose (its holder might fail its own ``WAIT``
and publish nothing). A call that went through the client (a fallback, an
idempotent acquire, a run's start) confirms afterwards on a connection of its
own (:meth:`LockStore.confirm`). An answer not confirmed in time is a
:class:`NotReplicated` error that carries it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import InvalidResponse, NoScriptError

from celery_unique import scripts
from celery_unique.clients import REDIS_ERRORS, certainly_not_run, text
from celery_unique.exceptions import ConfigurationError
from celery_unique.keys import done_key, family_of

# The suffix of an owner token: "#" and 12 hex digits (48 random bits, unique
# among the messages of one task id).
_SUFFIX = re.compile(r"#[0-9a-f]{12}\Z")
#: Messages of one key remembered as run to their end (their copies are discarded):
#: the latest ones, for as long as their locks could have lived.
DONE_KEPT = 32


def new_owner(task_id: str) -> str:
    """A new owner token for a message with this task id."""
    return f"{task_id}#{os.urandom(6).hex()}"


def new_task_id_and_owner() -> tuple[str, str]:
    """A new task id (a random UUID, as Celery makes them) and its first owner token,
    from one read of the system's random source (``delay()`` makes both per call)."""
    raw = os.urandom(22)
    digits = raw[:16].hex()
    variant = "89ab"[raw[8] >> 4 & 3]  # RFC 4122's variant, from the bits of the digit it replaces
    task_id = f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"
    return task_id, f"{task_id}#{raw[16:].hex()}"


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


def _set_acquisition(
    owner: str, ttl_ms: int, set_reply: Reply, pttl: Reply | redis.ResponseError
) -> Acquisition:
    """The answer of ``SET key owner NX GET PX ttl`` (it ran) and of the ``PTTL`` after it."""
    if set_reply is None:  # it was free: ours now
        return Acquisition(owner=owner, holder=owner, ttl_ms=ttl_ms, acquired=True)
    if not isinstance(set_reply, bytes):
        raise InvalidResponse(f"unexpected acquire reply {set_reply!r}")
    holder = text(set_reply)
    # Not atomic with the SET, as the script is: the holder may have released (-2)
    # in between, or the PTTL met an error; the lock is then said to be at its end
    # (no hint kept), never to live for ever (-1).
    held_ms = pttl if isinstance(pttl, int) and pttl != -2 else 0
    return Acquisition(owner=owner, holder=holder, ttl_ms=held_ms, acquired=holder == owner)


class Redirected(redis.ResponseError):
    """A cluster's MOVED, ASK or TRYAGAIN, read whole: the connection stays usable."""


#: What sends :meth:`LockStore.call_lean` back to the client's own call.
_LEAN_FAILURES: tuple[type[Exception], ...] = (InvalidResponse, *REDIS_ERRORS)


class NotReplicated(redis.RedisError):
    """Fewer replicas than wanted acknowledged a lock in time (``acknowledged``
    is None when that could not be asked): the lock taken, or the holder's
    lock that a duplicate was answered with.

    A failover could lose such a lock, so the caller treats it as a Redis
    error, knowing the answer (``acquisition``): whether it holds the lock.
    ``answer`` is what the call would have returned (the acquisition, unless
    the call returns more).
    """

    def __init__(
        self,
        acquisition: Acquisition,
        acknowledged: int | None,
        wanted: int,
        timeout_ms: int,
        answer: Any = None,
    ) -> None:
        acks = "an unknown number" if acknowledged is None else str(acknowledged)
        super().__init__(f"the lock reached {acks} of {wanted} replicas within {timeout_ms} ms")
        self.acquisition = acquisition
        self.answer: Any = acquisition if answer is None else answer
        self.acknowledged = acknowledged
        self.wanted = wanted

    def __repr__(self) -> str:
        # redis-py's errors show their class only; this message names no secret.
        return f"{type(self).__name__}({str(self)!r})"


_REDIRECTIONS = ("MOVED ", "ASK ", "TRYAGAIN")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


Reply = int | tuple[bytes, int] | bytes | None


def _parse_reply(data: bytes, at: int = 0) -> tuple[Reply | redis.ResponseError, int] | None:
    """Parse the reply that starts at ``data[at]``: (the reply, where it ends);
    None while it is incomplete.

    The acquire script answers ``:<ttl>`` or ``*2 $<n> <holder> :<pttl>`` (the
    same in RESP2 and RESP3), ``WAIT`` and ``PTTL`` an integer, ``SET ... NX
    GET`` a null (``$-1``, or ``_`` in RESP3) or the holder. An error reply is returned
    as its exception (NOSCRIPT as NoScriptError), so that the replies after it
    can be read before it is raised.
    """
    end = data.find(b"\r\n", at)
    if end < 0:
        return None
    kind = data[at : at + 1]
    if kind == b":":
        return int(data[at + 1 : end]), end + 2
    if kind == b"-":
        message = data[at + 1 : end].decode(errors="replace")
        if message.startswith("NOSCRIPT"):
            return NoScriptError(message), end + 2
        if message.startswith(_REDIRECTIONS):
            return Redirected(message), end + 2
        return redis.ResponseError(message), end + 2
    if kind == b"_" or (kind == b"$" and data[at + 1 : end] == b"-1"):
        return None, end + 2  # a null: SET ... NX GET found the key free
    if kind == b"$":  # the holder that SET ... NX GET found
        size = int(data[at + 1 : end])
        if len(data) < end + 4 + size:
            return None
        return data[end + 2 : end + 2 + size], end + 4 + size
    if kind != b"*" or data[at + 1 : end] != b"2":
        raise InvalidResponse(f"unexpected acquire reply {data[at : at + 40]!r}")
    if len(data) < end + 3:
        return None
    if data[end + 2 : end + 3] != b"$":
        raise InvalidResponse(f"unexpected acquire reply {data[at : at + 40]!r}")
    start = end + 3
    end = data.find(b"\r\n", start)
    if end < 0:
        return None
    size = int(data[start:end])
    holder_end = end + 2 + size
    ttl_end = data.find(b"\r\n", holder_end + 2)
    if ttl_end < 0:
        return None
    return (data[end + 2 : holder_end], int(data[holder_end + 3 : ttl_end])), ttl_end + 2


def _parse_acquire_reply(data: bytes) -> Reply | None:
    """Parse the acquire script's reply; None while it is incomplete. An error
    reply raises, NOSCRIPT as NoScriptError."""
    parsed = _parse_reply(data)
    if parsed is None:
        return None
    if isinstance(parsed[0], redis.ResponseError):
        raise parsed[0]
    return parsed[0]


def _read_replies(connection: Any, count: int) -> list[Reply]:
    """Read ``count`` replies (an acquire's, and a WAIT's) from a connection of
    our own; the first error reply raises once all of them are read."""
    found: list[Reply] = []
    for reply in _read_replies_and_errors(connection, count):
        if isinstance(reply, redis.ResponseError):
            raise reply
        found.append(reply)
    return found


def _read_replies_and_errors(connection: Any, count: int) -> list[Reply | redis.ResponseError]:
    """Read ``count`` replies from a connection of our own, error replies as their exceptions."""
    sock = connection._sock
    if sock is None:
        raise redis.ConnectionError("connection closed")
    data, at = b"", 0
    replies: list[Reply | redis.ResponseError] = []
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
        while len(replies) < count:
            parsed = _parse_reply(data, at)
            if parsed is None:
                break
            reply, at = parsed
            replies.append(reply)
        if len(replies) == count:
            return replies


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
        self._short: NotReplicated | None = None  # answered, and not confirmed on the replicas
        self._node, self._connection = "", None
        #: Whether the first attempt went out (it may have run, answered or not).
        self.sent = False
        #: Why the reply is unknown, when asking again through the client failed.
        self.error: BaseException | None = None
        # Without a handover or replicas to wait for, the script's work is one
        # SET ... NX GET (Redis 7.0+) and a PTTL, sent together: no Lua to run.
        self._plain = store.plain_set and not handover and not store.replicas
        if not store.lean:
            return  # nothing sent now: result() asks through the client
        try:
            self._node, self._connection = store._take_connection(key)
            if self._plain:
                command = store._encode_set(key, owner, ttl_ms)
            else:
                command = store._encode_acquire(key, owner, ttl_ms, handover) + store._wait
            self._connection.send_packed_command([command], check_health=False)
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
        An answer not confirmed on the replicas is returned all the same
        (:meth:`result` raises :class:`NotReplicated` for it).
        """
        connection = self._connection
        store = self._store
        if self._result is None and connection is not None and self._plain:
            return self._plain_reply(connection)
        if self._result is None and connection is not None:
            self._connection = None
            try:
                replies = store._read_kept(self._node, connection, 2 if store.replicas else 1)
            except (NoScriptError, Redirected):
                # Refused unrun, so the first attempt cannot land; the client's
                # own call loads the script or follows the redirection.
                self.sent = False
            except InvalidResponse as exc:
                # What answered speaks no Redis protocol (a wrong port): nothing ran there.
                self.sent, self.error = False, exc
            except REDIS_ERRORS:
                pass  # asked again through the client (result)
            else:
                found = self._result = _acquisition(self._call[1], replies[0])
                if store.replicas:
                    # The script wrote the lock (taken, or written again as
                    # held): the WAIT after it counts the replicas that have it.
                    acks = replies[1] if isinstance(replies[1], int) else None
                    if acks is None or acks < store.replicas:
                        self._short = store.not_replicated(found, acks)
        return self._result

    def _plain_reply(self, connection: Any) -> Acquisition | None:
        """:meth:`reply` of a ``SET ... NX GET`` and its ``PTTL``."""
        store = self._store
        try:
            set_reply, pttl = _read_replies_and_errors(connection, 2)
        except InvalidResponse as exc:
            self.sent, self.error = False, exc  # no Redis answered: nothing ran there
            self._drop()
            return None
        except BaseException:
            self._drop()  # unknown whether the SET ran: asked again through the client
            raise
        if isinstance(set_reply, redis.ResponseError):
            # A refused SET did not run; both replies are read, so the connection
            # serves again, unless the server's state is in doubt (READONLY, ...).
            self.sent = False
            if "syntax error" in str(set_reply).lower():
                store.plain_set = False  # before Redis 7.0, NX with GET: the script from now on
            if isinstance(set_reply, Redirected) or not store.plain_set:
                self._connection = None
                store._give_back(self._node, connection)
            else:
                self._drop()
            return None
        try:
            found = _set_acquisition(self._call[1], self._call[2], set_reply, pttl)
        except InvalidResponse:
            self._drop()
            raise
        self._connection = None
        store._give_back(self._node, connection)
        self._result = found
        return found

    def may_have_run(self) -> bool:
        """Without a reply: whether an attempt may still have taken the lock. It
        may unless none was sent and asking again was certainly refused."""
        return self.sent or self.error is None or not certainly_not_run(self.error, self._store.cluster)

    def result(self) -> Acquisition:
        """The reply, asking again through the client when it cannot be read.

        The script call loads the script when the server lost it. The first
        attempt may still have run: the answer then names our own token as
        the holder, which is taken as acquired. An answer not confirmed on
        the replicas raises :class:`NotReplicated`.
        """
        found = self.reply()
        if found is None:
            try:
                found = self._result = self._store.acquire_via_client(*self._call)
            except NotReplicated as short:
                found = self._result = short.acquisition
                self._short = short
            except REDIS_ERRORS as exc:
                self.error = exc
                raise
        if self._short is not None:
            raise self._short
        return found


class LockStore:
    """Locks in one Redis, through one client (any redis-py client class).

    With ``replicas``, a lock counts as taken once that many replicas
    acknowledged it within ``replica_timeout_ms`` (Redis ``WAIT``).
    """

    def __init__(
        self, client: Any, replicas: int = 0, replica_timeout_ms: int = 1000, location: str = ""
    ) -> None:
        self.client = client
        self.location = location  # where the Redis is, for messages (clients.location)
        self.replicas = replicas
        self.replica_timeout_ms = replica_timeout_ms
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._release_all = client.register_script(scripts.RELEASE_ALL)
        self._extend = client.register_script(scripts.EXTEND)
        self._begin_run = client.register_script(scripts.BEGIN_RUN)
        self._acquire_idempotent = client.register_script(scripts.ACQUIRE_IDEMPOTENT)
        self._store_and_release = client.register_script(scripts.STORE_AND_RELEASE)
        # The lean path needs a client whose pools it can copy connections from.
        self.cluster = isinstance(client, RedisCluster)
        self.lean = self.cluster or (isinstance(client, redis.Redis) and hasattr(client, "connection_pool"))
        self._evalsha_head = b"*8\r\n$7\r\nEVALSHA\r\n" + _bulk(self._acquire.sha.encode()) + b"$1\r\n1\r\n"
        self._rewrite_held = _bulk(b"1" if replicas else b"")  # the acquire's ARGV[4]
        self._wait = (
            b"*3\r\n$4\r\nWAIT\r\n" + _bulk(b"%d" % replicas) + _bulk(b"%d" % replica_timeout_ms)
            if replicas
            else b""
        )
        # The confirmation's write, as EVAL: it never meets a NOSCRIPT.
        self._touch_head = b"*5\r\n$4\r\nEVAL\r\n" + _bulk(scripts.TOUCH.encode()) + b"$1\r\n1\r\n"
        if replicas and not self.lean:
            raise ConfigurationError("unique_lock_replicas needs a redis-py Redis or RedisCluster client")
        #: Whether the lean acquire may be SET ... NX GET (Redis 7.0+; turned
        #: off at the first server that refuses it).
        self.plain_set = True
        self._idle: dict[str, list[Any]] = {}  # by cluster node ("" for one server)
        self._pid = os.getpid()

    # -- connections of the lean path ------------------------------------

    def _take_connection(self, key: str, fresh: bool = False) -> tuple[Any, Any]:
        """(the node, a connection to it) for ``key``: a kept one, unless ``fresh``."""
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
        if not fresh:
            try:
                return name, self._idle[name].pop()
            except (KeyError, IndexError):
                pass
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

    def _read_kept(self, node: str, connection: Any, count: int) -> list[Reply]:
        """Read ``count`` replies on a connection from :meth:`_take_connection`, then
        keep it for the next call. An error reply read to its end (NOSCRIPT, a
        redirection) leaves the connection fit to keep; any other failure
        disconnects it. Either raises."""
        try:
            replies = _read_replies(connection, count)
        except (NoScriptError, Redirected):
            self._give_back(node, connection)
            raise
        except BaseException:
            connection.disconnect()
            raise
        self._give_back(node, connection)
        return replies

    def _exchange(self, key: str, command: bytes, count: int, fresh: bool = False) -> list[Reply]:
        """Send ``command`` on a kept connection to ``key``'s server (a new one if
        ``fresh``) and read its ``count`` replies (see :meth:`_read_kept`)."""
        node, connection = self._take_connection(key, fresh)
        try:
            connection.send_packed_command([command], check_health=False)
        except BaseException:
            connection.disconnect()
            raise
        return self._read_kept(node, connection, count)

    def _encode_acquire(self, key: str, owner: str, ttl_ms: int, handover: str) -> bytes:
        return b"".join(
            (
                self._evalsha_head,
                _bulk(key.encode()),
                _bulk(owner.encode()),
                _bulk(b"%d" % ttl_ms),
                _bulk(handover.encode()),
                self._rewrite_held,
            )
        )

    def _encode_set(self, key: str, owner: str, ttl_ms: int) -> bytes:
        key_bulk = _bulk(key.encode())
        return b"".join(
            (
                b"*7\r\n$3\r\nSET\r\n",
                key_bulk,
                _bulk(owner.encode()),
                b"$2\r\nNX\r\n$3\r\nGET\r\n$2\r\nPX\r\n",
                _bulk(b"%d" % ttl_ms),
                b"*2\r\n$4\r\nPTTL\r\n",
                key_bulk,
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
        acquisition = _acquisition(owner, self._acquire(keys=[key], args=[owner, ttl_ms, handover]))
        self.confirm(key, acquisition.holder, acquisition)
        return acquisition

    def not_replicated(
        self, acquisition: Acquisition, acknowledged: int | None, answer: Any = None
    ) -> NotReplicated:
        return NotReplicated(acquisition, acknowledged, self.replicas, self.replica_timeout_ms, answer)

    def confirm(self, key: str, holder: str, acquisition: Acquisition, answer: Any = None) -> None:
        """Return once ``replicas`` replicas hold ``holder``'s lock ``key``
        (at once without ``replicas``); raise :class:`NotReplicated` with
        ``acquisition`` (and the call's ``answer``) otherwise.

        For an answer read through the client, whose connection is not ours
        to ``WAIT`` on: on a connection of our own to the key's server, the
        lock is written again unchanged while ``holder`` holds it (the TOUCH
        script: a write after the one that took it) and ``WAIT`` counts the
        replicas that have it. A kept connection that fails (stale after a
        failover) is replaced once.
        """
        if not self.replicas:
            return
        command = b"".join((self._touch_head, _bulk(key.encode()), _bulk(holder.encode())))
        error: BaseException | None = None
        for fresh in (False, True):
            try:
                held, acks = self._exchange(key, command + self._wait, 2, fresh)
            except (NoScriptError, Redirected) as exc:
                error = exc  # an answer: a fresh connection would get the same one
                break
            except REDIS_ERRORS as exc:
                error = exc
                continue
            if held != 1:  # the lock is no longer the holder's
                raise self.not_replicated(acquisition, None, answer)
            if not isinstance(acks, int) or acks < self.replicas:
                raise self.not_replicated(acquisition, acks if isinstance(acks, int) else None, answer)
            return
        raise self.not_replicated(acquisition, None, answer) from error

    def call_lean(self, script: Any, key: str, args: list[Any]) -> Any:
        """Run ``script`` (registered on this store's client) on ``key`` the way the
        acquire goes: a pre-encoded ``EVALSHA`` on a kept connection, whose integer
        reply is read here (about half of redis-py's cost per call). Through the
        client when that path is not open or meets anything unexpected, so only
        for scripts that may run again with the same arguments."""
        if not self.lean:
            return script(keys=[key], args=args)
        parts = [b"EVALSHA", script.sha.encode(), b"1", key.encode(), *(str(a).encode() for a in args)]
        command = b"*%d\r\n" % len(parts) + b"".join(_bulk(part) for part in parts)
        try:
            [reply] = self._exchange(key, command, 1)
        except _LEAN_FAILURES:
            # NOSCRIPT, a redirection, or a connection that failed: the client
            # loads the script, follows the redirection, or connects again.
            return script(keys=[key], args=args)
        return reply

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
        note = "" if done_ttl_ms is None else done_ttl_ms
        return int(self._release_all(keys=[done, *keys], args=[owner, note, DONE_KEPT]))

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
            start = RunStart(
                owner=owner,
                holder=owner,
                ttl_ms=ttl_ms,
                acquired=True,
                fence=int(reply[1]),
                released_queued=bool(int(reply[2])),
            )
            if mode != "until_executing":  # the others hold a lock while the task runs
                self.confirm(lock if mode == "until_executed" else run, owner, start)
            return start
        return RunStart(owner=owner, holder=text(reply[1]), ttl_ms=int(reply[2]), acquired=False)

    def acquire_idempotent(
        self, lock: str, result: str, args: str, owner: str, ttl_ms: int, handover: str, args_digest: str
    ) -> tuple[Acquisition, str | None, str]:
        """Acquire for an idempotent task: (acquisition, stored outcome, holder's argument digest)."""
        reply = self._acquire_idempotent(
            keys=[lock, result, args], args=[owner, ttl_ms, handover, args_digest]
        )
        if isinstance(reply, int):
            taken = Acquisition(owner, owner, reply, acquired=True)
            self.confirm(lock, owner, taken, (taken, None, args_digest))
            return taken, None, args_digest
        if int(reply[0]) == 2:
            return Acquisition(owner, "", 0, acquired=False), text(reply[1]), ""
        holder = text(reply[1])
        holding = Acquisition(owner, holder, int(reply[2]), acquired=holder == owner)
        self.confirm(lock, holder, holding, (holding, None, text(reply[3])))
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
