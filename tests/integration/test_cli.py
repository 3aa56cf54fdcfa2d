"""``celery -A app unique ...`` through click's runner, against a real Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner
from redis.exceptions import AskError, MovedError, TryAgainError

from celery_unique import idempotency
from celery_unique import inspect as inspect_module
from celery_unique.aggregate import aggregator
from celery_unique.conf import get_conf
from celery_unique.inspect import iter_locks, open_fan_ins
from celery_unique.keys import (
    args_key,
    digest,
    family_key,
    family_of,
    fan_in_key,
    fence_key,
    lock_key,
    result_key,
    run_key,
)
from celery_unique.locks import LockStore
from tests.integration.conftest import ROOT, Events, release_held, wait_for
from tests.integration.worker_app import LIFETIME_TASKS, open_gate, sleeper

APP = "tests.integration.worker_app"
WAIT = 60.0  # seconds: generous, the machine may be busy


@pytest.fixture
def queued(celery_app: Any, token: str) -> Any:
    """A unique task waiting in the queue (countdown), so its lock is held."""
    result = sleeper.apply_async((token,), countdown=60)
    yield result
    result.revoke()
    release_held(sleeper.unique_store(), sleeper.unique_lock_key((token,)), result.id)


@pytest.fixture
def store(celery_app: Any) -> LockStore:
    return get_conf(celery_app).locks


@pytest.fixture
def planted(celery_app: Any, store: LockStore) -> Iterator[list[str]]:
    """Keys a test writes itself through the scripts (for a task name of its own); deleted after."""
    keys: list[str] = []
    yield keys
    for key in keys:
        store.client.delete(key)


@pytest.fixture
def gate(redis_client: redis.Redis, token: str) -> Iterator[Callable[[], None]]:
    """Opens the gate where the test's run (``gated=True``) waits between "start" and "end";
    opened after the test too, so a failed test does not keep a worker process."""

    def opened() -> None:
        open_gate(redis_client, token)

    yield opened
    opened()


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(celery_cli, ["-A", APP, "unique", *args], input=input, catch_exceptions=False)


def columns(output: str, key: str) -> dict[str, str]:
    """The fields of the listing line of ``key``: kind, holder, ttl, age, lifetime."""
    [line] = [line for line in output.splitlines() if line.startswith(f"{key}  ")]
    _, kind, *pairs = line.split("  ")
    return {"kind": kind, **dict(pair.split("=", 1) for pair in pairs)}


def family(celery_app: Any, task_name: str, name: str) -> str:
    return family_key(get_conf(celery_app).key_prefix, task_name, digest(name))


def test_locks_lists_holder_ttl_age_and_lifetime(queued: Any, token: str) -> None:
    done = run("locks", "--task", "tests.sleeper")
    assert done.exit_code == 0
    found = columns(done.output, sleeper.unique_lock_key((token,)))
    assert found["kind"] == "lock" and found["holder"] == queued.id
    ttl = sleeper.unique_lock_timeout + 60  # the countdown too
    assert ttl - 10 < float(found["ttl"].rstrip("s")) <= ttl
    assert found["age"] == "-"  # nothing records when a lock was queued
    assert found["lifetime"] == "until_executed"


@pytest.mark.worker
@pytest.mark.parametrize("lifetime", ["while_executing", "until_and_while_executing"])
def test_locks_shows_the_age_of_a_running_lock(
    worker: Any, token: str, events: Events, gate: Callable[[], None], lifetime: str
) -> None:
    task = LIFETIME_TASKS[lifetime]
    sent = time.time()
    result = task.delay(token, gated=True)
    [start] = wait_for(lambda: events(), timeout=WAIT, worker=worker)  # then it waits at the gate
    time.sleep(0.2)  # only so that the age is measurably above 0
    asked = time.time()
    done = run("locks", "--task", task.name)
    answered = time.time()
    found = columns(done.output, run_key(family_of(task.unique_lock_key((token,)))))
    assert found["kind"] == "run" and found["holder"] == result.id and found["lifetime"] == lifetime
    # The run drew its fence after delay() and before it recorded "start"; the CLI read
    # the clock between asked and answered. Printed to 0.1 s: 0.05 either way.
    age = float(found["age"].rstrip("s"))
    assert 0 < asked - start["time"] - 0.05 <= age <= answered - sent + 0.05
    gate()
    result.get(timeout=WAIT)
    assert [event["event"] for event in events()] == ["start", "end"]


@pytest.mark.worker
def test_locks_shows_no_age_for_a_queued_lock_held_while_running(
    worker: Any, token: str, events: Events, gate: Callable[[], None], store: LockStore
) -> None:
    """until_executed takes its fence at the start of a run of the same key, but a
    fence may be an earlier holder's: its age is never shown."""
    task = LIFETIME_TASKS["until_executed"]
    key = task.unique_lock_key((token,))
    result = task.delay(token, gated=True)
    wait_for(lambda: events(), timeout=WAIT, worker=worker)  # running, at the gate
    assert store.client.get(fence_key(family_of(key))) is not None  # this run's fence is there
    done = run("locks", "--task", task.name)
    found = columns(done.output, key)
    assert found["kind"] == "lock" and found["holder"] == result.id
    assert found["age"] == "-" and found["lifetime"] == "until_executed"
    assert run_key(family_of(key)) not in done.output  # it holds its queued lock while it runs
    gate()
    result.get(timeout=WAIT)
    assert [event["event"] for event in events()] == ["start", "end"]


