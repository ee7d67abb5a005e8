"""Gated residual add, alone and fused with the LayerNorm that reads the updated residual.

Spec §4.10 / §10.1 / §10.2. Per token s (segment g = 0 if s < split else 1), x fp32 (bf16 only at
block 0's input, which promotes to fp32):
    x_new = fp32(x) + fp32(y_bf16) * gate[g]            # gate fp32 [B, 2, C]; gate None -> x + y
Fused variants (one read of x and y, one write of x_new and of the next GEMM input h):
    gated_residual_layernorm_affine : self-attn out -> norm3 (cross-attn input)
        x_new = x + y*gate_sa[g];  h = bf16( LN(x_new) * w + b )              (w, b upcast to fp32)
    residual_add_norm_modulate      : cross-attn out (no gate) -> norm2 (FFN input)
        x_new = x + y;             h = bf16( LN(x_new) * (1 + scale_ffn[g]) + shift_ffn[g] )
    gated_residual_norm_modulate    : FFN out -> next block's norm1 (or the head with G = 1, fp32 out)
        x_new = x + y*gate_ffn[g]; h = out_dtype( LN(x_new) * (1 + scale[g']) + shift[g'] )
    residual_pair_norm_modulate     : self-attn and cross-attn outs -> norm2, after norm3 ran with
        store_x=False:  x_new = (x + y*gate_sa[g]) + y2;  h as residual_add_norm_modulate
        (one write of x per attention half instead of two)
LN: eps 1e-6, biased variance, fp32 statistics, no affine unless stated.

Which pairs are valid: these three are all the (residual, next norm) neighbours in a block. The
FFN -> next-norm1 pair is NOT valid after an audio-injection block (0,4,8,...,39: the injection
adds into x[:, :Lv] between them) nor after the last block (use G = 1 head modulation with
out_dtype fp32 and slice [:, :Lv], or the plain residual + head norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (
    as_segment_param,
    batch_stride,
    clamp_split,
    is_interpreter,
    kernels_usable,
    row_norm_launch,
    segment_expand,
    to_dtype,
    triton,
    tl,
)

if triton is not None:
    from .norm_modulate import _layernorm_rows

# x_new is fp32: the kernel may contract x + y*gate into one fma (1 fp32 ulp). h is bf16: at most
# 1 bf16 ulp from a different statistics summation order (see norm_modulate.TOLERANCES).
TOLERANCES = {
    "x": dict(atol=1e-5, rtol=1e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=2**-7),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}

_MODE_NONE, _MODE_MODULATE, _MODE_AFFINE = 0, 1, 2

if triton is not None:

    @triton.jit
    def _residual_norm_kernel(
        X, Y, GATE, Y2, XO, P0, P1, H,
        n_rows, L, C, split,
        sxb, sxl, syb, syl, sgb, sgg, s2b, s2l, sob, sol, s0b, s0g, s1b, s1g, shb, shl,
        eps,
        HAS_GATE: tl.constexpr, HAS_Y2: tl.constexpr, STORE_X: tl.constexpr, MODE: tl.constexpr,
        BLOCK_C: tl.constexpr, ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        # MODE 0: x_new only. MODE 1: h = LN(x_new)*(1+P1[g]) + P0[g] (P0 shift, P1 scale).
        # MODE 2: h = LN(x_new)*P0 + P1 (P0 weight [C], P1 bias [C]).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols[None, :] < C
        mask = rmask[:, None] & cmask
        b = (rows // L).to(tl.int64)
        s = (rows % L).to(tl.int64)
        g = (s >= split).to(tl.int64)
        x = tl.load(X + (b * sxb + s * sxl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + (b * syb + s * syl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + (b * sgb + g * sgg)[:, None] + cols[None, :], mask=mask, other=0.0)
            x = x + y * gate.to(tl.float32)
        else:
            x = x + y
        if HAS_Y2:  # a second, ungated residual (the cross-attention output)
            y2 = tl.load(Y2 + (b * s2b + s * s2l)[:, None] + cols[None, :], mask=mask, other=0.0)
            x = x + y2.to(tl.float32)
        if STORE_X:
            tl.store(XO + (b * sob + s * sol)[:, None] + cols[None, :], x, mask=mask)
        if MODE != 0:
            u = _layernorm_rows(x, cmask, C, eps)
            if MODE == 1:
                sh = tl.load(P0 + (b * s0b + g * s0g)[:, None] + cols[None, :], mask=mask, other=0.0)
                sc = tl.load(P1 + (b * s1b + g * s1g)[:, None] + cols[None, :], mask=mask, other=0.0)
                h = u * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
            else:
                w = tl.load(P0 + cols, mask=cols < C, other=0.0).to(tl.float32)
                bb = tl.load(P1 + cols, mask=cols < C, other=0.0).to(tl.float32)
                h = u * w[None, :] + bb[None, :]
            tl.store(H + (b * shb + s * shl)[:, None] + cols[None, :],
                     to_dtype(h, H.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------- references


def gated_residual_reference(x, y, gate=None, split=None):
    """x_new = fp32(x) + fp32(y) * gate[g]  (gate None: x + y)."""
    L = x.shape[1]
    if gate is None:
        return x.float() + y.float()
    gate = as_segment_param(gate, x.shape[2])
    return x.float() + y.float() * segment_expand(gate.float(), L, split)


def gated_residual_layernorm_affine_reference(x, y, gate, split, weight, bias, *, eps=1e-6,
                                              out_dtype=torch.bfloat16):
    xn = gated_residual_reference(x, y, gate, split)
    h = F.layer_norm(xn, (xn.shape[-1],), weight.float(), bias.float(), eps=eps)
    return xn, h.to(out_dtype)


def residual_add_norm_modulate_reference(x, y, shift, scale, split, *, eps=1e-6, out_dtype=torch.bfloat16):
    from .norm_modulate import norm_modulate_reference

    xn = gated_residual_reference(x, y, None, split)
    return xn, norm_modulate_reference(xn, shift, scale, split, eps=eps, out_dtype=out_dtype)


def gated_residual_norm_modulate_reference(x, y, gate, shift, scale, split, *, eps=1e-6,
                                           out_dtype=torch.bfloat16):
    from .norm_modulate import norm_modulate_reference

    xn = gated_residual_reference(x, y, gate, split)
    return xn, norm_modulate_reference(xn, shift, scale, split, eps=eps, out_dtype=out_dtype)


def residual_pair_norm_modulate_reference(x, y, gate, y2, shift, scale, split, *, eps=1e-6,
                                          out_dtype=torch.bfloat16):
    """Both residuals of the attention half of a block: (x + y*gate[g]) + y2, then norm2."""
    xn = gated_residual_reference(gated_residual_reference(x, y, gate, split), y2)
    from .norm_modulate import norm_modulate_reference

    return xn, norm_modulate_reference(xn, shift, scale, split, eps=eps, out_dtype=out_dtype)


# ----------------------------------------------------------------------------- wrappers


def _x_out(x, out):
    """Where x_new goes: `out` if given; else in place when x is fp32; else a new fp32 tensor."""
    if out is not None:
        return out
    if x.dtype == torch.float32:
        return x
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def _launch(x, y, gate, split, mode, p0, p1, h, xo, eps, y2=None):
    """xo None: x_new is not stored (only h)."""
    B, L, C = x.shape
    n_rows = B * L
    if n_rows == 0:
        return
    BLOCK_C, ROWS, num_warps = row_norm_launch(C)

    def seg_strides(p):
        if p is None:
            return 0, 0
        return batch_stride(p, B), (p.stride(1) if p.shape[1] == 2 else 0)

    sgb, sgg = seg_strides(gate)
    s0b, s0g = seg_strides(p0) if mode == _MODE_MODULATE else (0, 0)
    s1b, s1g = seg_strides(p1) if mode == _MODE_MODULATE else (0, 0)
    hh = h if h is not None else xo
    y2_ = y2 if y2 is not None else y
    xo_ = xo if xo is not None else hh
    _residual_norm_kernel[(triton.cdiv(n_rows, ROWS),)](
        x, y, gate if gate is not None else x, y2_, xo_,
        p0 if p0 is not None else x, p1 if p1 is not None else x, hh,
        n_rows, L, C, clamp_split(split, L),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), sgb, sgg, y2_.stride(0), y2_.stride(1),
        xo_.stride(0), xo_.stride(1), s0b, s0g, s1b, s1g, hh.stride(0), hh.stride(1),
        eps,
        HAS_GATE=gate is not None, HAS_Y2=y2 is not None, STORE_X=xo is not None, MODE=mode,
        BLOCK_C=BLOCK_C, ROWS=ROWS,
        INTERPRET=is_interpreter(), num_warps=num_warps,
    )


def _supported(x, y, xo, *others):
    """xo None: x_new is not stored."""
    ts = [t for t in (x, y, xo) + others if t is not None]
    return (
        kernels_usable(*ts)
        and x.dim() == 3 and y.shape == x.shape
        and x.dtype in (torch.float32, torch.bfloat16)
        and y.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and (xo is None or (xo.dtype == torch.float32 and xo.shape == x.shape))
        and all(t.stride(-1) == 1 for t in ts)
    )


def gated_residual(x, y, gate=None, split=None, *, out=None):
    """x_new = x + fp32(y) * gate[g]; gate [B|1, G, C] fp32 or None (plain add, e.g. cross-attn or
    audio injection output). Writes in place into x when x is fp32 and `out` is None; returns x_new."""
    C = x.shape[-1]
    gate = as_segment_param(gate, C) if gate is not None else None
    xo = _x_out(x, out)
    if not _supported(x, y, xo, gate):
        xo.copy_(gated_residual_reference(x, y, gate, split))
        return xo
    _launch(x, y, gate, split, _MODE_NONE, None, None, None, xo, 0.0)
    return xo


def gated_residual_layernorm_affine(x, y, gate, split, weight, bias, *, eps=1e-6, out=None, h_out=None,
                                    out_dtype=torch.bfloat16, store_x=True):
    """Self-attn residual + norm3: returns (x_new, h = bf16(LN(x_new) * weight + bias)).
    ``store_x=False``: x_new is not written (x is left as it was; returns (None, h)): the
    caller adds this residual again with the next one (``residual_pair_norm_modulate``)."""
    B, L, C = x.shape
    gate = as_segment_param(gate, C) if gate is not None else None
    xo = _x_out(x, out) if store_x else None
    h = h_out if h_out is not None else torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    w, bvec = weight.contiguous(), bias.contiguous()
    if not (_supported(x, y, xo, gate, h, w, bvec) and w.numel() == C and bvec.numel() == C):
        xn, hr = gated_residual_layernorm_affine_reference(x, y, gate, split, weight, bias, eps=eps,
                                                           out_dtype=h.dtype)
        h.copy_(hr)
        if xo is not None:
            xo.copy_(xn)
        return xo, h
    _launch(x, y, gate, split, _MODE_AFFINE, w, bvec, h, xo, eps)
    return xo, h


def _residual_modulate(x, y, gate, shift, scale, split, eps, out, h_out, out_dtype, y2=None):
    B, L, C = x.shape
    gate = as_segment_param(gate, C) if gate is not None else None
    shift, scale = as_segment_param(shift, C), as_segment_param(scale, C)
    xo = _x_out(x, out)
    h = h_out if h_out is not None else torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    if not (_supported(x, y, xo, gate, shift, scale, h, y2) and (y2 is None or y2.shape == x.shape)):
        xn, hr = residual_pair_norm_modulate_reference(x, y, gate, y2, shift, scale, split, eps=eps,
                                                       out_dtype=h.dtype) if y2 is not None else \
            gated_residual_norm_modulate_reference(x, y, gate, shift, scale, split, eps=eps,
                                                   out_dtype=h.dtype)
        xo.copy_(xn)
        h.copy_(hr)
        return xo, h
    _launch(x, y, gate, split, _MODE_MODULATE, shift, scale, h, xo, eps, y2=y2)
    return xo, h


def residual_add_norm_modulate(x, y, shift, scale, split, *, eps=1e-6, out=None, h_out=None,
                               out_dtype=torch.bfloat16):
    """Cross-attn residual (no gate) + norm2: returns (x_new, h = bf16(LN(x_new)*(1+scale[g])+shift[g]))."""
    return _residual_modulate(x, y, None, shift, scale, split, eps, out, h_out, out_dtype)


def gated_residual_norm_modulate(x, y, gate, shift, scale, split, *, eps=1e-6, out=None, h_out=None,
                                 out_dtype=torch.bfloat16):
    """FFN residual + next block's norm1: returns (x_new, h). shift/scale may be G = 1 (head)."""
    return _residual_modulate(x, y, gate, shift, scale, split, eps, out, h_out, out_dtype)


def residual_pair_norm_modulate(x, y, gate, y2, shift, scale, split, *, eps=1e-6, out=None, h_out=None,
                                out_dtype=torch.bfloat16):
    """Self-attn residual (gated) + cross-attn residual (y2, ungated) + norm2 in one pass:
    returns (x_new = (x + y*gate[g]) + y2, h = bf16(LN(x_new)*(1+scale[g])+shift[g])). Same fp32
    operations in the same order as the two residual kernels; saves writing and re-reading x."""
    return _residual_modulate(x, y, gate, shift, scale, split, eps, out, h_out, out_dtype, y2=y2)
