"""Quick tier (``-m quick``, under ~6 min on an H100): what the README claims, at 14B shapes.

Every row times one call with ``measure`` (bench/conftest.py: pytest-benchmark pedantic mode,
synchronised, CUDA-event medians in extra_info) on fresh random inputs, and asserts its accuracy
against its exact path with ``check`` (bounds below, each with where it comes from). The inputs,
cases and drivers are the scripts' own (bench_kernels, bench_fp8, dit_common, bench_vae,
bench_audio_features, bench_streaming); on a CPU machine every row runs its smoke form (tiny
shapes, Triton interpreter) under ``--benchmark-disable``.

* ``test_kernel``: each Triton kernel of bench_kernels.KERNEL_CASES at 32,760 and 79,200 tokens,
  against the eager torch code it replaces (rel L2 1e-2 / cos 0.9999: the same math, bf16 output).
* ``test_attention``: every bf16 attention backend (self at both sizes, and 512 keys), against
  fp32 attention on every 16th query (1e-2 / 0.9999: bf16 inputs, measured 1.7e-3);
  ``test_attention_fp8``: fp8 attention on DiT-like inputs (0.12 / 0.998: measured 3-9%, fp8-*).
* ``test_gemm_fp8``: the step's three GEMM shapes with per-token fp8 activations, against fp32
  (0.06 / 0.998: e4m3 on both operands, measured 3.5%).
* ``test_dit_section``: a 4-block, full-width (5120) DiT section at 448x832 x 80 frames (32,760
  tokens, CFG batch 2): ``reference``, ``fast`` (vs reference: 1e-2 / 0.9999, gpu_smoke's bound)
  and ``fp8`` (``quantize_dit``; vs reference: 0.10 / 0.995, gpu_smoke's bound). The reference row
  is the exact path itself: it checks its re-run against the first call (1e-3 / 0.99999).
* ``test_vae_decode``: the full-size VAE's plain decode of 20 latents at 448x832 (TF32 as the
  pipeline leaves it), against the TF32-off decode of its first 3 latents (causal: the same
  frames; 1e-2 / 0.9999). ``test_vae_stream_decode``: ``WanVAE.stream_decoder()`` on blocks of 3
  latents at 704x384 after the 7-latent warm-up, against ``decode`` of the whole sequence (TF32
  off: 1e-4 / 0.99999, the documented equivalence; the timed block with TF32: 1e-2 / 0.9999).
* ``test_audio_features``: wav2vec2 (full-size structure) features of 5 s of speech-like audio
  on the GPU, against the reference's fp32 CPU run (1e-3 / 0.99999: measured 0).
* ``test_streaming_forward``: ``StreamingRunner`` (bench_streaming.run_stream: prefill + 5 blocks
  x 4 steps, the ring wraps once) on the 4-block section at 704x384, against an fp32 copy of its
  weights (gpu_smoke.STREAM_BF16_BOUND).
"""
from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch

import bench_audio_features
import bench_fp8
import bench_kernels as bk
import bench_streaming
from bench_vae import random_vae
from conftest import CUDA
from dit_common import build_random_dit, make_inputs, step_fn
from gpu_smoke import STREAM_BF16_BOUND

from s2v_fast.kernels import attention as attn
from s2v_fast.kernels import fp8_attention as fa8
from s2v_fast.kernels import fp8_gemm as fg
from s2v_fast.testing.latents import smooth_latents
from s2v_fast.fast import set_precision

pytestmark = pytest.mark.quick

DEV = "cuda" if CUDA else "cpu"
KCFG = bk.Cfg() if CUDA else bk.smoke_cfg()
DIT_LAYERS = 4
# (H, W, frames) of the DiT section; the CPU form runs the tiny preset (the same code path)
DIT_SHAPE = (448, 832, 80) if CUDA else (64, 64, 4)
STREAM_SHAPE = (704, 384) if CUDA else (64, 64)
STREAM_BLOCKS = 5 if CUDA else 2


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
    if CUDA:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def tf32_convs(on: bool):
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def _clone(out):
    return tuple(o.clone() for o in out) if isinstance(out, (tuple, list)) else out.clone()


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("L", list(KCFG.shapes))
@pytest.mark.parametrize("op", list(bk.KERNEL_CASES))
def test_kernel(measure, check, op, L):
    Lv, Nf = KCFG.shapes[L]
    case = bk.KERNEL_CASES[op]
    torch.manual_seed(L)
    fast, _, nbytes = case(KCFG, L, Lv, Nf, DEV)
    first = _clone(fast())  # before timing: in-place kernels drift their buffers
    torch.manual_seed(L)  # the same inputs, fresh, for the eager reference
    _, ref, _ = case(KCFG, L, Lv, Nf, DEV)
    expected = _clone(ref())
    measure(fast, rounds=20, warmup_rounds=3, op=op, tokens=L, bytes=nbytes)
    check(first, expected, 1e-2, 0.9999, against="eager")


