"""Building the redis-py client for a ``unique_redis_url``: one Redis, a Cluster or Sentinel.

The URL schemes are those Celery users know:

* ``redis://``, ``rediss://`` (TLS), ``unix://``: one Redis server;
* ``redis+cluster://host:port`` (``rediss+cluster://`` for TLS): a Redis
  Cluster, reached through any of its nodes; several seed nodes are joined
  with ``;`` as Celery joins broker URLs;
* ``sentinel://host:port;sentinel://host2:port2``: Redis Sentinel, spelled as
  Celery's Redis transport spells it, with the master's name in the
  transport options (``{"master_name": "mymaster"}``).

The first URL's credentials, database and query options (``ssl_ca_certs``,
say) are parsed by redis-py and apply to every cluster node, or to the
Sentinel's master; ``sentinel_kwargs`` in the transport options (a password,
say) are the Sentinels' own.
"""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import InvalidResponse, NoPermissionError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from celery_unique.exceptions import ConfigurationError

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("sentinel://",)
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


def _nodes(url: str) -> list[tuple[str, int]]:
    """(host, port) of every node in a ``;``-joined URL list."""
    found = []
    for part in url.split(";"):
        if not part.strip():
            continue
        try:
            parsed = urlsplit(part.strip())
            host, port = parsed.hostname, parsed.port
        except ValueError:
            host = port = None  # a port that is no number (a password with an unquoted "/"?)
        if not host or not port:
            # Never the URL itself in the message: it may hold a password.
            raise ConfigurationError(
                "every node of unique_redis_url needs a host and a port "
                "(percent-encode special characters in a password)"
            )
        found.append((host, port))
    return found


def _first_node_options(url: str) -> dict[str, Any]:
    """Credentials, database and query options of the first node, parsed by redis-py.

    They apply to every node (a cluster) or to the master (Sentinel).
    """
    first = url.split(";")[0].strip()
    as_redis = "rediss://" if first.startswith("rediss+") else "redis://"
    try:
        options: dict[str, Any] = parse_url(as_redis + first.partition("://")[2])  # type: ignore[no-untyped-call]
    except ValueError:
        raise ConfigurationError("unique_redis_url has an invalid option or database") from None
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def cluster_client(url: str, **options: Any) -> RedisCluster:
    nodes = _nodes(url)
    node_options = _first_node_options(url)
    if node_options.pop("db", 0):
        raise ConfigurationError("Redis Cluster has only database 0")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],  # type: ignore[no-untyped-call]
        **{**node_options, **options},
    )


def sentinel_client(url: str, transport_options: dict[str, Any], **options: Any) -> redis.Redis:
    nodes = _nodes(url)
    sentinel_kwargs = transport_options.get("sentinel_kwargs")
    if sentinel_kwargs is not None:
        # The Sentinels keep our timeouts unless the options set their own:
        # discovery must not hang on an unreachable Sentinel.
        timeouts = {name: value for name, value in options.items() if name.startswith("socket_")}
        sentinel_kwargs = {**timeouts, **sentinel_kwargs}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes,
        # None: the Sentinels get the timeouts of the master's connections.
        sentinel_kwargs=sentinel_kwargs,
        **{**_first_node_options(url), **options},
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        transport_options["master_name"], redis_class=redis.Redis
    )
    return client


# The ports a URL without one means, by scheme.
_DEFAULT_PORTS = {
    "redis": 6379,
    "rediss": 6379,
    "redis+cluster": 6379,
    "rediss+cluster": 6379,
    "sentinel": 26379,
}
_SOCKET = "redis+socket://"  # kombu's (and celery-once's) spelling of unix://


