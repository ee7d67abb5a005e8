"""Segmented LayerNorm + adaLN modulation -> bf16 GEMM input (spec §10.1).

Math (one token s of row x [C], segment g = 0 if s < split else 1):
    u   = (x - mean(x)) / sqrt(var(x) + eps)       # fp32 statistics, biased variance, no affine
    u   = fp32(bf16(u))                            # only if round_normed_to_bf16 (block 0 norm1: x is bf16)
    out = out_dtype( u * (1 + scale[g]) + shift[g] )   # shift/scale fp32 [B, 2, C]
Used for norm1 / norm2 of every block (split = Lv) and for the output head (single segment,
shift/scale [B, 1, C], out_dtype fp32 because the head runs in fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (
    as_segment_param,
    batch_stride,
    clamp_split,
    kernels_usable,
    row_norm_launch,
    is_interpreter,
    segment_expand,
    to_bf16,
    to_dtype,
    triton,
    tl,
)

# Tolerances vs the torch reference (bf16 output): the kernel's fp32 statistics use a different
# summation order (and may contract u*(1+s)+b into an fma), so an output can land on the other
# side of a bf16 rounding boundary: at most 1 bf16 ulp (2^-8 relative).
TOLERANCES = {torch.bfloat16: dict(atol=1e-2, rtol=2**-7), torch.float32: dict(atol=1e-5, rtol=1e-5)}

if triton is not None:

    @triton.jit
    def _layernorm_rows(x, cmask, C, eps):
        """x: fp32 [ROWS, BLOCK_C] tile (masked columns arbitrary) -> normalised u (fp32, no affine)."""
        mean = tl.sum(tl.where(cmask, x, 0.0), axis=1) / C
        xc = tl.where(cmask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        rstd = tl.rsqrt(var + eps)
        return xc * rstd[:, None]

    @triton.jit
    def _norm_modulate_kernel(
        X, SHIFT, SCALE, OUT,
        n_rows, L, C, split,
        sxb, sxl, ssb, ssg, scb, scg, sob, sol,
        eps,
        ROUND_U: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols[None, :] < C
        mask = rmask[:, None] & cmask
        b = (rows // L).to(tl.int64)
        s = (rows % L).to(tl.int64)
        g = (s >= split).to(tl.int64)
        x = tl.load(X + (b * sxb + s * sxl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = _layernorm_rows(x, cmask, C, eps)
        if ROUND_U:
            u = to_bf16(u, INTERPRET).to(tl.float32)
        sh = tl.load(SHIFT + (b * ssb + g * ssg)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + (b * scb + g * scg)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = u * (1.0 + sc) + sh
        tl.store(OUT + (b * sob + s * sol)[:, None] + cols[None, :], to_dtype(out, OUT.dtype.element_ty, INTERPRET), mask=mask)


def norm_modulate_reference(x, shift, scale, split=None, *, eps=1e-6, round_normed_to_bf16=False,
                            out_dtype=torch.bfloat16):
    """Pure-torch reference of §10.1 with the reference's dtype rules."""
    B, L, C = x.shape
    shift, scale = as_segment_param(shift, C), as_segment_param(scale, C)
    u = F.layer_norm(x.float(), (C,), eps=eps)
    if round_normed_to_bf16:
        u = u.to(torch.bfloat16).float()
    sh = segment_expand(shift.float(), L, split)
    sc = segment_expand(scale.float(), L, split)
    return (u * (1 + sc) + sh).to(out_dtype)


def _supported(x, shift, scale, out_dtype):
    return (
        kernels_usable(x, shift, scale)
        and x.dim() == 3
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.stride(-1) == 1
        and out_dtype in (torch.bfloat16, torch.float32, torch.float16)
    )


def norm_modulate(x, shift, scale, split=None, *, eps=1e-6, round_normed_to_bf16=False,
                  out=None, out_dtype=torch.bfloat16):
    """Segmented LayerNorm + modulation.

    x [B, L, C] (fp32, or bf16 at block 0; last dim contiguous, any row/batch stride);
    shift/scale [B|1, G, C] with G = 2 (segments split at `split`) or G = 1 (single segment, head);
    returns out [B, L, C] of `out_dtype` (bf16 GEMM input by default).
    """
    B, L, C = x.shape
    shift, scale = as_segment_param(shift, C), as_segment_param(scale, C)
    if out is not None:
        out_dtype = out.dtype
    if not _supported(x, shift, scale, out_dtype) or (out is not None and out.stride(-1) != 1):
        ref = norm_modulate_reference(x, shift, scale, split, eps=eps,
                                      round_normed_to_bf16=round_normed_to_bf16, out_dtype=out_dtype)
        if out is None:
            return ref
        out.copy_(ref)
        return out
    if out is None:
        out = torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    n_rows = B * L
    if n_rows == 0:
        return out
    BLOCK_C, ROWS, num_warps = row_norm_launch(C)
    grid = (triton.cdiv(n_rows, ROWS),)
    _norm_modulate_kernel[grid](
        x, shift, scale, out,
        n_rows, L, C, clamp_split(split, L),
        x.stride(0), x.stride(1),
        batch_stride(shift, B), shift.stride(1) if shift.shape[1] == 2 else 0,
        batch_stride(scale, B), scale.stride(1) if scale.shape[1] == 2 else 0,
        out.stride(0), out.stride(1),
        eps,
        ROUND_U=bool(round_normed_to_bf16), BLOCK_C=BLOCK_C, ROWS=ROWS, INTERPRET=is_interpreter(),
        num_warps=num_warps,
    )
    return out
