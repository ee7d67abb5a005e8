"""The attention backend registry: name -> a function with the ``attention(q, k, v)`` contract.

Its own module so that backends which call other backends (``fp8`` falls back to the bf16 choice,
``cuda`` to cuDNN) look them up here instead of importing the dispatcher (``attention.py``),
which imports them: the kernels package then has no import cycle. It imports no backend;
``attention.py`` fills it when the kernels package is imported.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BACKENDS: Dict[str, AttentionFn] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Add (or replace) a backend with the ``attention`` contract."""
    _BACKENDS[name] = fn


def attention_backend_fn(name: str) -> Optional[AttentionFn]:
    """The function registered as ``name``, or None."""
    return _BACKENDS.get(name)


def registered_attention_backends() -> list:
    """The registered names, sorted (``auto`` is not one: it picks among them)."""
    return sorted(_BACKENDS)
