"""The example's Celery app: Redis as broker and lock store, one unique task.

``recompute_loan`` stands for an expensive, idempotent computation (the seed's
loan recomputation): running it twice at once for one loan is wasted work, so
it is a ``UniqueTask`` keyed on ``loan_id``.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from celery_unique import UniqueTask

app = Celery("example_project", broker=os.environ.get("REDIS_URL"), set_as_current=False)
app.conf.update(worker_hijack_root_logger=False, worker_prefetch_multiplier=1)

EXECUTIONS = "example:executions"
RESULTS = "example:results"
RUNNING = "example:running"
OVERLAPS = "example:overlaps"


@app.task(base=UniqueTask, unique_on=("loan_id",), lock_timeout=60, name="example.recompute_loan")
def recompute_loan(loan_id: int, requested_by: str = "") -> int:
    """Recompute a loan's schedule (simulated: half a second of work)."""
    store = redis.Redis.from_url(app.conf.broker_url)
    loan = str(loan_id)
    store.hincrby(EXECUTIONS, loan, 1)
    if store.hincrby(RUNNING, loan, 1) > 1:
        store.hincrby(OVERLAPS, loan, 1)  # another run of this loan is in progress
    try:
        time.sleep(0.5)
        total = sum(range(loan_id * 1000))
        store.hset(RESULTS, loan, total)
    finally:
        store.hincrby(RUNNING, loan, -1)
        store.close()
    return total
