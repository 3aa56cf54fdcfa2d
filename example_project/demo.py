"""The demo: concurrent payments on a few loans, one real worker, and what happened.

Starts a private redis-server when ``REDIS_URL`` is unset and uses a fresh
SQLite file unless ``DATABASE_URL`` is set, migrates, starts a real Celery
worker (prefork, two processes) in a subprocess, then posts payments to the
Django view from several threads. Each payment updates its loan in a
transaction and asks for the loan's schedule to be recomputed on commit;
celery-unique publishes one recompute per loan at a time.

``--without-worker`` posts the payments with no worker running, so that the
recomputes stay queued, holding their locks, for ``celery unique locks`` to
show; it needs a ``REDIS_URL`` that outlives the demo. Each run first clears
what an earlier one left in the example project's queue.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: The queue of the recomputes that wait for the admin to show them (--admin).
PARKED = "example_project_parked"


def start_worker() -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "celery", "--quiet", "-A", "example_project", "worker",
        "--pool", "prefork", "--concurrency", "2", "--hostname", "demo@localhost",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env)


def wait_for_worker(app: Any, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}")
        if app.control.ping(destination=["demo@localhost"], timeout=0.5):
            return
    raise SystemExit("the worker did not start")


def post_payments(loan_ids: list[int], per_thread: int, threads: int) -> Counter[str]:
    from django.db import connections
    from django.test import Client

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def client(number: int) -> None:
        http = Client()
        rng = random.Random(number)
        try:
            for _ in range(per_thread):
                reply = http.post(f"/loans/{rng.choice(loan_ids)}/payments").json()
                with lock:
                    counts["requests"] += 1
                    counts["deduplicated" if reply["duplicate"] else "published"] += 1
                time.sleep(rng.uniform(0, 0.02))
        finally:
            connections.close_all()

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return counts


def clear_leftovers(app: Any, task_name: str) -> tuple[int, int]:
    """Purge the example project's queue and release its recomputes' locks: what a
    ``--without-worker`` (or interrupted) run left would otherwise deduplicate this
    run's payments, or run on its loans. The numbers of messages and locks cleared."""
    from celery_unique.inspect import force_release, iter_locks

    purged = (app.control.purge() or 0) + purge_parked(app)
    return purged, sum(force_release(app, lock.key) for lock in iter_locks(app, task_name))


def purge_parked(app: Any) -> int:
    """Delete what waits in the queue of parked recomputes (--admin); how many."""
    with app.connection_for_write() as connection:
        return int(connection.default_channel.queue_purge(PARKED) or 0)


def print_counts(*rows: tuple[str, int, str]) -> None:
    print()
    for label, count, note in rows:
        print(f"{label:<27} {count:>6}   {note}".rstrip())


def serve_admin(app: Any, loan_ids: list[int], port: int) -> None:
    """Serve the Django admin until interrupted, with a superuser made for the demo and
    one recompute per loan parked in a queue no worker reads (locks to look at)."""
    import secrets

    from django.contrib.auth.models import User
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.servers.basehttp import run
    from django.core.wsgi import get_wsgi_application

    from example_project.loans.tasks import recompute_schedule

    password = secrets.token_urlsafe(12)
    User.objects.filter(username="admin").delete()
    User.objects.create_superuser("admin", "admin@example.com", password)
    for loan_id in loan_ids:
        recompute_schedule.apply_async((loan_id,), queue=PARKED)
    print()
    print(f"admin at http://127.0.0.1:{port}/admin/celery_unique/lock/  user admin, password {password}")
    print(f"({len(loan_ids)} recomputes wait in the queue {PARKED!r}, holding their locks; Ctrl-C stops)")
    sys.stdout.flush()
    # SIGTERM as Ctrl-C: the worker is stopped and the parked queue purged on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run("127.0.0.1", port, StaticFilesHandler(get_wsgi_application()), threading=True)
    except KeyboardInterrupt:
        pass
    finally:
        purge_parked(app)


