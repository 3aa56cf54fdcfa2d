from django.db import models


class Loan(models.Model):
    principal = models.DecimalField(max_digits=12, decimal_places=2)
    annual_rate = models.DecimalField(max_digits=5, decimal_places=4)
    months = models.PositiveIntegerField()
    payments = models.PositiveIntegerField(default=0)


class Schedule(models.Model):
    """The recomputed result, served to web requests straight from this table."""

    loan = models.OneToOneField(Loan, on_delete=models.CASCADE, primary_key=True)
    monthly_payment = models.DecimalField(max_digits=12, decimal_places=2)
    payments_seen = models.PositiveIntegerField()
    runs = models.PositiveIntegerField(default=0)
    computed_at = models.DateTimeField(auto_now=True)
