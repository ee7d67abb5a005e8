"""The fast VAE (s2v_fast/fast/vae.py) against the fp32 reference ``WanVAE`` (CPU).

Accuracy of the decoded video: ``decode_accuracy`` (PSNR with peak-to-peak 2, max-abs), on the
golden fixture's latents and VAE (tests/fixtures/vae: a random-weight VAE of base dim 4) and on
smooth unit-variance latents (``smooth_latents``: blurred noise, like real latents; not white
noise). Measured on this CPU (2-core AMD EPYC, torch 2.13), bound in brackets:

| model, latents                         | bf16 PSNR / max-abs       | fp16 PSNR / max-abs       |
| golden VAE, golden latents [1,16,3,4,6]| 45.0 dB / 0.112 [40, 0.2] | 63.2 dB / 0.0145 [40, 2e-2]|
| golden VAE, smooth [1,16,5,8,12]       | 44.2 dB / 0.487 [40, 0.75]| 62.6 dB / 0.049 (untested)|
| tiny(dim=32), smooth [1,16,3,4,6]      | 54.4 dB / 0.019 [45, 4e-2]| -                         |

The issue's max-abs <= 2e-2 is met by fp16 (3 more mantissa bits than bf16) on the golden
latents, and not by bf16 on these random-weight models: rounding only the *weights* to bf16 (fp32
activations) already gives max-abs 0.026 on a dim-16 random VAE, and the dim-4 golden VAE is badly
conditioned (its RMS norms run over 4..16 channels; fp32 vs fp64 already differ by 1e-5 there).
PSNR >= 40 dB holds for bf16 everywhere. (The full-width dim-96 random VAE of bench/bench_vae.py:
bf16 50.6-50.9 dB / 0.025-0.028, fp16 68.5 dB / 0.0036 on [1,16,2,4,4]; too slow for CPU tests.)
Encode (normalised mu, unit-variance latent units): bf16 max-abs 0.024, rel L2 9.7e-3 on the
golden video (bound 0.05 / 2e-2: 5% of one latent std, well under the DiT's noise scale); 3.5e-3 /
2.1e-3 on the dim-32 VAE (bound 1e-2 / 5e-3).

Streaming and tiled decode on the fast path run the same per-latent-frame op sequence as the fast
whole-clip decode: measured 0.0 difference (bound 1e-3, far below the fast-vs-fp32 bounds).
"""
import copy

import pytest
import torch

from s2v_fast.models.vae import CausalConv3d, RMSNorm, WanVAE
from s2v_fast.fast.vae import apply_fast_vae, decode_accuracy, is_fast_vae
from s2v_fast.testing.latents import smooth_latents
from util import fixture, load_fixture

CKPT = fixture("vae", "Wan2.1_VAE.pth")
SAME_PATH = 1e-3  # streaming / tiled vs whole-clip on the fast path (measured 0.0)


@pytest.fixture(scope="module")
def ref():
    return WanVAE.from_file(CKPT)


@pytest.fixture(scope="module")
def fast(ref):
    return apply_fast_vae(copy.deepcopy(ref))


@pytest.fixture(scope="module")
def io():
    return load_fixture("vae", "inputs.safetensors"), load_fixture("vae", "outputs.safetensors")


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def max_diff(a, b):
    assert a.shape == b.shape
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- the transform
def test_transform_dtypes_layout_and_keys(ref, fast):
    assert is_fast_vae(fast) and not is_fast_vae(ref)
    assert list(fast.state_dict()) == list(ref.state_dict())  # same checkpoint keys
    fp32 = {"conv1", "conv2", "encoder.head.2", "decoder.head.2"}
    for name, m in fast.named_modules():
        if isinstance(m, RMSNorm):
            assert m.gamma.dtype == torch.float32
        elif isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
            want = torch.float32 if name in fp32 else torch.bfloat16
            assert m.weight.dtype == want, name
            if isinstance(m, torch.nn.Conv3d) and m.weight[0, 0].numel() > 1:
                assert m.weight.is_contiguous(memory_format=torch.channels_last_3d), name
    # the plain model is untouched
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    assert type(ref.decoder.conv1) is CausalConv3d


def test_transform_refuses_bad_inputs(ref, fast):
    with pytest.raises(ValueError, match="already"):
        apply_fast_vae(fast)
    with pytest.raises(ValueError, match="dtype"):
        apply_fast_vae(copy.deepcopy(ref), torch.int8)
    with pytest.raises(ValueError, match="fp32 VAE"):
        apply_fast_vae(WanVAE.tiny(dim=4, dtype=torch.bfloat16))


