"""FP8 (e4m3) attention forward for Hopper, SageAttention-style; attention backend ``"fp8"``.

Layout and contract as ``flash_attention.py``: q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16/fp16,
last dim contiguous, any strides) -> [B, Lq, H, D] in q's dtype; non-causal, unmasked, scale
1/sqrt(D) by default; D in (64, 128); any Lq, Lk (tails masked), Lq != Lk allowed.

Algorithm (all of it in :func:`fp8_attention_reference` as plain torch, the exact emulation):

1. K smoothing: ``k_c = k - mean_j k[b, j, h]`` (fp32 mean over the sequence per batch and head).
   softmax is invariant to it: q . mean_k is the same for every key of a query row.
2. Quantisation to e4m3 (round to nearest even; value * 448 / amax, so each row's largest
   element is exact), one scale per row of 128 (or 64) channels:
   * Q per token and head (finer than per block and free: the scale is a per-row factor in the
     softmax FMA); the softmax scale and log2(e) are folded into Q's scale.
   * K (``k_scale``, env ``S2V_FP8_ATTN_K``): "channel" (default) scales each channel of the
     head over the sequence and moves the channel scales into q before q's quantisation
     (q . k unchanged), so the kernel does no per-key work; "token" scales each key (its largest
     element exact), which costs one multiply per score in the kernel's softmax (~15 % of the
     CUDA kernel's speed) for less error. On :func:`make_realistic_qkv` data (L 2048, 2 heads,
     seeds 0-5, logit std 2) the output error is 2.9 % mean / 3.2 % worst per channel, 2.3 % /
     2.8 % per key, 2.7 % / 3.1 % per 16 or 32 keys, 2.8 % / 3.4 % per 128 and 3.2 % / 4.0 % per
     head (bench/NOTES.md section 14). Per key, the scales are stored in fp16 relative to a
     per-head power of two ``k_pow`` (>= the head's largest key scale; folded into Q's scale,
     exactly): the same error as fp32 scales (2^-11 against e4m3's 2^-4 per element).
   * V (``pv="fp8"``) per channel (b, h, d) over the sequence, stored transposed [B, H, D, L]:
     Hopper's fp8 wgmma needs its B operand K-major, and for P @ V the K dim is the key index.
3. S = (q8 @ k8^T) [fp8 MMA, fp32 accumulate] (* ks[key], per key) * qs[query] (qs incl. k_pow);
   online softmax in fp32 with exp2 over key blocks of BLOCK_N.
4. P @ V: ``pv="fp8"`` (default): P is produced already times 448 (log2(448) folded into the
   exp2 argument) and rounded to e4m3, V e4m3 per channel; the fp8 MMA accumulates each key block
   into a fresh partial sum that is then added in fp32 (``max_num_imprecise_acc = BLOCK_N``:
   Hopper's fp8 MMA accumulator keeps only ~14 bits, the two-level accumulation of
   SageAttention2). The row sum l: in the CUDA kernel the sum of the rounded P (the weights P.V
   used), which it gets from the P.V MMA through 8 columns of ones after V, replacing 64 adds per
   thread and tile (+5-6 %); in the Triton kernel the sum of the fp32 P (rounding P in fp32 for
   the sum cost it ~20 %); the emulation does either (``l_rounded``), the error differs by ~0.01
   points. ``pv="bf16"``: P rounded to bf16, original bf16 V (FlashAttention-style), l of the
   fp32 P. Output = acc / l (* V channel scale).

Why fp8 P.V is the default: on the realistic activations of :func:`make_realistic_qkv` (L 4096,
logit std 1-3) it adds 0.1-0.25 percentage points of relative L2 on top of the 0.4-4.4 % of the
fp8 QK^T (errors add in quadrature), for twice the P.V MMA rate. ``pv="bf16"`` / env
``S2V_FP8_ATTN_PV=bf16`` is the more accurate and slower mode.

Accuracy vs fp32 (emulation, CPU, L 4096, 4 heads, 2 seeds, pv=fp8, K per key): logit std 1.0: 0.44 % rel L2
(cos 0.99999); 1.5: 1.0 %; 2.0: 2.1 % (cos 0.99983); 2.5: 3.4 %; 3.0: 4.6 % (cos 0.99922). The
error grows with how peaked the attention is; the issue's 3 % holds up to logit std ~2.3. Without
the K centring, keys with a common offset give 5-27 % at logit std 2.

Cost that benchmarks must include: one stats pass over K (sum, max and min per channel: the mean
and the head's centred abs-max) and V (abs-max), one quantise pass each over Q, K, V (5 reads and
3 fp8 writes of [L, H, D]), done by :func:`quantize_qkv`.

Env: S2V_FP8_ATTN_CONFIG=<index> forces one FP8_CONFIGS entry; S2V_FP8_ATTN_AUTOTUNE=0 takes the
first config that compiles. CPU: under TRITON_INTERPRET=1 the dots are upcast to fp32 (fp8 -> fp32
is exact; bf16 dots are broken in the triton 3.9 interpreter) and the fp8 casts are rounded by
hand (see fp8_gemm.e4m3_round), so the kernel computes the same numbers as on the GPU.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..options import FP8_K_SCALES, FP8_PV_MODES, env_options
from ._utils import (
    dot_upcast,
    ensure_tma_allocator,
    forced_config,
    has_tensor_descriptor,
    is_interpreter,
    kernels_usable,
    load_rows,
    next_pow2,
    outputs_agree,
    shape_bucket,
    to_dtype,
    triton,
    tl,
)
from .fp8_gemm import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, _inv_and_scale, accuracy

LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(FP8_MAX)
PV_MODES = FP8_PV_MODES  # ("fp8", "bf16"); default_pv(): the one S2V_FP8_ATTN_PV picks
DEFAULT_PV = FP8_PV_MODES[0]
K_SCALES = FP8_K_SCALES  # K's scale granularity (module docstring, 2.); default_k_scale()
SUPPORTED_D = (64, 128)

# Tuning list. TMA: Q/K (and transposed V) tiles through on-device tensor descriptors; PROMOTE:
# two-level accumulation of the fp8 P.V MMA. Entry 0 is the H100's fastest (672-683 / 644-660
# TFLOP/s kernel-only at 32,760 / 79,200 tokens, results/attention_configs*-*): one warpgroup per CTA in
# 108 KB of shared memory and 215 registers (sm_90 SASS, triton 3.6), so two independent CTAs share
# an SM and one's softmax overlaps the other's MMAs (see flash_attention.FLASH_CONFIGS). Entries 7-8
# (168 registers, 58 / 75 KB) fit three CTAs per SM. The warp-specialised `tl.range` loops of
# triton 3.6 were dropped: 446-563 TFLOP/s.
FP8_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, TMA=True, PROMOTE=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False, PROMOTE=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=False, PROMOTE=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True, PROMOTE=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4, TMA=True, PROMOTE=True),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, TMA=False, PROMOTE=True),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2, TMA=True, PROMOTE=True),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True, PROMOTE=True),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, TMA=True, PROMOTE=True),
]
# self-attention only: fewer keys than this go to the bf16 `auto` choice (fp8_attention_backend)
FP8_MIN_KEYS = env_options().kernels.fp8_attn_min_keys  # S2V_FP8_ATTN_MIN_KEYS; tests patch it
_STATS_CHUNK = 256  # rows per partial-sum program of the K-mean / V-amax pass

if triton is not None:
    from .fp8_gemm import _rdiv, e4m3_round

    @triton.jit
    def _col_stats_kernel(
        X, SUM, MAX, MIN, AMAX, L, C, D, sxb, sxl, sxh, n_chunks,
        CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        DO_SUM: tl.constexpr, DO_MINMAX: tl.constexpr, DO_AMAX: tl.constexpr,
    ):
        """Partial column sum / max / min / abs-max of X [B, L, H, D] over CHUNK rows -> [B, n_chunks, H*D]."""
        chunk = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        coff = (cols // D).to(tl.int64) * sxh + (cols % D)
        base = X + b * sxb
        acc_s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_a = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_hi = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        acc_lo = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
        r0 = chunk * CHUNK
        for r in range(0, CHUNK, BLOCK_R):
            rows = r0 + r + tl.arange(0, BLOCK_R)
            m = (rows < L)[:, None] & cmask[None, :]
            x = tl.load(base + rows.to(tl.int64)[:, None] * sxl + coff[None, :], mask=m, other=0.0).to(tl.float32)
            if DO_SUM:
                acc_s += x
            if DO_MINMAX:
                acc_hi = tl.maximum(acc_hi, tl.where(m, x, float("-inf")))
                acc_lo = tl.minimum(acc_lo, tl.where(m, x, float("inf")))
            if DO_AMAX:
                acc_a = tl.maximum(acc_a, tl.abs(x))
        out = (b * n_chunks + chunk) * C + cols
        if DO_SUM:
            tl.store(SUM + out, tl.sum(acc_s, axis=0), mask=cmask)
        if DO_MINMAX:
            tl.store(MAX + out, tl.max(acc_hi, axis=0), mask=cmask)
            tl.store(MIN + out, tl.min(acc_lo, axis=0), mask=cmask)
        if DO_AMAX:
            tl.store(AMAX + out, tl.max(acc_a, axis=0), mask=cmask)

    @triton.jit
    def _quant_rows_hd_kernel(
        X, Y, S, MEAN, POW, CVEC, L, LY, LS, H, sxb, sxl, sxh, post,
        D: tl.constexpr, BLOCK_R: tl.constexpr, IS_K: tl.constexpr, KCHAN: tl.constexpr,
        PERM32: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Per-(token, head) e4m3 quantisation of X [B, L, H, D] -> Y [B*H, LY, D] fp8 contiguous.

        IS_K: X minus MEAN [B*H, D]; S [B*H, LS] fp16 = amax / 448 * POW[bh] (1 / k_pow); PERM32: row i goes
        to row :func:`perm32_rows` (i) and its scale to :func:`ks_cuda_index` (i) (the CUDA kernel's
        layout). Else (Q): S [B*H, LS] fp32 = amax / 448 * post * POW[bh].
        KCHAN (K's per-channel scales): K is x - MEAN times CVEC [B*H, D] (448 / channel abs-max),
        no S; Q is x times CVEC (the channel scales, amax / 448) before its per-token quantisation."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < L
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + rows64[:, None] * sxl + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        if IS_K:
            mean = tl.load(MEAN + bh.to(tl.int64) * D + offs_d)
            x = x - mean[None, :]
        if KCHAN:
            x = x * tl.load(CVEC + bh.to(tl.int64) * D + offs_d)[None, :]
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)
        inv = _rdiv(tl.full([BLOCK_R], 448.0, tl.float32), amax)
        if IS_K and KCHAN:
            y = tl.minimum(tl.maximum(x, -448.0), 448.0)
        else:
            y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        if PERM32:
            rows64 = (rows64 & ~31) | (rows64 & 0x11) | ((rows64 & 0xC) >> 1) | ((rows64 & 0x2) << 2)
            srow = (rows64 & ~127) | (((rows64 >> 1) & 3) << 5) | (((rows64 >> 3) & 15) << 1) | (rows64 & 1)
        else:
            srow = rows64
        ybase = bh.to(tl.int64) * LY * D
        tl.store(Y + ybase + rows64[:, None] * D + offs_d[None, :], e4m3_round(y, INTERPRET),
                 mask=rmask[:, None])
        scale = _rdiv(amax, tl.full([BLOCK_R], 448.0, tl.float32))
        if IS_K:
            if not KCHAN:
                scale = (scale * tl.load(POW + bh)).to(tl.float16)  # POW holds 1 / k_pow here
                tl.store(S + bh.to(tl.int64) * LS + srow, scale, mask=rmask)
        else:
            scale = scale * post * tl.load(POW + bh)
            tl.store(S + bh.to(tl.int64) * LS + srow, scale, mask=rmask)

    @triton.jit
    def _quant_v_kernel(
        V, VT, INV, L, H, Lp, svb, svl, svh,
        D: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Per-channel e4m3 quantisation of V [B, L, H, D] -> VT [B*H, D, Lp] (keys contiguous).

        The tile is transposed in registers before the store, so each channel's BLOCK_R keys go
        out as whole 16-byte vectors (Lp is a multiple of 16; keys L..Lp get zeros): the untransposed
        store wrote single bytes and ran at ~1/6 of the copy bandwidth (H100 profile)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, D)
        x = tl.load(V + b * svb + h * svh + rows64[:, None] * svl + offs_d[None, :],
                    mask=(rows < L)[:, None], other=0.0).to(tl.float32)
        inv = tl.load(INV + bh.to(tl.int64) * D + offs_d)
        y = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
        vt = VT + bh.to(tl.int64) * D * Lp
        tl.store(vt + offs_d.to(tl.int64)[:, None] * Lp + rows64[None, :], tl.trans(e4m3_round(y, INTERPRET)),
                 mask=(rows < Lp)[None, :])

    @triton.jit
    def _fp8_attn_inner(
        acc, l_i, m_i, q, qs,
        k_src, v_src, ks_base, offs_n, offs_d, svl, Lk, lo, hi,
        D: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, TMA: tl.constexpr,
        PV_FP8: tl.constexpr, PROMOTE: tl.constexpr, HAS_KS: tl.constexpr, UPCAST: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        for start_n in tl.range(lo, hi, BLOCK_N):
            n_idx = start_n + offs_n
            if TMA:
                k = k_src.load([start_n, 0])
            else:
                k = load_rows(k_src, n_idx, offs_d, D, Lk, MASK_N)
            s = dot_upcast(q, tl.trans(k), None, UPCAST)
            if HAS_KS:
                if MASK_N:
                    ksc = tl.load(ks_base + n_idx, mask=n_idx < Lk, other=0.0).to(tl.float32)
                else:
                    ksc = tl.load(ks_base + n_idx).to(tl.float32)
                s = s * ksc[None, :]
            if MASK_N:
                s = tl.where(n_idx[None, :] < Lk, s, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(s, 1) * qs)
            if PV_FP8:  # p * 448 straight from the exp2 (P's e4m3 scale folded in)
                p = tl.math.exp2(s * qs[:, None] - (m_ij - 8.807354922057604)[:, None])
            else:
                p = tl.math.exp2(s * qs[:, None] - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            acc = acc * alpha[:, None]
            if PV_FP8:
                if TMA:
                    vt = v_src.load([0, start_n])
                else:
                    vp = v_src + offs_d[:, None] * svl + n_idx[None, :]
                    if MASK_N:
                        vt = tl.load(vp, mask=n_idx[None, :] < Lk, other=0.0)
                    else:
                        vt = tl.load(vp)
                # row sum of the unrounded P (emulation's l_rounded=False): summing the rounded
                # values costs this kernel ~20% (H100, rounding in fp32; converting the fp8 tensor
                # back gave NaNs), for a 0.01-point difference in the error
                l_i = l_i * alpha + tl.sum(p, 1)
                p8 = e4m3_round(p, INTERPRET)
                if UPCAST:
                    acc = tl.dot(p8.to(tl.float32), tl.trans(vt.to(tl.float32)), acc)
                elif PROMOTE:
                    acc = tl.dot(p8, tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
                else:
                    acc = tl.dot(p8, tl.trans(vt), acc)
            else:
                l_i = l_i * alpha + tl.sum(p, 1)
                v = load_rows(v_src, n_idx, offs_d, svl, Lk, MASK_N)
                acc = dot_upcast(to_dtype(p, v.dtype, INTERPRET), v, acc, UPCAST)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _fp8_attn_fwd_kernel(
        Q8, QS, K8, KS, V, VS, O,
        H, Lq, Lk, Lp, svb, svl, svh, sob, sol, soh,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr, PV_FP8: tl.constexpr, PROMOTE: tl.constexpr, HAS_KS: tl.constexpr,
        UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        bh64 = bh.to(tl.int64)
        b = bh64 // H
        h = bh64 % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q_base = Q8 + bh64 * Lq * D
        k_base = K8 + bh64 * Lk * D
        if PV_FP8:
            v_base = V + bh64 * D * Lp
            svl_eff = Lp
        else:
            v_base = V + b * svb + h * svh
            svl_eff = svl
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[Lq, D], strides=[D, 1], block_shape=[BLOCK_M, D])
            k_src = tl.make_tensor_descriptor(k_base, shape=[Lk, D], strides=[D, 1], block_shape=[BLOCK_N, D])
            if PV_FP8:
                v_src = tl.make_tensor_descriptor(v_base, shape=[D, Lk], strides=[Lp, 1], block_shape=[D, BLOCK_N])
            else:
                v_src = v_base
            q = q_desc.load([start_m * BLOCK_M, 0])
        else:
            k_src = k_base
            v_src = v_base
            q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :],
                        mask=offs_m[:, None] < Lq, other=0.0)
        qs = tl.load(QS + bh64 * Lq + offs_m, mask=offs_m < Lq, other=1.0)
        ks_base = KS + bh64 * Lk
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = (Lk // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fp8_attn_inner(
            acc, l_i, m_i, q, qs, k_src, v_src, ks_base, offs_n, offs_d, svl_eff, Lk, 0, n_full,
            D, BLOCK_N, False, TMA, PV_FP8, PROMOTE, HAS_KS, UPCAST, INTERPRET)
        if n_full < Lk:
            acc, l_i, m_i = _fp8_attn_inner(
                acc, l_i, m_i, q, qs, k_src, v_src, ks_base, offs_n, offs_d, svl_eff, Lk, n_full, Lk,
                D, BLOCK_N, True, TMA, PV_FP8, PROMOTE, HAS_KS, UPCAST, INTERPRET)
        o = acc / l_i[:, None]
        if PV_FP8:
            vs = tl.load(VS + bh64 * D + offs_d)
            o = o * vs[None, :]
        out = to_dtype(o, O.dtype.element_ty, INTERPRET)
        tl.store(O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sol + offs_d[None, :], out,
                 mask=offs_m[:, None] < Lq)


# ----------------------------------------------------------------------------- torch reference
def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _bhld(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D] (view)


def quantize_q_reference(q: torch.Tensor, softmax_scale: float, k_pow: torch.Tensor = None,
                         k_chan: torch.Tensor = None):
    """q [B, L, H, D] -> (e4m3 [B, H, L, D], fp32 scale [B, H, L] incl. softmax scale * log2 e).

    ``k_pow`` [B, H]: K's per-head power of two (k_scale "token"), folded into the scale;
    ``k_chan`` [B, H, D]: K's channel scales (k_scale "channel"), multiplied into q first."""
    x = _bhld(q).float()
    if k_chan is not None:
        x = x * k_chan.float()[:, :, None, :]
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    inv, scale = _inv_and_scale(amax)
    scale = scale * (softmax_scale * LOG2E)
    if k_pow is not None:
        scale = scale * k_pow.float()[..., None]
    return _e4m3(x * inv[..., None]).contiguous(), scale


