"""Servers for the security tests: a plain broker, and a lock Redis behind TLS and ACLs.

The lock Redis speaks only TLS, wants a password for its default user and has
one ACL user per tenant that may touch nothing but its own key prefix.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_unique.testing import RedisServer
from tests.security.servers import SecureRedisServer, require_tls

TENANTS = {"tenant-a": "pw-a", "tenant-b": "pw-b"}


@pytest.fixture(scope="session")
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def lock_redis() -> Iterator[RedisServer]:
    """A plain lock Redis of the module's own (its tests' keys are all it holds)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def secure_redis() -> Iterator[SecureRedisServer]:
    require_tls()
    # Everything but the admin commands, on its own prefix only (keys used in
    # scripts are checked too).
    users = {name: f"on >{password} ~{name}:* +@all -@dangerous" for name, password in TENANTS.items()}
    with SecureRedisServer(users) as server:
        yield server


def tenant_url(server: SecureRedisServer, tenant: str) -> str:
    return server.url_for(tenant, TENANTS[tenant])