def main(
    loans: int = 5,
    per_thread: int = 25,
    threads: int = 8,
    without_worker: bool = False,
    admin_port: int | None = None,
) -> int:
    with ExitStack() as stack:
        if not os.environ.get("REDIS_URL"):
            if without_worker:
                raise SystemExit(
                    "--without-worker needs REDIS_URL: a Redis that stays up after the demo, where the "
                    "recomputes stay queued (an embedded redis-server would stop with the demo)"
                )
            os.environ["REDIS_URL"] = stack.enter_context(RedisServer()).url
            print(f"started an embedded redis-server at {os.environ['REDIS_URL']}")
        if not os.environ.get("DATABASE_URL"):
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="celery-unique-demo-"))
            os.environ["EXAMPLE_SQLITE_PATH"] = os.path.join(folder, "demo.sqlite3")
        os.environ["DJANGO_SETTINGS_MODULE"] = "example_project.settings"

        import django
        from django.core.management import call_command

        django.setup()
        from django.db import connection

        from celery_unique.conf import get_conf
        from example_project.celery_app import app
        from example_project.loans.models import Loan, Schedule
        from example_project.loans.tasks import recompute_schedule

        print(f"database: {connection.vendor}")
        call_command("migrate", verbosity=0)
        Schedule.objects.all().delete()
        Loan.objects.all().delete()
        loan_ids = [
            Loan.objects.create(principal=Decimal(10_000 * n), annual_rate=Decimal("0.05"), months=12 * n).pk
            for n in range(1, loans + 1)
        ]
        stack.callback(get_conf(app).close)
        purged, released = clear_leftovers(app, recompute_schedule.name)
        if purged or released:
            print(f"cleared what an earlier run left: {purged} queued recompute(s), {released} lock(s)")

        if without_worker:
            print(f"no worker; {threads} threads post {per_thread} payments each to {loans} loans")
        else:
            worker = start_worker()
            stack.callback(lambda: (worker.terminate(), worker.wait(30)))
            wait_for_worker(app, worker)
            print(f"worker ready; {threads} threads post {per_thread} payments each to {loans} loans")

        started = time.monotonic()
        counts = post_payments(loan_ids, per_thread, threads)
        # Plain Celery's delay_on_commit() publishes one message per committed
        # request: its figure is the request count, beside what was published.
        figures = [
            ("requests", counts["requests"], f"(in {time.monotonic() - started:.1f}s)"),
            ("published by plain Celery", counts["requests"], "(one recompute per request)"),
        ]

        if without_worker:
            print_counts(
                *figures,
                ("published by celery-unique", counts["published"], "(queued: no worker runs them)"),
                ("deduplicated", counts["deduplicated"], "(handle of the queued recompute)"),
            )
            print()
            print(
                f"The recomputes stay queued, each holding its loan's lock for "
                f"{get_conf(app).lock_timeout:.0f} s (CELERY_UNIQUE_LOCK_TIMEOUT).\n"
                "Meanwhile, with the same REDIS_URL:\n"
                "    .venv/bin/celery -A example_project unique locks\n"
                "    .venv/bin/celery -A example_project unique stats\n"
                "    .venv/bin/python manage.py unique_locks\n"
                "The demo's next run clears them."
            )
            return 0

        # Wait until every published recompute has run and released its lock.
        store = get_conf(app).locks
        keys = [recompute_schedule.unique_lock_key((loan,)) for loan in loan_ids]
        keys += [key.replace(":lock", ":run") for key in keys]
        deadline = time.monotonic() + 60
        while any(store.holder(key)[0] for key in keys) and time.monotonic() < deadline:
            time.sleep(0.1)

        rows = list(
            Schedule.objects.order_by("loan_id").values_list(
                "loan_id", "runs", "payments_seen", "monthly_payment"
            )
        )
        executed = sum(runs for _, runs, _, _ in rows)
        payments = {loan.pk: loan.payments for loan in Loan.objects.all()}
        print_counts(
            *figures,
            ("published by celery-unique", counts["published"], ""),
            ("deduplicated", counts["deduplicated"], "(handle of the queued or running recompute)"),
            ("executed", executed, ""),
        )
        print()
        print("loan  payments  recomputes  payments seen  monthly payment")
        for loan_id, runs, seen, monthly in rows:
            print(f"{loan_id:>4}  {payments[loan_id]:>8}  {runs:>10}  {seen:>13}  {monthly:>15}")
        ok = executed == counts["published"] and all(seen == payments[loan] for loan, _, seen, _ in rows)
        print()
        print(
            "every published recompute ran exactly once, and every schedule saw its last payment"
            if ok
            else "MISMATCH: see the counts above"
        )
        if admin_port is not None:
            serve_admin(app, loan_ids, admin_port)
        return 0 if ok else 1
