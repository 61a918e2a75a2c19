"""Benchmarks of clipzoo against open_clip. ``python -m tools.bench --help``."""
