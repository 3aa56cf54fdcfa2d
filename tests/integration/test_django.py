"""Django integration: real Django, real databases (SQLite and PostgreSQL), real Redis.

Every transaction test runs on both database aliases; PostgreSQL is the
service on 127.0.0.1:5432 (database ``test``). Its absence fails the suite
under ``CI=true`` and skips those cases elsewhere, with the reason.
"""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from celery_unique.conf import get_conf
from tests.integration.conftest import PG_HOST, PG_PORT, Events, release_held, require_service, wait_for
from tests.integration.worker_app import django_recompute, gate_key


@pytest.fixture(params=["default", "pg"])
def alias(request: pytest.FixtureRequest, django_databases: list[str]) -> str:
    name: str = request.param
    if name not in django_databases:
        require_service("PostgreSQL", PG_HOST, PG_PORT)
    return name


def held(task: Any, token: str) -> str | None:
    holder: str | None = task.unique_store().holder(task.unique_lock_key((token,)))[0]
    return holder


def test_rollback_publishes_nothing_and_leaves_no_lock(
    celery_app: Any, alias: str, token: str, redis_client: redis.Redis
) -> None:
    from django.db import transaction

    from tests.django_app.models import Account

    handle = None
    with pytest.raises(RuntimeError), transaction.atomic(using=alias):
        Account.objects.using(alias).create(balance=1)
        handle = django_recompute.apply_async_on_commit((token,), using=alias)
        raise RuntimeError("roll back")
    assert handle is not None and handle.id is None and not handle.published
    assert held(django_recompute, token) is None
    assert not redis_client.exists(django_recompute.unique_lock_key((token,)))


def test_commit_takes_the_lock_at_commit_and_publishes_once(celery_app: Any, alias: str, token: str) -> None:
    from django.db import transaction

    with transaction.atomic(using=alias):
        handle = django_recompute.apply_async_on_commit((token,), using=alias, countdown=30)
        again = django_recompute.apply_async_on_commit((token,), using=alias, countdown=30)
        assert held(django_recompute, token) is None  # not before the commit
        assert handle.id is None
    assert held(django_recompute, token) == handle.id
    assert handle.duplicate is False
    assert again.duplicate is True and again.id == handle.id
    django_recompute.AsyncResult(handle.id).revoke()
    release_held(django_recompute.unique_store(), django_recompute.unique_lock_key((token,)), handle.id)


def test_outside_a_transaction_it_publishes_at_once(celery_app: Any, token: str) -> None:
    handle = django_recompute.delay_on_commit(token)
    assert handle.published and handle.id is not None
    assert handle.task_id == handle.id  # AsyncResult attributes pass through


def test_savepoints_follow_django_on_commit_semantics(celery_app: Any, alias: str) -> None:
    from django.db import transaction

    kept, dropped = uuid.uuid4().hex, uuid.uuid4().hex
    with transaction.atomic(using=alias):
        outer = django_recompute.apply_async_on_commit((kept,), using=alias, countdown=30)
        with pytest.raises(RuntimeError), transaction.atomic(using=alias):
            inner = django_recompute.apply_async_on_commit((dropped,), using=alias, countdown=30)
            raise RuntimeError("roll back the savepoint")
        with transaction.atomic(using=alias):
            nested = django_recompute.apply_async_on_commit((kept,), using=alias, countdown=30)
    assert outer.published and nested.published and not inner.published
    assert nested.duplicate and nested.id == outer.id
    assert held(django_recompute, dropped) is None
    assert held(django_recompute, kept) == outer.id
    django_recompute.AsyncResult(outer.id).revoke()
    release_held(django_recompute.unique_store(), django_recompute.unique_lock_key((kept,)), outer.id)


