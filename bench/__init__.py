"""Benchmarks that print figures (not part of the test run); run each with
``python -m bench.<name>`` from the project root, or all with ``make bench``."""
