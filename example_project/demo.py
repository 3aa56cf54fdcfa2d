"""The demo: many duplicate requests, one real worker, and what happened.

Starts a private redis-server when ``REDIS_URL`` is unset, a real Celery worker
(prefork, two processes) in a subprocess, then fires bursts of ``delay()``
calls for a handful of loans from several threads, the way a busy web app
would, and prints how many were published, deduplicated and executed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from celery_unique.conf import get_conf
from celery_unique.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def start_worker(redis_url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "celery", "--quiet", "-A", "example_project.celery_app", "worker",
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


def fire(loans: list[int], bursts: int, threads: int) -> Counter[str]:
    from example_project.celery_app import recompute_loan

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = random.Random(number)
        for _ in range(bursts):
            result = recompute_loan.delay(rng.choice(loans), requested_by=f"user-{number}")
            with lock:
                counts["requests"] += 1
                counts["deduplicated" if result.duplicate else "published"] += 1
            time.sleep(rng.uniform(0, 0.02))

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return counts


def main(loans: int = 5, bursts: int = 100, threads: int = 8) -> int:
    from example_project.celery_app import EXECUTIONS, OVERLAPS, RESULTS, RUNNING, app, recompute_loan

    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if not url:
            url = stack.enter_context(RedisServer()).url
            print(f"started an embedded redis-server at {url}")
        app.conf.broker_url = url
        get_conf(app).reload()
        stack.callback(get_conf(app).close)
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        client.delete(EXECUTIONS, RESULTS, RUNNING, OVERLAPS)

        worker = start_worker(url)
        stack.callback(lambda: (worker.terminate(), worker.wait(30)))
        wait_for_worker(app, worker)
        print(f"worker ready; {threads} threads send {bursts} requests each for {loans} loans")

        started = time.monotonic()
        counts = fire(list(range(1, loans + 1)), bursts, threads)
        elapsed = time.monotonic() - started

        # Wait until every published task has run and released its lock.
        store = get_conf(app).locks
        keys = [recompute_loan.unique_lock_key((loan,)) for loan in range(1, loans + 1)]
        deadline = time.monotonic() + 60
        while any(store.holder(key)[0] for key in keys) and time.monotonic() < deadline:
            time.sleep(0.1)

        executions = {int(k): int(v) for k, v in client.hgetall(EXECUTIONS).items()}
        executed = sum(executions.values())
        overlaps = sum(int(v) for v in client.hvals(OVERLAPS))
        print()
        print(f"requests      {counts['requests']:>6}   (in {elapsed:.1f}s)")
        print(f"published     {counts['published']:>6}")
        print(f"deduplicated  {counts['deduplicated']:>6}   (returned the running task's handle)")
        print(f"executed      {executed:>6}")
        print(f"overlapping runs of one loan  {overlaps}")
        print()
        print("loan  executions  result")
        for loan in sorted(executions):
            print(f"{loan:>4}  {executions[loan]:>10}  {int(client.hget(RESULTS, str(loan)) or 0)}")
        ok = executed == counts["published"] and overlaps == 0
        print()
        print(
            "every published task ran exactly once, never two at once for a loan"
            if ok
            else "MISMATCH: see the counts above"
        )
        return 0 if ok else 1
