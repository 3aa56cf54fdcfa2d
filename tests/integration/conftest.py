"""A real Celery worker (prefork, ``-c 2``) in a subprocess, on our Redis."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import django
import pytest
import redis
from django.conf import settings

from celery_unique.conf import get_conf
from celery_unique.locks import task_id_of
from tests.barrier import barrier_key
from tests.integration import worker_app
from tests.integration.results import polling_backend_url

ROOT = Path(__file__).resolve().parents[2]
# Pool processes of every test worker (prefork, prefetch multiplier 1).
CONCURRENCY = 2


class Worker:
    """A ``celery worker`` subprocess and its log.

    ``app`` names the module of the Celery app it runs (``tests.integration.worker_app``
    unless given) and ``env`` adds to its environment.
    """

    #: Worker subprocesses started in this test run, the demo's counted by
    #: run_with_a_worker(): the ``worker`` marker check (tests/conftest.py) compares
    #: it around each test.
    started = 0

    def __init__(
        self,
        redis_url: str,
        name: str,
        *extra: str,
        app: str = "tests.integration.worker_app",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = f"{name}-{uuid.uuid4().hex[:6]}@localhost"
        self.app = importlib.import_module(app).app
        self.broker_url = redis_url
        # Kept open for the worker's lifetime; stop() closes and removes it.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="celery-worker-", suffix=".log", delete=False
        )
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT), **(env or {})}
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", "prefork", "--concurrency", str(CONCURRENCY), "--hostname", self.name,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "INFO", *extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        Worker.started += 1

    def __enter__(self) -> Worker:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_text()}")
            if self.app.control.ping(destination=[self.name], timeout=0.5):
                return
        raise RuntimeError(f"worker did not answer ping within {timeout}s:\n{self.log_text()}")

    def whole_log(self) -> str:
        """All of the log (a line soon leaves the tail that log_text() gives)."""
        return Path(self.log.name).read_text(errors="replace")

    def log_text(self) -> str:
        return self.whole_log()[-6000:]

    def drain(self, queue: str | None = None, countdown: float = 0.0, timeout: float = 60.0) -> None:
        """Return once this worker has run every message sent to ``queue`` before this
        call (with a countdown of at most ``countdown`` seconds), and every message
        that those runs sent there in turn. Published through ``self.app`` (this
        process's instance of the worker's app, so configured for the same broker).

        Why that holds: the worker takes the queue's messages in the order they were
        sent and hands them, in that order, to its CONCURRENCY pool processes, each
        running one at a time and only then taking the next (prefork, fair
        scheduling). A round sends CONCURRENCY barrier tasks (tests/barrier.py),
        which wait until all of them run at once, so in all the processes: each has
        finished what it was handed before its barrier task, that is every message
        sent before the round. A message with a countdown waits in the worker's
        timer and is handed over at its time, in the order of those times: the
        round has ``countdown`` too, so a later time. A message that a run sent (a
        callback, a retry) was sent before the first round ended: a second round
        proves that it has run as well.
        """
        barrier = self.app.tasks["tests.barrier"]
        with redis.Redis.from_url(self.broker_url) as client:
            for _ in range(2):
                name = uuid.uuid4().hex
                for _ in range(CONCURRENCY):
                    barrier.apply_async((name, CONCURRENCY, timeout), queue=queue, countdown=countdown)
                wait_for(
                    lambda name=name: int(client.get(barrier_key(name)) or 0) >= CONCURRENCY,  # type: ignore[misc]
                    timeout=timeout + countdown,
                    worker=self,
                )

    def child_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def frozen(server: Any) -> Iterator[None]:
    """A redis-server (:class:`~celery_unique.testing.RedisServer`) stopped with SIGSTOP
    until the block ends: as a replica, it acknowledges nothing meanwhile."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def lock_holder(client: redis.Redis, key: str) -> str | None:
    """The task id holding a lock, read from Redis (its value is the holder's owner
    token: the task id and a suffix made for each message)."""
    value = client.get(key)
    return None if value is None else task_id_of(value.decode())


def release_held(store: Any, key: str, task_id: str) -> bool:
    """Release a lock that ``task_id`` holds, with the owner token it holds it by (owner-checked)."""
    owner, _ = store.owner(key)
    return owner is not None and task_id_of(owner) == task_id and bool(store.release(key, owner))


