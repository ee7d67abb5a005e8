"""Audio injection pieces (spec §4.11, §10.9): per-frame AdaLN and 5-key per-frame cross-attention.

(a) audio_adaln: token s of the noisy stream belongs to latent frame f = s // Nf (Nf = th*tw tokens
    per frame, contiguous). shift/scale are the bf16 outputs of the injector's Linear, per frame:
        u   = LN_{eps=1e-5}(x_s)                      # fp32 stats, biased var, no affine
        opl = bf16(1 + scale[f])                      # (1 + scale) is a bf16 op in the reference
        A_s = bf16( u * fp32(opl) + fp32(shift[f]) )  # product/sum fp32, cast by the Wq GEMM
(b) frame_cross_attention: for every token s (frame f) and head h, the NK = 5 keys of its frame:
        logit_j = (q_s . k_{f,j}) / sqrt(D) (fp32), p = softmax_j(logit) (fp32), o = bf16(sum_j p_j v_{f,j})
    Keys/values stay in registers: this replaces a batched SDPA call with 5 keys. The reference ran
    FlashAttention, which rounds p to bf16 before the PV product; we keep p in fp32 (closer to exact).
(b') frame_attention_probs: the same softmax, written out as P [B, Lv, KP] (column h*NK + j is p_j
    of head h, column H*NK is 1, the rest up to KP (a multiple of 8) 0) for the injector's output
    projection folded with the values (``fast/folded_output.py``): y = P @ [Wo_h v_{f,j}; bo].
(c) audio_residual_add: x[:, :Lv] += fp32(bf16 out) (plain residual, no gate) via gated_residual.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._utils import is_interpreter, kernels_usable, next_pow2, row_norm_launch, to_dtype, triton, tl
from .gated_residual import gated_residual

TOLERANCES = {torch.bfloat16: dict(atol=1e-2, rtol=2**-7)}

if triton is not None:
    from .norm_modulate import _layernorm_rows

    @triton.jit
    def _audio_adaln_kernel(
        X, SHIFT, SCALE, OUT,
        n_rows, Lv, C, Nf,
        sxb, sxl, ssb, ssf, scb, scf, sob, sol,
        eps,
        BLOCK_C: tl.constexpr, ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols[None, :] < C
        mask = rmask[:, None] & cmask
        b = (rows // Lv).to(tl.int64)
        s = (rows % Lv).to(tl.int64)
        f = s // Nf
        x = tl.load(X + (b * sxb + s * sxl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = _layernorm_rows(x, cmask, C, eps)
        sh = tl.load(SHIFT + (b * ssb + f * ssf)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + (b * scb + f * scf)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        opl = to_dtype(1.0 + sc, SHIFT.dtype.element_ty, INTERPRET).to(tl.float32)  # 1 + scale in its dtype
        out = u * opl + sh
        tl.store(OUT + (b * sob + s * sol)[:, None] + cols[None, :],
                 to_dtype(out, OUT.dtype.element_ty, INTERPRET), mask=mask)

    @triton.jit
    def _frame_attn_kernel(
        Q, K, V, O,
        Nf, F, H, sm_scale,
        sqb, sql, sqh, skb, skf, skj, skh, svb, svf, svj, svh, sob, sol, soh,
        D: tl.constexpr, NK: tl.constexpr, BLOCK_S: tl.constexpr, HB: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)  # token index inside the frame
        bf = tl.program_id(1)
        b = (bf // F).to(tl.int64)
        f = (bf % F).to(tl.int64)
        h = tl.program_id(2) * HB + tl.arange(0, HB)
        d = tl.arange(0, D)
        s = (f * Nf + t).to(tl.int64)
        t3 = t[:, None, None]
        h3 = h[None, :, None]
        d3 = d[None, None, :]
        m3 = (t3 < Nf) & (h3 < H) & (d3 < D)
        q = tl.load(Q + b * sqb + s[:, None, None] * sql + h3 * sqh + d3, mask=m3, other=0.0).to(tl.float32)
        hk = h[:, None]
        mk = (hk < H) & (d[None, :] < D)
        m_i = tl.full([BLOCK_S, HB], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_S, HB], tl.float32)
        acc = tl.zeros([BLOCK_S, HB, D], tl.float32)
        for j in tl.static_range(NK):
            kj = tl.load(K + b * skb + f * skf + j * skj + hk * skh + d[None, :], mask=mk, other=0.0).to(tl.float32)
            vj = tl.load(V + b * svb + f * svf + j * svj + hk * svh + d[None, :], mask=mk, other=0.0).to(tl.float32)
            logit = tl.sum(q * kj[None, :, :], axis=2) * sm_scale
            m_new = tl.maximum(m_i, logit)
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(logit - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, :, None] + p[:, :, None] * vj[None, :, :]
            m_i = m_new
        out = acc / l_i[:, :, None]
        tl.store(O + b * sob + s[:, None, None] * sol + h3 * soh + d3, to_dtype(out, O.dtype.element_ty, INTERPRET), mask=m3)


    @triton.jit
    def _frame_probs_kernel(
        Q, K, P,
        Nf, F, H, sm_scale,
        sqb, sql, sqh, skb, skf, skj, skh, spb, spl,
        D: tl.constexpr, NK: tl.constexpr, BLOCK_S: tl.constexpr, HB: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        bf = tl.program_id(1)
        b = (bf // F).to(tl.int64)
        f = (bf % F).to(tl.int64)
        h = tl.program_id(2) * HB + tl.arange(0, HB)
        d = tl.arange(0, D)
        s = (f * Nf + t).to(tl.int64)
        t3 = t[:, None, None]
        h3 = h[None, :, None]
        d3 = d[None, None, :]
        m3 = (t3 < Nf) & (h3 < H) & (d3 < D)
        q = tl.load(Q + b * sqb + s[:, None, None] * sql + h3 * sqh + d3, mask=m3, other=0.0).to(tl.float32)
        hk = h[:, None]
        mk = (hk < H) & (d[None, :] < D)
        k_base = K + b * skb + f * skf + hk * skh + d[None, :]
        m_i = tl.full([BLOCK_S, HB], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_S, HB], tl.float32)
        for j in tl.static_range(NK):  # pass 1: row max and sum (online)
            kj = tl.load(k_base + j * skj, mask=mk, other=0.0).to(tl.float32)
            logit = tl.sum(q * kj[None, :, :], axis=2) * sm_scale
            m_new = tl.maximum(m_i, logit)
            l_i = l_i * tl.exp(m_i - m_new) + tl.exp(logit - m_new)
            m_i = m_new
        mp = (t[:, None] < Nf) & (h[None, :] < H)
        p_base = P + b * spb + s[:, None] * spl + h[None, :] * NK
        for j in tl.static_range(NK):  # pass 2: normalised probabilities
            kj = tl.load(k_base + j * skj, mask=mk, other=0.0).to(tl.float32)
            logit = tl.sum(q * kj[None, :, :], axis=2) * sm_scale
            tl.store(p_base + j, to_dtype(tl.exp(logit - m_i) / l_i, P.dtype.element_ty, INTERPRET), mask=mp)


# ----------------------------------------------------------------------------- references


def audio_adaln_reference(hv, shift, scale, tokens_per_frame, *, eps=1e-5):
    """hv [B, Lv, C] (fp32), shift/scale [B, F, C] bf16 per latent frame -> bf16 [B, Lv, C]
    (output and the 1 + scale rounding follow shift's dtype: fp32 shift -> fp32 math and output)."""
    B, Lv, C = hv.shape
    Fr = Lv // tokens_per_frame
    u = F.layer_norm(hv.float(), (C,), eps=eps).view(B, Fr, tokens_per_frame, C)
    opl = 1 + scale  # bf16 op (rounded), as in the reference
    a = u * opl[:, :, None, :] + shift[:, :, None, :]
    return a.view(B, Lv, C).to(shift.dtype)


def frame_cross_attention_reference(q, k, v, *, softmax_scale=None):
    """q [B, Lv, H, D], k/v [B, F, NK, H, D] -> [B, Lv, H, D] (q.dtype); fp32 logits/softmax/PV."""
    B, Lv, H, D = q.shape
    Fr = k.shape[1]
    Nf = Lv // Fr
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().view(B, Fr, Nf, H, D)
    logits = torch.einsum("bfshd,bfjhd->bfhsj", qf, k.float()) * scale
    p = torch.softmax(logits, dim=-1)
    o = torch.einsum("bfhsj,bfjhd->bfshd", p, v.float())
    return o.reshape(B, Lv, H, D).to(q.dtype)


def frame_probs_width(H: int, NK: int) -> int:
    """Columns of frame_attention_probs' output: H*NK probabilities, a ones column, zeros to a
    multiple of 8 (16-byte rows for the GEMM)."""
    return -(-(H * NK + 1) // 8) * 8


def frame_attention_probs_reference(q, k, *, softmax_scale=None):
    """q [B, Lv, H, D], k [B, F, NK, H, D] -> P [B, Lv, frame_probs_width(H, NK)] (q.dtype)."""
    B, Lv, H, D = q.shape
    Fr, NK = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    logits = torch.einsum("bfshd,bfjhd->bfshj", q.float().view(B, Fr, Lv // Fr, H, D), k.float()) * scale
    out = q.new_zeros(B, Lv, frame_probs_width(H, NK))
    out[..., :H * NK] = torch.softmax(logits, dim=-1).reshape(B, Lv, H * NK).to(q.dtype)
    out[..., H * NK] = 1
    return out


# ----------------------------------------------------------------------------- wrappers


def audio_adaln(hv, shift, scale, tokens_per_frame, *, eps=1e-5, out=None):
    """Per-frame AdaLN of the noisy tokens. hv [B, Lv, C] fp32 (e.g. the view x[:, :Lv]); shift,
    scale [B, F, C] bf16 (e.g. the two halves of the injector Linear output). Returns bf16 [B, Lv, C]
    (fp32 shift/scale, as in fp32-weight runs: fp32 output)."""
    B, Lv, C = hv.shape
    Nf = int(tokens_per_frame)
    if out is None:
        out = torch.empty((B, Lv, C), dtype=shift.dtype, device=hv.device)
    ok = (
        kernels_usable(hv, shift, scale, out)
        and Nf > 0 and Lv % Nf == 0
        and shift.shape == (B, Lv // Nf, C) and scale.shape == shift.shape
        and hv.dtype in (torch.float32, torch.bfloat16)
        and shift.dtype in (torch.bfloat16, torch.float32) and scale.dtype == shift.dtype
        and out.dtype == shift.dtype
        and all(t.stride(-1) == 1 for t in (hv, shift, scale, out))
    )
    if not ok:
        out.copy_(audio_adaln_reference(hv, shift, scale, Nf, eps=eps))
        return out
    n_rows = B * Lv
    if n_rows == 0:
        return out
    BLOCK_C, ROWS, num_warps = row_norm_launch(C)
    _audio_adaln_kernel[(triton.cdiv(n_rows, ROWS),)](
        hv, shift, scale, out,
        n_rows, Lv, C, Nf,
        hv.stride(0), hv.stride(1), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1),
        eps,
        BLOCK_C=BLOCK_C, ROWS=ROWS, INTERPRET=is_interpreter(), num_warps=num_warps,
    )
    return out


def frame_cross_attention(q, k, v, *, softmax_scale=None, out=None):
    """Per-latent-frame cross-attention: q [B, Lv, H, D] bf16, k/v [B, F, NK(=5), H, D] bf16
    (last dim contiguous, any other strides) -> [B, Lv, H, D] bf16. Token s attends frame s // (Lv/F)."""
    B, Lv, H, D = q.shape
    Fr, NK = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Lv, H, D), dtype=q.dtype, device=q.device)
    ok = (
        kernels_usable(q, k, v, out)
        and Fr > 0 and Lv % Fr == 0 and k.shape == (B, Fr, NK, H, D) and v.shape == k.shape
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype == q.dtype and v.dtype == q.dtype and out.dtype == q.dtype
        and next_pow2(D) == D and 1 <= NK <= 16
        and all(t.stride(-1) == 1 for t in (q, k, v, out))
    )
    if not ok:
        out.copy_(frame_cross_attention_reference(q, k, v, softmax_scale=scale))
        return out
    Nf = Lv // Fr
    if B * Lv == 0:
        return out
    HB = max(1, min(next_pow2(H), 4096 // (32 * D)))  # 32 tokens x HB heads x D per program
    BLOCK_S = 32
    grid = (triton.cdiv(Nf, BLOCK_S), B * Fr, triton.cdiv(H, HB))
    _frame_attn_kernel[grid](
        q, k, v, out,
        Nf, Fr, H, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, NK=NK, BLOCK_S=BLOCK_S, HB=HB, INTERPRET=is_interpreter(), num_warps=4,
    )
    return out


def frame_attention_probs(q, k, *, softmax_scale=None, out=None):
    """The per-frame softmax of ``frame_cross_attention`` as P [B, Lv, KP] (q.dtype; layout in the
    module docstring, KP = frame_probs_width(H, NK)). q [B, Lv, H, D], k [B, F, NK, H, D]."""
    B, Lv, H, D = q.shape
    Fr, NK = k.shape[1], k.shape[2]
    KP = frame_probs_width(H, NK)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Lv, KP), dtype=q.dtype, device=q.device)
    ok = (
        kernels_usable(q, k, out)
        and Fr > 0 and Lv % Fr == 0 and k.shape == (B, Fr, NK, H, D) and out.shape == (B, Lv, KP)
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and k.dtype == q.dtype and out.dtype == q.dtype
        and next_pow2(D) == D and 1 <= NK <= 16
        and q.stride(-1) == 1 and k.stride(-1) == 1 and out.stride(-1) == 1
    )
    if not ok:
        out.copy_(frame_attention_probs_reference(q, k, softmax_scale=scale))
        return out
    if B * Lv == 0:
        return out
    out[..., H * NK:] = 0
    out[..., H * NK] = 1
    HB = max(1, min(next_pow2(H), 4096 // (32 * D)))
    BLOCK_S = 32
    grid = (triton.cdiv(Lv // Fr, BLOCK_S), B * Fr, triton.cdiv(H, HB))
    _frame_probs_kernel[grid](
        q, k, out,
        Lv // Fr, Fr, H, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        out.stride(0), out.stride(1),
        D=D, NK=NK, BLOCK_S=BLOCK_S, HB=HB, INTERPRET=is_interpreter(), num_warps=4,
    )
    return out


def audio_residual_add(x, y, num_noisy_tokens=None):
    """x[:, :Lv] += fp32(y) in place (x fp32 [B, L, C], y bf16 [B, Lv, C]); returns x."""
    Lv = y.shape[1] if num_noisy_tokens is None else int(num_noisy_tokens)
    xv = x[:, :Lv]
    gated_residual(xv, y, None, None, out=xv)
    return x