# ----------------------------------------------------------------------------- attention
ATTN_BACKENDS = bk.ATTN_BACKENDS if CUDA else ("triton",)  # the others need a GPU
ATTN_STRIDE = 16 if CUDA else 1


@pytest.mark.parametrize("Lk", [None, 512], ids=["self", "cross512"])
@pytest.mark.parametrize("L", list(KCFG.shapes))
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention(measure, check, backend, L, Lk):
    name, fn, (q, k, v) = bk.attention_case(backend, L, KCFG, Lk)
    fn()  # compile / tune outside the timing
    out = measure(fn, rounds=10, warmup_rounds=2, name=name,
                  flops=4 * KCFG.H * KCFG.D * L * k.shape[1])
    ref = fa8.attention_fp32(q[:, ::ATTN_STRIDE], k, v)
    check(out[:, ::ATTN_STRIDE], ref, 1e-2, 0.9999, against="fp32")


FP8_ATTN = (KCFG.H, KCFG.D, bench_fp8.ATTN_SIZES) if CUDA else (2, 64, (96,))


@pytest.mark.parametrize("Lk", [None, 512], ids=["self", "cross512"])
@pytest.mark.parametrize("L", FP8_ATTN[2])
def test_attention_fp8(measure, check, L, Lk):
    h, d, _ = FP8_ATTN
    Lk = L if Lk is None else (Lk if CUDA else 64)
    q, k, v = fa8.make_realistic_qkv(1, L, h, d, Lk, seed=L + Lk, device=DEV)
    fa8.fp8_attention(q, k, v)  # tunes and compiles
    out = measure(lambda: fa8.fp8_attention(q, k, v), rounds=10, warmup_rounds=2,
                  flops=4 * h * d * L * Lk, fallbacks=str(fa8.FALLBACKS))
    ref = fa8.attention_fp32(q[:, ::ATTN_STRIDE], k, v)
    check(out[:, ::ATTN_STRIDE], ref, 0.12, 0.998, against="fp32")


GEMM_SHAPES = bench_fp8.GEMM_SHAPES if CUDA else ((64, 64, 128),)


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_fp8(measure, check, shape):
    M, N, K = shape
    x = fg.realistic_linear_input(M, K, device=DEV, gelu=K > N, seed=K)
    w = fg.realistic_weight(N, K, device=DEV)
    bias = (0.02 * torch.randn(N, device=DEV)).to(torch.bfloat16)
    w8, sw = fg.quantize_weight(w)
    out = measure(lambda: fg.fp8_linear(x, w8, sw, bias), rounds=10, warmup_rounds=2,
                  flops=2 * M * N * K, scaled_mm=fg.scaled_mm_usable(w8[:1], w8, torch.bfloat16))
    n = min(M, 4096)
    check(out[:n], x[:n].float() @ w.float().t() + bias.float(), 0.06, 0.998, against="fp32")


# ----------------------------------------------------------------------------- DiT section
def _section(seed=0):
    if CUDA:
        return build_random_dit(device=DEV, layers=DIT_LAYERS, seed=seed)
    return build_random_dit("tiny", device=DEV, dtype=torch.float32, seed=seed)


@pytest.fixture(scope="module")
def dit_section():
    model = _section()
    H, W, F = DIT_SHAPE
    inp = make_inputs(model, H, W, frames=F, batch=2, seed=H + W)
    set_precision(model, "reference")
    with torch.no_grad():
        ref = model(**inp).float()
    yield dict(model=model, inp=inp, ref=ref)
    del model, inp, ref
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["reference", "fast", "fp8"])
def test_dit_section(measure, check, dit_section, mode):
    model, inp, ref = dit_section["model"], dit_section["inp"], dit_section["ref"]
    info = dict(layers=model.config.num_layers, dim=model.config.dim, shape="x".join(map(str, DIT_SHAPE)))
    if mode == "reference":
        set_precision(model, "reference")
        out = measure(lambda: model(**inp), rounds=3, warmup_rounds=1, **info)
        check(out.float(), ref, 1e-3, 0.99999, against="first_call")
        return
    if mode == "fp8":
        from s2v_fast.quantization import quantize_dit

        model = _section()  # the same weights (seed), quantised in place
        quantize_dit(model, "fp8", attention=CUDA)  # fp8 attention is GPU-only in speed
        info["attention"] = attn.configured_backends(model)["self"]
    set_precision(model, "fast")
    out = measure(step_fn(model, inp), rounds=3, warmup_rounds=1, **info)
    rel, cos = (1e-2, 0.9999) if mode == "fast" else (0.10, 0.995)
    check(out.float(), ref, rel, cos, against="reference")