def test_locks_of_a_task_not_registered_here(
    celery_app: Any, store: LockStore, planted: list[str], token: str
) -> None:
    name = f"tests.elsewhere.{token}"
    held = family(celery_app, name, "x")
    planted += [run_key(held), fence_key(held)]
    assert store.begin_run(
        lock_key(held), run_key(held), fence_key(held), "owner", "while_executing", 60_000
    ).acquired
    done = run("locks", "--task", name)
    found = columns(done.output, run_key(held))
    assert found["kind"] == "run" and found["holder"] == "owner"
    assert found["lifetime"] == "?" and found["age"] == "-"


def test_locks_shows_no_age_when_the_fence_is_ahead_of_the_clock(
    celery_app: Any, store: LockStore, planted: list[str], token: str
) -> None:
    """The fence is max(previous + 1, server time): after a clock step back it is no start time."""
    task = LIFETIME_TASKS["while_executing"]
    held = family_of(task.unique_lock_key((token,)))
    planted += [run_key(held), fence_key(held)]
    seconds, micros = store.client.time()
    store.client.set(fence_key(held), (seconds + 3600) * 1_000_000 + micros)
    assert store.begin_run(
        lock_key(held), run_key(held), fence_key(held), "owner", "while_executing", 60_000
    ).acquired
    done = run("locks", "--task", task.name)
    found = columns(done.output, run_key(held))
    assert found["holder"] == "owner" and found["lifetime"] == "while_executing" and found["age"] == "-"


def test_release_by_key_asks_first(queued: Any, token: str) -> None:
    key = sleeper.unique_lock_key((token,))
    refused = run("release", key, input="n\n")
    assert refused.exit_code != 0 and sleeper.unique_store().holder(key)[0] == queued.id
    done = run("release", key, "--yes")
    assert done.exit_code == 0 and "released 1 lock(s)" in done.output
    assert sleeper.unique_store().holder(key)[0] is None
    assert not sleeper.delay(token, 0.0).duplicate


def test_release_by_task(celery_app: Any, token: str) -> None:
    task = LIFETIME_TASKS["until_expired"]  # its lock outlives the run: nothing else frees it
    task.delay(token)
    done = run("release", "--task", task.name, "--yes")
    assert done.exit_code == 0 and "released" in done.output
    assert task.unique_store().holder(task.unique_lock_key((token,)))[0] is None


def test_release_by_task_asks_first(
    celery_app: Any, store: LockStore, planted: list[str], token: str
) -> None:
    name = f"tests.release.{token}"
    keys = [lock_key(family(celery_app, name, part)) for part in ("a", "b")]
    planted += keys
    for key in keys:
        assert store.acquire(key, "owner", 60_000).acquired
    refused = run("release", "--task", name, input="n\n")
    assert refused.exit_code != 0 and "release 2 lock(s)?" in refused.output
    assert [store.holder(key)[0] for key in keys] == ["owner", "owner"]
    done = run("release", "--task", name, input="y\n")
    assert done.exit_code == 0 and "released 2 lock(s)" in done.output
    assert [store.holder(key)[0] for key in keys] == [None, None]


