"""audio_injection: per-frame AdaLN, 5-key per-frame cross-attention, residual add (spec §4.11, §10.9)."""
import math

import pytest
import torch

from s2v_fast.kernels.audio_injection import (
    audio_adaln,
    audio_adaln_reference,
    audio_residual_add,
    frame_cross_attention,
    frame_cross_attention_reference,
)

from util import DEV, bf16_ulps



def assert_bf16_close(got, ref, max_frac=0.01, abs_floor=1e-5):
    # different fp32 summation orders: <= 1 bf16 ulp (rare); near-zero values in absolute terms.
    d = bf16_ulps(got, ref)
    near = (got.double() - ref.double()).abs() <= abs_floor
    assert ((d <= 1) | near).all() and (d > 0).float().mean().item() < max_frac


ADALN_CASES = [(1, 3, 7, 160), (2, 2, 40, 96), (1, 2, 3, 5120)]  # (B, F, Nf, C)


@pytest.mark.parametrize("B,Fr,Nf,C", ADALN_CASES)
def test_audio_adaln_matches_reference(B, Fr, Nf, C):
    gen = torch.Generator().manual_seed(B + Fr + Nf + C)
    L = Fr * Nf + 5  # + reference/motion tokens that must be left out
    x = (torch.randn(B, L, C, generator=gen) * 2 + 0.5).to(DEV)
    lin = (torch.randn(B, Fr, 2 * C, generator=gen) * 0.5).to(torch.bfloat16).to(DEV)
    shift, scale = lin[..., :C], lin[..., C:]  # first half shift, second half scale (strided views)
    got = audio_adaln(x[:, :Fr * Nf], shift, scale, Nf)
    ref = audio_adaln_reference(x[:, :Fr * Nf], shift, scale, Nf)
    assert got.shape == (B, Fr * Nf, C) and got.dtype == torch.bfloat16
    assert_bf16_close(got, ref)


def test_audio_adaln_fp32_modulation():
    # fp32-weight runs: shift/scale fp32 -> fp32 output, 1 + scale in fp32
    B, Fr, Nf, C = 1, 2, 5, 96
    x = torch.randn(B, Fr * Nf, C, device=DEV)
    sh, sc = torch.randn(B, Fr, C, device=DEV), torch.randn(B, Fr, C, device=DEV)
    got = audio_adaln(x, sh, sc, Nf)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, audio_adaln_reference(x, sh, sc, Nf), atol=1e-5, rtol=1e-5)


def test_audio_adaln_reference_matches_spec_f64():
    B, Fr, Nf, C = 2, 3, 5, 96
    gen = torch.Generator().manual_seed(0)
    hv = torch.randn(B, Fr * Nf, C, generator=gen).to(DEV)
    shift = torch.randn(B, Fr, C, generator=gen).to(torch.bfloat16).to(DEV)
    scale = torch.randn(B, Fr, C, generator=gen).to(torch.bfloat16).to(DEV)
    ref = audio_adaln_reference(hv, shift, scale, Nf)
    xd = hv.double()
    mu = xd.mean(-1, keepdim=True)
    u = (xd - mu) / torch.sqrt(((xd - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    f = torch.arange(Fr * Nf, device=DEV) // Nf
    opl = (1 + scale.double()).to(torch.bfloat16).double()  # (1 + scale) rounded to bf16
    exp = u * opl[:, f] + shift.double()[:, f]
    assert_bf16_close(ref, exp, max_frac=0.02)


ATTN_CASES = [(1, 3, 7, 2, 32), (2, 2, 40, 3, 64), (1, 2, 33, 2, 128)]  # (B, F, Nf, H, D)


@pytest.mark.parametrize("B,Fr,Nf,H,D", ATTN_CASES)
def test_frame_cross_attention_matches_reference(B, Fr, Nf, H, D):
    gen = torch.Generator().manual_seed(Fr * Nf + H + D)
    q = (torch.randn(B, Fr * Nf, H, D, generator=gen) * 1.5).to(torch.bfloat16).to(DEV)
    kv = torch.randn(B, Fr, 5, 2, H, D, generator=gen).to(torch.bfloat16).to(DEV)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]  # strided views (interleaved k/v projection output)
    got = frame_cross_attention(q, k, v)
    ref = frame_cross_attention_reference(q, k, v)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert_bf16_close(got, ref, abs_floor=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_frame_cross_attention_other_dtypes(dtype):
    B, Fr, Nf, H, D = 1, 2, 9, 2, 32
    q = torch.randn(B, Fr * Nf, H, D, device=DEV).to(dtype)
    k = torch.randn(B, Fr, 5, H, D, device=DEV).to(dtype)
    v = torch.randn(B, Fr, 5, H, D, device=DEV).to(dtype)
    got = frame_cross_attention(q, k, v)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: one output rounding (2^-11 relative)
    torch.testing.assert_close(got, frame_cross_attention_reference(q, k, v), atol=tol, rtol=tol)


def test_frame_cross_attention_reference_matches_spec_f64():
    B, Fr, Nf, H, D = 1, 3, 4, 2, 32
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, Fr * Nf, H, D, generator=gen).to(torch.bfloat16).to(DEV)
    k = torch.randn(B, Fr, 5, H, D, generator=gen).to(torch.bfloat16).to(DEV)
    v = torch.randn(B, Fr, 5, H, D, generator=gen).to(torch.bfloat16).to(DEV)
    ref = frame_cross_attention_reference(q, k, v)
    exp = torch.empty(B, Fr * Nf, H, D, dtype=torch.float64, device=DEV)
    for s in range(Fr * Nf):
        f = s // Nf
        for h in range(H):
            logits = (k[0, f, :, h].double() @ q[0, s, h].double()) / math.sqrt(D)
            exp[0, s, h] = torch.softmax(logits, 0) @ v[0, f, :, h].double()
    assert_bf16_close(ref, exp, max_frac=0.02, abs_floor=1e-4)


def test_audio_residual_add_only_touches_noisy_tokens():
    B, L, Lv, C = 2, 30, 21, 96
    x = torch.randn(B, L, C, device=DEV)
    y = torch.randn(B, Lv, C, device=DEV).to(torch.bfloat16)
    exp = x.clone()
    exp[:, :Lv] += y.float()
    got = audio_residual_add(x, y)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, exp, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_production_shapes():
    B, Fr, Nf, H, D = 1, 20, 1456, 40, 128
    C = H * D
    q = torch.randn(B, Fr * Nf, H, D, device=DEV).to(torch.bfloat16)
    k = torch.randn(B, Fr, 5, H, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(B, Fr, 5, H, D, device=DEV).to(torch.bfloat16)
    assert_bf16_close(frame_cross_attention(q, k, v), frame_cross_attention_reference(q, k, v), abs_floor=1e-4)
    x = torch.randn(B, Fr * Nf + 3640, C, device=DEV)
    lin = torch.randn(B, Fr, 2 * C, device=DEV).to(torch.bfloat16)
    got = audio_adaln(x[:, :Fr * Nf], lin[..., :C], lin[..., C:], Nf)
    assert_bf16_close(got, audio_adaln_reference(x[:, :Fr * Nf], lin[..., :C], lin[..., C:], Nf))
