"""What the plugin keeps in Redis: never unpickled, never raw arguments.

* A pickle planted in every key the plugin reads (a lock's holder, a stored
  outcome) is read as text or refused as bad JSON by the producer, the worker
  and the listing tools; nothing ever unpickles it (it would leave a file).
  The package imports no unpickler at all.
* Arguments go into keys as SHA-256 digests only: after producing, running,
  deduplicating, conflicting and replaying calls whose arguments hold a
  secret, no key, no stored value and no celery-unique log line (producer or
  worker, down to DEBUG) contains it.
"""

from __future__ import annotations

import ast
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import celery_unique
from celery_unique import DuplicateTaskError, UniqueKeyError
from celery_unique.inspect import iter_locks
from celery_unique.keys import family_of, result_key
from celery_unique.testing import RedisServer
from tests.chaos import chaos_app
from tests.chaos.conftest import chaos_worker, producing
from tests.integration.conftest import Worker, wait_for
from tests.security import tripwire

QUEUE = "security-data"


@pytest.fixture(scope="module")
def app(broker: RedisServer, lock_redis: RedisServer) -> Iterator[Any]:
    with producing(broker.url, lock_redis.url) as app:
        yield app


@pytest.fixture(scope="module")
def worker(app: Any, broker: RedisServer, lock_redis: RedisServer) -> Iterator[Worker]:
    with chaos_worker(
        broker.url, lock_redis.url, "data", "--queues", QUEUE, "--loglevel", "DEBUG"
    ) as started:
        yield started


