"""A producer process of the chaos suite: threads calling ``delay()``, and what they saw.

Run as ``python -m tests.chaos.producers --token T --index I ...`` with the
``CHAOS_*`` environment of :mod:`tests.chaos.chaos_app`. The process tells the
test it is ready (``INCR chaos-ready:<token>``), waits for ``chaos-go:<token>``,
then each thread calls ``delay()``:

* ``--calls N``: N calls in all (shared by the threads), all of one key;
* ``--until-stopped``: a new key per call until ``chaos-stop:<token>`` is set.

Every call's outcome is counted: published (``after_task_publish`` fired, so
a message really left), duplicate (the holder's id) or raised (by type).
Progress counters live in the broker Redis (``chaos-published:<token>``,
``chaos-raised:<token>``) so the test can wait on them. At the end the process
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from typing import Any

from celery import signals

from celery_unique import orphans
from tests.chaos import chaos_app


def ready_key(token: str) -> str:
    return f"chaos-ready:{token}"


def go_key(token: str) -> str:
    return f"chaos-go:{token}"


def stop_key(token: str) -> str:
    return f"chaos-stop:{token}"


def published_key(token: str) -> str:
    return f"chaos-published:{token}"


def raised_key(token: str) -> str:
    return f"chaos-raised:{token}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="chaos.hold")
    parser.add_argument("--token", required=True)
    parser.add_argument("--index", type=int, default=0, help="this process's number")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=0, help="calls of one key, over all processes")
    parser.add_argument("--until-stopped", action="store_true", help="a new key per call until stopped")
    parser.add_argument("--seconds", type=float, default=0.0, help="how long each task runs")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between a thread's calls")
    parser.add_argument("--queue", default=None)
    options = parser.parse_args()

    task = chaos_app.app.tasks[options.task]
    client = chaos_app.broker_client()
    lock = threading.Lock()
    published: list[list[str]] = []  # [item, task id] of every message that left
    returned: list[list[Any]] = []  # [item, id returned, duplicate] of every call that returned
    raised: Counter[str] = Counter()
    raised_items: list[str] = []
    sent = threading.local()

    def after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("task") == options.task:
            sent.ids.append(headers["id"])  # type: ignore[index]

    signals.after_task_publish.connect(after_publish, weak=False)

    def call(item: str) -> None:
        sent.ids = []
        try:
            result = task.apply_async(
                (options.token,), {"seconds": options.seconds or None, "item": item}, queue=options.queue
            )
        except Exception as exc:
            with lock:
                raised[type(exc).__name__] += 1
                raised_items.append(item)
            client.incr(raised_key(options.token))
        else:
            with lock:
                returned.append([item, result.id, result.duplicate])
        with lock:
            published.extend([item, task_id] for task_id in sent.ids)
        if sent.ids:
            client.incr(published_key(options.token), len(sent.ids))

    total_threads = options.processes * options.threads

    def thread(number: int) -> None:
        position = options.index * options.threads + number
        if options.until_stopped:
            n = 0
            while not client.exists(stop_key(options.token)):
                call(f"{options.index}-{number}-{n}")
                n += 1
                time.sleep(options.pause)
            return
        share = options.calls // total_threads + (1 if position < options.calls % total_threads else 0)
        for _ in range(share):
            call("")
            time.sleep(options.pause)

    client.incr(ready_key(options.token))
    while not client.exists(go_key(options.token)):
        time.sleep(0.01)
    threads = [threading.Thread(target=thread, args=(n,)) for n in range(options.threads)]
    for started in threads:
        started.start()
    for started in threads:
        started.join()
    # A long-lived producer would stay: give its orphan locks their release.
    deadline = time.monotonic() + 60
    while orphans.releaser.pending() and time.monotonic() < deadline:
        time.sleep(0.1)
    print(
        json.dumps(
            {"published": published, "returned": returned, "raised": raised, "raised_items": raised_items}
        )
    )


if __name__ == "__main__":
    main()