# ----------------------------------------------------------------------------- VAE
VAE = dict(dim=96, size=(448, 832), latents=20) if CUDA else dict(dim=4, size=(32, 32), latents=3)


@pytest.fixture(scope="module")
def vae():
    v = random_vae(torch.device(DEV), dim=VAE["dim"])
    yield v
    del v


def test_vae_decode(measure, check, vae):
    h, w = VAE["size"]
    z = smooth_latents((1, 16, VAE["latents"], h // 8, w // 8), seed=5, device=DEV)
    vae.disable_tiling()
    out = measure(lambda: vae.decode(z), rounds=3, warmup_rounds=1, latents=VAE["latents"],
                  size=f"{h}x{w}", tf32=torch.backends.cudnn.allow_tf32)
    n = min(3, VAE["latents"] - 1)
    with tf32_convs(False):
        exact = vae.decode(z[:, :, :n])
    check(out[:, :, :exact.shape[2]], exact, 1e-2, 0.9999, against="fp32_decode")


def test_vae_stream_decode(measure, check, vae):
    h, w = STREAM_SHAPE if CUDA else VAE["size"]
    warm, blk = (7, 3) if CUDA else (2, 2)  # LiveAvatar warms with 7 motion latents
    z = smooth_latents((1, 16, warm + blk * 8, h // 8, w // 8), seed=6, device=DEV)
    vae.disable_tiling()
    dec = vae.stream_decoder()
    dec.warmup(z[:, :, :warm])
    blocks = (z[:, :, i:i + blk] for i in itertools.count(warm, blk))
    first = []

    def decode_block():
        out = dec.decode(next(blocks))
        if not first:
            first.append(out.clone())
        return out

    measure(decode_block, rounds=5, warmup_rounds=1, latents_per_block=blk, size=f"{h}x{w}")
    with tf32_convs(False):
        exact = vae.decode(z[:, :, :warm + blk])[:, :, 1 + 4 * (warm - 1):]
        s = vae.stream_decoder()
        s.warmup(z[:, :, :warm])
        streamed = s.decode(z[:, :, warm:warm + blk])
    check(streamed, exact, 1e-4, 0.99999, against="decode_fp32")
    check(first[0], exact, 1e-2, 0.9999, against="decode_fp32_timed")


# ----------------------------------------------------------------------------- audio
def test_audio_features(measure, check):
    from s2v_fast.models.audio_features import AudioFeatureExtractor

    small = {} if CUDA else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, conv_dim=(32,) * 7,
                                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    model, fe = bench_audio_features.full_size_model(**small)
    wave = bench_audio_features.speech_like(5.0 if CUDA else 1.0)
    exact = AudioFeatureExtractor(model, fe, device="cpu")(wave)  # the reference: fp32 on the CPU
    ext = AudioFeatureExtractor(copy.deepcopy(model).to(DEV), fe, device=DEV)
    with tf32_convs(False):  # as S2VPipeline.audio_features runs it
        out = measure(lambda: ext(wave), rounds=5, warmup_rounds=1, seconds_audio=len(wave) / 16000)
    check(out.cpu(), exact, 1e-3, 0.99999, against="cpu_fp32")


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("precision", ["reference", "fast"])
def test_streaming_forward(benchmark, measure, check, precision):
    """The reference block-causal forward and the fused one (s2v_fast/fast/causal.py; on the
    CPU form's fp32 tiny model it takes the reference forward)."""
    from s2v_fast.streaming.preset import StreamingSettings

    settings = StreamingSettings()
    model = build_random_dit(device=DEV, layers=DIT_LAYERS) if CUDA else bench_streaming.build(True, None)[0]
    set_precision(model, precision)
    h, w = STREAM_SHAPE
    res = measure(lambda: bench_streaming.run_stream(model, None, h, w, STREAM_BLOCKS, settings),
                  rounds=3, warmup_rounds=1, blocks=STREAM_BLOCKS, size=f"{h}x{w}")
    row = bench_streaming.summarize((h, w), "bf16", res, model, settings)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    if next(model.parameters()).dtype != torch.float32:
        exact = bench_streaming.run_stream(copy.deepcopy(model).float(), None, h, w,
                                           STREAM_BLOCKS, settings)["latents"]
    else:  # the CPU form's tiny model is fp32 already: its exact path is itself
        exact = res["latents"]
    check(res["latents"], exact, *STREAM_BF16_BOUND, against="fp32_weights")
