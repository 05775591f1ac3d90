"""Helpers for tests, benchmarks and smoke runs without downloads (tiny random models)."""
