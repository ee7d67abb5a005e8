"""The Wan VAE's RMS_norm (+ SiLU) over channels-last rows, one pass (the fast VAE, issue 25).

Per row x [C] (one pixel of a channels-last activation: C is the innermost dim), spec section 7.1:
    y = x / max(||fp32(x)||_2, 1e-12) * sqrt(C) * gamma          (all in fp32)
    y = silu(y)                                                  (when ``silu``)
    out = dt(y)                                                  dt = ``out_dtype``
The torch reference runs ~6 kernels over the activation (upcast, norm, two multiplies, SiLU,
downcast; ~22 bytes moved per bf16 element); the Triton kernel reads x once and writes y once
(4 bytes per element for bf16 in and out). Used on CUDA tensors; the CPU runs the reference (the
interpreter runs the kernel in the tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._utils import is_interpreter, kernels_usable, row_norm_launch, to_dtype, triton, tl

EPS = 1e-12  # F.normalize's default: the norm is clamped from below, not offset
# Kernel vs reference: both in fp32 up to the sum-of-squares order and sqrt/div vs the kernel's
# rsqrt-free form; bf16 outputs differ by at most 1 bf16 ulp (rare), fp32 by a few fp32 ulps.
TOLERANCES = {torch.bfloat16: dict(atol=1e-2, rtol=2**-7), torch.float32: dict(atol=1e-5, rtol=1e-5)}

if triton is not None:

    @triton.jit
    def _channel_norm_kernel(X, G, Y, n_rows, C, sx, scale,
                             SILU: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                             INTERPRET: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols[None, :] < C)
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        g = tl.load(G + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = (x / norm[:, None]) * scale * g[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + rows[:, None] * C + cols[None, :], to_dtype(y, Y.dtype.element_ty, INTERPRET),
                 mask=mask)


def channel_norm_reference(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False,
                           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``RMSNorm`` of :mod:`s2v_fast.models.vae` (then SiLU) over the last dim, in fp32."""
    xf = x.float()
    y = F.normalize(xf, dim=-1, eps=EPS) * (x.shape[-1] ** 0.5) * gamma.float().reshape(-1)
    if silu:
        y = F.silu(y)
    return y.to(out_dtype or x.dtype)


def channel_norm(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False,
                 out_dtype: Optional[torch.dtype] = None,
                 use_kernel: Optional[bool] = None) -> torch.Tensor:
    """:func:`channel_norm_reference` of ``x [..., C]`` (rows contiguous) -> ``[..., C]`` in
    ``out_dtype`` (default ``x.dtype``). ``use_kernel``: None = the Triton kernel on CUDA
    tensors, True = wherever Triton can run (the interpreter on the CPU), False = torch."""
    out_dtype = out_dtype or x.dtype
    C = x.shape[-1]
    if use_kernel is None:
        use_kernel = x.is_cuda and not is_interpreter()
    ok = (use_kernel and kernels_usable(x, gamma) and gamma.numel() == C
          and x.dtype in (torch.bfloat16, torch.float32)
          and out_dtype in (torch.bfloat16, torch.float32) and x.stride(-1) == 1)
    x2 = x.reshape(-1, C) if ok else None  # a view for channels-last activations
    if not ok or x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < C):
        return channel_norm_reference(x, gamma, silu, out_dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y
    g = gamma.reshape(-1).contiguous()
    BLOCK_C, ROWS, num_warps = row_norm_launch(C)
    _channel_norm_kernel[(triton.cdiv(n_rows, ROWS),)](
        x2, g, y, n_rows, C, x2.stride(0), float(C) ** 0.5, SILU=bool(silu), BLOCK_C=BLOCK_C,
        ROWS=ROWS, INTERPRET=is_interpreter(), num_warps=num_warps)
    return y