# Task names whose SCAN patterns could reach each other: a name and the same name
# with a ":sub" (a pattern "{name:*}" matched both), names with glob characters,
# braces (percent-encoded in the tag) and names one character apart.
SIBLINGS = ("rel.pfx", "a", "a*", "a?b", "a[1]", "a{x}", "a%7Bx%7D", "ab", "axb", "a1")
SIBLING_NAMES = (*SIBLINGS, *(f"{name}:sub" for name in SIBLINGS))


@pytest.fixture
def siblings(celery_app: Any, store: LockStore, planted: list[str], token: str) -> dict[str, set[str]]:
    """A queued lock and a run lock of each of SIBLING_NAMES (under this test's token): name -> keys."""
    held: dict[str, set[str]] = {}
    for name in SIBLING_NAMES:
        full = f"tests.exact.{token}.{name}"
        queued, running = family(celery_app, full, "queued"), family(celery_app, full, "running")
        planted += [lock_key(queued), run_key(running), fence_key(running)]
        assert store.acquire(lock_key(queued), "owner", 60_000).acquired
        assert store.begin_run(
            lock_key(running), run_key(running), fence_key(running), "owner", "while_executing", 60_000
        ).acquired
        held[full] = {lock_key(queued), run_key(running)}
    return held


@pytest.mark.parametrize("name", SIBLING_NAMES)
def test_locks_and_release_by_task_touch_exactly_that_task(
    siblings: dict[str, set[str]], store: LockStore, token: str, name: str
) -> None:
    asked = f"tests.exact.{token}.{name}"
    listed = run("locks", "--task", asked)
    assert listed.exit_code == 0
    *lines, total = listed.output.splitlines()
    assert {line.split("  ")[0] for line in lines} == siblings[asked]
    assert total == "2 lock(s) and outcome(s)"
    done = run("release", "--task", asked, "--yes")
    assert done.exit_code == 0 and done.output.splitlines() == ["released 2 lock(s)"]
    kept = {key for keys in siblings.values() for key in keys if store.client.exists(key)}
    assert kept == {key for each, keys in siblings.items() if each != asked for key in keys}


def test_release_needs_a_key_or_a_task() -> None:
    assert run("release").exit_code != 0
    assert run("release", "not-a-lock", "--yes").exit_code != 0


def test_stats_counts_per_task(celery_app: Any, store: LockStore, planted: list[str], token: str) -> None:
    name = f"tests.stats.{token}"
    queued = [lock_key(family(celery_app, name, part)) for part in ("a", "b")]
    running, stored = family(celery_app, name, "c"), family(celery_app, name, "d")
    planted += [*queued, run_key(running), fence_key(running), result_key(stored)]
    for key in queued:
        assert store.acquire(key, "owner", 60_000).acquired
    assert store.begin_run(
        lock_key(running), run_key(running), fence_key(running), "o", "while_executing", 60_000
    ).acquired
    outcome = idempotency.encode_success("done", "", 1)
    assert store.store_and_release(
        result_key(stored), args_key(stored), lock_key(stored), [], "done", outcome, 60_000
    )[0]
    fan_ins = aggregator(celery_app)
    tokens = [f"{token}-{n}" for n in range(3)]
    planted += [fan_ins.key(each) for each in tokens]
    for each in tokens:
        fan_ins.create(each, ["a"], celery_app.signature(name))
    fan_ins.client.hset(fan_ins.key(tokens[2]), "state", "completed")  # closed, not yet deleted

    done = run("stats")
    assert done.exit_code == 0
    assert done.output.split("\n", 1)[0].split() == ["task", "lock", "run", "result", "fan-ins"]
    [row] = [line.split() for line in done.output.splitlines() if line.startswith(f"{name} ")]
    assert row == [name, "2", "1", "1", "2"]