def k_mean_reference(k: torch.Tensor) -> torch.Tensor:
    """fp32 mean of k [B, L, H, D] over the sequence -> [B, H, D]."""
    return k.float().mean(dim=1)


def k_pow_of(head_amax: torch.Tensor) -> torch.Tensor:
    """A power of two >= (about) head_amax / 448, the largest key scale of the head: the per-key
    scales are stored in fp16 relative to it (<= ~1, fp16's precise range)."""
    return torch.exp2(torch.ceil(torch.log2(head_amax.clamp_min(AMAX_FLOOR) / FP8_MAX)))


def quantize_k_reference(k: torch.Tensor, k_mean: torch.Tensor = None, k_scale: str = "token"):
    """k [B, L, H, D] -> (e4m3 [B, H, L, D] of k - mean, ks, mean [B, H, D], q_factor).

    k_scale "token": ks fp16 [B, H, L] relative to q_factor = k_pow [B, H] fp32 (a power of two,
    :func:`k_pow_of` of the head's abs-max). "channel": ks None, q_factor = the channel scales
    [B, H, D] (channel abs-max over the sequence / 448), which Q takes on (q . k is unchanged)."""
    km = k_mean_reference(k) if k_mean is None else k_mean.float()
    x = _bhld(k).float() - km[:, :, None, :]
    if k_scale == "channel":
        inv, chan = _inv_and_scale(x.abs().amax(2).clamp_min(AMAX_FLOOR))
        return _e4m3(x * inv[:, :, None, :]).contiguous(), None, km, chan
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    k_pow = k_pow_of(amax.amax(-1))
    inv, scale = _inv_and_scale(amax)
    return _e4m3(x * inv[..., None]).contiguous(), (scale / k_pow[..., None]).half(), km, k_pow


