import os

import pytest

# Triton kernels run on the CPU through the interpreter; it must be switched on before triton is
# imported anywhere, so do it here when no CUDA device is present.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


def rel_err(candidate, expected):
    """Golden metric: max|C - E| / max|E| in float64."""
    c = candidate.detach().double().cpu()
    e = expected.detach().double().cpu()
    denom = e.abs().max().item()
    return (c - e).abs().max().item() / (denom if denom > 0 else 1.0)
