"""Redis Cluster and Sentinel: what differs from one Redis, on real servers.

The worker tests run against both topologies with ``--unique-redis=cluster``
or ``--unique-redis=sentinel``; here are the checks only a topology has: one
slot per key family, SCAN over every primary, a failover.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique import Context, LockBackendError, UniqueTask
from celery_unique.aggregate import aggregator
from celery_unique.checks import check_eviction, check_replicas
from celery_unique.clients import is_cluster
from celery_unique.conf import get_conf
from celery_unique.inspect import iter_locks
from celery_unique.testing import ClusterServers, SentinelServers
from tests.integration.conftest import frozen, lock_holder, release_held


def _app(broker: str, url: str, **conf: Any) -> Celery:
    app = Celery(f"topology-{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    # A queue no worker reads: these tests look at the producer side only.
    app.conf.update(
        unique_redis_url=url,
        task_default_queue=f"topology-{uuid.uuid4().hex}",
        unique_signing_key="test-signing-key",
        **conf,
    )
    return app


def _task(app: Celery) -> Any:
    @app.task(base=UniqueTask, name="topology.job", shared=False)
    def job(n: int) -> int:
        return n

    return job


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterServers]:
    with ClusterServers() as servers:
        yield servers


@pytest.fixture
def cluster_app(cluster: ClusterServers, redis_url: str) -> Iterator[Celery]:
    app = _app(redis_url, cluster.url)
    yield app
    get_conf(app).close()
    app.close()


def test_every_key_family_lives_in_one_slot(cluster_app: Celery) -> None:
    client = get_conf(cluster_app).locks.client
    assert is_cluster(client)
    job = _task(cluster_app)
    lock = job.unique_lock_key((1,))
    family = lock.removesuffix(":lock")
    keys = [family + suffix for suffix in (":lock", ":run", ":fence", ":result", ":args")]
    assert len({client.keyslot(key) for key in keys}) == 1
    context = Context(cluster_app, "shared")
    assert len({client.keyslot(key) for key in (context.base_key, context.log_key, context.lock_key)}) == 1


def test_duplicates_are_stopped_and_locks_spread_over_every_primary(cluster_app: Celery) -> None:
    job = _task(cluster_app)
    calls = range(60)
    firsts = [job.delay(n).id for n in calls]
    assert [job.delay(n).id for n in calls] == firsts  # every second call is a duplicate
    client = get_conf(cluster_app).locks.client
    keys = [job.unique_lock_key((n,)) for n in calls]
    primaries = {client.get_node_from_key(key).name for key in keys}
    assert len(primaries) == 3
    # The listing SCANs every primary: it finds each lock with its holder.
    found = {info.key: info.holder for info in iter_locks(cluster_app, task_name="topology.job")}
    assert found == dict(zip(keys, firsts, strict=True))
    for key, owner in zip(keys, firsts, strict=True):
        assert release_held(get_conf(cluster_app).locks, key, owner)


def test_a_fan_in_completes_on_a_cluster(cluster_app: Celery) -> None:
    job = _task(cluster_app)
    agg = aggregator(cluster_app)
    token = uuid.uuid4().hex
    agg.create(token, ["a", "b"], job.s())
    assert agg.report(token, "a", 1) == 0
    assert agg.report(token, "a", 1) == -1  # counted once
    assert agg.report(token, "b", 2) == 1  # completed: the callback was published
    assert not agg.client.exists(agg.key(token))


def test_the_eviction_check_asks_every_primary(cluster: ClusterServers, cluster_app: Celery) -> None:
    assert check_eviction(cluster_app) == []
    last = redis.Redis(port=cluster.primaries[-1].port)
    last.config_set("maxmemory-policy", "allkeys-lru")
    try:
        [finding] = check_eviction(cluster_app)
        assert finding.id == "eviction" and "allkeys-lru" in finding.message
    finally:
        last.config_set("maxmemory-policy", "noeviction")
        last.close()


@pytest.fixture
def sentinel() -> Iterator[SentinelServers]:
    with SentinelServers() as servers:
        yield servers


def _kept_connections_go_to(store: Any) -> set[int]:
    """The server ports of the lock store's kept fast-path connections."""
    return {connection._sock.getpeername()[1] for connection in store._idle[""]}