def test_locks_on_a_cluster_follow_a_moved_slot(
    celery_app: Any, unique_redis: Any, store: LockStore, planted: list[str], token: str, monkeypatch: Any
) -> None:
    """A slot table gone stale (a resharding, a failover) is read again, once."""
    if unique_redis.topology != "cluster":
        pytest.skip("needs --unique-redis=cluster")
    name = f"tests.moved.{token}"
    key = lock_key(family(celery_app, name, "x"))
    planted.append(key)
    assert store.acquire(key, "owner", 60_000).acquired
    cluster = store.client
    node_of = cluster.get_node_from_key
    asked: list[str] = []

    def stale(of: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(of)
        right = node_of(of, *args, **kwargs)
        if len(asked) > 1:
            return right
        return next(node for node in cluster.get_primaries() if node.name != right.name)

    monkeypatch.setattr(cluster, "get_node_from_key", stale)
    [found] = iter_locks(celery_app, name)
    assert asked == [key, key] and (found.key, found.holder) == (key, "owner")


@pytest.mark.parametrize(
    "errors",
    [
        pytest.param([AskError("1 127.0.0.1:1")], id="ask"),
        pytest.param([TryAgainError("TRYAGAIN")], id="tryagain"),
        pytest.param([MovedError("1 127.0.0.1:1")] * 2, id="moved-twice"),
    ],
)
def test_locks_on_a_cluster_read_a_redirected_key_through_the_cluster_client(
    celery_app: Any,
    unique_redis: Any,
    store: LockStore,
    planted: list[str],
    token: str,
    monkeypatch: Any,
    errors: list[Exception],
) -> None:
    """A slot mid-migration (ASK), mid-resharding (TRYAGAIN) or moved again: the key is
    still listed, read without its fence, so without an age."""
    if unique_redis.topology != "cluster":
        pytest.skip("needs --unique-redis=cluster")
    task = LIFETIME_TASKS["while_executing"]
    held = family_of(task.unique_lock_key((token,)))
    planted += [run_key(held), fence_key(held)]
    assert store.begin_run(
        lock_key(held), run_key(held), fence_key(held), "owner", "while_executing", 60_000
    ).acquired
    assert columns(run("locks", "--task", task.name).output, run_key(held))["age"] != "-"
    read = inspect_module._read
    pending = list(errors)

    def redirected(client: Any, keys: list[str]) -> Any:
        if keys == [run_key(held)] and pending:
            raise pending.pop(0)
        return read(client, keys)

    monkeypatch.setattr(inspect_module, "_read", redirected)
    done = run("locks", "--task", task.name)
    assert done.exit_code == 0 and not pending
    found = columns(done.output, run_key(held))
    assert found["holder"] == "owner" and found["lifetime"] == "while_executing"
    assert 50 < float(found["ttl"].rstrip("s")) <= 60 and found["age"] == "-"


def test_locks_reports_a_redis_it_cannot_reach(
    celery_app: Any, unique_redis: Any, store: LockStore, planted: list[str], token: str, monkeypatch: Any
) -> None:
    """One line naming the node (a listing without its keys would look complete), no traceback."""
    name = f"tests.unreachable.{token}"
    key = lock_key(family(celery_app, name, "x"))
    planted.append(key)
    assert store.acquire(key, "owner", 60_000).acquired

    def refused(client: Any, keys: list[str]) -> Any:
        raise redis.ConnectionError("Error 111 connecting. Connection refused.")

    monkeypatch.setattr(inspect_module, "_read", refused)
    done = run("locks", "--task", name)
    assert done.exit_code == 1 and "Traceback" not in done.output
    [message] = [line for line in done.output.splitlines() if line.startswith("Error: ")]
    assert "Connection refused" in message
    if unique_redis.topology == "cluster":
        assert f"from the cluster node {store.client.get_node_from_key(key).name}: " in message


def test_stats_counts_a_malformed_fan_in_under_a_question_mark(
    celery_app: Any, store: LockStore, planted: list[str], token: str
) -> None:
    contexts = {
        "not-json": {"state": "open", "callback": "{not json"},
        "no-callback": {"state": "open"},
        "no-task": {"state": "open", "callback": "{}"},
        "not-an-object": {"state": "open", "callback": "[1]"},
    }
    before = open_fan_ins(celery_app)["?"]
    prefix = get_conf(celery_app).key_prefix
    for part, fields in contexts.items():
        key = fan_in_key(prefix, f"{token}-{part}")
        planted.append(key)
        store.client.hset(key, mapping=fields)
    done = run("stats")
    assert done.exit_code == 0
    [row] = [line.split() for line in done.output.splitlines() if line.startswith("? ")]
    assert row[:4] == ["?", "0", "0", "0"] and int(row[4]) == before + len(contexts)


def test_an_app_without_a_redis_is_one_clear_error() -> None:
    done = CliRunner().invoke(
        celery_cli, ["-A", "tests.integration.no_redis_app", "unique", "stats"], catch_exceptions=False
    )
    assert done.exit_code == 1
    assert done.output.splitlines()[-1].startswith("Error: celery-unique needs a Redis: set unique_redis_url")
    assert "Traceback" not in done.output


def test_a_prefix_with_glob_characters_is_matched_literally(
    celery_app: Any, store: LockStore, planted: list[str], token: str
) -> None:
    """A prefix such as ``app[1]*?`` (the settings allow it): the listing, the counts and
    the fan-in count find this app's keys and no other prefix's."""
    conf = get_conf(celery_app)
    before = celery_app.conf.get("unique_key_prefix")
    celery_app.conf.unique_key_prefix = "app[1]*?"
    conf.reload()
    try:
        digest_part = digest({"token": token})
        own = lock_key(family_key("app[1]*?", "tests.cli.prefixed", digest_part))
        foreign = lock_key(family_key("app1zz", "tests.cli.prefixed", digest_part))  # the glob matches it
        planted.extend([own, foreign])
        store.acquire(own, "own-holder", 60_000)
        store.acquire(foreign, "foreign-holder", 60_000)
        assert [(lock.key, lock.holder) for lock in iter_locks(celery_app)] == [(own, "own-holder")]
        fan_in_token = f"prefixed-{token}"
        aggregator(celery_app).create(fan_in_token, ["a"], sleeper.s(token))
        planted.append(aggregator(celery_app).key(fan_in_token))
        assert open_fan_ins(celery_app) == {"tests.sleeper": 1}
    finally:
        celery_app.conf.unique_key_prefix = before
        conf.reload()


def test_a_django_project_s_autodiscovered_tasks_are_known_to_the_cli(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """The example project registers its task through autodiscover_tasks(), as Django
    projects do: the command, in a fresh process, imports it and shows its lifetime."""
    env = {**os.environ, "REDIS_URL": redis_url, "DJANGO_SETTINGS_MODULE": "example_project.settings"}
    holder = f"cli-test-{uuid.uuid4().hex}"
    take = (
        "import django; django.setup()\n"
        "from celery_unique.conf import get_conf\n"
        "from example_project.loans.tasks import recompute_schedule as task\n"
        "key = task.unique_lock_key((424242,))\n"
        f"get_conf(task.app).locks.acquire(key, {holder!r}, 60_000)\n"
        "print(key)\n"
    )
    key = subprocess.run(
        [sys.executable, "-c", take], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "example_project", "unique", "locks"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        [line] = [line for line in listed.stdout.splitlines() if holder in line]
        assert line.split()[-1] == "lifetime=until_and_while_executing", line
    finally:
        redis_client.delete(key)


@pytest.fixture
def own_prefix(celery_app: Any, token: str) -> Iterator[str]:
    """The app's locks under a prefix of this test's, with a fast reaper; then back."""
    before = {name: celery_app.conf.get(name) for name in ("unique_key_prefix", "unique_reap_interval")}
    celery_app.conf.update(unique_key_prefix=f"cli-{token}", unique_reap_interval=3)
    get_conf(celery_app).reload()
    yield f"cli-{token}"
    celery_app.conf.update(before)
    get_conf(celery_app).reload()


def test_reap_frees_a_lock_without_a_message_and_a_dry_run_only_lists_it(
    celery_app: Any, store: LockStore, own_prefix: str, token: str
) -> None:
    key = sleeper.unique_lock_key((token,))
    assert key.startswith(own_prefix)
    assert store.acquire(key, f"lost-{token}#0123456789ab", 600_000).acquired  # never published
    queued = sleeper.apply_async((f"{token}-queued",), countdown=60)  # its message is in the broker
    try:
        dry = run("reap", "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert f"{key}  holder=lost-{token}  task={sleeper.name}  reason=no_message" in dry.output
        assert "would free 1 of 2 lock(s)" in dry.output
        assert store.owner(key)[0] == f"lost-{token}#0123456789ab"
        done = run("reap")
        assert done.exit_code == 0, done.output
        assert "freed 1 of 2 lock(s)" in done.output
        assert store.owner(key)[0] is None
        assert sleeper.unique_store().holder(sleeper.unique_lock_key((f"{token}-queued",)))[0] == queued.id
    finally:
        queued.revoke()
        release_held(store, sleeper.unique_lock_key((f"{token}-queued",)), queued.id)