@pytest.mark.worker
def test_concurrent_requests_run_the_recompute_once(
    worker: Any, alias: str, token: str, events: Events, redis_client: redis.Redis
) -> None:
    from django.db import connections, transaction

    from tests.django_app.models import Account

    account = Account.objects.using(alias).create(balance=0)
    handles: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def request() -> None:
        try:
            start.wait()
            with transaction.atomic(using=alias):
                Account.objects.using(alias).filter(pk=account.pk).update(balance=models_f("balance") + 1)
                # Gated: the run, and so its lock, lasts until every request has committed.
                handle = django_recompute.apply_async_on_commit((token, 0.0, True), using=alias)
            with lock:
                handles.append(handle)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=request) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    redis_client.set(gate_key(token), 1, ex=60)  # every request has committed: let the run end

    assert errors == []
    assert Account.objects.using(alias).get(pk=account.pk).balance == 50
    assert len(handles) == 50 and all(h.published for h in handles)
    assert len({h.id for h in handles}) == 1
    assert sum(1 for h in handles if not h.duplicate) == 1
    wait_for(lambda: any(e["event"] == "end" for e in events()), timeout=20)
    wait_for(lambda: held(django_recompute, token) is None, timeout=5)
    worker.drain()  # a second run, if any, has run by now
    assert sum(1 for e in events() if e["event"] == "start") == 1


def models_f(name: str) -> Any:
    from django.db.models import F

    return F(name)


# -- settings and system checks ------------------------------------------------


@pytest.fixture
def django_celery_app(django_databases: list[str], redis_url: str) -> Iterator[Celery]:
    """A Celery app configured from Django's settings, as a project's celery.py does."""
    from celery import current_app

    previous = current_app._get_current_object()
    app = Celery("django-project", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.set_current()  # what the checks and the command look at
    yield app
    get_conf(app).close()
    previous.set_current()


def run_checks(**options: Any) -> dict[str, str]:
    from django.core import checks

    messages = checks.run_checks(tags=["celery_unique"], **options)
    return {m.id: m.msg for m in messages}


def test_celery_unique_settings_come_from_django(django_celery_app: Celery, redis_url: str) -> None:
    from django.test import override_settings

    with override_settings(CELERY_BROKER_URL=redis_url, CELERY_UNIQUE_LOCK_TIMEOUT=42):
        conf = get_conf(django_celery_app)
        assert conf.lock_timeout == 42.0
        assert conf.redis_url == redis_url
        with override_settings(CELERY_UNIQUE_LOCK_TIMEOUT=7):
            assert conf.lock_timeout == 7.0  # setting_changed reloads


def test_system_checks_are_quiet_on_a_good_configuration(django_celery_app: Celery, redis_url: str) -> None:
    from django.test import override_settings

    with override_settings(CELERY_BROKER_URL=redis_url):
        assert run_checks(include_deployment_checks=True) == {}


def test_e001_unreachable_redis(django_celery_app: Celery) -> None:
    from django.test import override_settings

    with override_settings(
        CELERY_BROKER_URL="redis://127.0.0.1:1/0", CELERY_UNIQUE_REDIS_CONNECT_TIMEOUT=0.5
    ):
        said = run_checks(include_deployment_checks=True)["celery_unique.E001"]
        assert "127.0.0.1:1" in said and "ConnectionError" in said and "network:" not in said, said
        assert "celery_unique.E001" not in run_checks()  # network checks only with --deploy


def test_w002_evicting_redis(django_celery_app: Celery) -> None:
    from django.test import override_settings

    from celery_unique.testing import RedisServer

    with RedisServer("--maxmemory", "10mb", "--maxmemory-policy", "volatile-lru") as server:
        with override_settings(CELERY_BROKER_URL=server.url):
            found = run_checks(include_deployment_checks=True)
        get_conf(django_celery_app).close()
    assert "volatile-lru" in found["celery_unique.W002"]


def test_w003_inconsistent_timeouts(django_celery_app: Celery, redis_url: str) -> None:
    from django.test import override_settings

    with override_settings(
        CELERY_BROKER_URL=redis_url,
        CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 60},
        CELERY_UNIQUE_LOCK_TIMEOUT=3600,
    ):
        from celery_unique import UniqueTask

        @django_celery_app.task(base=UniqueTask, shared=False, name="checks.long")
        def long_lock() -> None: ...

        assert "visibility_timeout" in run_checks()["celery_unique.W003"]


