"""The README's demo, end to end: a Django project, a real worker, real databases."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

from tests.integration.conftest import require_service, run_with_a_worker

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.worker


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
