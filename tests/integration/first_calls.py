"""A fresh process whose threads all make their first ``delay()`` at once.

Run as ``python -m tests.integration.first_calls <broker url> <queue> <threads> <unique|plain>``.
The app and its task are built lazily, as in a web server's module: the task
is created and bound by whichever thread uses it first, while the others call
it too. Prints one JSON line: the errors the calls raised, by type and message.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter

from celery import Celery

from celery_unique import UniqueTask

broker, queue, threads, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
app = Celery("first-calls", broker=broker, set_as_current=False)
app.conf.update(task_default_queue=queue, unique_redis_url=broker)


if kind == "unique":

    @app.task(base=UniqueTask, name="first_calls.job", unique_on=("item",))
    def job(item: str) -> None: ...

else:

    @app.task(name="first_calls.job")
    def job(item: str) -> None: ...


def main() -> None:
    start = threading.Barrier(threads)
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def call(item: str) -> None:
        start.wait()
        try:
            job.delay(item)
        except Exception as exc:  # counted: the test expects none
            with lock:
                errors[f"{type(exc).__name__}: {exc}"] += 1

    # Keys of this process only: every call publishes.
    running = [threading.Thread(target=call, args=(f"{os.getpid()}-{n}",)) for n in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    print(json.dumps(dict(errors)))


if __name__ == "__main__":
    main()
