"""Triton flash attention vs torch reference vs float64 softmax attention (spec §10.6).

CPU runs use the Triton interpreter, which computes garbage for bf16 x bf16 `tl.dot`; the kernel
upcasts its dot operands to fp32 there (interpreter-only switch), so bf16 is also checked on CPU,
but the real bf16 tensor-core path is only exercised by the @gpu tests.
"""
import math

import pytest
import torch

from s2v_fast.kernels.flash_attention import FLASH_CONFIGS, attention_reference, triton_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances (absolute, outputs are O(0.1-1)): p is rounded to the input dtype before the PV
# product (as FlashAttention does) and the output is rounded once more; fp32 only differs by the
# summation order / exp2 vs exp.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(B, Lq, Lk, H, D, dtype, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # q/k/v as slices of a fused [B, L, 3, H, D] projection output (Lq == Lk)
        qkv = torch.randn(B, Lq, 3, H, D, generator=gen)
        qkv[:, :, 1] *= 1.5
        qkv = qkv.to(dtype).to(DEV)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(B, Lq, H, D, generator=gen).to(dtype).to(DEV)
    k = (torch.randn(B, Lk, H, D, generator=gen) * 1.5).to(dtype).to(DEV)
    v = torch.randn(B, Lk, H, D, generator=gen).to(dtype).to(DEV)
    return q, k, v


def check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype], err


CASES = [  # (B, Lq, Lk, H, D)
    (1, 128, 128, 2, 64),     # exact tiles
    (2, 77, 77, 2, 64),       # single partial tile
    (1, 300, 300, 2, 128),    # several tiles + tails (production head dim)
    (1, 130, 512, 2, 128),    # cross-attention shape (Lq != Lk), keys a multiple of the tile
    (1, 129, 37, 2, 32),
]


@pytest.mark.parametrize("B,Lq,Lk,H,D", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_attention_matches_reference(B, Lq, Lk, H, D, dtype):
    q, k, v = make(B, Lq, Lk, H, D, dtype, seed=Lq + Lk + D)
    check(triton_attention(q, k, v), attention_reference(q, k, v), dtype)


@pytest.mark.parametrize("idx", range(len(FLASH_CONFIGS)))
def test_every_config(idx):
    # every tuning entry (pointer and TMA-descriptor paths) on a tail shape
    q, k, v = make(1, 150, 200, 2, 64, torch.float16, seed=idx)
    try:
        got = triton_attention(q, k, v, config=FLASH_CONFIGS[idx])
    except Exception as e:  # GPU: a config this triton cannot compile is skipped by the tuner too
        if DEV == "cpu":
            raise
        pytest.skip(f"config {idx} does not compile here: {type(e).__name__}")
    check(got, attention_reference(q, k, v), torch.float16)


@pytest.mark.parametrize("cfg", [0, 1])  # TMA descriptors, plain pointers
def test_strided_qkv_bf16_and_custom_scale(cfg):
    q, k, v = make(1, 200, 200, 2, 128, torch.bfloat16, seed=5, layout="qkv")
    assert not q.is_contiguous()
    got = triton_attention(q, k, v, softmax_scale=0.05, config=FLASH_CONFIGS[cfg])
    check(got, attention_reference(q, k, v, softmax_scale=0.05), torch.bfloat16)


def test_reference_matches_f64():
    q, k, v = make(1, 50, 70, 2, 32, torch.float16, seed=9)
    qd, kd, vd = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) / math.sqrt(32)
    exp = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vd)
    assert (attention_reference(q, k, v).double() - exp).abs().max().item() <= 1e-3  # fp16 output rounding


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1000, 4096])
@pytest.mark.parametrize("idx", range(len(FLASH_CONFIGS)))
def test_gpu_bf16_configs(L, idx):
    q, k, v = make(1, L, L, 8, 128, torch.bfloat16, seed=L)
    try:
        got = triton_attention(q, k, v, config=FLASH_CONFIGS[idx])
    except Exception as e:  # a config this triton cannot compile is skipped by the tuner
        pytest.skip(f"config {idx} does not compile here: {type(e).__name__}")
    check(got, attention_reference(q, k, v), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_tuned_cross_attention():
    q, k, v = make(2, 3001, 512, 40, 128, torch.bfloat16, seed=1)
    check(triton_attention(q, k, v), attention_reference(q, k, v), torch.bfloat16)

