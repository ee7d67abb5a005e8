"""The single attention entry point of the DiT.

``attention(q, k, v)``: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.
Dense, unmasked, non-causal softmax attention with scale 1/sqrt(D) (spec §4.10, §10.6). Every
S2V attention (self, text cross, audio per-frame cross) has this contract.

Backends live in a small registry so faster ones (Triton, FlashAttention) can be registered by
other modules: ``register_attention_backend(name, fn)`` then ``set_attention_backend(name)``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention over [B, L, H, D] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: Dict[str, AttentionFn] = {"sdpa": sdpa_attention}
_current = "sdpa"


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Add (or replace) a backend with the ``attention`` contract."""
    _BACKENDS[name] = fn


def set_attention_backend(name: str) -> None:
    global _current
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}")
    _current = name


def get_attention_backend() -> str:
    return _current


def available_attention_backends() -> list:
    return sorted(_BACKENDS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense softmax attention, q [B,Lq,H,D], k/v [B,Lk,H,D] -> [B,Lq,H,D]."""
    return _BACKENDS[_current](q, k, v)
