"""qk_norm_rope: Triton kernel vs torch reference vs float64 spec math (spec §10.4, §4.7)."""

import pytest
import torch

from s2v_fast.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

from util import DEV, bf16_ulps



def make(B, L, H, D, seed=0, fused_qkv=True):
    gen = torch.Generator().manual_seed(seed)
    C = H * D
    if fused_qkv:  # q, k as column slices of a QKV GEMM output (row stride 3C)
        qkv = (torch.randn(B, L, 3 * C, generator=gen) * 3).to(torch.bfloat16).to(DEV)
        q, k = qkv[..., :C], qkv[..., C:2 * C]
    else:
        q = (torch.randn(B, L, C, generator=gen) * 3).to(torch.bfloat16).to(DEV)
        k = (torch.randn(B, L, C, generator=gen) * 0.2).to(torch.bfloat16).to(DEV)
    wq = (torch.randn(C, generator=gen) * 0.5 + 1).to(torch.bfloat16).to(DEV)
    wk = (torch.randn(C, generator=gen) * 0.5 + 1).to(torch.bfloat16).to(DEV)
    # positions like the 3-axis table: arbitrary integer positions, frequencies 10000^(-2j/D)
    pos = torch.randint(-20, 60, (L, 1), generator=gen).double()
    freqs = 10000.0 ** (-2 * torch.arange(D // 2).double() / D)
    ang = pos * freqs
    return q, k, wq, wk, ang.cos().float().to(DEV), ang.sin().float().to(DEV), ang


def assert_bf16_close(got, ref, max_frac=0.01):
    # sum-of-squares order and fp32 (kernel) vs fp64 (reference) rotation: <= 1 bf16 ulp, rarely.
    # A 1-ulp difference of the normalised value before the rotation (the rstd differs in its last
    # fp32 bit; seen on the H100 at 32,760 tokens) is up to 2^-7 of that value and becomes several
    # ulps of a small rotated value (a cos - b sin cancels), so those are bounded by two bf16 ulps of
    # the head vector's largest value instead (2^-6 relative); a wrong index or angle is far larger.
    d = bf16_ulps(got, ref)
    head_max = ref.double().abs().amax(dim=-1, keepdim=True)
    near = (got.double() - ref.double()).abs() <= 2.0 ** -6 * head_max
    assert ((d <= 1) | near).all() and (d > 0).float().mean().item() < max_frac


@pytest.mark.parametrize("B,L,H,D,fused", [(2, 7, 3, 32, True), (1, 5, 40, 128, True),
                                           (1, 9, 5, 64, False), (2, 3, 2, 16, False)])
def test_qk_norm_rope_matches_reference(B, L, H, D, fused):
    q, k, wq, wk, cos, sin, _ = make(B, L, H, D, seed=L * H + D, fused_qkv=fused)
    qo, ko = qk_norm_rope(q, k, wq, wk, cos, sin, H)
    qr, kr = qk_norm_rope_reference(q, k, wq, wk, cos, sin, H)
    assert qo.shape == (B, L, H, D) and qo.dtype == torch.bfloat16
    assert_bf16_close(qo, qr)
    assert_bf16_close(ko, kr)


def test_fp32_inputs_follow_the_same_rules_in_fp32():
    # fp32-weight runs: rounding steps happen in fp32, output fp32 (summation order only)
    B, L, H, D = 1, 5, 3, 32
    q, k, wq, wk, cos, sin, _ = make(B, L, H, D, seed=4)
    q, k, wq, wk = q.float(), k.float(), wq.float(), wk.float()
    qo, ko = qk_norm_rope(q, k, wq, wk, cos, sin, H)
    qr, kr = qk_norm_rope_reference(q, k, wq, wk, cos, sin, H)
    assert qo.dtype == torch.float32
    torch.testing.assert_close(qo, qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ko, kr, atol=1e-5, rtol=1e-5)


def test_batched_rope_table():
    B, L, H, D = 2, 6, 3, 32
    q, k, wq, wk, cos, sin, _ = make(B, L, H, D, seed=1)
    cos_b = torch.stack([cos, cos.flip(0)])
    sin_b = torch.stack([sin, sin.flip(0)])
    qo, ko = qk_norm_rope(q, k, wq, wk, cos_b, sin_b, H)
    qr, kr = qk_norm_rope_reference(q, k, wq, wk, cos_b, sin_b, H)
    assert_bf16_close(qo, qr)
    assert_bf16_close(ko, kr)


def test_reference_matches_spec_f64():
    B, L, H, D = 2, 5, 4, 32
    q, k, wq, wk, cos, sin, ang = make(B, L, H, D, seed=2)
    qr, _ = qk_norm_rope_reference(q, k, wq, wk, cos, sin, H)
    # spec: r over all C features in f64; bf16(q*r); bf16(. * w); rotate pairs in f64 (exact angles)
    qd = q.double()
    r = 1 / torch.sqrt((qd ** 2).mean(-1, keepdim=True) + 1e-6)
    qn = ((qd * r).to(torch.bfloat16).double() * wq.double()).to(torch.bfloat16).double()
    qn = qn.view(B, L, H, D // 2, 2)
    a, c = qn[..., 0], qn[..., 1]
    cs, sn = ang.cos().to(DEV)[None, :, None, :], ang.sin().to(DEV)[None, :, None, :]
    exp = torch.stack([a * cs - c * sn, a * sn + c * cs], -1).reshape(B, L, H, D)
    assert_bf16_close(qr, exp, max_frac=0.02)


@pytest.mark.gpu
def test_gpu_production_shape():
    B, L, H, D = 1, 32760, 40, 128
    q, k, wq, wk, cos, sin, _ = make(B, L, H, D, seed=3)
    qo, ko = qk_norm_rope(q, k, wq, wk, cos, sin, H)
    qr, kr = qk_norm_rope_reference(q, k, wq, wk, cos, sin, H)
    assert_bf16_close(qo, qr)
    assert_bf16_close(ko, kr)