def normalised_url(url: str, setting: str = "unique_redis_url") -> str:
    """``url`` spelt one way per server, database, credentials and options.

    Two settings name one location when their normalised URLs are equal:
    ``redis://h``, ``redis://h:6379``, ``redis://h:6379/`` and
    ``redis://h:6379/0`` are one (the default port, database 0), as are
    ``redis+socket:///s`` and ``unix:///s?db=0``. The database is read as
    redis-py reads it (``?db=`` wins over the path), and the query options are
    sorted. Each node of a ``;``-joined list is normalised, in its order. A
    port that is no number is a :class:`ConfigurationError` naming ``setting``
    (never the URL: it may hold a password).
    """
    return ";".join(_normalised_node(part.strip(), setting) for part in url.split(";") if part.strip())


def _normalised_node(url: str, setting: str) -> str:
    if url.startswith(_SOCKET):
        url = "unix://" + url[len(_SOCKET) :]
    parsed = urlsplit(url)
    options: dict[str, str] = {}
    for name, value in parse_qsl(parsed.query):
        options.setdefault(name, value)  # the first of a repeated option, as redis-py
    database = options.pop("db", None)
    if database is None and parsed.scheme != "unix":
        database = unquote(parsed.path).replace("/", "")
    try:
        database = str(int(database or 0))
        port = parsed.port
    except ValueError:
        raise ConfigurationError(
            f"{setting} has a port or database that is not a number "
            "(percent-encode special characters in a password)"
        ) from None
    user = ""
    if parsed.username or parsed.password:
        name, password = (quote(unquote(part or ""), safe="") for part in (parsed.username, parsed.password))
        user = f"{name}:{password}@"
    query = "".join(f"&{quote(name)}={quote(value)}" for name, value in sorted(options.items()))
    if parsed.scheme == "unix":
        return f"unix://{user}{unquote(parsed.path)}?db={database}{query}"
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = port or _DEFAULT_PORTS.get(parsed.scheme, 0)
    return f"{parsed.scheme}://{user}{host}:{port}/{database}{query.replace('&', '?', 1)}"


def check_target(url: str, transport_options: dict[str, Any], setting: str = "unique_redis_url") -> None:
    """Raise :class:`ConfigurationError` (naming ``setting``) for a URL no client can be built for."""
    if not url.startswith(SCHEMES):
        # Only the scheme: the rest may hold a password.
        scheme = repr(url.partition("://")[0]) if "://" in url else "no scheme"
        raise ConfigurationError(f"{setting} must start with one of {', '.join(SCHEMES)}; got {scheme}")
    if url.startswith(SENTINEL_SCHEMES) and not transport_options.get("master_name"):
        raise ConfigurationError(
            "a sentinel:// URL needs the master's name: "
            'unique_redis_transport_options = {"master_name": ...} '
            "(or broker_transport_options when the broker's Sentinel URL is used)"
        )
    if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        _nodes(url)
        _first_node_options(url)


def _anonymous() -> dict[str, Any]:
    """Options that keep redis-py's connection handshake to ``HELLO``/``AUTH``.

    redis-py names itself (``CLIENT SETINFO``) and, from 8.0 on RESP3, asks for
    maintenance notifications (``CLIENT MAINT_NOTIFICATIONS``) as it connects.
    The least-privilege ACL rule (docs/security.rst) grants no ``CLIENT``, and no single
    rule could (Redis 7.0 rejects ``+client|setinfo`` as unknown), while 6.2 and
    7.2+ log every refusal in ``ACL LOG`` (redis-py goes on regardless), which
    buries the refusals that matter. Our clients retry on their own terms.
    """
    parameters = inspect.signature(redis.Redis.__init__).parameters
    options: dict[str, Any] = {}
    if "driver_info" in parameters:  # newer redis-py: None turns SETINFO off
        options["driver_info"] = None
    elif "lib_name" in parameters:  # redis-py 5 until driver_info
        options.update(lib_name=None, lib_version=None)
    if "maint_notifications_config" in parameters:
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return options


ANONYMOUS = _anonymous()


