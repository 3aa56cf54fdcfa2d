"""Building the redis-py client for a ``unique_redis_url``: one Redis, a Cluster or Sentinel.

The URL schemes are those Celery users know:

* ``redis://``, ``rediss://`` (TLS), ``unix://``: one Redis server;
* ``redis+cluster://host:port`` (``rediss+cluster://`` for TLS): a Redis
  Cluster, reached through any of its nodes; several seed nodes are joined
  with ``;`` as Celery joins broker URLs;
* ``sentinel://host:port;sentinel://host2:port2``: Redis Sentinel, spelled as
  Celery's Redis transport spells it, with the master's name in the
  transport options (``{"master_name": "mymaster"}``). Credentials and the
  database in the URL are the master's; ``sentinel_kwargs`` in the transport
  options (a password, say) are the Sentinels' own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

from celery_unique.exceptions import ConfigurationError

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEMES = ("sentinel://",)
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES


def _nodes(url: str) -> list[Any]:
    """The parsed parts of a ``;``-joined URL list, each with a host and a port."""
    parts = [urlsplit(part.strip()) for part in url.split(";") if part.strip()]
    for part in parts:
        if not part.hostname or not part.port:
            # Not the URL itself: it may hold a password.
            raise ConfigurationError("every node of unique_redis_url needs a host and a port")
    return parts


def _credentials(part: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if part.username:
        found["username"] = unquote(part.username)
    if part.password:
        found["password"] = unquote(part.password)
    return found


def _database(part: Any) -> int:
    path = part.path.strip("/")
    if not path:
        return 0
    if not path.isdigit():
        raise ConfigurationError(f"the database in a Sentinel URL must be a number, got {path!r}")
    return int(path)


def cluster_client(url: str, **options: Any) -> RedisCluster:
    nodes = _nodes(url)
    first = nodes[0]
    if _database(first):
        raise ConfigurationError("Redis Cluster has only database 0")
    return RedisCluster(
        startup_nodes=[ClusterNode(node.hostname, node.port) for node in nodes],  # type: ignore[no-untyped-call]
        ssl=url.startswith("rediss+"),
        **_credentials(first),
        **options,
    )


def sentinel_client(url: str, transport_options: dict[str, Any], **options: Any) -> redis.Redis:
    nodes = _nodes(url)
    first = nodes[0]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [(node.hostname, node.port) for node in nodes],
        # None: the Sentinels get the timeouts of the master's connections.
        sentinel_kwargs=transport_options.get("sentinel_kwargs"),
        db=_database(first),
        **_credentials(first),
        **options,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        transport_options["master_name"], redis_class=redis.Redis
    )
    return client


def check_target(url: str, transport_options: dict[str, Any]) -> None:
    """Raise :class:`ConfigurationError` for a URL no client can be built for."""
    if not url.startswith(SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else url[:12]
        raise ConfigurationError(
            f"unique_redis_url must start with one of {', '.join(SCHEMES)}; got {scheme!r}"
        )
    if url.startswith(SENTINEL_SCHEMES) and not transport_options.get("master_name"):
        raise ConfigurationError(
            "a sentinel:// URL needs the master's name: "
            'unique_redis_transport_options = {"master_name": ...} '
            "(or broker_transport_options when the broker's Sentinel URL is used)"
        )
    if url.startswith(CLUSTER_SCHEMES + SENTINEL_SCHEMES):
        _nodes(url)


def make_client(url: str, transport_options: dict[str, Any] | None = None, **options: Any) -> Any:
    """The client for ``url``; ``options`` are connection settings (timeouts)."""
    transport_options = transport_options or {}
    check_target(url, transport_options)
    if url.startswith(CLUSTER_SCHEMES):
        return cluster_client(url, **options)
    if url.startswith(SENTINEL_SCHEMES):
        return sentinel_client(url, transport_options, **options)
    return redis.Redis.from_url(url, **options)


# What a Redis call can raise when Redis fails: RedisCluster raises some errors
# (no reachable node, an uncovered slot) outside redis-py's RedisError.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)
