"""``celery -A app unique ...`` through click's runner, against a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner

from celery_unique.aggregate import aggregator
from tests.integration.worker_app import sleeper

APP = "tests.integration.worker_app"


@pytest.fixture
def queued(celery_app: Any, token: str) -> Any:
    """A unique task waiting in the queue (countdown), so its lock is held."""
    result = sleeper.apply_async((token,), countdown=60)
    yield result
    result.revoke()
    sleeper.unique_store().release(sleeper.unique_lock_key((token,)), result.id)


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(celery_cli, ["-A", APP, "unique", *args], input=input, catch_exceptions=False)


def test_locks_lists_holder_and_ttl(queued: Any, token: str) -> None:
    done = run("locks", "--task", "tests.sleeper")
    assert done.exit_code == 0
    key = sleeper.unique_lock_key((token,))
    [line] = [line for line in done.output.splitlines() if key in line]
    assert f"holder={queued.id}" in line and " lock " in line and "ttl=" in line


def test_release_by_key_asks_first(queued: Any, token: str) -> None:
    key = sleeper.unique_lock_key((token,))
    refused = run("release", key, input="n\n")
    assert refused.exit_code != 0 and sleeper.unique_store().holder(key)[0] == queued.id
    done = run("release", key, "--yes")
    assert done.exit_code == 0 and "released 1 lock(s)" in done.output
    assert sleeper.unique_store().holder(key)[0] is None
    assert not sleeper.delay(token, 0.0).duplicate


def test_release_by_task(celery_app: Any, token: str) -> None:
    from tests.integration.worker_app import LIFETIME_TASKS

    task = LIFETIME_TASKS["until_expired"]  # its lock outlives the run: nothing else frees it
    task.delay(token)
    done = run("release", "--task", task.name, "--yes")
    assert done.exit_code == 0 and "released" in done.output
    assert task.unique_store().holder(task.unique_lock_key((token,)))[0] is None


def test_release_needs_a_key_or_a_task() -> None:
    assert run("release").exit_code != 0
    assert run("release", "not-a-lock", "--yes").exit_code != 0


def test_stats_counts_per_task(queued: Any, celery_app: Any, token: str) -> None:
    from tests.integration.worker_app import fan_collect

    aggregator(celery_app).create(token, ["a"], fan_collect.s(token))
    done = run("stats")
    assert done.exit_code == 0
    [row] = [line for line in done.output.splitlines() if line.startswith("tests.sleeper")]
    assert int(row.split()[1]) >= 1
    assert int(done.output.rsplit("open fan-ins:", 1)[1]) >= 1
    aggregator(celery_app).client.delete(aggregator(celery_app).key(token))
