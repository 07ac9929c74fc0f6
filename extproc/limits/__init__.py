"""Limits: request and token rates, concurrency and $ budgets.

quota.py is the sans-IO seam (values and the algorithms); memory.py and
redis_store.py are its two backends.
"""
