"""Full-width QK-RMSNorm + interleaved-pair RoPE + bf16 cast, q and k in one launch (spec §10.4).

Per token row q [C = H*D] (the bf16 GEMM output):
    r   = rsqrt( mean_c(fp32(q)^2) + eps )            # over all C features (all heads jointly)
    qn  = bf16( bf16(q * r) * w )                     # w bf16 [C]: a bf16 multiply
    per head h, pair j: (a, b) = (qn[h, 2j], qn[h, 2j+1]), theta = angle[token, j]
    out[h, 2j]   = bf16(a cos - b sin);   out[h, 2j+1] = bf16(a sin + b cos)
cos/sin: fp32 [L, D/2] (or [B, L, D/2]), the same angles for all heads and for q and k. The
reference rotates in float64 and stores fp32 before the bf16 cast; fp32 trig/FMAs differ from that
far below bf16 resolution (a rare 1-ulp flip at a rounding boundary).
"""
from __future__ import annotations

import torch

from ._utils import is_interpreter, kernels_usable, next_pow2, to_dtype, triton, tl

# bf16 outputs: 1 bf16 ulp (summation order of the sum of squares, fp32 vs fp64 rotation).
TOLERANCES = {torch.bfloat16: dict(atol=1e-2, rtol=2**-7)}

if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        Q, K, WQ, WK, COS, SIN, QO, KO,
        L, C, H,
        sqb, sql, skb, skl, scb, scl, ssb, ssl, sqob, sqol, skob, skol,
        eps,
        D: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        row = tl.program_id(0)
        which = tl.program_id(1)  # 0: q, 1: k
        b = (row // L).to(tl.int64)
        s = (row % L).to(tl.int64)
        if which == 0:
            src = Q + b * sqb + s * sql
            dst = QO + b * sqob + s * sqol
            wp = WQ
        else:
            src = K + b * skb + s * skl
            dst = KO + b * skob + s * skol
            wp = WK
        HALF: tl.constexpr = D // 2
        # whole row as [BLOCK_H, D] (contiguous, vectorised loads), split into interleaved pairs
        hh = tl.arange(0, BLOCK_H)[:, None]
        dd = tl.arange(0, D)[None, :]
        mask = (hh < H) & (dd < D)
        offs = hh * D + dd
        x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / C + eps)
        w = tl.load(wp + offs, mask=mask, other=0.0).to(tl.float32)
        # rounded to the input dtype, then times w in that dtype: for bf16, bf16(q*r) * w is exact in
        # fp32 (8-bit x 8-bit significands), so one more rounding equals the bf16 multiply.
        DT = QO.dtype.element_ty
        xn = to_dtype(to_dtype(x * r, DT, INTERPRET).to(tl.float32) * w, DT, INTERPRET).to(tl.float32)
        a, c = tl.split(tl.reshape(xn, [BLOCK_H, HALF, 2]))
        jj = tl.arange(0, HALF)[None, :]
        cos = tl.load(COS + b * scb + s * scl + jj).to(tl.float32)
        sin = tl.load(SIN + b * ssb + s * ssl + jj).to(tl.float32)
        out = tl.reshape(tl.join(a * cos - c * sin, a * sin + c * cos), [BLOCK_H, D])
        tl.store(dst + offs, to_dtype(out, DT, INTERPRET), mask=mask)


def _rope_table(t, B, L, half):
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.shape[-2:] != (L, half) or t.shape[0] not in (1, B):
        raise ValueError(f"rope table must be [L={L}, {half}] or [B, L, {half}], got {tuple(t.shape)}")
    return t


def rms_norm_bf16_reference(x, w, eps=1e-6):
    """WanRMSNorm as the reference runs it: fp32 statistics, rounded to bf16, then bf16 * bf16 weight."""
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return n * w


def rope_reference(x, cos, sin):
    """Interleaved-pair rotation in float64, stored fp32 (as the reference), x [B, L, H, D]."""
    B, L, H, D = x.shape
    cos = _rope_table(cos, B, L, D // 2).double()[:, :, None, :]
    sin = _rope_table(sin, B, L, D // 2).double()[:, :, None, :]
    xd = x.double().reshape(B, L, H, D // 2, 2)
    a, c = xd[..., 0], xd[..., 1]
    return torch.stack([a * cos - c * sin, a * sin + c * cos], dim=-1).reshape(B, L, H, D).float()


def qk_norm_rope_reference(q, k, wq, wk, cos, sin, num_heads, *, eps=1e-6):
    """q, k [B, L, C] bf16 -> (q_out, k_out) [B, L, H, D] bf16 (fp32 in -> fp32 out, same rules)."""
    outs = []
    for x, w in ((q, wq), (k, wk)):
        B, L, C = x.shape
        xn = rms_norm_bf16_reference(x, w.to(x.dtype), eps)
        outs.append(rope_reference(xn.view(B, L, num_heads, C // num_heads), cos, sin).to(x.dtype))
    return outs[0], outs[1]


def qk_norm_rope(q, k, wq, wk, cos, sin, num_heads, *, eps=1e-6, q_out=None, k_out=None):
    """Fused RMSNorm(full width) + RoPE for q and k in one launch.

    q, k: [B, L, C] bf16 (last dim contiguous; any row stride, e.g. views of a fused QKV output);
    wq, wk: [C] bf16; cos, sin: [L, D/2] or [B, L, D/2] fp32. Returns (q_out, k_out) [B, L, H, D] bf16.
    fp32 q/k (fp32-weight runs) are supported too: rounding steps then happen in fp32, output fp32.
    """
    B, L, C = q.shape
    H = int(num_heads)
    D = C // H
    cos = _rope_table(cos, B, L, D // 2)
    sin = _rope_table(sin, B, L, D // 2)
    if q_out is None:
        q_out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    ok = (
        kernels_usable(q, k, wq, wk, cos, sin, q_out, k_out)
        and k.shape == q.shape and C == H * D and D % 2 == 0 and next_pow2(D // 2) == D // 2
        and q.dtype in (torch.bfloat16, torch.float32) and k.dtype == q.dtype
        and wq.dtype in (torch.bfloat16, q.dtype) and wk.dtype == wq.dtype
        and wq.is_contiguous() and wk.is_contiguous() and wq.numel() == C and wk.numel() == C
        and all(t.stride(-1) == 1 for t in (q, k, cos, sin))
        and q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == k_out.dtype == q.dtype
    )
    if not ok:
        qr, kr = qk_norm_rope_reference(q, k, wq, wk, cos, sin, H, eps=eps)
        q_out.copy_(qr)
        k_out.copy_(kr)
        return q_out, k_out
    if B * L == 0:
        return q_out, k_out
    BLOCK_H = next_pow2(H)
    num_warps = 8 if BLOCK_H * D >= 4096 else 4
    _qk_norm_rope_kernel[(B * L, 2)](
        q, k, wq, wk, cos, sin, q_out, k_out,
        L, C, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
        0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        eps,
        D=D, BLOCK_H=BLOCK_H, INTERPRET=is_interpreter(), num_warps=num_warps,
    )
    return q_out, k_out
