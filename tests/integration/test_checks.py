"""Startup checks against a real Redis."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_unique import UniqueTask
from celery_unique.checks import check_app
from celery_unique.conf import get_conf
from celery_unique.hooks import _check_configuration
from celery_unique.testing import RedisServer
from tests.integration.conftest import Worker


@pytest.fixture
def evicting_redis() -> Iterator[str]:
    with RedisServer("--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru") as server:
        yield server.url


def build(url: str, **conf: Any) -> Celery:
    app = Celery("checks", broker=url, set_as_current=False)
    app.conf.update(conf)

    @app.task(base=UniqueTask, shared=False, lock_timeout=60, time_limit=120, renew_lock=False)
    def short_lock() -> None: ...

    @app.task(base=UniqueTask, shared=False, lock_timeout=7200)
    def long_lock() -> None: ...

    return app


def test_findings_for_a_risky_configuration(evicting_redis: str) -> None:
    app = build(evicting_redis, broker_transport_options={"visibility_timeout": 600})
    try:
        findings = {f.id: f.message for f in check_app(app)}
    finally:
        get_conf(app).close()
    assert set(findings) == {"lock_timeout", "visibility_timeout", "eviction"}
    assert "short_lock" in findings["lock_timeout"] and "120" in findings["lock_timeout"]
    assert "long_lock" in findings["visibility_timeout"]
    assert "allkeys-lru" in findings["eviction"]


def test_no_findings_for_a_safe_configuration(redis_url: str) -> None:
    app = build(redis_url, broker_transport_options={"visibility_timeout": 10_000})
    app.tasks[next(n for n in app.tasks if n.endswith("short_lock"))].renew_lock = True
    try:
        assert check_app(app) == []
    finally:
        get_conf(app).close()


def test_more_lock_replicas_than_the_lock_redis_has_is_a_finding(redis_url: str) -> None:
    app = build(redis_url, unique_lock_replicas=1)
    try:
        findings = {f.id: f.message for f in check_app(app)}
    finally:
        get_conf(app).close()
    assert "unique_lock_replicas is 1" in findings["replicas"]
    assert "it has 0 connected" in findings["replicas"]


def test_worker_start_logs_the_findings(evicting_redis: str, caplog: pytest.LogCaptureFixture) -> None:
    app = build(evicting_redis)

    class Consumer:
        pass

    consumer = Consumer()
    consumer.app = app  # type: ignore[attr-defined]
    try:
        with caplog.at_level(logging.WARNING, logger="celery_unique"):
            _check_configuration(sender=consumer)
    finally:
        get_conf(app).close()
    assert "celery-unique check eviction" in caplog.text


@pytest.mark.worker
def test_a_worker_with_invalid_settings_refuses_to_start(redis_url: str) -> None:
    settings = {"unique_on_redis_error": "ignore", "unique_redis_socket_timeout": "5s"}
    env = {"CHAOS_BROKER_URL": redis_url, "CHAOS_LOCK_URL": redis_url, "CHAOS_SETTINGS": json.dumps(settings)}
    worker = Worker(redis_url, "misconfigured", app="tests.chaos.chaos_app", env=env)
    try:
        with pytest.raises(RuntimeError, match="worker exited with 1") as info:
            worker.wait_ready(timeout=60)
    finally:
        worker.stop()
    assert "celery-unique: invalid configuration" in str(info.value)
    assert "unique_on_redis_error must be one of raise, allow; got 'ignore'" in str(info.value)
    assert "unique_redis_socket_timeout must be a positive number of seconds, got '5s'" in str(info.value)


@pytest.mark.worker
def test_a_worker_whose_task_has_a_unique_on_typo_says_so_once_and_stops(redis_url: str) -> None:
    env = {"CHAOS_BROKER_URL": redis_url}
    worker = Worker(redis_url, "typo", app="tests.integration.typo_app", env=env)
    try:
        with pytest.raises(RuntimeError, match="worker exited with") as info:
            worker.wait_ready(timeout=60)
    finally:
        worker.stop()
    said = "typo.recompute: unique_on names ['loan'] are not parameters of the task"
    assert str(info.value).count(said) == 1, str(info.value)
