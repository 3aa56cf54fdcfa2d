"""Producer side against a real Redis: what delay() publishes, returns and raises.

No worker consumes this app's queue, so every published message stays in the
Redis list and can be inspected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from kombu.exceptions import OperationalError

from celery_unique import (
    ConfigurationError,
    DuplicateTaskError,
    LockBackendError,
    UniqueKeyError,
    UniqueTask,
    fan_in,
)
from celery_unique.conf import get_conf
from celery_unique.headers import HEADER, RUN_OWNER_HEADER
from celery_unique.locks import new_owner, task_id_of
from celery_unique.orphans import releaser
from tests.integration.conftest import require_service

QUEUE = "producer-tests"


def build_app(broker: str, lock_redis: str, **conf: Any) -> Celery:
    """A fresh app; the ``apps`` fixture closes it (and its Redis connections)."""
    app = Celery("producer-tests", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        unique_redis_url=lock_redis,
        task_publish_retry=False,
        broker_connection_timeout=1,
        **conf,
    )

    @app.task(base=UniqueTask, name="producer.job", unique_on=("item",), shared=False)
    def job(item: Any, note: str = "") -> Any:
        return item

    @app.task(name="producer.plain", shared=False)
    def plain(*args: Any) -> None: ...

    return app


@pytest.fixture
def apps() -> Iterator[Any]:
    built: list[Celery] = []

    def make(broker: str, lock_redis: str, **conf: Any) -> Celery:
        built.append(build_app(broker, lock_redis, **conf))
        return built[-1]

    yield make
    for app in built:
        get_conf(app).close()
        app.close()


@pytest.fixture
def app(apps: Any, redis_url: str, unique_redis: Any) -> Celery:
    app: Celery = apps(redis_url, redis_url)
    unique_redis.apply(app)  # the locks where this run keeps them (--unique-redis)
    return app


@pytest.fixture
def item() -> str:
    return uuid.uuid4().hex


def queued(redis_client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(m) for m in redis_client.lrange(QUEUE, 0, -1)]


def queued_ids(redis_client: redis.Redis) -> list[str]:
    return [m["headers"]["id"] for m in queued(redis_client)]


def test_message_headers_carry_the_lock_key_and_owner(
    app: Celery, item: str, redis_client: redis.Redis
) -> None:
    job = app.tasks["producer.job"]
    result = job.delay(item)
    message = next(m for m in queued(redis_client) if m["headers"]["id"] == result.id)
    header = message["headers"][HEADER]
    key = job.unique_lock_key((item,))
    assert header == {"key": key, "owner": header["owner"], "timeout": 3600.0}
    # The owner is the message's own: its task id and a suffix made for this call, held in the lock.
    assert header["owner"].startswith(f"{result.id}#") and task_id_of(header["owner"]) == result.id
    assert get_conf(app).locks.client.get(key) == header["owner"].encode()
    assert item not in message["headers"][HEADER]["key"]  # digests only, never raw arguments


def test_duplicate_returns_the_holder_and_publishes_nothing(
    app: Celery, item: str, redis_client: redis.Redis
) -> None:
    job = app.tasks["producer.job"]
    first = job.delay(item)
    before = redis_client.llen(QUEUE)
    again = job.delay(item, note="other notes are not part of the key")
    assert again.duplicate and not first.duplicate
    assert again.id == first.id
    assert redis_client.llen(QUEUE) == before


def test_a_caller_chosen_task_id_is_not_published_twice(
    app: Celery, item: str, redis_client: redis.Redis
) -> None:
    job = app.tasks["producer.job"]
    first = job.apply_async((item,), task_id=f"report-{item}")
    again = job.apply_async((item,), task_id=f"report-{item}")
    assert not first.duplicate and again.duplicate
    assert queued_ids(redis_client).count(f"report-{item}") == 1


class _Stalled:
    """A lock store whose Redis does not answer: the releases given to the releaser wait."""

    cluster = False

    def release_all(self, keys: list[str], owner: str, done_ttl_ms: int | None = None) -> int:
        raise redis.TimeoutError("stalled")


@pytest.mark.parametrize("task_id", ["", "report:*[{#x}"])
def test_a_call_takes_over_a_lock_this_process_gave_up_on(
    app: Celery, item: str, task_id: str, redis_client: redis.Redis
) -> None:
    """A call that gave up (its reply lost) left a lock that landed late; until the releaser
    frees it, the next call of the key in this process takes it over, whatever its id."""
    job = app.tasks["producer.job"]
    key = job.unique_lock_key((item,))
    stalled = _Stalled()
    given_up = new_owner(task_id or "an-earlier-call")
    job.unique_store().acquire(key, given_up, 60_000)  # the late acquire of the call that gave up
    releaser.release_later(stalled, key, given_up)
    try:
        again = job.apply_async((item,), task_id=task_id or None)
    finally:
        del stalled  # its releases are dropped
    assert not again.duplicate
    assert queued_ids(redis_client).count(again.id) == 1
    owner = get_conf(app).locks.client.get(key).decode()
    assert owner != given_up and task_id_of(owner) == again.id


def test_on_duplicate_raise_carries_holder_and_ttl(app: Celery, item: str) -> None:
    job = app.tasks["producer.job"]
    first = job.delay(item)
    with pytest.raises(DuplicateTaskError) as info:
        job.apply_async((item,), unique_options={"on_duplicate": "raise"})
    assert info.value.existing_id == first.id
    assert info.value.ttl is not None and 3500 < info.value.ttl <= 3600
    assert item not in str(info.value)


def test_on_duplicate_ignore_returns_none(app: Celery, item: str) -> None:
    job = app.tasks["producer.job"]
    job.delay(item)
    assert job.apply_async((item,), unique_options={"on_duplicate": "ignore"}) is None


def test_app_default_on_duplicate(apps: Any, redis_url: str, item: str) -> None:
    app = apps(redis_url, redis_url, unique_default_on_duplicate="raise")
    app.tasks["producer.job"].delay(item)
    with pytest.raises(DuplicateTaskError):
        app.tasks["producer.job"].delay(item)


def test_lock_ttl_covers_countdown_and_eta(app: Celery) -> None:
    job = app.tasks["producer.job"]
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    job.apply_async((first,), countdown=100, unique_options={"lock_timeout": 10})
    ttl = job.unique_store().holder(job.unique_lock_key((first,)))[1]
    assert ttl is not None and 105 < ttl <= 110
    eta = datetime.now(timezone.utc) + timedelta(seconds=200)
    job.apply_async((second,), eta=eta, unique_options={"lock_timeout": 10})
    ttl = job.unique_store().holder(job.unique_lock_key((second,)))[1]
    assert ttl is not None and 205 < ttl <= 210


def test_options_follow_a_changed_attribute_and_reloaded_settings(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delay() resolves a task's options once; a changed task attribute, or settings
    read anew (Django's setting_changed), are followed at the next call."""
    job = app.tasks["producer.job"]

    def ttl_of_a_new_call() -> float:
        argument = uuid.uuid4().hex
        job.delay(argument)
        ttl = job.unique_store().holder(job.unique_lock_key((argument,)))[1]
        assert ttl is not None
        return ttl

    assert 3590 < ttl_of_a_new_call() <= 3600
    monkeypatch.setattr(job, "lock_timeout", 50)
    assert 40 < ttl_of_a_new_call() <= 50
    monkeypatch.setattr(job, "lock_timeout", None)
    monkeypatch.setitem(app.conf, "unique_lock_timeout", 70)
    assert 3590 < ttl_of_a_new_call() <= 3600  # settings are read once...
    get_conf(app).reload()
    assert 60 < ttl_of_a_new_call() <= 70  # ...and again when told
    monkeypatch.setattr(job, "on_duplicate", "raise")
    same = uuid.uuid4().hex
    job.delay(same)
    with pytest.raises(DuplicateTaskError):
        job.delay(same)
    monkeypatch.setattr(job, "on_duplicate", "bogus")
    with pytest.raises(ConfigurationError, match="on_duplicate"):
        job.delay(uuid.uuid4().hex)


