"""Shared helpers for tests (golden metric, fixture loading, bf16 ulp distance)."""
import os

import torch

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


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # kernel tests: the GPU when there is one


def bf16_ulps(a, b):
    """Elementwise distance in bf16 ulps (exact, via the ordered bit patterns)."""
    def ordered(t):
        i = t.to(torch.bfloat16).view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return (ordered(a) - ordered(b)).abs()