def quantize_v_reference(v: torch.Tensor, v_amax: torch.Tensor = None):
    """v [B, L, H, D] -> (e4m3 [B, H, L, D], fp32 per-channel scale [B, H, D])."""
    x = _bhld(v).float()
    amax = (x.abs().amax(2) if v_amax is None else v_amax.float()).clamp_min(AMAX_FLOOR)
    inv, scale = _inv_and_scale(amax)
    return _e4m3(x * inv[:, :, None, :]).contiguous(), scale


def fp8_attention_reference(q, k, v, softmax_scale=None, *, pv: str = None, block_n: int = 128,
                            k_mean: torch.Tensor = None, v_amax: torch.Tensor = None,
                            out_dtype=None, k_scale: str = None, l_rounded: bool = True) -> torch.Tensor:
    """Pure-torch emulation of the fp8 kernel: same quantisation, same online-softmax blocking
    (key blocks of ``block_n``), fp32 arithmetic; [B, Lq, H, D] -> [B, Lq, H, D] (q.dtype).
    ``l_rounded`` (pv="fp8"): the row sum of the e4m3-rounded P (the CUDA kernel) or of the fp32
    P (the Triton kernel)."""
    pv = pv or default_pv()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    out_dtype = out_dtype or q.dtype
    if Lk == 0:
        return torch.zeros_like(q, dtype=out_dtype)
    k_scale = k_scale or default_k_scale()
    k8, ks, _, qf = quantize_k_reference(k, k_mean, k_scale)
    if k_scale == "channel":
        q8, qs = quantize_q_reference(q, scale, k_chan=qf)
    else:
        q8, qs = quantize_q_reference(q, scale, k_pow=qf)
        ks = ks.float()
    if pv == "fp8":
        v8, vs = quantize_v_reference(v, v_amax)
        vv = v8.float()
    else:
        vv = _bhld(v).float()
    qf = q8.float()
    m = torch.full((B, H, Lq), float("-inf"), device=q.device)
    l = torch.zeros((B, H, Lq), device=q.device)
    acc = torch.zeros((B, H, Lq, D), device=q.device)
    for n0 in range(0, Lk, block_n):
        s = qf @ k8[:, :, n0:n0 + block_n].float().transpose(-1, -2)
        if ks is not None:
            s = s * ks[:, :, None, n0:n0 + block_n]
        m_new = torch.maximum(m, s.amax(-1) * qs)
        shift = m_new - LOG2_FP8_MAX if pv == "fp8" else m_new
        p = torch.exp2(s * qs[..., None] - shift[..., None])
        alpha = torch.exp2(m - m_new)
        acc = acc * alpha[..., None]
        if pv == "fp8":
            pq = _e4m3(p).float()
            l = l * alpha + (pq if l_rounded else p).sum(-1)
        else:
            pq = p.to(v.dtype).float()
            l = l * alpha + p.sum(-1)
        acc = acc + pq @ vv[:, :, n0:n0 + block_n]
        m = m_new
    o = acc / l[..., None]
    if pv == "fp8":
        o = o * vs[:, :, None, :]
    return o.transpose(1, 2).to(out_dtype)


