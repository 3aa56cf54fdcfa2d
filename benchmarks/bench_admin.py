"""The Django admin's locks page at scale: N locks in a private redis-server.

Side by side in one run, each a median of ``--repeat`` loads through Django's test
client (the whole request: session, permissions, Redis, the template):
- the first page, and the page after 50 next-page links (a page deep in the walk);
- a filter that matches nothing (state ``running``: the page stops at its budget);
- a search for one holder task id (likewise);
- beside them, the CLI's listing of every lock (``celery unique locks``: it reads
  every key), the cost a page would have if it counted or sorted the keys.

Also the Redis commands one page sends (``INFO stats``) and the longest single
command (``SLOWLOG``, threshold 1 ms): how long a page can block Redis.

    python benchmarks/bench_admin.py [--locks 100000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import django
import redis
from celery import Celery
from django.conf import settings

from celery_unique import UniqueTask
from celery_unique.conf import get_conf
from celery_unique.inspect import iter_locks
from celery_unique.locks import new_owner
from celery_unique.testing import RedisServer

APP = "benchmarks.bench_admin.app"
app = Celery("bench-admin", set_as_current=False)


@app.task(base=UniqueTask, name="bench.admin", shared=False)
def job(n: int) -> int:
    return n


def configure(folder: str) -> None:
    settings.configure(
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.admin",
            "django.contrib.sessions",
            "django.contrib.messages",
            "celery_unique.contrib.django",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
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
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": f"{folder}/bench.sqlite3"}},
        ROOT_URLCONF="bench_admin_urls",
        SECRET_KEY="bench",
        ALLOWED_HOSTS=["*"],
        STATIC_URL="/static/",
        CELERY_UNIQUE_APP=APP,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    from django.contrib import admin
    from django.urls import path

    urls = types.ModuleType("bench_admin_urls")
    urls.urlpatterns = [path("admin/", admin.site.urls)]  # type: ignore[attr-defined]
    sys.modules[urls.__name__] = urls


def fill(client: redis.Redis, count: int) -> list[str]:
    """``count`` queued locks of ``bench.admin``; their holders' task ids."""
    holders = []
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        holder = f"holder-{n}"
        holders.append(holder)
        pipe.set(job.unique_lock_key((n,)), new_owner(holder), px=3_600_000)
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()
    return holders


def median_ms(call: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--locks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    options = parser.parse_args()
    # CELERY_UNIQUE_APP names this module's app, run as a script (__main__).
    sys.modules.setdefault("benchmarks.bench_admin", sys.modules[__name__])

    with RedisServer() as server, tempfile.TemporaryDirectory() as folder:
        app.conf.broker_url = server.url
        get_conf(app).reload()
        configure(folder)
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from django.test import Client

        call_command("migrate", verbosity=0)
        user = User.objects.create_superuser("bench", "bench@example.com", "bench")
        client = redis.Redis.from_url(server.url)
        holders = fill(client, options.locks)
        client.config_set("slowlog-log-slower-than", 1000)
        http = Client()
        http.force_login(user)
        base = "/admin/celery_unique/lock/"

        def load(url: str) -> str:
            answer = http.get(url)
            assert answer.status_code == 200, answer.status_code
            return str(answer.content.decode())

        depth = max(1, min(50, options.locks // 100 - 1))

        def deep_url() -> str:
            url = base
            for _ in range(depth):
                found = re.search(r'href="(\?[^"]*)" id="next-page"', load(url))
                assert found, f"fewer than {depth + 1} pages"
                url = base + found.group(1).replace("&amp;", "&")
            return url

        def commands() -> int:
            return int(client.info("stats")["total_commands_processed"])

        deep = deep_url()
        rows = len(re.findall(r'class="celery-unique-row"', load(base)))
        pages = {
            "first page": base,
            f"page {depth + 1}": deep,
            "state=running (no match)": base + "?state=running",
            "search one holder id": base + f"?q={holders[len(holders) // 2]}",
        }
        print(f"{options.locks:,} locks, {rows} rows a page, medians of {options.repeat} loads")
        client.slowlog_reset()
        figures = {}
        for label, url in pages.items():
            before = commands()
            load(url)
            sent = commands() - before - 1  # less this INFO
            figures[label] = median_ms(lambda url=url: load(url), options.repeat)
            print(f"  {label:<28} {figures[label]:8.1f} ms   {sent:>4} Redis commands")
        slow = client.slowlog_get(100_000)
        worst = max(slow, key=lambda entry: entry["duration"], default=None)
        said = "-" if worst is None else f"{worst['duration'] / 1000:.1f} ms ({worst['command'][:40]!r})"
        print(f"  the pages' commands over 1 ms: {len(slow)}, the longest {said}")
        full = median_ms(lambda: sum(1 for _ in iter_locks(app, None, count=1000)), 3)
        print(f"  {'CLI listing of every lock':<28} {full:8.1f} ms   (median of 3)")
        print("ratios to the CLI's full listing:")
        for label, ms in figures.items():
            print(f"  {label:<28} {ms / full:6.3f}x")
        get_conf(app).close()


if __name__ == "__main__":
    main()
