"""Benchmarks: each module has run(settings) -> dict; run_all runs them all against one broker."""