def test_a_class_that_resolves_its_own_timeout_is_asked_at_each_call(app: Celery) -> None:
    """The compat classes derive the timeout from other settings: never kept."""
    timeouts = [30.0]

    class OwnTimeout(UniqueTask):  # type: ignore[misc]
        @property
        def unique_lock_timeout(self) -> float:
            return timeouts[0]

    @app.task(base=OwnTimeout, name="producer.own_timeout", shared=False)
    def own(x: str) -> None: ...

    class TimeoutMixin:  # not a UniqueTask: found all the same
        @property
        def unique_lock_timeout(self) -> float:
            return timeouts[0]

    class Mixed(TimeoutMixin, UniqueTask):  # type: ignore[misc]
        pass

    @app.task(base=Mixed, name="producer.mixed_timeout", shared=False)
    def mixed(x: str) -> None: ...

    for task in (own, mixed):
        for timeout in (30.0, 90.0):
            timeouts[0] = timeout
            argument = uuid.uuid4().hex
            task.delay(argument)
            ttl = task.unique_store().holder(task.unique_lock_key((argument,)))[1]
            assert ttl is not None and timeout - 10 < ttl <= timeout


def test_an_empty_task_id_is_none_as_celery_has_it(app: Celery, item: str) -> None:
    job = app.tasks["producer.job"]
    result = job.apply_async((item,), task_id="")
    assert result.id
    held_by = job.unique_store().holder(job.unique_lock_key((item,)))[0]
    assert held_by is not None and task_id_of(held_by) == result.id


