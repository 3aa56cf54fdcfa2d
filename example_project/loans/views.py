from __future__ import annotations

from django.db import transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from example_project.loans.models import Loan
from example_project.loans.tasks import recompute_schedule


@csrf_exempt
def record_payment(request: HttpRequest, loan_id: int) -> JsonResponse:
    """Record a payment; the loan's schedule is recomputed after the commit."""
    with transaction.atomic():
        Loan.objects.filter(pk=loan_id).update(payments=F("payments") + 1)
        handle = recompute_schedule.delay_on_commit(loan_id)
    # The transaction has committed: the handle knows what was published.
    return JsonResponse({"task_id": handle.id, "duplicate": handle.duplicate})
