"""A producer process of the chaos suite: threads calling ``delay()``, and what they saw.

Run as ``python -m tests.chaos.producers --token T --index I ...`` with the
``CHAOS_*`` environment of :mod:`tests.chaos.chaos_app`. The process tells the
test it is ready (``INCR chaos-ready:<token>``), waits for ``chaos-go:<token>``,
then each thread calls ``delay()``:

* ``--calls N``: N calls in all (shared by the threads), all of one key;
* ``--until-stopped``: a new key per call until ``chaos-stop:<token>`` is set;
* ``--keys N``: instead, every thread hammers the same N keys (as users
  do: a few hot keys from everywhere);
* ``--fixed-ids``: every other call chooses its own task id.

Every call's outcome is counted: published (``after_task_publish`` fired, so
a message really left), duplicate (the holder's id) or raised (by type, with
the ids it asked for or built: none of them may run after a LockBackendError,
which publishes nothing; after a broker error they may, since a publish whose
reply was lost may have landed).
Progress counters live in the broker Redis (``chaos-published:<token>``,
``chaos-raised:<token>``) so the test can wait on them. At the end the process
prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import threading
import time
from collections import Counter
from typing import Any

from celery import signals

from celery_unique import orphans
from celery_unique.exceptions import UniqueError
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
    parser.add_argument("--calls", type=int, default=0, help="calls in all, over all processes")
    parser.add_argument("--until-stopped", action="store_true", help="call until stopped")
    parser.add_argument(
        "--keys", type=int, default=0, help="the keys every producer hammers (0: one key for --calls, a new "
        "key per call for --until-stopped)"
    )  # fmt: skip
    parser.add_argument("--fixed-ids", action="store_true", help="every other call chooses its task id")
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
    unpublished: list[str] = []  # ids that calls which raised asked for or built: none may run
    # ... unless the broker raised: a publish whose reply was lost may have landed.
    unsure: list[str] = []
    sent = threading.local()

    def before_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("task") == options.task:
            sent.built.append(headers["id"])  # type: ignore[index]

    def after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if (headers or {}).get("task") == options.task:
            sent.ids.append(headers["id"])  # type: ignore[index]

    signals.before_task_publish.connect(before_publish, weak=False)
    signals.after_task_publish.connect(after_publish, weak=False)

    def call(item: str, task_id: str | None) -> None:
        sent.ids, sent.built = [], []
        try:
            result = task.apply_async(
                (options.token,),
                {"seconds": options.seconds or None, "item": item},
                task_id=task_id,
                queue=options.queue,
            )
        except Exception as exc:
            with lock:
                raised[type(exc).__name__] += 1
                asked = {*sent.built, *([task_id] if task_id else [])} - set(sent.ids)
                (unpublished if isinstance(exc, UniqueError) else unsure).extend(asked)
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
        chooser = random.Random(f"{options.token}-{position}")
        calls = itertools.count()
        if not options.until_stopped:
            share = options.calls // total_threads + (1 if position < options.calls % total_threads else 0)
            calls = iter(range(share))  # type: ignore[assignment]
        for n in calls:
            if options.until_stopped and client.exists(stop_key(options.token)):
                return
            if options.keys:
                item = f"key-{chooser.randrange(options.keys)}"
            else:
                item = f"{options.index}-{number}-{n}" if options.until_stopped else ""
            # A caller-chosen id, unique to the call, with characters keys and patterns treat apart.
            task_id = f"fixed:*[{{#{options.token}-{position}-{n}" if options.fixed_ids and n % 2 else None
            call(item, task_id)
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
            {
                "published": published,
                "returned": returned,
                "raised": raised,
                "unpublished": unpublished,
                "unsure": unsure,
            }
        )
    )


if __name__ == "__main__":
    main()