def test_no_concatenation_in_causal_convs(ref, fast, io, monkeypatch):
    """The fast path's causal histories are preallocated buffers: an untiled decode calls
    ``torch.cat`` nowhere and an encode once (``_encode_untiled`` joining its chunks' latents);
    the reference concatenates history and input in every temporal conv."""
    inputs, _ = io
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    ref.decode(inputs["latent"][None, :, :2])
    assert calls  # the counter sees the reference's concatenations
    calls.clear()
    fast.decode(inputs["latent"][None, :, :2])
    assert not calls
    fast.encode(inputs["video"][None, :, :5])
    assert len(calls) == 1


def test_fp32_layout_path_matches_reference(ref, io):
    """dtype=fp32 applies the layout / buffer / upsample changes alone: the reference up to
    the convolutions' summation order (measured 6.7e-6 decode, 7e-7 encode)."""
    inputs, _ = io
    f32 = apply_fast_vae(copy.deepcopy(ref), torch.float32)
    z = inputs["latent"][None]
    assert max_diff(f32.decode(z, clamp=False), ref.decode(z, clamp=False)) <= 1e-4
    v = inputs["video"][None]
    assert max_diff(f32.encode(v), ref.encode(v)) <= 1e-5


# --------------------------------------------------------------------------- accuracy vs fp32
def test_decode_golden_latents_bf16(ref, fast, io):
    inputs, outputs = io
    out = fast.decode(inputs["latent"][None])
    assert out.dtype == torch.float32 and out.abs().max() <= 1.0
    acc = decode_accuracy(out[0], outputs["decode_latent"])
    assert acc["psnr_db"] >= 40.0 and acc["max_abs"] <= 0.2, acc  # measured 45.0 dB / 0.112


def test_decode_golden_latents_fp16_meets_issue_bounds(ref, io):
    inputs, outputs = io
    f16 = apply_fast_vae(copy.deepcopy(ref), torch.float16)
    acc = decode_accuracy(f16.decode(inputs["latent"][None])[0], outputs["decode_latent"])
    assert acc["psnr_db"] >= 40.0 and acc["max_abs"] <= 2e-2, acc  # measured 63.2 dB / 0.0145


def test_decode_smooth_latents_bf16(ref, fast):
    z = smooth_latents((1, 16, 5, 8, 12), seed=3)
    acc = decode_accuracy(fast.decode(z), ref.decode(z))
    assert acc["psnr_db"] >= 40.0 and acc["max_abs"] <= 0.75, acc  # measured 44.2 dB / 0.487


def test_decode_and_encode_bf16_wider_vae():
    """A better conditioned (dim 32) random VAE: bf16 is well inside the PSNR bound."""
    ref32 = WanVAE.tiny(dim=32, seed=0)
    f32 = apply_fast_vae(copy.deepcopy(ref32))
    z = smooth_latents((1, 16, 3, 4, 6), seed=3)
    video = ref32.decode(z)
    acc = decode_accuracy(f32.decode(z), video)
    assert acc["psnr_db"] >= 45.0 and acc["max_abs"] <= 4e-2, acc  # measured 54.4 dB / 0.019
    mu, mu_ref = f32.encode(video), ref32.encode(video)
    # measured max-abs 3.5e-3, rel L2 2.1e-3
    assert max_diff(mu, mu_ref) <= 1e-2 and rel_l2(mu, mu_ref) <= 5e-3


def test_encode_bf16(ref, fast, io):
    inputs, outputs = io
    for key, case in (("video", "encode_video"), ("image", "encode_image")):
        out = fast.encode(inputs[key][None])
        assert out.dtype == torch.float32 and out.shape[1:] == outputs[case].shape
        # latent units (unit variance): measured max-abs 0.024 / 0.017, rel L2 9.7e-3 / 9.3e-3
        assert max_diff(out[0], outputs[case]) <= 0.05, case
        assert rel_l2(out[0], outputs[case]) <= 2e-2, case


# --------------------------------------------------------------------------- streaming / tiled / sliced
@pytest.fixture(scope="module")
def z9():
    return smooth_latents((1, 16, 9, 4, 6), seed=1)


@pytest.fixture(scope="module")
def fast_whole(fast, z9):
    return fast.decode(z9)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_stream_chunks_equal_whole_clip(ref, fast, z9, fast_whole, chunk):
    dec = fast.stream_decoder()
    outs = [dec.decode(z9[:, :, i:i + chunk]) for i in range(0, z9.shape[2], chunk)]
    assert all(o.dtype == torch.float32 for o in outs)
    out = torch.cat(outs, 2)
    assert max_diff(out, fast_whole) <= SAME_PATH
    acc = decode_accuracy(out, ref.decode(z9))
    assert acc["psnr_db"] >= 40.0, acc


