"""Shared helpers for tests (golden metric, fixture loading)."""
import os

from safetensors.torch import load_file

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def fixture(*parts):
    return os.path.join(FIXTURES, *parts)


def load_fixture(*parts):
    return load_file(fixture(*parts))


def rel_err(candidate, expected):
    """Golden metric: max|C - E| / max|E| computed in float64."""
    c = candidate.detach().double().cpu()
    e = expected.detach().double().cpu()
    denom = e.abs().max().item()
    return (c - e).abs().max().item() / (denom if denom > 0 else 1.0)
