"""Runnable benchmarks (not tests): see benchmarks/README.md."""
