"""Ledger settlement throughput vs plain signature recovery: ``python -m benchmarks.ledger.run``."""
