"""Chord-free fan-in with a real worker: exactly-once callbacks, policies, deadlines."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis.cluster import RedisCluster

from celery_unique import aggregate, fan_in
from celery_unique.aggregate import COMPLETED, DEADLINE_TASK, DUPLICATE, aggregator
from celery_unique.conf import get_conf
from celery_unique.headers import FAN_IN_HEADER
from tests.integration.conftest import Events, Worker, wait_for
from tests.integration.worker_app import (
    FAN_UNIQUE_COLLECT,
    fan_collect,
    fan_errback,
    fan_in_fault_key,
    fan_key_info,
    fan_part,
    fan_part_killed_once,
    fan_worker,
    open_gate,
)


def text_of(command: Any) -> str:
    return command.decode() if isinstance(command, bytes) else command


def callbacks(events: Events) -> list[dict[str, Any]]:
    return [e for e in events() if e["event"] == "callback"]


def errbacks(events: Events) -> list[dict[str, Any]]:
    return [e for e in events() if e["event"] == "errback"]


@pytest.mark.worker
def test_1000_parts_fire_the_callback_once_with_every_payload(
    worker: Worker, token: str, events: Events
) -> None:
    handle = fan_in([fan_part.s(token, n) for n in range(1000)], fan_collect.s(token), timeout=120)
    wait_for(lambda: callbacks(events), timeout=120, worker=worker)
    worker.drain()  # a second callback or errback, if any, has run by now
    [done] = callbacks(events)
    assert done["results"] == {str(n): n * 2 for n in range(1000)}
    assert handle.state is None  # cleaned up


@pytest.mark.worker
def test_a_part_delivered_twice_counts_once(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    aggregator(celery_app).create(token, ["a", "b"], fan_collect.s(token))
    part_id = str(uuid.uuid4())
    for _ in range(2):  # the same message twice: same task id, same part
        fan_part.apply_async(
            (token, 1), task_id=part_id, headers={FAN_IN_HEADER: {"token": token, "part": "a"}}
        )
    wait_for(lambda: "a" in aggregator(celery_app).reports(token), timeout=10)
    worker.drain()  # both deliveries of "a" have run, and a callback either sent
    assert callbacks(events) == []  # "a" twice did not complete a set of two
    fan_part.apply_async((token, 2), headers={FAN_IN_HEADER: {"token": token, "part": "b"}})
    wait_for(lambda: callbacks(events), timeout=10)
    worker.drain()
    assert [c["results"] for c in callbacks(events)] == [{"a": 2, "b": 4}]


@pytest.mark.worker
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "collect",
            {
                "0": {"ok": True, "value": 0},
                "1": {"ok": False, "error": {"type": "ValueError", "message": "part 1 failed"}},
                "2": {"ok": True, "value": 4},
            },
        ),
        ("ignore", {"0": 0, "2": 4}),
    ],
)
def test_collect_and_ignore_policies(
    worker: Worker, token: str, events: Events, policy: str, expected: dict[str, Any]
) -> None:
    header = [fan_part.s(token, 0), fan_part.s(token, 1, fail=True), fan_part.s(token, 2)]
    fan_in(header, fan_collect.s(token), errback=fan_errback.s(token), policy=policy)
    wait_for(lambda: callbacks(events), timeout=20)
    worker.drain()
    assert [c["results"] for c in callbacks(events)] == [expected]
    assert errbacks(events) == []


@pytest.mark.worker
def test_fail_policy_fires_the_errback_once_and_never_the_callback(
    worker: Worker, token: str, events: Events
) -> None:
    header = [fan_part.s(token, n, fail=n in (3, 7)) for n in range(10)]
    handle = fan_in(header, fan_collect.s(token), errback=fan_errback.s(token), policy="fail")
    wait_for(lambda: errbacks(events), timeout=20)
    worker.drain()
    [failed] = errbacks(events)
    assert failed["info"]["reason"] == "failed" and failed["info"]["token"] == handle.token
    assert len(failed["info"]["failed"]) == 1  # the first failure closed the fan-in
    assert callbacks(events) == []


@pytest.mark.worker
def test_deadline_fires_the_errback_with_the_missing_parts(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    aggregator(celery_app).create(
        token, ["present", "late", "lost"], fan_collect.s(token), fan_errback.s(token), timeout=1.5
    )
    fan_part.apply_async((token, 1), headers={FAN_IN_HEADER: {"token": token, "part": "present"}})
    wait_for(lambda: errbacks(events), timeout=20, worker=worker)
    worker.drain()
    [expired] = errbacks(events)
    assert expired["info"]["reason"] == "expired"
    assert expired["info"]["missing"] == ["late", "lost"]
    assert callbacks(events) == []


@pytest.mark.worker
def test_a_deadline_longer_than_the_visibility_timeout_holds_no_message_and_fires_once(
    celery_app: Any, redis_url: str, redis_client: Any, token: str, events: Events
) -> None:
    # A deadline kept as a message would sit unacknowledged in the worker for the whole
    # timeout, and come back every visibility timeout: it lives in Redis instead.
    with Worker(redis_url, "short-visibility", env={"TEST_VISIBILITY_TIMEOUT": "1"}) as worker:
        created = time.time()
        aggregator(celery_app).create(
            token, ["present", "lost"], fan_collect.s(token), fan_errback.s(token), timeout=4
        )
        fan_part.apply_async((token, 1), headers={FAN_IN_HEADER: {"token": token, "part": "present"}})
        wait_for(lambda: "present" in aggregator(celery_app).reports(token), timeout=20, worker=worker)
        # The part has run: while the fan-in waits for its deadline, no worker holds a message.
        wait_for(lambda: redis_client.hlen("unacked") == 0, timeout=10, worker=worker)
        assert errbacks(events) == []
        wait_for(lambda: errbacks(events), timeout=30, worker=worker)
        worker.drain()
        [expired] = errbacks(events)
        log = worker.whole_log()
    assert expired["info"]["missing"] == ["lost"]
    assert expired["time"] - created >= 4  # not before its deadline
    assert f"{DEADLINE_TASK}[" not in log  # no deadline message was ever received, nor again
    assert callbacks(events) == []


@pytest.mark.worker
def test_a_part_killed_mid_run_is_redelivered_and_the_fan_in_completes_once(
    worker: Worker, token: str, events: Events
) -> None:
    header = [fan_part.s(token, 0), fan_part_killed_once.s(token, 1), fan_part.s(token, 2)]
    fan_in(header, fan_collect.s(token), timeout=60)
    wait_for(lambda: callbacks(events), timeout=60, worker=worker)
    worker.drain()
    assert [c["results"] for c in callbacks(events)] == [{"0": 0, "1": 2, "2": 4}]


@pytest.mark.worker
@pytest.mark.parametrize("fault", ["kill", "refuse"])
@pytest.mark.parametrize("policy", ["fail", "collect"])
def test_the_callback_is_published_once_when_the_completing_process_dies_or_the_broker_refuses(
    worker: Worker, redis_client: Any, token: str, events: Events, fault: str, policy: str
) -> None:
    """The fan-in has no timeout and its parts are not acks_late: nothing but the plugin
    itself can finish what the completing child left. With policy "fail" the first part
    fails, so it is the errback that must go out once."""
    redis_client.set(fan_in_fault_key(token), fault)
    failing = policy == "fail"
    handle = fan_in(
        [fan_part.s(token, 0, fail=failing), fan_part.s(token, 1), fan_part.s(token, 2)],
        fan_collect.s(token),
        fan_errback.s(token),
        policy=policy,
        token=token,  # the fan-in's token: the one its fault is keyed on
    )
    wait_for(lambda: (errbacks if failing else callbacks)(events), timeout=60, worker=worker)
    wait_for(lambda: handle.state is None, timeout=30, worker=worker)  # finished: nothing can send another
    worker.drain()
    assert not redis_client.exists(fan_in_fault_key(token))  # the fault was met
    if failing:
        [failed] = errbacks(events)
        assert failed["info"]["reason"] == "failed" and callbacks(events) == []
    else:
        assert [c["results"] for c in callbacks(events)] == [
            {"0": {"ok": True, "value": 0}, "1": {"ok": True, "value": 2}, "2": {"ok": True, "value": 4}}
        ]
        assert errbacks(events) == []


@pytest.mark.worker
def test_named_parts_of_different_task_types(worker: Worker, token: str, events: Events) -> None:
    fan_in(
        {
            "key-info": fan_key_info.s(token),
            "worker1": fan_worker.s(token, 1),
            "worker2": fan_worker.s(token, 2),
        },
        fan_collect.s(token),
    )
    wait_for(lambda: callbacks(events), timeout=20)
    worker.drain()
    assert [c["results"] for c in callbacks(events)] == [
        {"key-info": {"key": f"k-{token}"}, "worker1": "worker1 done", "worker2": "worker2 done"}
    ]


@pytest.mark.worker
def test_parts_store_no_result_in_the_backend_unless_asked(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    """The context carries each part's result to the callback: a part's result is not
    also written to the result backend, unless its signature asks for it."""
    quiet, kept = uuid.uuid4().hex, uuid.uuid4().hex
    header = {
        "quiet": fan_worker.s(token, 1).set(task_id=quiet),
        "kept": fan_worker.s(token, 2).set(task_id=kept, ignore_result=False),
    }
    fan_in(header, fan_collect.s(token))
    wait_for(lambda: callbacks(events), timeout=20)
    worker.drain()
    assert [c["results"] for c in callbacks(events)] == [{"quiet": "worker1 done", "kept": "worker2 done"}]
    meta = celery_app.backend.get_task_meta
    wait_for(lambda: meta(kept)["status"] == "SUCCESS", worker=worker)
    assert meta(quiet)["status"] == "PENDING"


def test_reports_outside_the_worker_and_unknown_parts(celery_app: Any, token: str) -> None:
    agg = aggregator(celery_app)
    agg.create(token, ["x"], fan_collect.s(token))
    assert agg.report(token, "nope", value=1) == -2
    assert agg.report(f"{token}-missing", "x", value=1) == -2
    assert agg.reports(token) == {}
    agg.client.delete(agg.key(token))


def test_two_creators_of_one_token_cannot_both_win(celery_app: Any, token: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from celery_unique.exceptions import ConfigurationError

    agg = aggregator(celery_app)

    def create(_: int) -> bool:
        try:
            agg.create(token, ["x"], fan_collect.s(token))
        except ConfigurationError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(create, range(8))) == [False] * 7 + [True]
    agg.client.delete(agg.key(token))


def test_a_retried_create_finds_its_own_context(celery_app: Any, token: str) -> None:
    # What a client retry does after the reply to a create that ran was lost.
    agg = aggregator(celery_app)
    key, ttl_ms, fields = agg.key(token), 60_000, ["remaining", 1, "state", "open", "e:x", 1]
    assert agg._create(keys=[key], args=[ttl_ms, "creator-1", "", *fields]) == 1
    assert agg._create(keys=[key], args=[ttl_ms, "creator-1", "", *fields]) == 1
    assert agg._create(keys=[key], args=[ttl_ms, "creator-2", "", *fields]) == 0
    agg.client.delete(key)


def test_a_big_fan_in_is_written_in_calls_that_each_hold_redis_briefly(
    celery_app: Any, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aggregate, "PARTS_PER_CALL", 1000)  # a smaller call: the same path, sooner
    agg = aggregator(celery_app)
    names = [f"part:{n}*[{{" for n in range(5500)]
    # The server that holds the context: the locks' Redis (a cluster's node for its slot).
    redis_client = agg.client
    if isinstance(redis_client, RedisCluster):
        redis_client = redis_client.get_redis_connection(redis_client.get_node_from_key(agg.key(token)))
    slowlog = (redis_client.config_get("slowlog-log-slower-than"), redis_client.config_get("slowlog-max-len"))
    redis_client.config_set("slowlog-log-slower-than", 0)  # every command, with its arguments
    redis_client.config_set("slowlog-max-len", 10_000)
    redis_client.slowlog_reset()
    try:
        agg.create(token, names, fan_collect.s(token), timeout=60)
        logged = redis_client.slowlog_get(10_000)
    finally:
        for setting in slowlog:
            redis_client.config_set(*next(iter(setting.items())))
    writes = [e for e in logged if text_of(e["command"]).startswith("EVALSHA")]
    # SLOWLOG shows 31 arguments and then "... (N more arguments)".
    sizes = [31 + int(re.search(r"\((\d+) more arguments\)", text_of(e["command"]))[1]) for e in writes]
    # Six calls (a NOSCRIPT answered one is sent again), none above 1,000 parts and the context's fields.
    assert len(writes) >= 6 and max(sizes) <= 2 * 1000 + 40
    key = agg.key(token)
    try:
        assert {f"e:{name}".encode() for name in names} <= set(redis_client.hkeys(key))
        for name in names[:-1]:
            assert agg._report(keys=[key], args=[name, "{}", "1", "fail", "c", 60_000]) == 0
        assert agg._report(keys=[key], args=[names[-1], "{}", "1", "fail", "closer", 60_000]) == COMPLETED
    finally:
        redis_client.delete(key)


def one_part_fan_in(celery_app: Any, token: str) -> tuple[Any, str, Callable[..., int]]:
    """(aggregator, context key, report of its one part "a" by a claimant) of a new fan-in."""
    agg = aggregator(celery_app)
    agg.create(token, ["a"], fan_collect.s(token))
    key = agg.key(token)

    def report(claimant: str, claim_ms: int = 60_000) -> int:
        payload = '{"ok": true, "value": 1}'
        return int(agg._report(keys=[key], args=["a", payload, "1", "", claimant, claim_ms]))

    return agg, key, report


def test_a_report_asked_again_by_its_own_closer_gets_its_claim_back(celery_app: Any, token: str) -> None:
    """A report whose reply was lost, sent again with the same claimant (a client's retry):
    the claim it took is its own, so it publishes now instead of waiting for the sweep."""
    agg, key, report = one_part_fan_in(celery_app, token)
    try:
        assert report("closer") == COMPLETED
        assert report("closer") == COMPLETED
        assert report("other") == DUPLICATE
    finally:
        agg.client.delete(key)


def test_a_part_reported_again_takes_over_a_lapsed_claim(celery_app: Any, token: str) -> None:
    """The closer claimed the publishing and never published (it died): a part reported
    again (a redelivery) gets the claim once it lapsed, and must publish."""
    agg, key, report = one_part_fan_in(celery_app, token)
    try:
        assert report("closer", 300) == COMPLETED
        assert report("other") == DUPLICATE
        # Once the closer's 0.3 s claim lapsed, the redelivered report takes it over.
        retaken = wait_for(lambda: report("redelivery") == COMPLETED, timeout=10)
        assert retaken and agg.client.hget(key, "claim") == b"redelivery"
        # A live claim is not taken over.
        assert report("late") == DUPLICATE
        # The callback began to run (it was published): nothing takes the claim over, and the
        # context goes.
        agg.started(token)
        agg.client.hset(key, "until", 0)
        assert report("late") == DUPLICATE
        assert not agg.client.exists(key)
    finally:
        agg.client.delete(key)
        agg.client.zrem(agg.due, token)


def _report(token: str, part: str, number: int) -> None:
    fan_part.apply_async((token, number), headers={FAN_IN_HEADER: {"token": token, "part": part}})


@pytest.mark.worker
@pytest.mark.parametrize("forged", ["callback", "report"])
def test_a_forged_callback_or_report_is_refused_and_nothing_is_published(
    worker: Worker, celery_app: Any, redis_client: Any, token: str, events: Events, forged: str
) -> None:
    """A client that may write the plugin's key prefix rewrites a pending fan-in: its callback
    (a task, arguments and queue of its choosing), or a part's report (the callback's
    arguments). The worker publishes nothing, says so, and the fan-in is closed for good."""
    agg = aggregator(celery_app)
    handle = agg.create(token, ["a", "b"], fan_collect.s(token))
    key, queue = agg.key(token), f"forged-{token}"
    if forged == "callback":
        injected = dict(fan_collect.s({"FORGED": True}, token).set(queue=queue))
        agg.client.hset(key, "callback", json.dumps(injected))
        _report(token, "a", 1)
    else:
        agg.client.hset(key, mapping={"p:a": json.dumps({"ok": True, "value": "FORGED"}), "remaining": 1})
    _report(token, "b", 2)
    what = "fan-in callback" if forged == "callback" else "fan-in part's report"
    refused = f"fan-in {token}: nothing published: a stored {what} did not verify"
    wait_for(lambda: refused in worker.whole_log(), worker=worker)
    assert handle.state == "refused"
    worker.drain()
    assert callbacks(events) == [] and redis_client.llen(queue) == 0
    assert agg.client.zscore(agg.due, token) is None  # off the sweep: nothing takes it over again
    assert worker.whole_log().count(refused) == 1
    agg.client.delete(key)


@pytest.mark.worker
def test_a_producer_and_a_worker_with_different_keys_fail_loudly_at_the_first_fan_in(
    worker: Worker, celery_app: Any, token: str, events: Events
) -> None:
    conf = get_conf(celery_app)
    celery_app.conf.unique_signing_key = "a-key-the-worker-does-not-know"
    conf.reload()
    try:
        handle = aggregator(celery_app).create(token, ["a"], fan_collect.s(token))
    finally:
        celery_app.conf.unique_signing_key = "test-signing-key"
        conf.reload()
    _report(token, "a", 1)
    refused = f"fan-in {token}: nothing published: a stored fan-in callback did not verify"
    wait_for(lambda: refused in worker.whole_log(), worker=worker)
    assert handle.state == "refused" and callbacks(events) == []
    aggregator(celery_app).client.delete(handle.key)


@pytest.mark.worker
@pytest.mark.parametrize("lifetime", sorted(FAN_UNIQUE_COLLECT))
def test_a_unique_callback_whose_key_is_held_still_runs_for_its_fan_in(
    worker: Worker, token: str, events: Events, redis_client: Any, lifetime: str
) -> None:
    """Two fan-ins whose callbacks have one key: the second completes while the
    first one's callback runs. Dropping its callback as a duplicate (at delay() or
    at the run) would lose its results; it runs, after the first where the lock
    guards runs."""
    collect = FAN_UNIQUE_COLLECT[lifetime]
    fan_in([fan_part.s(token, 1)], collect.s(token, gated=True))
    wait_for(lambda: callbacks(events), timeout=60, worker=worker)  # the first callback holds the key
    second = fan_in([fan_part.s(token, 2)], collect.s(token))
    wait_for(lambda: second.state is None, timeout=60, worker=worker)  # completed: its callback published
    if lifetime != "until_executed":  # a running lock: the second callback's run meets the first's,
        # and goes on meeting it past the task's max_retries (3): it is never given up.
        met = re.compile(rf"{re.escape(collect.name)}\[[^]]*\]: lock \w+ is held by")
        limit = collect.max_retries + 2
        wait_for(lambda: len(met.findall(worker.whole_log())) >= limit, timeout=60, worker=worker)
    open_gate(redis_client, token)
    wait_for(lambda: len(callbacks(events)) >= 2, timeout=60, worker=worker)
    worker.drain()
    assert sorted(done["results"]["0"] for done in callbacks(events)) == [2, 4]