def make_client(url: str, transport_options: dict[str, Any] | None = None, **options: Any) -> Any:
    """The client for ``url``; ``options`` are connection settings (timeouts)."""
    transport_options = transport_options or {}
    check_target(url, transport_options)
    if url.startswith(_SOCKET):
        url = "unix://" + url[len(_SOCKET) :]  # redis-py knows only this spelling
    options = {**ANONYMOUS, **options}
    if url.startswith(CLUSTER_SCHEMES):
        return cluster_client(url, **options)  # its retries follow a failover to the new primary
    # No retries inside redis-py, whatever its version's default: the callers
    # retry where that is safe and bounded (releases), and a call must cost at
    # most one socket timeout on an outage (delay(), the worker's main process).
    # The pool replaces a connection that went stale before using it.
    options = {"retry": Retry(NoBackoff(), 0), **options}
    if url.startswith(SENTINEL_SCHEMES):
        return sentinel_client(url, transport_options, **options)
    return redis.Redis.from_url(url, **options)


# What a Redis call can raise when Redis fails: RedisCluster raises some errors
# (no reachable node, an uncovered slot) outside redis-py's RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)
# Those of them that say Redis could not be reached or refused this client
# (not a bug in a command).
UNREACHABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.AuthenticationError,
    NoPermissionError,
    RedisClusterException,
)


def refused_command(error: BaseException) -> bool:
    """Whether Redis refused a command to this client's ACL user (directly, or in a script)."""
    return isinstance(error, NoPermissionError) or (
        isinstance(error, redis.ResponseError) and "can't run this command" in str(error)
    )


def location(url: str) -> str:
    """Where ``url`` points, for messages: ``host:port``, a socket's path, or a
    cluster's or the Sentinels' first nodes; never a password."""
    if url.startswith(_SOCKET):
        url = "unix://" + url[len(_SOCKET) :]
    try:
        if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
            nodes = ",".join(f"{host}:{port}" for host, port in _nodes(url)[:3])
            return f"the {'cluster' if url.startswith(CLUSTER_SCHEMES) else 'Sentinels'} at {nodes}"
        options = parse_url(url)  # type: ignore[no-untyped-call]
    except (ConfigurationError, ValueError):
        return "an address that cannot be read"
    if options.get("path"):
        return f"unix:{options['path']}"
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"


def describe(error: BaseException, where: str = "") -> str:
    """An error as a message shows it: its class and message (redis-py 8's repr keeps
    only a category, such as ``network:ConnectionError``), where it happened (a
    timeout's message names no server: ``where``, from :func:`location`), and what to
    do about a refusal."""
    said = f"{type(error).__name__}: {error}".rstrip(": ")
    if where and where not in said:
        said += f" (at {where})"
    if isinstance(error, InvalidResponse):
        said += " (what answered is not a Redis server: check the URL's host and port)"
    if refused_command(error):
        said += " (the lock Redis's user lacks a command: see docs/security.rst, Least-privilege Redis user)"
    return said


def text(value: Any) -> str:
    """A reply as text (clients without ``decode_responses`` answer bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def certainly_not_run(error: BaseException, retried: bool = False) -> bool:
    """Whether Redis certainly did not run a command that failed with ``error``.

    It answered with an error (a refused login, NOPERM, NOSCRIPT), nothing
    listened (a refused connection: a server that is down has lost what it
    had buffered), or the Sentinels knew no primary to send it to. A timeout
    or a dropped connection leaves it unknown. When the client ``retried``
    by itself (a cluster client), the error tells of its last attempt only:
    then only an error reply is certain.
    """
    if isinstance(error, (redis.ResponseError, redis.AuthenticationError, InvalidResponse)):
        return True  # an error reply, or an answer in no Redis protocol: no Redis ran it
    if retried:
        return False
    if isinstance(error, MasterNotFoundError):
        return True
    # redis-py raises its ConnectionError while handling the socket's error
    # and names it; a refusal further away is the caller's own business.
    seen: BaseException | None = error
    for _ in range(10):  # bounded: a chain may loop
        if not isinstance(seen, redis.ConnectionError):
            break
        below = seen.__cause__ or seen.__context__
        if isinstance(below, ConnectionRefusedError) and "refused" in str(seen).lower():
            return True
        seen = below
    return False
