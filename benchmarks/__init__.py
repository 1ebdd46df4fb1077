"""Benchmarks: each prints JSON (--json) or a short table; never run as tests."""
