"""gated_residual and its fused residual+norm variants vs torch references vs float64 spec math."""
import pytest
import torch

from s2v_fast.kernels.gated_residual import (
    gated_residual,
    gated_residual_layernorm_affine,
    gated_residual_layernorm_affine_reference,
    gated_residual_norm_modulate,
    gated_residual_norm_modulate_reference,
    gated_residual_reference,
    residual_add_norm_modulate,
    residual_add_norm_modulate_reference,
    residual_pair_norm_modulate,
    residual_pair_norm_modulate_reference,
)

from util import DEV, bf16_ulps



def assert_bf16_close(got, ref, max_frac=0.01):
    # fp32 statistics in a different summation order (and an FMA in x + y*gate): a value may round
    # to the neighbouring bf16; near-zero outputs of u*(1+scale)+shift (cancellation) may be further
    # off in ulps but not in absolute terms (1e-5 of O(1) outputs).
    d = bf16_ulps(got, ref)
    near = (got.double() - ref.double()).abs() <= 1e-5
    assert ((d <= 1) | near).all() and (d > 0).float().mean().item() < max_frac


def make(B, L, C, x_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, m=1.0, a=0.0: (torch.randn(*s, generator=gen) * m + a)
    return dict(
        x=r(B, L, C, m=2.0, a=0.3).to(x_dtype).to(DEV),
        y=r(B, L, C).to(torch.bfloat16).to(DEV),
        gate=r(B, 2, C, m=0.5).to(DEV),
        shift=r(B, 2, C, m=0.5).to(DEV),
        scale=r(B, 2, C, m=0.5).to(DEV),
        w=r(C, m=0.3, a=1.0).to(torch.bfloat16).to(DEV),
        b=r(C, m=0.2).to(torch.bfloat16).to(DEV),
    )


def seg(p, L, split):
    g = (torch.arange(L, device=p.device) >= split).long()
    if p.shape[1] == 1:
        g = torch.zeros_like(g)
    return p.double()[:, g]


def ln64(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


CASES = [(2, 37, 96, 0), (2, 37, 96, 17), (1, 37, 96, 37), (1, 70, 96, 32), (1, 9, 160, 4), (1, 3, 5120, 1)]
# x_new tolerance: fp32, the kernel may fuse x + y*gate into one FMA (<= 1 fp32 ulp).
XTOL = dict(atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("B,L,C,split", CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gated_residual(B, L, C, split, x_dtype):
    t = make(B, L, C, x_dtype, seed=L + C)
    for gate in (t["gate"], None):
        ref = gated_residual_reference(t["x"], t["y"], gate, split)
        x = t["x"].clone()
        got = gated_residual(x, t["y"], gate, split)
        assert got.dtype == torch.float32
        if x_dtype == torch.float32:
            assert got.data_ptr() == x.data_ptr()  # in place
        torch.testing.assert_close(got, ref, **XTOL)


@pytest.mark.parametrize("B,L,C,split", CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_layernorm_affine(B, L, C, split, x_dtype):
    t = make(B, L, C, x_dtype, seed=3 * L + C)
    xr, hr = gated_residual_layernorm_affine_reference(t["x"], t["y"], t["gate"], split, t["w"], t["b"])
    xg, hg = gated_residual_layernorm_affine(t["x"].clone(), t["y"], t["gate"], split, t["w"], t["b"])
    torch.testing.assert_close(xg, xr, **XTOL)
    assert hg.dtype == torch.bfloat16
    assert_bf16_close(hg, hr)


@pytest.mark.parametrize("B,L,C,split", CASES)
def test_residual_add_norm_modulate(B, L, C, split):
    t = make(B, L, C, seed=5 * L + C)
    xr, hr = residual_add_norm_modulate_reference(t["x"], t["y"], t["shift"], t["scale"], split)
    xg, hg = residual_add_norm_modulate(t["x"].clone(), t["y"], t["shift"], t["scale"], split)
    torch.testing.assert_close(xg, xr, **XTOL)
    assert_bf16_close(hg, hr)


@pytest.mark.parametrize("B,L,C,split", CASES)
def test_gated_residual_norm_modulate(B, L, C, split):
    t = make(B, L, C, seed=7 * L + C)
    xr, hr = gated_residual_norm_modulate_reference(t["x"], t["y"], t["gate"], t["shift"], t["scale"], split)
    xg, hg = gated_residual_norm_modulate(t["x"].clone(), t["y"], t["gate"], t["shift"], t["scale"], split)
    torch.testing.assert_close(xg, xr, **XTOL)
    assert_bf16_close(hg, hr)
    # head form: single-segment modulation, fp32 output
    xr, hr = gated_residual_norm_modulate_reference(t["x"], t["y"], t["gate"], t["shift"][:, :1],
                                                    t["scale"][:, :1], split, out_dtype=torch.float32)
    xg, hg = gated_residual_norm_modulate(t["x"].clone(), t["y"], t["gate"], t["shift"][:, :1],
                                          t["scale"][:, :1], split, out_dtype=torch.float32)
    torch.testing.assert_close(hg, hr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,L,C,split", CASES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_attention_half_in_two_passes_equals_three(B, L, C, split, x_dtype):
    """norm3 without storing x, then both residuals + norm2 in one pass (fast_path's order) gives
    the same x_new as the two residual kernels one after the other (same fp32 operations in the
    same order: bitwise on the interpreter, <= 1 fp32 ulp from FMA contraction on the GPU) and
    the same h3 / h2."""
    t = make(B, L, C, x_dtype, seed=11 * L + C)
    y2 = torch.randn(B, L, C, generator=torch.Generator().manual_seed(L)).bfloat16().to(DEV)
    x0 = t["x"].clone()
    x1, h3 = gated_residual_layernorm_affine(t["x"].clone(), t["y"], t["gate"], split, t["w"], t["b"])
    x2, h2 = residual_add_norm_modulate(x1, y2, t["shift"], t["scale"], split)
    none, h3b = gated_residual_layernorm_affine(x0, t["y"], t["gate"], split, t["w"], t["b"], store_x=False)
    assert none is None and torch.equal(x0, t["x"]) and torch.equal(h3b, h3)  # x untouched
    x2b, h2b = residual_pair_norm_modulate(x0, t["y"], t["gate"], y2, t["shift"], t["scale"], split)
    torch.testing.assert_close(x2b, x2, **XTOL)
    assert_bf16_close(h2b, h2)
    xr, hr = residual_pair_norm_modulate_reference(t["x"], t["y"], t["gate"], y2, t["shift"], t["scale"], split)
    torch.testing.assert_close(x2b, xr, **XTOL)
    assert_bf16_close(h2b, hr)


def test_references_match_spec_f64():
    B, L, C, split = 2, 23, 160, 9
    t = make(B, L, C, seed=99)
    x64 = t["x"].double() + t["y"].double() * seg(t["gate"], L, split)
    torch.testing.assert_close(gated_residual_reference(t["x"], t["y"], t["gate"], split).double(), x64,
                               atol=1e-5, rtol=1e-6)
    _, h = gated_residual_layernorm_affine_reference(t["x"], t["y"], t["gate"], split, t["w"], t["b"])
    assert_bf16_close(h, ln64(x64) * t["w"].double() + t["b"].double(), max_frac=0.02)
    _, h = gated_residual_norm_modulate_reference(t["x"], t["y"], t["gate"], t["shift"], t["scale"], split)
    h64 = ln64(x64) * (1 + seg(t["scale"], L, split)) + seg(t["shift"], L, split)
    assert_bf16_close(h, h64, max_frac=0.02)
    x64 = t["x"].double() + t["y"].double()
    _, h = residual_add_norm_modulate_reference(t["x"], t["y"], t["shift"], t["scale"], split)
    assert_bf16_close(h, ln64(x64) * (1 + seg(t["scale"], L, split)) + seg(t["shift"], L, split), max_frac=0.02)


def test_strided_views():
    # residual as a [:, :Lv] view (audio injection / head), y a column slice of a wider GEMM output
    B, L, C = 2, 19, 96
    t = make(B, L + 5, C, seed=1)
    x = t["x"].clone()
    xv = x[:, :L]
    y = torch.randn(B, L, 2 * C, device=DEV).to(torch.bfloat16)[..., C:]
    ref = gated_residual_reference(xv, y, t["gate"], 8)
    gated_residual(xv, y, t["gate"], 8, out=xv)
    torch.testing.assert_close(x[:, :L], ref, **XTOL)
    torch.testing.assert_close(x[:, L:], t["x"][:, L:], atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_production_shapes():
    B, L, C, split = 1, 32760, 5120, 29120
    t = make(B, L, C, seed=4)
    xr, hr = gated_residual_norm_modulate_reference(t["x"], t["y"], t["gate"], t["shift"], t["scale"], split)
    xg, hg = gated_residual_norm_modulate(t["x"].clone(), t["y"], t["gate"], t["shift"], t["scale"], split)
    torch.testing.assert_close(xg, xr, **XTOL)
    assert_bf16_close(hg, hr)
