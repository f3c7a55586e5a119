"""Benchmarks, run as modules (python -m benchmarks.<name>); not part of the test suite."""
