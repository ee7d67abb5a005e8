"""The PyTorch SDPA attention backends (``sdpa``, ``cudnn``, ``sdpa_flash``) over [B, L, H, D].

A module of their own because our kernels fall back to them (``cuda`` to cuDNN for inputs it
does not cover, ``fp8`` to SDPA when no Triton config compiles) and must not import the
dispatcher to reach them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import AttentionFn


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention over [B, L, H, D] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def sdpa_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`sdpa_attention` with softmax scale ``scale`` instead of 1/sqrt(D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)


def sdpa_only(backend_name: str) -> AttentionFn:
    """:func:`sdpa_attention` restricted to one SDPA kernel (a ``torch.nn.attention.SDPBackend``)."""
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return sdpa_attention(q, k, v)

    run.__name__ = f"sdpa_{backend_name.lower()}"
    return run


cudnn_attention = sdpa_only("CUDNN_ATTENTION")
sdpa_flash_attention = sdpa_only("FLASH_ATTENTION")
