"""Fault injection: many clients, real redis-server nodes, faults, and a checker.

``harness.py`` holds the machinery (clients, ledger, injector, proxy, checker);
each ``test_*.py`` module is one family of scenarios; ``report.py`` runs them
all and writes the results table (``python -m tests.faults.report OUT.md``).
"""
