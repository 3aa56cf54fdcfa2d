"""Loans: a payment updates a loan; its schedule is recomputed once, after commit."""
