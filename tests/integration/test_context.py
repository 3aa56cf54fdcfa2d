"""Split contexts against a real Redis: parallel appends, views, compaction under a lock."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_unique import Context
from celery_unique.conf import get_conf
from celery_unique.exceptions import ConfigurationError


@pytest.fixture
def app(redis_url: str, unique_redis: Any) -> Iterator[Celery]:
    app = Celery("context-tests", broker=redis_url, set_as_current=False)
    unique_redis.apply(app)
    yield app
    get_conf(app).close()


@pytest.fixture
def context(app: Celery) -> Iterator[Context]:
    found = Context(app, f"ctx-{uuid.uuid4().hex}", ttl=300)
    yield found
    found.delete()


def _append_many(url: str, unique_redis: Any, name: str, writer: int, count: int) -> None:
    app = Celery("context-writer", broker=url, set_as_current=False)
    unique_redis.apply(app)
    shared = Context(app, name)
    for n in range(count):
        shared.append({f"w{writer}-{n}": n})
    get_conf(app).close()


def test_parallel_appends_from_processes_are_all_kept(
    redis_url: str, unique_redis: Any, context: Context
) -> None:
    spawn = multiprocessing.get_context("spawn")
    writers = [
        spawn.Process(target=_append_many, args=(redis_url, unique_redis, context.name, w, 200))
        for w in range(4)
    ]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
    assert all(process.exitcode == 0 for process in writers)
    base, entries = context.view()
    assert base is None and len(entries) == 800
    assert len(context.value()) == 800


def test_compaction_folds_the_log_and_keeps_later_entries(context: Context) -> None:
    for n in range(5):
        context.append({"step": n, f"k{n}": True})
    assert context.compact()
    base, entries = context.view()
    assert entries == [] and base == {"step": 4, "k0": True, "k1": True, "k2": True, "k3": True, "k4": True}
    context.append({"step": 5})
    assert context.value()["step"] == 5


def test_compaction_is_refused_while_another_holds_the_lock(context: Context) -> None:
    context.append({"a": 1})
    context.client.set(context.lock_key, "someone-else", px=10_000)
    assert not context.compact()
    assert context.view() == (None, [{"a": 1}])


def test_entries_appended_during_a_compaction_survive(context: Context) -> None:
    for n in range(3):
        context.append({f"early{n}": n})

    def merge_and_append_meanwhile(base: Any, entry: Any) -> Any:
        if "late" not in str(context.client.lrange(context.log_key, 0, -1)):
            context.append({"late": True})  # another job appends while we compact
        return {**(base or {}), **entry}

    assert context.compact(merge=merge_and_append_meanwhile)
    base, entries = context.view()
    assert base == {"early0": 0, "early1": 1, "early2": 2}
    assert entries == [{"late": True}]


def test_all_keys_of_a_context_share_one_hash_tag(context: Context) -> None:
    tags = {
        key[key.index("{") : key.index("}") + 1]
        for key in (context.base_key, context.log_key, context.lock_key)
    }
    assert len(tags) == 1


@pytest.mark.parametrize("name", ["", "a{b", "x}", "z" * 201])
def test_invalid_names_are_configuration_errors(app: Celery, name: str) -> None:
    with pytest.raises(ConfigurationError):
        Context(app, name)


def test_compaction_keeps_the_context_s_time_to_live(app: Celery) -> None:
    """Compacted, the base keeps an expiry: the context ends with its TTL, whichever
    process compacts it (one that knows the TTL, or one that does not)."""
    name = f"ctx-{uuid.uuid4().hex}"
    with_ttl, without = Context(app, name, ttl=300), Context(app, name)
    try:
        with_ttl.append({"a": 1})
        assert with_ttl.compact()
        assert 0 < with_ttl.client.pttl(with_ttl.base_key) <= 300_000
        with_ttl.append({"b": 2})
        assert without.compact()  # a compacting process that does not know the TTL
        assert 0 < with_ttl.client.pttl(with_ttl.base_key) <= 300_000
        assert without.value() == {"a": 1, "b": 2}
    finally:
        with_ttl.delete()
