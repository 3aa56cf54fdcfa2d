"""The expensive, idempotent recomputation, unique per loan.

``until_and_while_executing``: at most one recompute per loan waits in the
queue and at most one runs. A payment that commits while a recompute runs
queues the next one (so the table always ends up reflecting the last
payment), and that next one waits (``on_conflict="retry"``) instead of running
beside the first.
"""

from __future__ import annotations

import time
from decimal import Decimal

from django.db import transaction
from django.db.models import F

from celery_unique.contrib.django import UniqueDjangoTask
from example_project.celery_app import app


@app.task(
    base=UniqueDjangoTask,
    unique_on=("loan_id",),
    lock="until_and_while_executing",
    on_conflict="retry",
    conflict_retry_countdown=0.2,
    max_retries=None,
    name="loans.recompute_schedule",
)
def recompute_schedule(loan_id: int) -> str:
    from example_project.loans.models import Loan, Schedule

    time.sleep(0.3)  # stands for the heavy part
    loan = Loan.objects.get(pk=loan_id)
    rate = loan.annual_rate / 12
    payment = (
        loan.principal * rate / (1 - (1 + rate) ** -loan.months) if rate else loan.principal / loan.months
    )
    computed = {"monthly_payment": payment.quantize(Decimal("0.01")), "payments_seen": loan.payments}
    with transaction.atomic():
        # Write first: SQLite then waits for the write lock, where a read
        # followed by a write fails at once if another connection writes
        # (Django < 5.1 cannot BEGIN IMMEDIATE).
        if not Schedule.objects.filter(loan=loan).update(runs=F("runs") + 1, **computed):
            Schedule.objects.create(loan=loan, runs=1, **computed)
    return str(payment)