def test_producers_keep_working_across_a_sentinel_failover(sentinel: SentinelServers, redis_url: str) -> None:
    app = _app(
        redis_url,
        sentinel.url,
        unique_redis_transport_options=sentinel.transport_options,
        unique_redis_socket_timeout=1.0,
        unique_redis_connect_timeout=1.0,
    )
    job = _task(app)
    broker = redis.Redis.from_url(redis_url)
    queue = app.conf.task_default_queue
    before = job.delay("before")
    # The lock reached the replica before the primary fails, so it survives.
    replica = redis.Redis(port=sentinel.replica.port)
    lock = job.unique_lock_key(("before",))
    deadline = time.monotonic() + 10
    while lock_holder(replica, lock) != before.id:
        assert time.monotonic() < deadline, "the lock never reached the replica"
        time.sleep(0.02)
    replica.close()
    store = get_conf(app).locks
    assert store.lean and _kept_connections_go_to(store) == {sentinel.primary.port}
    old_port = sentinel.master_port()
    sentinel.primary.stop()

    raised = published = 0
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "the Sentinel did not promote the replica in time"
        try:
            job.delay(f"during-{raised + published}")
        except LockBackendError:
            raised += 1  # said plainly, nothing published: the caller knows
            time.sleep(0.1)
            continue
        published += 1
        if sentinel.master_port() != old_port:
            break

    assert sentinel.master_port() == sentinel.replica.port
    # After the switch: the replicated lock still holds, new locks dedupe.
    assert job.delay("before").id == before.id
    after = job.delay("after")
    assert job.delay("after").id == after.id
    # The fast path's connections found the new primary through the Sentinel.
    assert _kept_connections_go_to(store) == {sentinel.replica.port}
    # Exactly the calls that returned were published: none that raised, no duplicate.
    assert broker.llen(queue) == 1 + published + 1
    print(f"failover: {raised} calls raised LockBackendError, {published} published during the switch")
    broker.close()
    get_conf(app).close()
    app.close()


def _move_slot(cluster: ClusterServers, slot: int, source: int, target: int) -> None:
    """Move an empty slot between primaries, as a resharding does."""
    nodes = [redis.Redis(port=server.port) for server in cluster.primaries]
    try:
        ids = [node.execute_command("CLUSTER MYID").decode() for node in nodes]
        nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        nodes[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        for node in nodes:
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
    finally:
        for node in nodes:
            node.close()


def test_the_fast_path_follows_a_moved_slot(cluster: ClusterServers, cluster_app: Celery) -> None:
    job = _task(cluster_app)
    store = get_conf(cluster_app).locks
    assert store.lean  # acquires go straight to the primary the slot table names
    client = store.client
    key = job.unique_lock_key(("moved",))
    source = client.get_node_from_key(key)
    # A call for another key on the same primary leaves a kept connection there.
    warm = next(n for n in range(10_000) if client.get_node_from_key(job.unique_lock_key((n,))) == source)
    first = job.delay(warm)
    assert len(store._idle[source.name]) == 1
    ports = [server.port for server in cluster.primaries]
    target = (ports.index(source.port) + 1) % 3
    _move_slot(cluster, client.keyslot(key), ports.index(source.port), target)
    # The client's slot table is stale now: Redis answers MOVED, the client follows.
    moved = job.delay("moved")
    assert job.delay("moved").id == moved.id
    assert lock_holder(redis.Redis(port=ports[target]), key) == moved.id
    # MOVED was read whole: that connection was kept for the keys still there.
    assert len(store._idle[source.name]) == 1
    assert release_held(store, key, moved.id)
    assert release_held(store, job.unique_lock_key((warm,)), first.id)


def _primary_of(replica_port: int) -> int:
    with redis.Redis(port=replica_port) as replica:
        return int(replica.info("replication")["master_port"])


def test_on_a_cluster_a_lock_waits_for_the_replica_of_its_primary(
    cluster: ClusterServers, redis_url: str
) -> None:
    app = _app(redis_url, cluster.url, unique_lock_replicas=1, unique_redis_socket_timeout=0.4)
    job = _task(app)
    broker = redis.Redis.from_url(redis_url)
    queue = app.conf.task_default_queue
    store = get_conf(app).locks
    firsts = [job.delay(n) for n in range(12)]  # over every primary
    assert [job.delay(n).id for n in range(12)] == [first.id for first in firsts]
    key = job.unique_lock_key(("stopped",))
    primary = store.client.get_node_from_key(key).port
    [replica] = [server for server in cluster.replicas if _primary_of(server.port) == primary]
    with frozen(replica), pytest.raises(LockBackendError, match="0 of 1 replicas"):
        job.delay("stopped")
    assert store.owner(key) == (None, None)  # released: nothing was published for it
    assert broker.llen(queue) == 12
    assert check_replicas(app) == []  # the startup check asks every primary
    app.conf.unique_lock_replicas = 2
    get_conf(app).reload()
    [finding] = check_replicas(app)
    assert "one of its primaries has 1 connected" in finding.message
    app.conf.unique_lock_replicas = 1
    get_conf(app).reload()
    store = get_conf(app).locks
    for n, first in enumerate(firsts):
        assert release_held(store, job.unique_lock_key((n,)), first.id)
    broker.close()
    get_conf(app).close()
    app.close()


def test_a_cluster_that_cannot_be_reached_raises_lock_backend_error(redis_url: str) -> None:
    with ClusterServers(primaries=3, replicas=0) as gone:
        url = gone.url
    app = _app(redis_url, url, unique_redis_connect_timeout=0.5, unique_redis_socket_timeout=0.5)
    job = _task(app)
    broker = redis.Redis.from_url(redis_url)
    queue = app.conf.task_default_queue
    with pytest.raises(LockBackendError) as raised:
        job.delay(1)
    assert raised.value.__cause__ is not None
    assert broker.llen(queue) == 0  # nothing was published
    broker.close()
    app.close()
