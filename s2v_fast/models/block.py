"""Transformer block of the S2V DiT (`WanS2VAttentionBlock`, spec §4.10) and its math steps.

Dtype rules (spec §4.13; "cdt" = the weights' dtype, bf16 in production, fp32 in tests):
* Linear: input cast to cdt, cdt output (bf16 GEMM, fp32 accumulate).
* LayerNorm: computed in fp32, cast back to the input's dtype (so only block 0's norm1, whose
  input residual is still bf16, rounds to bf16); affine weights upcast to fp32.
* adaLN modulation: fp32, per segment: tokens [0, split) use column 0 of the modulation
  tensors (timestep t), tokens [split, L) column 1 (t = 0).
* q/k RMSNorm over the full width: fp32 statistics, normalised value rounded to cdt, times the
  cdt weight in cdt.
* RoPE in the table dtype (float64 reference), stored fp32, cast to cdt for attention.
* Gated residual: x_fp32 + fp32(y_cdt) * gate_fp32.  Ungated residual: x + fp32(y).
* FFN: W1 (cdt out), GELU-tanh in cdt, W2 (cdt out).
Every step is a small function so fused kernels can replace it one by one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention_sites import AttentionSlot
from .rope import RopeTable, apply_rope


# ----------------------------------------------------------------------------- math steps
def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """y = x W^T + b in the weight dtype (autocast-style cast of the input)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def linear_fp32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """fp32 Linear (reference `autocast(float32)` regions: time MLP, head, audio encoder)."""
    b = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), b)


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in fp32, result cast back to x's dtype (`WanLayerNorm`)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


def segment_modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     split: int) -> torch.Tensor:
    """fp32 h*(1+scale[g]) + shift[g]; shift/scale [B, 2, C], g = 0 for tokens < split else 1."""
    h = h.float()
    out = torch.empty_like(h)
    for g, (a, b) in enumerate(((0, split), (split, h.shape[1]))):
        if b > a:
            out[:, a:b] = h[:, a:b] * (1 + scale[:, g:g + 1]) + shift[:, g:g + 1]
    return out


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, split: int,
                  eps: float) -> torch.Tensor:
    """Segmented adaLN: modulate(LayerNorm(x)) (norm1 / norm2), fp32 output."""
    return segment_modulate(layer_norm(x, eps), shift, scale, split)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                   split: int) -> torch.Tensor:
    """x + fp32(y) * gate[g], fp32 result (a bf16 x is promoted, as in the reference)."""
    y = y.float()
    yg = torch.empty_like(y)
    for g, (a, b) in enumerate(((0, split), (split, y.shape[1]))):
        if b > a:
            yg[:, a:b] = y[:, a:b] * gate[:, g:g + 1]
    return x + yg


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ungated residual x + y (type promotion: fp32 x stays fp32)."""
    return x + y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`WanRMSNorm`: cdt(x * rsqrt(mean(x^2) + eps)) (stats in fp32) * weight, in cdt."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return n.to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """`WanLayerNorm`: fp32 LayerNorm, output cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x):
        return layer_norm(x, self.eps, self.weight, self.bias)


# ----------------------------------------------------------------------------- attention
class _AttentionProjections(nn.Module):
    """q/k/v/o Linear(dim, dim) and full-width RMSNorm on q and k (official key names), and the
    attention slot of the module's site (``attn``: reference SDPA until ``configure_attention``)."""

    site = "self"

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, site: Optional[str] = None):
        super().__init__()
        self.attn = AttentionSlot(site or self.site)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))


class SelfAttention(_AttentionProjections):
    """q/k/v/o projections, full-width q/k RMSNorm, 3-axis RoPE, dense attention."""

    def qk_norm_rope(self, h: torch.Tensor, rope: RopeTable) -> Tuple[torch.Tensor, torch.Tensor]:
        """q = RoPE(RMSNorm_q(Wq h)), k = RoPE(RMSNorm_k(Wk h)), each [B, L, H, D] fp32."""
        q = self.norm_q(linear(h, self.q))
        k = self.norm_k(linear(h, self.k))
        return apply_rope(self._heads(q), rope), apply_rope(self._heads(k), rope)

    # the sequence-parallel seam: a strategy ``sp(q, k, v, local_attention)`` that exchanges
    # tokens / heads over the ranks around the slot's attention (s2v_fast.parallel.sequence)
    sequence_parallel = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Core attention over this rank's tokens [B, L, H, D]."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel(q, k, v, self.attn)
        return self.attn(q, k, v)

    def forward(self, h: torch.Tensor, rope: RopeTable) -> torch.Tensor:
        cdt = self.q.weight.dtype
        q, k = self.qk_norm_rope(h, rope)
        v = self._heads(linear(h, self.v))
        a = self.attend(q.to(cdt), k.to(cdt), v)
        return linear(a.flatten(2), self.o)


class CrossAttention(_AttentionProjections):
    """Cross-attention without RoPE or mask: text (block) and audio (injector) variants.

    q = RMSNorm_q(Wq x), k = RMSNorm_k(Wk c), v = Wv c; k/v can be precomputed with
    :meth:`context_kv` (they depend only on the context) and passed as ``kv``. Site ``text``
    (a block's) or ``audio`` (an injector's).
    """

    site = "text"

    def context_kv(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k = self._heads(self.norm_k(linear(context, self.k)))
        v = self._heads(linear(context, self.v))
        return k, v

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.context_kv(context)
        q = self._heads(self.norm_q(linear(x, self.q)))
        a = self.attn(q, k, v)
        return linear(a.flatten(2), self.o)


# ----------------------------------------------------------------------------- block
class S2VBlock(nn.Module):
    """One `WanS2VAttentionBlock` (spec §4.10):

    x = x + SelfAttn(mod(LN(x)))·gate_sa ; x = x + CrossAttn(LN_affine(x), ctx) ;
    x = x + FFN(mod(LN(x)))·gate_ffn, with per-segment modulation = modulation + E.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def modulation_terms(self, e0: torch.Tensor):
        """fp32 (modulation[1,6,1,C] + E[B,6,2,C]) split into 6 tensors [B, 2, C]."""
        m = self.modulation.float().unsqueeze(2) + e0.float()
        return m.unbind(1)

    def ffn_forward(self, h: torch.Tensor) -> torch.Tensor:
        """W2 · GELU_tanh(W1 h + b1) + b2, each GEMM output in cdt, GELU in cdt."""
        y = linear(h, self.ffn[0])
        y = F.gelu(y, approximate="tanh")
        return linear(y, self.ffn[2])

    def forward(self, x: torch.Tensor, e0: torch.Tensor, split: int, rope: RopeTable,
                context: Optional[torch.Tensor] = None,
                context_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = self.modulation_terms(e0)
        h = norm_modulate(x, shift_sa, scale_sa, split, self.eps)
        x = gated_residual(x, self.self_attn(h, rope), gate_sa, split)
        x = residual(x, self.cross_attn(self.norm3(x), context, kv=context_kv))
        h = norm_modulate(x, shift_ff, scale_ff, split, self.eps)
        return gated_residual(x, self.ffn_forward(h), gate_ff, split)