@pytest.fixture
def lock_client(lock_redis: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(lock_redis.url) as client:
        yield client


def events(broker_url: str, token: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(broker_url) as client:
        return [json.loads(e) for e in client.lrange(chaos_app.events_key(token), 0, -1)]


@pytest.fixture
def later() -> str:
    """A queue of the test's own, consumed only once the test has planted what it
    plants (a queue shared with an earlier test would be consumed already)."""
    return f"security-data-later-{uuid.uuid4().hex}"


def run_later_queue(app: Any, worker: Worker, later: str) -> None:
    # Waits for the worker's answer: under load the default 1 s can pass first.
    replies = app.control.add_consumer(later, destination=[worker.name], reply=True, timeout=10)
    assert replies, f"the worker did not confirm consuming {later}:\n{worker.log_text()}"


def test_the_package_imports_no_unpickler() -> None:
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "jsonpickle", "marshal", "shelve"}
    for path in Path(celery_unique.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & unpicklers, f"{path} imports {names & unpicklers}"


@pytest.mark.worker
def test_a_pickle_planted_in_its_keys_is_never_unpickled(
    app: Any, worker: Worker, lock_client: redis.Redis, later: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    planted = tripwire.payload(marker)
    token = uuid.uuid4().hex

    # A lock whose holder is a pickle: a duplicate names it as text.
    lock = chaos_app.hold.unique_lock_key((token,))
    lock_client.set(lock, planted, px=60_000)
    assert chaos_app.hold.apply_async((token,), queue=QUEUE).id == planted.decode()
    with pytest.raises(DuplicateTaskError) as info:
        chaos_app.hold.apply_async((token,), queue=QUEUE, unique_options={"on_duplicate": "raise"})
    assert info.value.existing_id == planted.decode()
    assert [x.holder for x in iter_locks(app, "chaos.hold") if x.key == lock] == [planted.decode()]

    # A stored outcome that is a pickle: refused as JSON by delay() and by stored_outcome().
    outcome = result_key(family_of(chaos_app.idempotent.unique_lock_key((token,))))
    lock_client.set(outcome, planted, px=60_000)
    with pytest.raises(ValueError):
        chaos_app.idempotent.apply_async((token,), queue=QUEUE)
    with pytest.raises(ValueError):
        chaos_app.idempotent.stored_outcome((token,))

    # In the worker: a run whose lock a pickle holds (conflict), and a run sent
    # by name whose stored outcome is a pickle (refused: the run fails).
    other = uuid.uuid4().hex
    queued = chaos_app.work.apply_async((other,), queue=later)
    lock_client.set(chaos_app.work.unique_lock_key((other,)), planted, px=60_000)
    app.send_task("chaos.idempotent", (token,), queue=later)
    run_later_queue(app, worker, later)
    wait_for(
        lambda: [e for e in events(app.conf.broker_url, other) if e["event"] == "conflict"], worker=worker
    )
    wait_for(
        lambda: [e for e in events(app.conf.broker_url, token) if e["event"] == "failure"], worker=worker
    )
    conflict = next(e for e in events(app.conf.broker_url, other) if e["event"] == "conflict")
    assert (conflict["id"], conflict["holder"]) == (queued.id, planted.decode())
    assert [e["reason"] for e in events(app.conf.broker_url, token)] == ["JSONDecodeError"]
    assert not marker.exists()
    lock_client.delete(lock, outcome, chaos_app.work.unique_lock_key((other,)))


def stored_text(client: redis.Redis, key: bytes) -> str:
    """Everything a key holds, as text (strings, hashes, lists, the sorted sets of
    owners and deadlines and the reaper's set of workers are what the plugin writes)."""
    kind = client.type(key).decode()
    if kind == "string":
        parts = [client.get(key) or b""]
    elif kind == "hash":
        parts = [item for pair in client.hgetall(key).items() for item in pair]
    elif kind == "list":
        parts = client.lrange(key, 0, -1)
    elif kind == "zset":
        parts = client.zrange(key, 0, -1)
    elif kind == "set":
        parts = sorted(client.smembers(key))
    else:
        pytest.fail(f"the plugin wrote a {kind} at {key!r}")
    return b"\n".join(parts).decode(errors="replace")


def unique_lines(log: str) -> list[str]:
    """celery-unique's own lines of a worker log (its format names the logger)."""
    return [line for line in log.splitlines() if " celery_unique." in line]


@pytest.mark.worker
def test_no_key_value_or_log_line_holds_a_raw_argument(
    app: Any, worker: Worker, lock_client: redis.Redis, later: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    with caplog.at_level(logging.DEBUG, logger="celery_unique"):
        # Published, then a duplicate (logged), then raised as a duplicate.
        first = chaos_app.work.apply_async((token,), {"item": secret, "seconds": 1.0}, queue=QUEUE)
        assert chaos_app.work.apply_async((token,), {"item": secret, "seconds": 1.0}, queue=QUEUE).duplicate
        with pytest.raises(DuplicateTaskError) as duplicate:
            chaos_app.work.apply_async(
                (token,), {"item": secret}, queue=QUEUE, unique_options={"on_duplicate": "raise"}
            )
        # Arguments that cannot make a key, or do not fit the signature.
        with pytest.raises(UniqueKeyError) as unserialisable:
            chaos_app.work.apply_async((token,), {"item": object()}, queue=QUEUE)
        with pytest.raises(UniqueKeyError) as misfit:
            chaos_app.work.apply_async((token, 1.0, secret, secret), queue=QUEUE)
        # An idempotent call: run, outcome stored, replayed to the next call.
        call = {"item": secret, "seconds": 0}
        chaos_app.idempotent.apply_async((token,), call, queue=QUEUE)
        wait_for(lambda: chaos_app.idempotent.stored_outcome((token,), call), worker=worker)
        assert chaos_app.idempotent.apply_async((token,), call, queue=QUEUE).replayed
        # In the worker: a conflict (the lock taken by another id), and a replay of a call sent by name.
        conflicting = chaos_app.work.apply_async((token,), {"item": f"{secret}-2"}, queue=later)
        lock_client.set(chaos_app.work.unique_lock_key((token,), {"item": f"{secret}-2"}), "another-id")
        app.send_task("chaos.idempotent", (token,), call, queue=later)
        run_later_queue(app, worker, later)
        seen = lambda: events(app.conf.broker_url, token)  # noqa: E731
        wait_for(
            lambda: [e for e in seen() if e["event"] == "conflict" and e["id"] == conflicting.id],
            timeout=30,
            worker=worker,
        )
        wait_for(lambda: [e for e in seen() if e["event"] == "end" and e["id"] == first.id], worker=worker)
        wait_for(lambda: lock_client.get(chaos_app.work.unique_lock_key((token,), {"item": secret})) is None)
        wait_for(lambda: "replayed" in worker.whole_log())
    worker_lines = unique_lines(worker.whole_log())
    producer_lines = [r.getMessage() for r in caplog.records if r.name.startswith("celery_unique")]
    stored = {key.decode(): stored_text(lock_client, key) for key in lock_client.scan_iter("celery_unique:*")}
    errors = [str(e.value) for e in (duplicate, unserialisable, misfit)]

    # Not vacuous: each place was written to.
    assert any("duplicate of" in line for line in producer_lines)
    assert any("is held by" in line for line in worker_lines)
    assert any("released" in line for line in worker_lines)
    assert any(key.endswith(":result") for key in stored) and any(key.endswith(":fence") for key in stored)
    # Digests only.
    assert not [line for line in producer_lines + worker_lines if secret in line]
    assert not [key for key, value in stored.items() if secret in key or secret in value]
    assert not [error for error in errors if secret in error]
