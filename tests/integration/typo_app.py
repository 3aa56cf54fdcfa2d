"""A worker app whose task's ``unique_on`` names no parameter (a typo)."""

from __future__ import annotations

import os

from celery import Celery

from celery_unique import UniqueTask

app = Celery("typo_app", broker=os.environ.get("CHAOS_BROKER_URL"), set_as_current=False)


# shared=False: the tests import this module (Worker does), and a shared task would
# join, and break, every app that the test process finalizes afterwards.
@app.task(base=UniqueTask, name="typo.recompute", unique_on=("loan",), shared=False)
def recompute(loan_id: int) -> None: ...
