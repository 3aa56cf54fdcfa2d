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
    with transaction.atomic():
        schedule, _ = Schedule.objects.get_or_create(
            loan=loan, defaults={"monthly_payment": Decimal(0), "payments_seen": 0}
        )
        Schedule.objects.filter(pk=schedule.pk).update(
            monthly_payment=payment.quantize(Decimal("0.01")),
            payments_seen=loan.payments,
            runs=F("runs") + 1,
        )
    return str(payment)
