"""Helpers for tests and benchmarks that are not part of the inference path: realistic synthetic
inputs and fixture checkers."""
