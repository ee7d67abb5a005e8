"""CUDA C++ flash attention (csrc/flash_attention_sm90.cu, backend ``cuda``) against the fp32
reference and cuDNN; the build and error paths on any machine.

The kernel itself needs an sm_90 GPU and nvcc: those tests skip elsewhere (CI), and run on the H100
through the device tool (bench/gpu_run.sh stage ``gpucuda``).
"""
import os
import stat

import pytest
import torch

from s2v_fast.kernels import attention as attn
from s2v_fast.kernels import cuda_attention as ca
from s2v_fast.kernels.flash_attention import attention_reference

REASON = ca.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# bf16 output vs the fp32-softmax reference: P is rounded to bf16 before P.V (FA-style) and the
# output once more -> a few bf16 ulps of O(1) outputs (same bound as the Triton kernel's tests).
TOL = 1.6e-2


def make(B, Lq, Lk, H, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # q/k/v as views of one fused [B, L, 3, H, D] projection (strided)
        qkv = torch.randn(B, Lq, 3, H, 128, generator=gen).to(torch.bfloat16).cuda()
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(B, Lq, H, 128, generator=gen)
    k = torch.randn(B, Lk, H, 128, generator=gen) * 1.5
    v = torch.randn(B, Lk, H, 128, generator=gen)
    return (t.to(torch.bfloat16).cuda() for t in (q, k, v))


CASES = [  # (B, Lq, Lk, H): exact tiles, tails in q and k, one partial tile, cross-attention
    (1, 256, 256, 2), (2, 300, 300, 3), (1, 77, 77, 2), (1, 1000, 512, 2), (2, 129, 5, 2),
    (1, 4100, 4100, 1),
]


@needs_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("B,Lq,Lk,H", CASES)
def test_matches_reference(B, Lq, Lk, H):
    q, k, v = make(B, Lq, Lk, H, seed=Lq * 7 + Lk)
    out = ca.cuda_attention(q, k, v)
    ref = attention_reference(q, k, v)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL, err


@needs_kernel
@pytest.mark.gpu
def test_strided_views_and_scale_and_cudnn_agreement():
    q, k, v = make(2, 333, 333, 4, seed=3, layout="qkv")
    assert not q.is_contiguous()
    out = ca.cuda_attention(q, k, v)
    assert (out.double() - attention_reference(q, k, v).double()).abs().max().item() <= TOL
    cudnn = attn._BACKENDS["cudnn"](q, k, v)
    assert (out.double() - cudnn.double()).abs().max().item() <= TOL
    scaled = ca.cuda_attention(q, k, v, softmax_scale=0.05)
    assert (scaled.double() - attention_reference(q, k, v, 0.05).double()).abs().max().item() <= TOL


@needs_kernel
@pytest.mark.gpu
def test_large_logits_and_determinism():
    # peaked softmax (logit std ~ 20): the running max must rescale correctly across tiles
    q, k, v = make(1, 700, 900, 2, seed=11)
    q = (q.float() * 4).bfloat16()
    a, b = ca.cuda_attention(q, k, v), ca.cuda_attention(q, k, v)
    assert torch.equal(a, b)
    assert (a.double() - attention_reference(q, k, v).double()).abs().max().item() <= TOL


@needs_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("nats_per_tile", [12.0, 2.0])
def test_lazy_rescaling_with_logits_rising_along_the_keys(nats_per_tile):
    """Logits that grow along the keys: by ~17 log2 units per 176-key tile every row's max moves
    past the lazy threshold (2^8) on every tile, so the output is rescaled each time; by ~3 units
    the rows keep a stale max for a few tiles and P grows past 1 before a rescale. Both match the
    reference, and the kernel built without lazy rescaling (-DS2V_LAZY_RESCALE=0) agrees."""
    gen = torch.Generator().manual_seed(5)
    Lq, Lk, H = 200, 1400, 2
    q = torch.randn(1, Lq, H, 128, generator=gen) * 0.3
    k = torch.randn(1, Lk, H, 128, generator=gen) * 0.3
    q[..., 0] = 4.0  # logit ramp: q.k / sqrt(128) grows by nats_per_tile every 176 keys
    k[..., 0] = torch.arange(Lk).float()[None, :, None] * nats_per_tile / 176 * 128 ** 0.5 / 4.0
    v = torch.randn(1, Lk, H, 128, generator=gen)
    q, k, v = (t.to(torch.bfloat16).cuda() for t in (q, k, v))
    ref = attention_reference(q, k, v).double()
    lazy = ca.cuda_attention(q, k, v)
    eager = ca.cuda_attention(q, k, v, defines=("-DS2V_LAZY_RESCALE=0",))
    assert (lazy.double() - ref).abs().max().item() <= TOL
    assert (eager.double() - ref).abs().max().item() <= TOL


@needs_kernel
@pytest.mark.gpu
def test_unsupported_inputs_fall_back_to_sdpa():
    q, k, v = make(1, 100, 100, 2, seed=5)
    for qq, kk, vv in ((q.half(), k.half(), v.half()), (q[..., :64], k[..., :64], v[..., :64])):
        assert not ca.supports(qq, kk, vv)
        out = ca.cuda_attention(qq, kk, vv)
        ref = attention_reference(qq, kk, vv)
        assert (out.double() - ref.double()).abs().max().item() <= TOL


@needs_kernel
@pytest.mark.gpu
def test_registered_and_in_auto():
    assert "cuda" in attn.available_attention_backends()
    assert attn.check_attention_backend("cuda") == "cuda"
    q, k, v = make(1, 300, 300, 2, seed=9)
    out = attn.attention(q, k, v, "cuda")
    assert (out.double() - attention_reference(q, k, v).double()).abs().max().item() <= TOL


# --------------------------------------------------------------------- any machine


def test_clear_error_when_unavailable(monkeypatch):
    monkeypatch.setattr(ca, "find_nvcc", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = ca.unavailable_reason()
    assert "needs a CUDA GPU" in reason and "--attention-backend auto" in reason
    with pytest.raises(ValueError, match="attention backend 'cuda'"):
        attn.check_attention_backend("cuda")


def test_missing_nvcc_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(ca, "find_nvcc", lambda: None)
    assert "needs nvcc" in ca.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert "Hopper" in ca.unavailable_reason()


def test_sources_are_shipped():
    for name, (_, symbol, _) in ca.KERNELS.items():
        text = ca.source_path(name).read_text()
        assert f'extern "C" int {symbol}' in text and "wgmma.mma_async" in text


def _fake_nvcc(tmp_path, script):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True, exist_ok=True)
    nvcc.write_text("#!/bin/sh\n" + script)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return nvcc


def test_build_caches_and_reports_nvcc_errors(tmp_path, monkeypatch):
    # a stand-in nvcc: prints a version, writes its -o argument; the second build hits the cache
    log = tmp_path / "calls"
    _fake_nvcc(tmp_path, f'if [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\n'
                         f'echo built >> {log}\n'
                         'while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then echo lib > "$2"; fi; shift; done\n')
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv("S2V_FAST_CACHE", str(tmp_path / "cache"))
    assert ca.find_nvcc() == str(tmp_path / "cuda" / "bin" / "nvcc")
    lib = ca.build()
    assert lib.read_text() == "lib\n" and ca.build() == lib
    assert log.read_text().count("built") == 1
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ca.KERNELS["bf16"][0]).write_text("broken")
    monkeypatch.setenv("S2V_CSRC_DIR", str(bad))
    os.unlink(tmp_path / "cuda" / "bin" / "nvcc")
    _fake_nvcc(tmp_path, 'if [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\n'
                         'echo "error: expected a declaration" >&2; exit 1\n')
    with pytest.raises(RuntimeError, match="nvcc failed .*expected a declaration"):
        ca.build()
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]


