"""Benchmarks (not timed tests); run as `python -m bench.<name>`."""