def test_stream_warmup_and_flat_history(fast, z9, fast_whole):
    dec = fast.stream_decoder()
    dec.warmup(z9[:, :, :4])
    nbytes = dec.cache_nbytes()
    out = torch.cat([dec.decode(z9[:, :, 4:7]), dec.decode(z9[:, :, 7:])], 2)
    assert nbytes > 0 and dec.cache_nbytes() == nbytes  # buffers are reused, never grown
    assert max_diff(out, fast_whole[:, :, 1 + 4 * 3:]) <= SAME_PATH


def test_tiled_and_sliced_decode_on_fast_path(ref):
    z = smooth_latents((2, 16, 3, 8, 12), seed=4)
    fast = apply_fast_vae(copy.deepcopy(ref))
    plain = fast.decode(z)
    fast.enable_tiling(32, 32, 8, 8, 16)
    fast.enable_slicing()
    ref_t = copy.deepcopy(ref)
    ref_t.enable_tiling(32, 32, 8, 8, 16)
    try:
        assert len(fast.decode_tile_boxes(8, 12)) == 12
        tiled = fast.decode(z)
        # against the fp32 *tiled* decode (tiling's own error, ~31 dB on this tiny VAE with a
        # 16 px halo, is the same on both paths): measured 45.1 dB / 0.209
        acc = decode_accuracy(tiled, ref_t.decode(z))
        assert acc["psnr_db"] >= 40.0 and acc["max_abs"] <= 0.75, acc
        dec = fast.stream_decoder()
        streamed = torch.cat([dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:])], 2)
        assert max_diff(streamed, tiled) <= SAME_PATH
    finally:
        fast.disable_tiling()
        fast.disable_slicing()
    assert max_diff(fast.decode(z[1:]), plain[1:]) <= SAME_PATH  # slicing = per item


def test_fused_norm_kernel_in_the_model(ref):
    """``norm_kernel=True`` runs the Triton RMS_norm + SiLU (the interpreter on a CPU) in every
    norm; the same decode as the torch form up to a bf16 ulp here and there (measured 2.7e-3
    max-abs after the badly conditioned dim-4 decoder amplifies them)."""
    pytest.importorskip("triton")
    from s2v_fast.kernels._utils import is_interpreter

    if not is_interpreter() and not torch.cuda.is_available():
        pytest.skip("needs CUDA or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    k = apply_fast_vae(copy.deepcopy(ref).to(dev), norm_kernel=True)
    t = apply_fast_vae(copy.deepcopy(ref).to(dev), norm_kernel=False)
    z = smooth_latents((1, 16, 2, 2, 3), seed=1, device=dev)
    acc = decode_accuracy(k.decode(z), t.decode(z))
    assert acc["psnr_db"] >= 60.0 and acc["max_abs"] <= 2e-2, acc


def test_bench_vae_fast_rows_cpu_form():
    """bench/bench_vae.py's fast mode on CPU (--smoke: dim-8 VAE, 16x24): fp32 and fast rows for
    decode / stream / encode with their floors, and the fast rows' accuracy vs fp32."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_vae

    rows = bench_vae.main(["--smoke", "--modes", "fast"])
    assert {(r["op"], r["path"]) for r in rows} == {(op, p) for op in ("decode", "stream_decode", "encode")
                                                    for p in ("fp32", "fast")}
    for r in rows:
        assert r["median_ms"] > 0 and (r.get("floor_ms_per_latent") or r["floor_ms_per_frame"]) > 0
        if r["path"] == "fast":
            assert r["x_floor"] > 0
            if r["op"] == "encode":
                assert r["rel_l2"] <= 5e-2
            else:
                assert r["psnr_db"] >= 40.0, r


def test_vae_floor_counts_the_full_size_decoder():
    """The floor's FLOP count: conv FLOPs per output pixel of the decoder's stages add up to the
    hand count (~9.1 TFLOP per latent frame after the first at 704x384, attention included;
    measured 9.16)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from bench_vae import vae_floor

    one, four = vae_floor(704, 384, latents=1), vae_floor(704, 384, latents=4)
    per_latent = (four["tflop"] - one["tflop"]) / 3  # a latent after the first: 4 pixel frames
    assert 8.7 <= per_latent <= 9.3, per_latent
    assert four["floor_ms"] > four["tflop"] / 790 * 1e3  # never below the compute-only time