# --------------------------------------------------------------------- FP8 kernel
from s2v_fast.kernels import fp8_attention as fa8  # noqa: E402
from s2v_fast.kernels import fp8_gemm as fg  # noqa: E402
from s2v_fast.kernels import fp8_quant as fq  # noqa: E402
from s2v_fast.testing.attention_inputs import make_realistic_qkv  # noqa: E402


def test_ks_layout_gives_each_thread_contiguous_scales():
    """Thread t of a quad reads the scales of its score columns 8i + 2t + b (storage rows of a
    128-key tile, i = 0..15, b = 0, 1) as 32 contiguous fp16 values starting at 32t."""
    n = torch.arange(256)
    pos = fq.ks_cuda_index(n)
    assert sorted(pos.tolist()) == n.tolist() and torch.equal(pos // 128, n // 128)
    row = fq.perm32_rows(n)
    for t in range(4):
        keys = [int(torch.nonzero(row == 128 + 8 * i + 2 * t + b)) for i in range(16) for b in (0, 1)]
        assert pos[keys].tolist() == list(range(128 + 32 * t, 128 + 32 * t + 32))


def test_perm32_layout_is_a_permutation_within_groups():
    n = torch.arange(96)
    rows = fq.perm32_rows(n)
    assert sorted(rows.tolist()) == n.tolist() and torch.equal(rows // 32, n // 32)
    # the fragment rule the CUDA kernel relies on: key 16h + 4t + 2c + b at row 16h + 8c + 2t + b
    for h in (0, 1):
        for t in range(4):
            for c in (0, 1):
                for b in (0, 1):
                    assert rows[16 * h + 4 * t + 2 * c + b] == 16 * h + 8 * c + 2 * t + b


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")
@pytest.mark.parametrize("k_scale", fa8.K_SCALES)
@pytest.mark.parametrize("Lk", [64, 77])
def test_permuted_k_quantisation_kernel_matches_torch(Lk, k_scale):
    q, k, v = make_realistic_qkv(1, 40, 2, 64, Lk, seed=Lk)
    got, exp, plain = (fa8.quantize_qkv(q, k, v, 0.125, "fp8", use_kernels=uk, k_perm32=perm, k_scale=k_scale)
                       for uk, perm in ((True, True), (False, True), (False, False)))
    lkp = -(-Lk // 32) * 32
    assert got["Lkp"] == exp["Lkp"] == lkp and got["k8"].shape == (2, lkp, 64)
    assert torch.equal(got["k8"].view(torch.uint8), exp["k8"].view(torch.uint8))
    n = torch.arange(Lk)
    rows, kpos = fq.perm32_rows(n), fq.ks_cuda_index(n)
    assert torch.equal(got["k8"].view(torch.uint8)[:, rows], plain["k8"].view(torch.uint8))
    unused = torch.ones(lkp, dtype=torch.bool)
    unused[rows] = False
    assert torch.all(got["k8"].view(torch.uint8)[:, unused] == 0)
    if k_scale == "channel":
        assert got["ks"] is None and exp["ks"] is None
        return
    assert torch.equal(got["ks"], exp["ks"])
    assert got["ks"].shape == (2, 128) and torch.equal(got["ks"][:, kpos], plain["ks"])
    unused = torch.ones(128, dtype=torch.bool)
    unused[kpos] = False
    assert torch.all(got["ks"][:, unused] == 0)


FP8_CASES = [(1, 4096, 4096, 2), (2, 1000, 1000, 2), (1, 300, 77, 2), (1, 129, 4133, 1)]


@needs_kernel
@pytest.mark.gpu
@pytest.mark.parametrize("k_scale", fa8.K_SCALES)
@pytest.mark.parametrize("B,Lq,Lk,H", FP8_CASES)
def test_fp8_matches_emulation_and_triton(B, Lq, Lk, H, k_scale):
    """Same quantisation as the Triton fp8 kernel and the torch emulation: they differ only by
    exp2 approximation, P's e4m3 rounding of those values and accumulation order (measured on the
    Triton kernel: ~bf16 output rounding). Bound as test_fp8.test_gpu_fp8_attention: rel L2 1e-2.
    Both K scale granularities (the two kernel instantiations)."""
    q, k, v = make_realistic_qkv(B, Lq, H, 128, Lk, seed=Lq + Lk, device="cuda")
    got = ca.cuda_fp8_attention(q, k, v, k_scale=k_scale)
    emu = fa8.fp8_attention_reference(q, k, v, pv="fp8", block_n=128, out_dtype=torch.float32, k_scale=k_scale)
    acc = fg.accuracy(got, emu)
    assert acc["rel_l2"] <= 1e-2 and acc["cosine"] >= 0.9999, acc
    tri = fa8.fp8_attention(q, k, v, pv="fp8", k_scale=k_scale)
    assert fg.accuracy(got, tri)["rel_l2"] <= 1e-2
    ref = fg.accuracy(got, fa8.attention_fp32(q, k, v))
    assert ref["cosine"] >= 0.999 and ref["rel_l2"] <= 0.05, ref  # bounds of test_gpu_fp8_attention


@needs_kernel
@pytest.mark.gpu
def test_fp8_backend_runs_the_cuda_kernel(monkeypatch):
    q, k, v = make_realistic_qkv(1, 4096, 2, 128, seed=1, device="cuda")
    assert fa8.cuda_fp8_usable(q, k, v)
    out = attn.attention(q, k, v, "fp8")
    assert not fa8.FALLBACKS.get("cuda")
    assert torch.equal(out, ca.cuda_fp8_attention(q, k, v))
    monkeypatch.setenv("S2V_FP8_ATTN_IMPL", "triton")
    assert not fa8.cuda_fp8_usable(q, k, v)


def test_failed_build_is_not_retried(tmp_path, monkeypatch):
    calls = []

    def failing_build(kernel="bf16", defines=()):
        calls.append(kernel)
        raise RuntimeError("nvcc failed to build flash_attention_sm90.cu: boom")

    monkeypatch.setattr(ca, "build", failing_build)
    monkeypatch.setattr(ca, "_failed", {})
    monkeypatch.setattr(ca, "_libs", {})
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            ca._load("bf16")
    assert calls == ["bf16"]
