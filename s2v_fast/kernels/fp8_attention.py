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
     CUDA kernel's speed) for less error. On ``make_realistic_qkv`` data (L 2048, 2 heads,
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

Why fp8 P.V is the default: on the realistic activations of ``make_realistic_qkv``
(``s2v_fast/testing/attention_inputs.py``; L 4096, logit std 1-3) it adds 0.1-0.25 percentage
points of relative L2 on top of the 0.4-4.4 % of the fp8 QK^T (errors add in quadrature), for
twice the P.V MMA rate. ``pv="bf16"`` / env
``S2V_FP8_ATTN_PV=bf16`` is the more accurate and slower mode.

Accuracy vs fp32 (emulation, CPU, L 4096, 4 heads, 2 seeds, pv=fp8, K per key): logit std 1.0: 0.44 % rel L2
(cos 0.99999); 1.5: 1.0 %; 2.0: 2.1 % (cos 0.99983); 2.5: 3.4 %; 3.0: 4.6 % (cos 0.99922). The
error grows with how peaked the attention is; the issue's 3 % holds up to logit std ~2.3. Without
the K centring, keys with a common offset give 5-27 % at logit std 2.

Cost that benchmarks must include: one stats pass over K (sum, max and min per channel: the mean
and the head's centred abs-max) and V (abs-max), one quantise pass each over Q, K, V (5 reads and
3 fp8 writes of [L, H, D]), done by :func:`quantize_qkv` (``fp8_quant.py``).

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

from ..options import FP8_PV_MODES, env_options
from ._utils import (
    dot_upcast,
    ensure_tma_allocator,
    forced_config,
    has_tensor_descriptor,
    is_interpreter,
    kernels_usable,
    load_rows,
    outputs_agree,
    shape_bucket,
    to_dtype,
    triton,
    tl,
)
from .auto import resolve_auto
from .fp8_gemm import FP8_MAX, accuracy
from .fp8_quant import (  # noqa: F401 (K_SCALES: the backend's k_scale values, for callers)
    FALLBACKS,
    K_SCALES,
    _bhld,
    _e4m3,
    default_k_scale,
    quantize_k_reference,
    quantize_q_reference,
    quantize_qkv,
    quantize_v_reference,
)
from .registry import attention_backend_fn
from .sdpa import sdpa_attention

LOG2_FP8_MAX = math.log2(FP8_MAX)
PV_MODES = FP8_PV_MODES  # ("fp8", "bf16"); default_pv(): the one S2V_FP8_ATTN_PV picks
DEFAULT_PV = FP8_PV_MODES[0]
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

if triton is not None:
    from .fp8_gemm import e4m3_round

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


def default_pv() -> str:
    """P.V's precision when the caller gives none (``S2V_FP8_ATTN_PV``, default "fp8")."""
    return env_options().kernels.fp8_attn_pv


# ----------------------------------------------------------------------------- attention launch
_TUNED: dict = {}
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
        return attention_backend_fn(resolve_auto(q, k, v))(q, k, v)
    if cuda_fp8_usable(q, k, v):
        from .cuda_attention import cuda_fp8_attention

        try:
            return cuda_fp8_attention(q, k, v)
        except RuntimeError as e:  # a build or launch failure: the Triton kernel from now on
            FALLBACKS["cuda"] = str(e)[:400]
            warnings.warn(f"cuda fp8 attention unavailable ({str(e)[:200]}); using the Triton kernel")
    if FALLBACKS.get("attention") and q.is_cuda:
        return sdpa_attention(q, k, v)
    try:
        return fp8_attention(q, k, v)
    except RuntimeError as e:
        if not q.is_cuda or "FP8_CONFIGS" not in str(e):
            raise
        FALLBACKS["attention"] = str(e)[:400]
        warnings.warn(f"fp8 attention unavailable ({str(e)[:200]}); attention backend 'fp8' uses SDPA bf16")
        return sdpa_attention(q, k, v)


__all__ = [
    "FP8_CONFIGS", "DEFAULT_PV", "fp8_attention", "fp8_attention_reference", "quantize_qkv",
    "attention_fp32", "accuracy", "fp8_attention_backend",
]


def __getattr__(name):
    """``make_realistic_qkv`` moved to ``s2v_fast.testing.attention_inputs`` (it needs the model's
    RoPE, and no kernel module imports ``models/``); benchmarks still find it here, imported on
    first access only."""
    if name == "make_realistic_qkv":
        from ..testing.attention_inputs import make_realistic_qkv

        return make_realistic_qkv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
