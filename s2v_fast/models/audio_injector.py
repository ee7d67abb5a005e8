"""Audio injection after selected blocks (`AudioInjector_WAN`, spec §4.11, §10.8-9).

For injector j, on the noisy tokens only (x[:, :Lv], frames contiguous, Nf tokens per frame):
  (shift, scale) = split(Linear_j(SiLU(global_f)), 2)      # cdt out; FIRST half = shift
  A = LN_1e-5(Hv) * (1 + scale) + shift                      # LN fp32, (1+scale) in cdt
  o = CrossAttn_j(A, local_f)                                # per frame: Nf queries x (n+1) keys
  x[:, :Lv] += fp32(o)                                       # plain residual, no gate
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import CrossAttention, linear

ADAIN_EPS = 1e-5


class AudioAdaLN(nn.Module):
    """diffusers `AdaLayerNorm(embedding_dim=dim, output_dim=2*dim, chunk_dim=1)` (no affine)."""

    def __init__(self, dim: int, eps: float = ADAIN_EPS):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def shift_scale(self, gvec: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """gvec [N, C] -> (shift, 1 + scale), each [N, C] in cdt (step-invariant per clip)."""
        emb = linear(F.silu(gvec), self.linear)
        shift, scale = emb.chunk(2, dim=-1)
        return shift, 1 + scale

    def forward(self, x: torch.Tensor, gvec: Optional[torch.Tensor] = None,
                shift_scale: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x [N, T, C] -> fp32 LN_eps(x) * (1 + scale)[:, None] + shift[:, None]."""
        shift, scale1 = shift_scale if shift_scale is not None else self.shift_scale(gvec)
        xn = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return xn * scale1[:, None, :] + shift[:, None, :]


class AudioInjector(nn.Module):
    """Holds `injector.{j}` (cross-attention) and `injector_adain_layers.{j}` (AdaLN)."""

    def __init__(self, dim: int, num_heads: int, inject_layers, eps: float = 1e-6):
        super().__init__()
        self.inject_layers = tuple(inject_layers)
        self.layer_to_index = {layer: j for j, layer in enumerate(self.inject_layers)}
        n = len(self.inject_layers)
        self.injector = nn.ModuleList([CrossAttention(dim, num_heads, eps, site="audio")
                                       for _ in range(n)])
        self.injector_adain_layers = nn.ModuleList([AudioAdaLN(dim) for _ in range(n)])

    def inject(self, j: int, x: torch.Tensor, num_noisy: int, audio_local: torch.Tensor,
               audio_global: torch.Tensor) -> torch.Tensor:
        """Apply injector j to x [B, L, C] (returns x, updated in place on [:, :Lv])."""
        B, F_, n_tok, C = audio_local.shape
        hv = x[:, :num_noisy].reshape(B * F_, num_noisy // F_, C)
        a = self.injector_adain_layers[j](hv, gvec=audio_global[:, :, 0].reshape(B * F_, C))
        o = self.injector[j](a, audio_local.reshape(B * F_, n_tok, C))
        x[:, :num_noisy] += o.reshape(B, num_noisy, C).to(x.dtype)
        return x