def run_with_a_worker(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of a command that starts a Celery worker of its own (the
    example project's demo), counted in :attr:`Worker.started`."""
    Worker.started += 1
    return subprocess.run(command, **options)


PG_HOST, PG_PORT = "127.0.0.1", 5432
#: The screenshots a browser test kept (tests/integration/test_django_admin.py).
SCREENSHOTS = pytest.StashKey[list[str]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    """A failed browser test's report lists the screenshots of the pages it saw."""
    report = yield
    shots = item.stash.get(SCREENSHOTS, None)
    if report.failed and shots:
        report.sections.append(("screenshots", "\n".join(shots)))
    return report


def service_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip without the service; under CI=true its absence is a failure, said plainly."""
    if service_reachable(host, port):
        return
    message = f"{name} is required for this test and is not reachable at {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def celery_app(redis_url: str, unique_redis: Any) -> Iterator[Any]:
    app = worker_app.app
    unique_redis.apply(app)
    app.conf.broker_url = redis_url
    # The worker stores results in Redis; this process polls for them.
    app.conf.result_backend = polling_backend_url(redis_url)
    get_conf(app).reload()
    yield app
    get_conf(app).close()
    app.close()


@pytest.fixture(scope="session")
def worker(celery_app: Any, redis_url: str) -> Iterator[Worker]:
    with Worker(redis_url, "main") as started:
        yield started


Events = Callable[..., list[dict[str, Any]]]


def read_events(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """What the test tasks recorded (one JSON object per event) in a list at ``key``."""
    return [json.loads(item) for item in client.lrange(key, 0, -1)]


@pytest.fixture
def events(redis_client: redis.Redis, token: str) -> Events:
    """The events the worker recorded for a token (this test's unless given)."""

    def read(of: str | None = None) -> list[dict[str, Any]]:
        return read_events(redis_client, worker_app.events_key(of or token))

    return read


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.05,
    worker: Worker | None = None,
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            log = f"\nworker log:\n{worker.log_text()}" if worker is not None else ""
            pytest.fail(f"condition not met within {timeout}s{log}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def django_databases() -> Iterator[list[str]]:
    """Configure Django once for the session; the aliases to test."""
    folder = tempfile.TemporaryDirectory(prefix="celery-unique-django-")
    sqlite_options: dict[str, Any] = {"timeout": 30}
    if django.VERSION >= (5, 1):
        sqlite_options.update(transaction_mode="IMMEDIATE", init_command="PRAGMA journal_mode=WAL;")
    databases: dict[str, Any] = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(folder.name, "test.sqlite3"),
            "OPTIONS": sqlite_options,
        },
        "pg": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("PGDATABASE", "test"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": PG_HOST,
            "PORT": PG_PORT,
        },
    }
    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=[
                "django.contrib.contenttypes",
                "django.contrib.auth",
                "django.contrib.admin",
                "django.contrib.sessions",
                "django.contrib.messages",
                "django.contrib.staticfiles",
                "celery_unique.contrib.django",
                "tests.django_app",
            ],
            # The admin's pages (tests/integration/test_django_admin.py).
            MIDDLEWARE=[
                "django.contrib.sessions.middleware.SessionMiddleware",
                "django.middleware.common.CommonMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware",
            ],
            TEMPLATES=[
                {
                    "BACKEND": "django.template.backends.django.DjangoTemplates",
                    "APP_DIRS": True,
                    "OPTIONS": {
                        "context_processors": [
                            "django.template.context_processors.request",
                            "django.contrib.auth.context_processors.auth",
                            "django.contrib.messages.context_processors.messages",
                        ]
                    },
                }
            ],
            ROOT_URLCONF="tests.django_app.urls",
            STATIC_URL="/static/",
            ALLOWED_HOSTS=["*"],
            DATABASES=databases,
            # Django 4.2's AdminEmailHandler renders the settings (SECRET_KEY
            # included) for every logged error, even with no ADMINS.
            SECRET_KEY="celery-unique-tests",
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        )
        django.setup()
    from django.core.management import call_command
    from django.db import connections

    aliases = ["default"]
    if service_reachable(PG_HOST, PG_PORT):
        aliases.append("pg")
    for alias in aliases:
        call_command("migrate", database=alias, run_syncdb=True, verbosity=0)
    yield aliases
    connections.close_all()
    folder.cleanup()