def attention_fp32(q, k, v, softmax_scale=None) -> torch.Tensor:
    """fp32 softmax attention (the accuracy reference), [B, L, H, D] -> fp32 [B, Lq, H, D]."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    o = F.scaled_dot_product_attention(*(_bhld(t).float() for t in (q, k, v)), scale=scale)
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- quantisation launch
def default_k_scale() -> str:
    """K's scale granularity when the caller gives none (``S2V_FP8_ATTN_K``, default "channel")."""
    return env_options().kernels.fp8_attn_k


def default_pv() -> str:
    """P.V's precision when the caller gives none (``S2V_FP8_ATTN_PV``, default "fp8")."""
    return env_options().kernels.fp8_attn_pv


def _padded_len(L: int) -> int:
    return max(16, -(-L // 16) * 16)


def perm32_rows(n: torch.Tensor) -> torch.Tensor:
    """Storage row of key ``n`` in the CUDA fp8 kernel's K layout: inside each group of 32 keys,
    key 16h + 4t + 2c + b is stored at row 16h + 8c + 2t + b (csrc/fp8_attention_sm90.cu explains
    why: its score fragment then is the P.V operand without shuffles)."""
    return (n & ~31) | (n & 0x11) | ((n & 0xC) >> 1) | ((n & 0x2) << 2)


def ks_cuda_index(n: torch.Tensor) -> torch.Tensor:
    """Position of key ``n``'s scale in the CUDA layout: the scale of storage row r = 8i + 2t + b of
    a 128-key tile (:func:`perm32_rows`) goes to 32t + 2i + b, so that thread t of a quad finds the
    32 scales of its score columns in 64 contiguous bytes (four 16-byte loads)."""
    r = perm32_rows(n)
    return (r & ~127) | (((r >> 1) & 3) << 5) | (((r >> 3) & 15) << 1) | (r & 1)


def quantize_qkv(q, k, v, softmax_scale: float, pv: str, use_kernels: bool = None,
                 k_perm32: bool = False, k_scale: str = None) -> dict:
    """All quantisation work of one attention call (what the benchmark must include).

    Returns q8/k8 [B*H, L, D] e4m3, qs [B*H, Lq] fp32 (softmax scale, log2 e and k_pow folded in),
    km [B, H, D], k_scale; for k_scale "token" ks [B*H, Lk] fp16 (per key, relative to k_pow) and
    k_pow [B*H], for "channel" ks None and k_chan [B*H, D] (taken on by q); for pv="fp8" also
    vt [B*H, D, Lp] e4m3 (keys contiguous, Lp = Lk padded to 16) and vs [B*H, D] fp32.
    ``k_perm32`` (the CUDA kernel's layout): k8 holds Lkp = Lk padded to 32 rows, key n at row
    :func:`perm32_rows` (n); ks holds Lk padded to 128, key n's scale at :func:`ks_cuda_index`
    (n); zeros elsewhere; ``Lkp`` is in the result."""
    k_scale = k_scale or default_k_scale()
    if k_scale not in K_SCALES:
        raise ValueError(f"k_scale={k_scale!r}; use one of {K_SCALES}")
    if use_kernels is None:
        use_kernels = kernels_usable(q, k, v)
    if use_kernels and not FALLBACKS.get("quantize"):
        try:
            return _quantize_qkv_kernels(q, k, v, softmax_scale, pv, k_perm32, k_scale)
        except Exception as e:  # a kernel that does not compile here: the torch path, same numbers
            FALLBACKS["quantize"] = f"{type(e).__name__}: {str(e)[:200]}"
            warnings.warn(f"fp8 attention quantisation kernels failed ({FALLBACKS['quantize']}); using torch")
    return _quantize_qkv_torch(q, k, v, softmax_scale, pv, k_perm32, k_scale)


def _k_rows(Lk: int, k_perm32: bool, multiple: int = 32) -> int:
    return -(-Lk // multiple) * multiple if k_perm32 else Lk


def _quantize_qkv_torch(q, k, v, softmax_scale, pv, k_perm32=False, k_scale="token"):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    k8, ks, km, qf = quantize_k_reference(k, k_scale=k_scale)
    chan = k_scale == "channel"
    q8, qs = quantize_q_reference(q, softmax_scale, None if chan else qf, qf if chan else None)
    k8 = k8.view(B * H, Lk, D)
    ks = None if chan else ks.reshape(B * H, Lk)
    if k_perm32:
        n = torch.arange(Lk, device=dev)
        k8p = torch.zeros((B * H, _k_rows(Lk, True), D), dtype=FP8_DTYPE, device=dev)
        k8p.view(torch.uint8)[:, perm32_rows(n)] = k8.view(torch.uint8)
        k8 = k8p
        if not chan:
            ksp = torch.zeros((B * H, _k_rows(Lk, True, 128)), dtype=torch.float16, device=dev)
            ksp[:, ks_cuda_index(n)] = ks
            ks = ksp
    res = dict(q8=q8.view(B * H, Lq, D), qs=qs.reshape(B * H, Lq), k8=k8, ks=ks, km=km,
               k_scale=k_scale, Lkp=_k_rows(Lk, k_perm32))
    res["k_chan" if chan else "k_pow"] = qf.reshape(B * H, D) if chan else qf.reshape(B * H)
    if pv == "fp8":
        v8, vs = quantize_v_reference(v)
        Lp = _padded_len(Lk)
        vt = torch.zeros((B * H, D, Lp), dtype=FP8_DTYPE, device=dev)
        vt[:, :, :Lk] = v8.view(B * H, Lk, D).transpose(1, 2)
        res.update(vt=vt, vs=vs.reshape(B * H, D).contiguous(), Lp=Lp)
    return res


def _quantize_qkv_kernels(q, k, v, softmax_scale, pv, k_perm32=False, k_scale="token"):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    res = {}
    interp = is_interpreter()
    C = H * D
    # 1. column statistics over the keys: K sum (-> mean), max and min (-> the head's centred
    # abs-max, max(max - mean, mean - min): rounding is monotonic, so exactly the torch path's) and,
    # for fp8 P.V, V abs-max; the interpreter runs programs one after another: few large ones there
    chunk = min(next_pow2(Lk), 1024) if interp else _STATS_CHUNK
    stats_r = chunk if interp else 16
    br = min(next_pow2(max(Lq, Lk)), 1024) if interp else 64
    n_chunks = triton.cdiv(Lk, chunk)
    block_c = min(512, next_pow2(C))
    grid = (n_chunks, triton.cdiv(C, block_c), B)
    kst = torch.empty((3, B, n_chunks, C), dtype=torch.float32, device=dev)
    _col_stats_kernel[grid](k, kst[0], kst[1], kst[2], kst[0], Lk, C, D, k.stride(0), k.stride(1),
                            k.stride(2), n_chunks, CHUNK=chunk, BLOCK_R=stats_r, BLOCK_C=block_c,
                            DO_SUM=True, DO_MINMAX=True, DO_AMAX=False, num_warps=4)
    km = (kst[0].sum(1) / Lk).view(B, H, D)
    kmc = km.reshape(B * H, D).contiguous()
    chan_amax = torch.maximum(kst[1].amax(1).view(B * H, D) - kmc, kmc - kst[2].amin(1).view(B * H, D))
    chan = k_scale == "channel"
    if chan:  # K per channel; q takes the channel scales on
        kvec, qvec = _inv_and_scale(chan_amax.clamp_min(AMAX_FLOOR))
        k_pow = torch.ones(B * H, dtype=torch.float32, device=dev)
    else:
        k_pow = k_pow_of(chan_amax.amax(1))
        kvec = qvec = kmc  # unused
    # 2. K and Q per (token, head)
    Lkp = _k_rows(Lk, k_perm32)
    Lks = _k_rows(Lk, k_perm32, 128)
    k8 = torch.empty((B * H, Lkp, D), dtype=FP8_DTYPE, device=dev)
    ks = None if chan else torch.empty((B * H, Lks), dtype=torch.float16, device=dev)
    if Lkp > Lk:  # the last group's rows that no key maps to
        k8.view(torch.uint8)[:, Lk & ~31:].zero_()
    if Lks > Lk and not chan:
        ks[:, Lk & ~127:].zero_()
    _quant_rows_hd_kernel[(triton.cdiv(Lk, br), B * H)](
        k, k8, k8 if chan else ks, kmc, (1.0 / k_pow).contiguous(), kvec.contiguous(), Lk, Lkp, Lks, H,
        k.stride(0), k.stride(1), k.stride(2), 1.0,
        D=D, BLOCK_R=br, IS_K=True, KCHAN=chan, PERM32=k_perm32, INTERPRET=interp, num_warps=8)
    q8 = torch.empty((B * H, Lq, D), dtype=FP8_DTYPE, device=dev)
    qs = torch.empty((B * H, Lq), dtype=torch.float32, device=dev)
    _quant_rows_hd_kernel[(triton.cdiv(Lq, br), B * H)](
        q, q8, qs, kmc, k_pow, qvec.contiguous(), Lq, Lq, Lq, H, q.stride(0), q.stride(1), q.stride(2),
        softmax_scale * LOG2E, D=D, BLOCK_R=br, IS_K=False, KCHAN=chan, PERM32=False, INTERPRET=interp,
        num_warps=8)
    res.update(q8=q8, qs=qs, k8=k8, ks=ks, km=km, k_scale=k_scale, Lkp=Lkp)
    res["k_chan" if chan else "k_pow"] = qvec if chan else k_pow
    if pv == "fp8":
        vmax = torch.empty((B, n_chunks, C), dtype=torch.float32, device=dev)
        _col_stats_kernel[grid](v, vmax, vmax, vmax, vmax, Lk, C, D, v.stride(0), v.stride(1), v.stride(2),
                                n_chunks, CHUNK=chunk, BLOCK_R=stats_r, BLOCK_C=block_c, DO_SUM=False,
                                DO_MINMAX=False, DO_AMAX=True, num_warps=4)
        amax = vmax.amax(1).view(B * H, D).clamp_min(AMAX_FLOOR)
        inv, vs = _inv_and_scale(amax)
        Lp = _padded_len(Lk)
        vt = torch.empty((B * H, D, Lp), dtype=FP8_DTYPE, device=dev)
        if Lp > Lk:
            vt[:, :, Lk:].zero_()
        _quant_v_kernel[(triton.cdiv(Lk, br), B * H)](
            v, vt, inv.contiguous(), Lk, H, Lp, v.stride(0), v.stride(1), v.stride(2),
            D=D, BLOCK_R=br, INTERPRET=interp, num_warps=8)
        res.update(vt=vt, vs=vs.contiguous(), Lp=Lp)
    return res


# ----------------------------------------------------------------------------- attention launch
_TUNED: dict = {}
FALLBACKS: dict = {}  # "quantize" / "attention" -> why a kernel path was given up (benchmarks report it)
TUNE_LOG: dict = {}  # key -> {config index: ms | "error: ..." | "mismatch"} (benchmarks report it)


def _config_usable(cfg) -> bool:
    return has_tensor_descriptor() or not cfg.get("TMA")


def _launch(cfg, qz, v, out, pv):
    B, Lq, H, D = out.shape
    Lk = v.shape[1]
    interp = is_interpreter()
    tma = bool(cfg.get("TMA")) and not interp
    if tma:
        ensure_tma_allocator()
    pv_fp8 = pv == "fp8"
    vsrc = qz["vt"] if pv_fp8 else v
    vs = qz["vs"] if pv_fp8 else qz["qs"]
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    _fp8_attn_fwd_kernel[grid](
        qz["q8"], qz["qs"], qz["k8"], qz["ks"] if qz["ks"] is not None else qz["qs"], vsrc, vs, out,
        H, Lq, Lk, qz.get("Lp", 0), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], TMA=tma,
        PV_FP8=pv_fp8, PROMOTE=bool(cfg.get("PROMOTE", True)), HAS_KS=qz["ks"] is not None,
        UPCAST=interp, INTERPRET=interp,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _tune_key(q, v, pv):
    return (q.shape[-1], q.dtype, v.dtype, shape_bucket(q.shape[1]), shape_bucket(v.shape[1]), pv)


def tuned_config(q, v, pv: str = None):
    """The config the tuner picked for inputs like these (None before the first call)."""
    forced = _forced_config()
    if forced is not None:
        return forced
    return _TUNED.get(_tune_key(q, v, pv or default_pv()))


def _forced_config():
    return forced_config(FP8_CONFIGS, env_options().kernels.fp8_attn_config, "S2V_FP8_ATTN_CONFIG")


def _pick_config(qz, v, out, pv):
    forced = _forced_config()
    if forced is not None:
        return forced
    key = _tune_key(out, v, pv)
    if key in _TUNED:
        return _TUNED[key]
    cands = [(i, c) for i, c in enumerate(FP8_CONFIGS) if _config_usable(c)]
    if is_interpreter():
        cands = [(i, c) for i, c in cands if not c.get("TMA")] or cands
        _TUNED[key] = cands[0][1]
        return cands[0][1]
    tune = env_options().kernels.fp8_attn_autotune
    from triton.testing import do_bench

    log = TUNE_LOG.setdefault(key, {})
    best, best_t, baseline = None, float("inf"), None
    for i, cfg in cands:
        try:
            _launch(cfg, qz, v, out, pv)
            if baseline is None:
                baseline = out.clone()
            elif not outputs_agree(out, baseline, rtol=3e-2):  # a miscompiled variant must never win
                log[i] = "mismatch"
                continue
            t = do_bench(lambda: _launch(cfg, qz, v, out, pv), warmup=5, rep=20) if tune else 0.0
            log[i] = t
        except Exception as e:  # does not compile / run on this triton or GPU: skip it
            log[i] = f"error: {type(e).__name__}: {str(e)[:160]}"
            continue
        if t < best_t:
            best, best_t = cfg, t
        if not tune:
            break
    if best is None:
        raise RuntimeError(f"no FP8_CONFIGS entry compiled for this GPU / triton version: {log}")
    _TUNED[key] = best
    return best


def fp8_attention_usable(q, k, v) -> bool:
    B, Lq, H, D = q.shape
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if is_interpreter() else ())
    return (kernels_usable(q, k, v) and q.dim() == 4 and k.dim() == 4 and v.shape == k.shape
            and k.shape[0] == B and k.shape[2:] == (H, D) and D in SUPPORTED_D
            and q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
            and all(t.stride(-1) == 1 for t in (q, k, v)))


def fp8_attention(q, k, v, softmax_scale=None, *, pv: str = None, out=None, config=None,
                  quantized: dict = None, k_scale: str = None) -> torch.Tensor:
    """FP8 attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q.dtype.

    ``pv``: "fp8" (default, env S2V_FP8_ATTN_PV) or "bf16". ``k_scale``: "channel" (default, env
    S2V_FP8_ATTN_K) or "token" (module docstring, 2.). ``config``: a FP8_CONFIGS-like dict
    (bypasses the tuner). ``quantized``: output of :func:`quantize_qkv` (benchmarks timing the
    attention kernel alone). Falls back to :func:`fp8_attention_reference` (same numbers, torch)
    where the kernel cannot run (``l_rounded=False``, as this kernel)."""
    pv = pv or default_pv()
    if pv not in PV_MODES:
        raise ValueError(f"pv={pv!r}; use one of {PV_MODES}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if not (fp8_attention_usable(q, k, v) and kernels_usable(out)):
        out.copy_(fp8_attention_reference(q, k, v, scale, pv=pv, k_scale=k_scale, l_rounded=False))
        return out
    if B * H * Lq == 0:
        return out
    if Lk == 0:
        return out.zero_()
    qz = quantized if quantized is not None else quantize_qkv(q, k, v, scale, pv, use_kernels=True,
                                                              k_scale=k_scale)
    cfg = config if config is not None else _pick_config(qz, v, out, pv)
    _launch(cfg, qz, v, out, pv)
    return out


_CUDA_FP8: dict = {}


def cuda_fp8_usable(q, k, v) -> bool:
    """Does the ``fp8`` backend run these inputs with the CUDA kernel (csrc/fp8_attention_sm90.cu)?
    Yes on sm_90 with nvcc, bf16 head dim 128, P.V in fp8, unless S2V_FP8_ATTN_IMPL=triton or the
    CUDA kernel failed before (``FALLBACKS["cuda"]``)."""
    if env_options().kernels.fp8_attn_impl == "triton" or FALLBACKS.get("cuda") \
            or default_pv() != "fp8" or not q.is_cuda:
        return False
    if "ok" not in _CUDA_FP8:
        from .cuda_attention import unavailable_reason

        _CUDA_FP8["ok"] = unavailable_reason() is None
    from .cuda_attention import supports

    return _CUDA_FP8["ok"] and supports(q, k, v)


def fp8_attention_backend(q, k, v):
    """The ``attention(q, k, v)`` contract (scale 1/sqrt(D)), FP8 where it pays: calls with fewer
    than ``FP8_MIN_KEYS`` keys (the DiT's text and audio cross-attention) take the bf16 ``auto``
    choice instead, since their K/V quantisation pass costs more than the fp8 MMAs save (H100,
    32,760 x 512 keys: 234 TFLOP/s fp8 against 521 for cuDNN). On sm_90 with nvcc the CUDA kernel
    runs (same numerics, faster; :func:`cuda_fp8_usable`), else the Triton kernel. If no Triton
    config compiles on this GPU / triton, warn once and use bf16 SDPA (``FALLBACKS["attention"]``
    records why)."""
    if k.shape[1] < FP8_MIN_KEYS:
        from .attention import _BACKENDS, resolve_auto

        return _BACKENDS[resolve_auto(q, k, v)](q, k, v)
    if cuda_fp8_usable(q, k, v):
        from .cuda_attention import cuda_fp8_attention

        try:
            return cuda_fp8_attention(q, k, v)
        except RuntimeError as e:  # a build or launch failure: the Triton kernel from now on
            FALLBACKS["cuda"] = str(e)[:400]
            warnings.warn(f"cuda fp8 attention unavailable ({str(e)[:200]}); using the Triton kernel")
    if FALLBACKS.get("attention") and q.is_cuda:
        from .attention import sdpa_attention

        return sdpa_attention(q, k, v)
    try:
        return fp8_attention(q, k, v)
    except RuntimeError as e:
        if not q.is_cuda or "FP8_CONFIGS" not in str(e):
            raise
        FALLBACKS["attention"] = str(e)[:400]
        warnings.warn(f"fp8 attention unavailable ({str(e)[:200]}); attention backend 'fp8' uses SDPA bf16")
        from .attention import sdpa_attention

        return sdpa_attention(q, k, v)


# ----------------------------------------------------------------------------- test / bench data
def make_realistic_qkv(B: int, Lq: int, H: int, D: int, Lk: int = None, *, seed: int = 0,
                       device="cpu", dtype=torch.bfloat16, logit_std: float = 2.0,
                       outliers: int = 4, outlier_scale=(10.0, 30.0), key_offset: float = 4.0,
                       grid_hw=(16, 16)):
    """Attention inputs shaped like the DiT's: q/k = RoPE(RMSNorm(x) * w) with structured tokens.

    * tokens: a smooth (along the sequence) rank-24 latent mixed into H*D channels + noise, k's
      mixing correlated with q's (so attention has structure, not uniform noise);
    * full-width RMSNorm, then norm weights 1 + N(0, 0.1^2) with ``outliers`` channels per head
      scaled by U(10, 30) (independently for q and k): heavy-tailed channels;
    * the project's 3-axis RoPE over a (frames, h, w) grid of ``grid_hw`` tokens per frame;
    * q rescaled per head so the logits q.k/sqrt(D) (of the centred keys) have std ``logit_std``
      (natural-log units; 2 = moderately peaked attention, the error grows with it);
    * keys + a common offset per head (``key_offset`` x the key RMS, constant over tokens);
    * v: noise + per-head offset + a structured part from the same latent.
    Generated in fp32 on ``device`` with its own generator (CPU and CUDA draw different numbers),
    returned in ``dtype``."""
    from ..models.rope import build_rope_table, video_segment

    Lk = Lq if Lk is None else Lk
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    C, r = H * D, 24

    def rnd(*s):
        return torch.randn(*s, generator=g, device=dev)

    def latent(L):
        z = rnd(B, L + 32, r).transpose(1, 2)
        z = F.avg_pool1d(z, 33, 1).transpose(1, 2)[:, :L]
        return z * 5.0

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def rope(x, L):
        th, tw = grid_hw
        frames = -(-L // (th * tw))
        t = build_rope_table([video_segment(frames, th, tw)], D, "cpu", torch.float32)
        cos, sin = (c[:L].to(dev)[None, :, None] for c in (t.cos, t.sin))
        xp = x.reshape(B, L, H, D // 2, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(B, L, H, D)

    zq = latent(Lq)
    zk = zq if Lk == Lq else latent(Lk)
    aq = rnd(r, C) / math.sqrt(r)
    ak = aq + 0.5 * rnd(r, C) / math.sqrt(r)
    wq, wk = 1 + 0.1 * rnd(C), 1 + 0.1 * rnd(C)
    lo, hi = outlier_scale
    for h in range(H):
        for w in (wq, wk):
            idx = torch.randperm(D, generator=g, device=dev)[:outliers] + h * D
            w[idx] *= lo + (hi - lo) * torch.rand(outliers, generator=g, device=dev)
    q = rope((rms(zq @ aq + 0.7 * rnd(B, Lq, C)) * wq).view(B, Lq, H, D), Lq)
    k = rope((rms(zk @ ak + 0.7 * rnd(B, Lk, C)) * wk).view(B, Lk, H, D), Lk)
    n = min(Lq, Lk, 512)
    kc = k - k.mean(1, keepdim=True)
    std = (torch.einsum("blhd,bmhd->bhlm", q[:, :n], kc[:, :n]) / math.sqrt(D)).std(dim=(0, 2, 3))
    q = q * (logit_std / std)[None, None, :, None]
    krms = k.pow(2).mean(dim=(0, 1, 3), keepdim=True).sqrt()
    k = k + key_offset * krms * rnd(1, 1, H, D)
    v = rnd(B, Lk, H, D) + 0.5 * rnd(1, 1, H, D) + 0.5 * (zk @ (rnd(r, C) / math.sqrt(r))).view(B, Lk, H, D)
    return tuple(t.to(dtype=dtype) for t in (q, k, v))


__all__ = [
    "FP8_CONFIGS", "DEFAULT_PV", "fp8_attention", "fp8_attention_reference", "quantize_qkv",
    "attention_fp32", "make_realistic_qkv", "accuracy", "fp8_attention_backend",
]


def _register():
    from .attention import register_attention_backend

    register_attention_backend("fp8", fp8_attention_backend)


_register()