def test_w005_more_lock_replicas_than_connected(django_celery_app: Celery, redis_url: str) -> None:
    from django.test import override_settings

    with override_settings(CELERY_BROKER_URL=redis_url, CELERY_UNIQUE_LOCK_REPLICAS=1):
        found = run_checks(include_deployment_checks=True)
    get_conf(django_celery_app).close()
    assert "unique_lock_replicas is 1" in found["celery_unique.W005"]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("CELERY_UNIQUE_LOCK_TIMEOUT", "ten"),
        ("CELERY_UNIQUE_DEFAULT_ON_DUPLICATE", "drop"),
        ("CELERY_UNIQUE_DEFAULT_LOCK", "forever"),
        ("CELERY_UNIQUE_KEY_PREFIX", "a{b}"),
    ],
)
def test_e004_invalid_settings(django_celery_app: Celery, redis_url: str, setting: str, value: Any) -> None:
    from django.test import override_settings

    with override_settings(CELERY_BROKER_URL=redis_url, **{setting: value}):
        found = run_checks()
    assert setting.removeprefix("CELERY_").lower().removeprefix("unique_") in found["celery_unique.E004"]


def test_unique_locks_command_lists_and_releases(
    django_celery_app: Celery, redis_url: str, token: str
) -> None:
    from django.core.management import CommandError, call_command
    from django.test import override_settings

    from celery_unique import UniqueTask

    with override_settings(CELERY_BROKER_URL=redis_url, CELERY_TASK_DEFAULT_QUEUE=f"cmd-{token}"):

        @django_celery_app.task(base=UniqueTask, shared=False, name=f"cmd.job.{token}")
        def job(value: str) -> None: ...

        first = job.delay(token)
        out = io.StringIO()
        call_command("unique_locks", task=job.name, stdout=out)
        key = job.unique_lock_key((token,))
        assert (
            key in out.getvalue()
            and first.id in out.getvalue()
            and "1 lock(s) and outcome(s)" in out.getvalue()
        )

        out = io.StringIO()
        call_command("unique_locks", release=key, stdout=out)
        assert "released" in out.getvalue()
        assert not job.delay(token).duplicate
        with pytest.raises(CommandError):
            call_command("unique_locks", release="some:other:key")


def test_outside_a_transaction_errors_reach_the_caller(celery_app: Any, token: str) -> None:
    from celery_unique import DuplicateTaskError

    first = django_recompute.apply_async_on_commit((token,), countdown=30)
    with pytest.raises(DuplicateTaskError):
        django_recompute.apply_async_on_commit(
            (token,), countdown=30, unique_options={"on_duplicate": "raise"}
        )
    django_recompute.AsyncResult(first.id).revoke()
    release_held(django_recompute.unique_store(), django_recompute.unique_lock_key((token,)), first.id)


def test_a_failed_publish_at_commit_is_kept_on_the_handle(
    django_databases: list[str], redis_url: str, token: str
) -> None:
    from django.db import transaction

    from celery_unique.contrib.django import UniqueDjangoTask

    app = Celery("dead-broker", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(unique_redis_url=redis_url, task_publish_retry=False, broker_connection_timeout=0.5)

    @app.task(base=UniqueDjangoTask, shared=False, name="django.dead")
    def job(value: str) -> None: ...

    try:
        with transaction.atomic():
            handle = job.delay_on_commit(token)
        assert handle.error is not None and not handle.published and handle.id is None
        with pytest.raises(AttributeError, match="publishing at commit failed"):
            handle.get()
    finally:
        get_conf(app).close()