def test_failed_publish_frees_its_lock(apps: Any, redis_url: str, item: str) -> None:
    app = apps("redis://127.0.0.1:1/0", redis_url)  # the broker is down, Redis for locks is up
    job = app.tasks["producer.job"]
    with pytest.raises(OperationalError):
        job.delay(item)
    assert job.unique_store().holder(job.unique_lock_key((item,))) == (None, None)
    with pytest.raises(OperationalError):
        job.delay(item)  # not a duplicate: the failed publish left no lock


def test_unknown_unique_option_is_a_configuration_error(app: Celery, item: str) -> None:
    with pytest.raises(ConfigurationError, match="nope"):
        app.tasks["producer.job"].apply_async((item,), unique_options={"nope": 1})


def test_unserialisable_argument_raises_and_publishes_nothing(app: Celery, redis_client: redis.Redis) -> None:
    before = redis_client.llen(QUEUE)
    with pytest.raises(UniqueKeyError):
        app.tasks["producer.job"].delay(object())
    assert redis_client.llen(QUEUE) == before


@pytest.fixture
def released_later(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The background releases asked for during the test (recorded, not run)."""
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(releaser, "release_later", lambda *args: calls.append(args))
    return calls


def test_redis_outage_raises_lock_backend_error_and_publishes_nothing(
    apps: Any,
    redis_url: str,
    item: str,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    released_later: list[tuple[Any, ...]],
) -> None:
    app = apps(redis_url, "redis://127.0.0.1:1/0", unique_redis_connect_timeout=0.5)
    before = redis_client.llen(QUEUE)
    for _ in range(2):  # the first call, and one after it (a client already built)
        with (
            caplog.at_level(logging.WARNING, logger="celery_unique"),
            pytest.raises(LockBackendError) as info,
        ):
            app.tasks["producer.job"].delay(item)
        assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert redis_client.llen(QUEUE) == before
    # Refused: no lock can have been taken, so none is released, now or later.
    assert released_later == []
    assert "could not be released" not in caplog.text


def test_a_redis_failure_names_the_address_and_never_the_password(
    apps: Any, redis_url: str, item: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py 8's repr of its errors is a category ("network:ConnectionError"), and a
    timeout's message names no server: the error says where, without the password."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        app = apps(
            redis_url,
            f"redis://someone:s3cret-pw@127.0.0.1:{port}/0",
            unique_redis_socket_timeout=0.3,
            unique_redis_connect_timeout=0.3,
        )
        with pytest.raises(LockBackendError) as timed_out:
            app.tasks["producer.job"].delay(item)
    refused = apps(redis_url, "redis://127.0.0.1:1/0", unique_redis_connect_timeout=0.5)
    with pytest.raises(LockBackendError) as refusal:
        refused.tasks["producer.job"].delay(item)
    for error, where in ((timed_out.value, f"127.0.0.1:{port}"), (refusal.value, "127.0.0.1:1")):
        said = str(error)
        assert where in said and "s3cret-pw" not in said and "network:" not in said, said
        assert type(error.__cause__).__name__ in said, said


@pytest.fixture
def not_redis() -> Iterator[int]:
    """The port of a server that answers every connection as an HTTP server would."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    with server:
        yield server.getsockname()[1]


def test_an_address_that_is_not_redis_is_named_and_no_lock_is_released_later(
    apps: Any,
    redis_url: str,
    item: str,
    not_redis: int,
    caplog: pytest.LogCaptureFixture,
    released_later: list[tuple[Any, ...]],
) -> None:
    app = apps(redis_url, f"redis://127.0.0.1:{not_redis}/0", unique_redis_socket_timeout=1)
    with caplog.at_level(logging.WARNING, logger="celery_unique"), pytest.raises(LockBackendError) as info:
        app.tasks["producer.job"].delay(item)
    said = str(info.value)
    assert f"127.0.0.1:{not_redis}" in said and "not a Redis server" in said, said
    # Whatever answered is no Redis: no lock can have been taken, none is released.
    assert released_later == []
    assert "could not be released" not in caplog.text


def test_redis_outage_with_allow_publishes_without_dedup(
    apps: Any,
    redis_url: str,
    item: str,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    released_later: list[tuple[Any, ...]],
) -> None:
    app = apps(
        redis_url, "redis://127.0.0.1:1/0", unique_on_redis_error="allow", unique_redis_connect_timeout=0.5
    )
    with caplog.at_level(logging.WARNING, logger="celery_unique"):
        result = app.tasks["producer.job"].delay(item)
        again = app.tasks["producer.job"].delay(item)
    assert {result.id, again.id} <= set(queued_ids(redis_client))
    assert caplog.text.count("without a uniqueness check") == 2
    assert "could not be released" not in caplog.text and released_later == []
    assert HEADER not in next(m for m in queued(redis_client) if m["headers"]["id"] == result.id)["headers"]


def test_canvas_members_are_published_without_dedup(
    apps: Any, redis_url: str, item: str, redis_client: redis.Redis
) -> None:
    app = apps(redis_url, redis_url, result_backend="cache+memory://")  # chords need one
    job = app.tasks["producer.job"]
    job.delay(item)  # holds the key: a deduplicated member would be lost
    before = redis_client.llen(QUEUE)
    group(job.s(item), job.s(item)).apply_async()
    chain(job.s(item), app.tasks["producer.plain"].s()).apply_async()
    chord([job.s(item)], app.tasks["producer.plain"].s()).apply_async()
    assert redis_client.llen(QUEUE) - before == 4
    # A caller's own link= is not canvas machinery: that call is deduplicated.
    assert job.apply_async((item,), link=app.tasks["producer.plain"].s()).duplicate


def test_canvas_members_can_be_refused(apps: Any, redis_url: str, item: str) -> None:
    app = apps(redis_url, redis_url, unique_on_canvas="raise")
    with pytest.raises(ConfigurationError, match=r"canvas|group"):
        group(app.tasks["producer.job"].s(item)).apply_async()


def test_eager_mode_runs_and_releases(apps: Any, redis_url: str, item: str) -> None:
    app = apps(redis_url, redis_url, task_always_eager=True)
    job = app.tasks["producer.job"]
    assert job.delay(item).get() == item
    assert job.unique_store().holder(job.unique_lock_key((item,))) == (None, None)


def test_lock_store_is_shared_per_app(app: Celery) -> None:
    assert get_conf(app).locks is app.tasks["producer.job"].unique_store()


# -- a non-Redis broker: locks in Redis, messages in RabbitMQ ----------------

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture
def amqp_app(apps: Any, redis_url: str) -> Iterator[Celery]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    app = apps(AMQP_URL, redis_url)
    app.conf.task_default_queue = f"{QUEUE}-{uuid.uuid4().hex[:8]}"
    yield app
    with app.connection_for_write() as connection:
        connection.default_channel.queue_delete(app.conf.task_default_queue)


def test_rabbitmq_broker_deduplicates_and_publishes_once(amqp_app: Celery, item: str) -> None:
    job = amqp_app.tasks["producer.job"]
    first = job.delay(item)
    assert job.delay(item).id == first.id
    with amqp_app.connection_for_write() as connection:
        _, count, _ = connection.default_channel.queue_declare(amqp_app.conf.task_default_queue, passive=True)
    assert count == 1


def test_a_duplicate_stopped_at_the_gate_leaves_no_result_subscription(
    apps: Any, redis_url: str, item: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import signals

    from celery_unique import publish
    from celery_unique.publish import DuplicateHints

    app = apps(redis_url, redis_url, result_backend=redis_url)
    job = app.tasks["producer.job"]
    first = job.delay(item)
    monkeypatch.setattr(publish, "hints", DuplicateHints())  # the next call takes the gated path
    attempted: list[str] = []

    def seen(headers: dict[str, Any] | None = None, **_: Any) -> None:
        attempted.append((headers or {})["id"])

    signals.before_task_publish.connect(seen, weak=False)
    try:
        assert job.delay(item).id == first.id
    finally:
        signals.before_task_publish.disconnect(seen)
    assert len(attempted) == 1 and attempted[0] != first.id  # built, then stopped at the gate
    consumer = app.backend.result_consumer
    stopped_key = app.backend.get_key_for_task(attempted[0]).decode()
    assert all((k.decode() if isinstance(k, bytes) else k) != stopped_key for k in consumer.subscribed_to)
    consumer.stop()


# -- option combinations and idempotent calls on the producer ------------------------


def test_while_executing_refuses_an_idempotency_key_and_per_call_unique_on(apps: Any, redis_url: str) -> None:
    app = apps(redis_url, redis_url)

    @app.task(base=UniqueTask, shared=False, name="producer.while", lock="while_executing", idempotent=True)
    def while_job(item: str) -> None: ...

    with pytest.raises(ConfigurationError, match="while_executing"):
        while_job.apply_async(("x",), idempotency_key="k")
    with pytest.raises(ConfigurationError, match="while_executing"):
        while_job.apply_async(("x",), unique_options={"unique_on": ("item",)})


@pytest.mark.parametrize("lifetime", ["until_executing", "until_expired"])
def test_idempotent_needs_a_lock_held_while_running(apps: Any, redis_url: str, lifetime: str) -> None:
    app = apps(redis_url, redis_url)

    @app.task(base=UniqueTask, shared=False, name=f"producer.idem.{lifetime}", lock=lifetime, idempotent=True)
    def job(item: str) -> None: ...

    with pytest.raises(ConfigurationError, match="holds the lock while running"):
        job.delay("x")


def test_idempotent_call_honours_the_allow_policy(
    apps: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    app = apps(
        redis_url, "redis://127.0.0.1:1/0", unique_on_redis_error="allow", unique_redis_connect_timeout=0.5
    )

    @app.task(base=UniqueTask, shared=False, name="producer.idem.allow", idempotent=True)
    def job(item: str) -> None: ...

    result = job.delay("x")
    assert result.id in queued_ids(redis_client)


def test_a_mixin_run_replays_a_stored_outcome(apps: Any, redis_url: str, item: str) -> None:
    from celery_unique import idempotency

    app = apps(redis_url, redis_url, task_always_eager=True)
    runs: list[str] = []

    class ChargeMixin:
        def run(self, order: str) -> str:
            runs.append(order)
            return f"charged {order}"

    class Charge(ChargeMixin, UniqueTask):
        name = "producer.mixin_charge"
        idempotent = True

    charge = app.register_task(Charge())
    family = charge.unique_lock_key((item,)).rpartition(":")[0]
    stored = idempotency.encode_success("earlier-id", charge.arguments_digest((item,)), "charged before")
    charge.unique_store().client.set(family + ":result", stored, px=60_000)
    assert charge.apply((item,)).get() == "charged before"
    assert runs == []


def test_a_key_function_in_the_decorator_deduplicates_delay(
    apps: Any, redis_url: str, item: str, redis_client: redis.Redis
) -> None:
    app = apps(redis_url, redis_url)

    def by_order(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[0]

    @app.task(base=UniqueTask, name="producer.keyed", unique_on=by_order, shared=False)
    def keyed(order: str, note: str) -> None: ...

    first = keyed.delay(item, "first")
    again = keyed.delay(item, "second")
    assert again.duplicate and again.id == first.id
    assert not keyed.delay(item + "-other", "first").duplicate
    assert queued_ids(redis_client).count(first.id) == 1


@pytest.mark.parametrize("on_canvas", ["bypass", "dedupe", "raise"])
def test_fan_in_parts_are_never_deduplicated(
    apps: Any, redis_url: str, item: str, redis_client: redis.Redis, on_canvas: str
) -> None:
    """Whatever unique_on_canvas says (it is about Celery's canvas): a dropped part
    would leave its fan-in waiting."""
    app = apps(redis_url, redis_url, unique_on_canvas=on_canvas, unique_signing_key="test-signing-key")
    job = app.tasks["producer.job"]
    held = job.delay(item)
    before = redis_client.llen(QUEUE)
    fan_in([job.s(item), job.s(item)], app.tasks["producer.plain"].s())
    assert redis_client.llen(QUEUE) - before == 2
    assert job.delay(item).id == held.id  # the parts took no lock: the key is still the first call's


def test_while_executing_messages_get_their_own_running_lock_owner(
    apps: Any, redis_url: str, item: str, redis_client: redis.Redis
) -> None:
    """Each call's message its own owner, also under one caller-chosen task id; the
    running message published again by its run (replace() carries no headers) its run's."""
    app = apps(redis_url, redis_url)

    @app.task(base=UniqueTask, shared=False, name="producer.while_owner", lock="while_executing")
    def while_job(item: str) -> None: ...

    def owners_of(task_id: str) -> list[str]:
        found = [m["headers"] for m in queued(redis_client)]
        return [headers.get(RUN_OWNER_HEADER) for headers in found if headers["id"] == task_id]

    fixed = f"fixed-{item}"
    while_job.apply_async((item,), task_id=fixed)
    while_job.apply_async((item,), task_id=fixed)
    first, second = owners_of(fixed)
    assert task_id_of(first) == task_id_of(second) == fixed and first != second
    running = f"running-{item}"
    owner = new_owner(running)
    while_job.push_request(id=running, called_directly=False, **{RUN_OWNER_HEADER: owner})
    try:
        while_job.apply_async((item,), task_id=running)
    finally:
        while_job.pop_request()
    assert owners_of(running) == [owner]
