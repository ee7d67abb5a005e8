"""norm_modulate: Triton kernel vs torch reference vs float64 spec math (spec §10.1)."""
import pytest
import torch

from s2v_fast.kernels._utils import row_norm_launch
from s2v_fast.kernels.norm_modulate import norm_modulate, norm_modulate_reference

from util import DEV, bf16_ulps



def assert_bf16_close(got, ref, max_frac=0.01):
    """<= 1 bf16 ulp apart (different fp32 summation order can flip a rounding), or within 1e-5
    absolute for near-zero outputs of u*(1+scale)+shift (cancellation); few mismatches overall."""
    d = bf16_ulps(got, ref)
    near = (got.double() - ref.double()).abs() <= 1e-5
    assert ((d <= 1) | near).all() and (d > 0).float().mean().item() < max_frac


def spec_f64(x, shift, scale, split, eps=1e-6, round_u=False):
    """§10.1 written out in float64 (explicit mean / biased variance)."""
    xd = x.double()
    mu = xd.mean(-1, keepdim=True)
    var = ((xd - mu) ** 2).mean(-1, keepdim=True)
    u = (xd - mu) / torch.sqrt(var + eps)
    if round_u:
        u = u.float().to(torch.bfloat16).double()
    L = x.shape[1]
    g = (torch.arange(L, device=x.device) >= (L if split is None else split)).long()
    if shift.shape[1] == 1:
        g = torch.zeros_like(g)
    return u * (1 + scale.double()[:, g]) + shift.double()[:, g]


def make(B, L, C, G=2, x_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, L, C, generator=gen) * 2.5 + 0.7).to(x_dtype).to(DEV)
    shift = (torch.randn(B, G, C, generator=gen) * 0.5).to(DEV)
    scale = (torch.randn(B, G, C, generator=gen) * 0.5).to(DEV)
    return x, shift, scale


ROWS_96 = row_norm_launch(96)[1]  # rows per program for C = 96: split at a program boundary

CASES = [  # (B, L, C, split)
    (2, 37, 96, 0),
    (2, 37, 96, 19),
    (2, 37, 96, 37),
    (1, 2 * ROWS_96 + 3, 96, ROWS_96),
    (1, 9, 160, 4),
    (2, 5, 5120, 3),
]


@pytest.mark.parametrize("B,L,C,split", CASES)
@pytest.mark.parametrize("x_dtype,round_u", [(torch.float32, False), (torch.bfloat16, True)])
def test_norm_modulate_matches_reference(B, L, C, split, x_dtype, round_u):
    x, shift, scale = make(B, L, C, x_dtype=x_dtype, seed=B * 1000 + L + C)
    got = norm_modulate(x, shift, scale, split, round_normed_to_bf16=round_u)
    ref = norm_modulate_reference(x, shift, scale, split, round_normed_to_bf16=round_u)
    assert got.dtype == torch.bfloat16 and got.shape == (B, L, C)
    # Different fp32 summation order -> an output may round to the neighbouring bf16 value.
    assert_bf16_close(got, ref)


@pytest.mark.parametrize("B,L,C,split", [(2, 37, 96, 19), (1, 9, 160, 0)])
def test_reference_matches_spec_f64(B, L, C, split):
    for x_dtype, round_u in [(torch.float32, False), (torch.bfloat16, True)]:
        x, shift, scale = make(B, L, C, x_dtype=x_dtype, seed=7)
        ref = norm_modulate_reference(x, shift, scale, split, round_normed_to_bf16=round_u)
        # fp32 vs f64 intermediates: at most one rounding-boundary flip (and the bf16 u-rounding
        # of the block-0 variant can flip the same way).
        assert_bf16_close(ref, spec_f64(x, shift, scale, split, round_u=round_u), max_frac=0.02)


def test_head_variant_single_segment_fp32_out():
    B, L, C = 1, 11, 160
    x, shift, scale = make(B, L, C, G=1, seed=3)
    got = norm_modulate(x, shift, scale, None, out_dtype=torch.float32)
    ref = norm_modulate_reference(x, shift, scale, None, out_dtype=torch.float32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # fp32 out: summation-order noise only
    torch.testing.assert_close(got.double(), spec_f64(x, shift, scale, None), atol=1e-5, rtol=1e-5)


def test_strided_input_and_broadcast_batch_modulation():
    # x is a [:, :Lv] view of a longer residual; shift/scale broadcast over the batch (B=1 tensors).
    B, L, C = 2, 21, 96
    x_full, shift, scale = make(B, L + 6, C, seed=5)
    shift, scale = shift[:1], scale[:1]
    x = x_full[:, :L]
    got = norm_modulate(x, shift, scale, 10)
    ref = norm_modulate_reference(x, shift, scale, 10)
    assert_bf16_close(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("L,split", [(32760, 29120), (4097, 4096)])
def test_norm_modulate_gpu_production_width(L, split):
    x, shift, scale = make(1, L, 5120, seed=11)
    got = norm_modulate(x, shift, scale, split)
    ref = norm_modulate_reference(x, shift, scale, split)
    assert_bf16_close(got, ref)
