"""The README's demo, end to end: a Django project, a real worker, real databases; and
the example project's manage.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
import redis

from celery_unique.keys import digest, family_key, lock_key
from tests.integration.conftest import Worker, require_service, run_with_a_worker, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.worker
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_demo_runs_every_published_recompute_once(database: str, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    # Database 1 of our Redis: the session worker consumes the default queue of database 0.
    env["REDIS_URL"] = urlunparse(urlparse(redis_url)._replace(path="/1"))
    if database == "postgresql":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        env["DATABASE_URL"] = "postgres://postgres@127.0.0.1:5432/test"
    done = run_with_a_worker(
        [sys.executable, "-m", "example_project", "demo", "--payments", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"database: {database}" in done.stdout
    assert (
        "every published recompute ran exactly once, and every schedule saw its last payment" in done.stdout
    )
    # Beside what celery-unique published, what plain Celery would have: one per request.
    requests = figure(done.stdout, "requests")
    assert requests == 8 * 10  # 8 threads (the default) x --payments 10
    assert figure(done.stdout, "published by plain Celery") == requests
    published = figure(done.stdout, "published by celery-unique")
    assert 0 < published < requests and published + figure(done.stdout, "deduplicated") == requests


def figure(output: str, label: str) -> int:
    """The number the demo prints beside a label."""
    found = re.search(rf"^{re.escape(label)} +(\d+)", output, re.MULTILINE)
    assert found, f"no {label!r} line in:\n{output}"
    return int(found.group(1))


@pytest.mark.worker
def test_demo_without_a_worker_leaves_its_recomputes_queued_and_locked(redis_url: str) -> None:
    """The operations page's recipe: the locks stay for ``celery unique locks`` to show,
    and the next demo run clears them (else they would deduplicate its payments)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    url = urlparse(redis_url)._replace(path="/2")
    env["REDIS_URL"] = urlunparse(url)
    command = [sys.executable, "-m", "example_project", "demo", "--payments", "10"]
    left = subprocess.run(
        [*command, "--without-worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert left.returncode == 0, left.stdout + left.stderr
    assert figure(left.stdout, "published by celery-unique") == 5  # one per loan: nothing runs them
    assert figure(left.stdout, "deduplicated") == 8 * 10 - 5
    with redis.Redis.from_url(urlunparse(url)) as client:
        locks = list(client.scan_iter("celery_unique:v1:{loans.recompute_schedule:*}:lock"))
        assert len(locks) == 5 and all(0 < client.pttl(key) <= 60_000 for key in locks)
        assert client.llen("example_project") == 5
    done = run_with_a_worker(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cleared what an earlier run left: 5 queued recompute(s), 5 lock(s)" in done.stdout
    assert "every published recompute ran exactly once" in done.stdout


def test_manage_py_runs_the_checks_and_lists_the_locks(redis_url: str, tmp_path: Path) -> None:
    """``python manage.py check`` and ``unique_locks`` from the repository root, as
    docs/django.rst gives them (no PYTHONPATH, no --settings)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PYTHONPATH")
    }
    url = urlunparse(urlparse(redis_url)._replace(path="/3"))
    env.update(REDIS_URL=url, EXAMPLE_SQLITE_PATH=str(tmp_path / "example.sqlite3"))

    def manage(*arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *arguments],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "System check identified no issues" in manage("check")
    manage("check", "--deploy", "--tag", "celery_unique")  # the checks that ask Redis: no error
    key = lock_key(family_key("celery_unique", "loans.recompute_schedule", digest([1])))
    with redis.Redis.from_url(url) as client:
        client.set(key, "2e5ed8c4#0123456789ab", px=60_000)
        try:
            listed = manage("unique_locks")
            assert f"{key}  lock  holder=2e5ed8c4  " in listed and "1 lock(s) and outcome(s)" in listed
            assert manage("unique_locks", "--release", key).strip() == "released"
            assert not client.exists(key)
        finally:
            client.delete(key)


@pytest.mark.worker
def test_demo_serves_the_admin_with_a_superuser_and_queued_locks(redis_url: str) -> None:
    """``demo --admin PORT``: after the demo, the admin is served with a superuser made for
    it; logged in, its locks page lists the parked recomputes, each holding its lock."""
    import http.cookiejar
    import urllib.request
    from urllib.parse import urlencode

    from celery_unique.testing import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    env["REDIS_URL"] = urlunparse(urlparse(redis_url)._replace(path="/2"))
    port = free_port()
    command = [sys.executable, "-m", "example_project", "demo", "--payments", "2", "--admin", str(port)]
    Worker.started += 1  # the demo's worker (see run_with_a_worker)
    demo = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        said = ""
        assert demo.stdout is not None
        while "password" not in said:
            line = demo.stdout.readline()
            assert line, f"the demo ended without serving the admin:\n{said}"
            said += line
        password = re.search(r"user admin, password (\S+)", said).group(1)  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        browser = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(jar := http.cookiejar.CookieJar())
        )
        login = f"{base}/admin/login/?next=/admin/celery_unique/lock/"
        wait_for(lambda: _answers(browser, login), timeout=30)
        token = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
        form = {
            "username": "admin",
            "password": password,
            "csrfmiddlewaretoken": token,
            "next": "/admin/celery_unique/lock/",
        }
        request = urllib.request.Request(login, data=urlencode(form).encode(), headers={"Referer": login})
        page = browser.open(request, timeout=30).read().decode()
        assert page.count("loans.recompute_schedule") >= 5 and "queued" in page
    finally:
        demo.terminate()  # SIGTERM: the demo stops its worker and purges its parked queue
        code = demo.wait(60)
        if demo.stdout is not None:
            demo.stdout.close()
    assert code == 0


def _answers(browser: Any, url: str) -> bool:
    try:
        return bool(browser.open(url, timeout=5).status == 200)
    except OSError:
        return False
