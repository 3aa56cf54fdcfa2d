"""Every feature works under the documented least-privilege Redis user, copied as it stands.

The rule is read out of docs/security.rst (the line after ``.. acl-rule``) and run
with ``ACL SETUSER`` on a private lock Redis (with a replica, so that
``unique_lock_replicas`` is exercised too). A worker and this process then
use every feature as that user; Redis's ``ACL LOG`` must have refused nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_unique import Context, fan_in
from celery_unique.aggregate import aggregator
from celery_unique.checks import check_app
from celery_unique.headers import FAN_IN_HEADER
from celery_unique.inspect import force_release, iter_locks, open_fan_ins
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import chaos_worker, producing
from tests.integration.conftest import Worker, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "security-acl"
PASSWORD = "acl-test-password"


def documented_rule() -> list[str]:
    """The ACL SETUSER command that docs/security.rst gives, as words, with a test password."""
    text = (ROOT / "docs" / "security.rst").read_text()
    after = text[text.index(".. acl-rule") :]
    line = next(line.strip() for line in after.splitlines() if line.strip().startswith("ACL SETUSER"))
    return [">" + PASSWORD if word == ">CHANGE-ME" else word for word in line.split()]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as primary, RedisServer("--replicaof", "127.0.0.1", str(primary.port)) as replica:
        with redis.Redis(port=replica.port) as client:
            wait_for(lambda: client.info("replication").get("master_link_status") == "up", timeout=20)
        yield primary, replica


@pytest.fixture(scope="module")
def admin(servers: tuple[RedisServer, RedisServer]) -> Iterator[redis.Redis]:
    with redis.Redis(port=servers[0].port) as client:
        client.execute_command(*documented_rule())
        client.acl_log_reset()
        yield client


@pytest.fixture(scope="module")
def lock_url(servers: tuple[RedisServer, RedisServer], admin: redis.Redis) -> str:
    user = documented_rule()[2]
    return f"redis://{user}:{PASSWORD}@127.0.0.1:{servers[0].port}/0"


@pytest.fixture(scope="module")
def app(broker: RedisServer, lock_url: str) -> Iterator[Any]:
    with producing(broker.url, lock_url, unique_lock_replicas=1) as app:
        yield app


@pytest.fixture(scope="module")
def worker(app: Any, broker: RedisServer, lock_url: str) -> Iterator[Worker]:
    settings = json.dumps({"unique_lock_replicas": 1})
    with chaos_worker(broker.url, lock_url, "acl", "--queues", QUEUE, CHAOS_SETTINGS=settings) as started:
        yield started


def events(broker: RedisServer, token: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(broker.url) as client:
        return [json.loads(e) for e in client.lrange(chaos_app.events_key(token), 0, -1)]


def test_the_documented_rule_is_what_this_test_creates() -> None:
    rule = documented_rule()
    assert rule[:3] == ["ACL", "SETUSER", "celery-unique"] and "~celery_unique:*" in rule
    assert "+@all" not in rule and "-@all" in rule


@pytest.mark.worker
def test_every_feature_runs_under_the_documented_user(
    app: Any, worker: Worker, broker: RedisServer, admin: redis.Redis
) -> None:
    token = uuid.uuid4().hex
    # Locks: a task runs and releases; a duplicate while it runs.
    first = chaos_app.work.apply_async((token,), {"seconds": 0.5}, queue=QUEUE)
    assert chaos_app.work.apply_async((token,), {"seconds": 0.5}, queue=QUEUE).id == first.id
    # The CLI's reads, a lock released by hand.
    assert any(lock.holder == first.id for lock in iter_locks(app, "chaos.work"))
    wait_for(lambda: [e for e in events(broker, token) if e["event"] == "end"], worker=worker)
    key = chaos_app.work.unique_lock_key((token,), {"seconds": 0.5})
    wait_for(lambda: not admin.exists(key), worker=worker)
    held = chaos_app.hold.apply_async((f"{token}-held",), queue=f"{QUEUE}-unread")
    assert force_release(app, chaos_app.hold.unique_lock_key((f"{token}-held",)))
    held.revoke()
    # An idempotent outcome, stored and replayed.
    chaos_app.reveal.apply_async((token, "value"), queue=QUEUE)
    wait_for(lambda: chaos_app.reveal.stored_outcome((token, "value")) is not None, worker=worker)
    assert chaos_app.reveal.apply_async((token, "value"), queue=QUEUE).replayed
    # A fan-in that completes, and one that expires in the workers' sweep.
    parts = [chaos_app.fan_part.s(f"{token}-done", n).set(queue=QUEUE) for n in range(2)]
    fan_in(parts, chaos_app.fan_callback.s(f"{token}-done").set(queue=QUEUE), token=f"{token}-done", app=app)
    late = chaos_app.fan_callback.s(f"{token}-late").set(queue=QUEUE)
    expiring = aggregator(app).create(f"{token}-late", ["never"], late, late, timeout=1)
    assert open_fan_ins(app)
    wait_for(lambda: [e for e in events(broker, f"{token}-done") if e["event"] == "callback"], worker=worker)
    wait_for(lambda: [e for e in events(broker, f"{token}-late") if e["event"] == "callback"], worker=worker)
    assert expiring.state is None
    # A split context.
    context = Context(app, f"ctx-{token}", ttl=60)
    context.append({"a": 1})
    assert context.compact() and context.value() == {"a": 1}
    context.delete()
    # The startup checks read what they check.
    assert [finding.id for finding in check_app(app)] == []

    # Nothing filtered: our clients do not send redis-py's CLIENT SETINFO either
    # (Redis 6.2 logs it as a refused "client"; 7.2+ as "client|setinfo").
    refused = admin.acl_log()
    assert refused == [], "the documented rule refused: " + ", ".join(
        f"{entry['reason']} {entry['object']}" for entry in refused
    )
    assert not re.search("NOPERM|NoPermission", worker.whole_log())


@pytest.mark.worker
def test_a_missing_command_is_one_clear_error_in_the_worker(
    broker: RedisServer, servers: tuple[RedisServer, RedisServer], admin: redis.Redis
) -> None:
    """A user without HSETNX (a fan-in report's): the worker says so once, naming the
    command, instead of Celery's "Signal handler raised" and a traceback."""
    rule = [word for word in documented_rule() if word != "+hsetnx"]
    rule[2] = "celery-unique-lacking"
    admin.execute_command(*rule)
    lacking = f"redis://celery-unique-lacking:{PASSWORD}@127.0.0.1:{servers[0].port}/0"
    token = uuid.uuid4().hex
    with (
        producing(broker.url, lacking) as app,
        chaos_worker(broker.url, lacking, "acl-lacking", "--queues", f"{QUEUE}-lacking") as worker,
    ):
        aggregator(app).create(token, ["a"], chaos_app.fan_callback.s(token))
        chaos_app.fan_part.apply_async(
            (token, 1), queue=f"{QUEUE}-lacking", headers={FAN_IN_HEADER: {"token": token, "part": "a"}}
        )
        said = "its fan-in report could not be recorded: "
        wait_for(lambda: said in worker.whole_log(), worker=worker)
        log = worker.whole_log()
    # Inside a script Redis names no command (7.0): the line says what is wrong and where to look.
    pointer = "user lacks a command: see docs/security.rst, Least-privilege Redis user"
    assert log.count(said) == 1 and pointer in log
    assert "Signal handler" not in log
