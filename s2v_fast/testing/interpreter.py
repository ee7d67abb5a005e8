"""Run Triton kernels through the interpreter when there is no CUDA device (tests, CPU smoke
forms of the benchmarks). Call before triton is imported anywhere."""
from __future__ import annotations

import os


def use_interpreter_without_cuda() -> bool:
    """Set ``TRITON_INTERPRET=1`` (unless already set) when no CUDA device is present; returns
    whether CUDA is available."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        cuda = False
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return cuda
