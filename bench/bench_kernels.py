"""GPU benchmarks of the s2v_fast Triton kernels at the Wan2.2-S2V-14B shapes.

Each kernel is timed against the eager torch reference it replaces (GB/s from the minimal bytes
moved, fraction of the 3.0 TB/s H100 copy ceiling, speedup), and the attention backends side by
side (triton vs SDPA cuDNN vs SDPA flash; TFLOP/s = 4*B*H*D*Lq*Lk / time). Medians of CUDA-event
timings after warm-up, on fresh random inputs. Results go to $S2V_BENCH_OUT (default
bench/results) as JSON: names `kernel_<op>_<tokens>` / `attention_<backend>_<tokens>`.

    python bench/bench_kernels.py --quick            # all of it, one table (the lead's H100 call)
    python bench/bench_kernels.py --sizes 32760 --only attention
    pytest bench/ --benchmark-only -m quick -k 'kernel or attention'   # pytest-benchmark form
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # CPU plumbing check, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import time_ms, write_results  # noqa: E402
from s2v_fast.kernels import audio_injection as ai
from s2v_fast.kernels import flash_attention as fa
from s2v_fast.kernels import gated_residual as gr
from s2v_fast.kernels import norm_modulate as nm
from s2v_fast.kernels import qk_norm_rope as qr
from s2v_fast.kernels import rms_norm as rn

COPY_CEILING_GBS = 3000.0  # measured H100 device-to-device copy (read + write), ENVIRONMENT.md
C, H, D = 5120, 40, 128
# L total -> (Lv noisy tokens, Nf tokens per latent frame); spec §9 (F = 20)
SHAPES = {32760: (29120, 1456), 79200: (70400, 3520)}
SMOKE_SHAPES = {40: (30, 6)}


class Cfg:
    C, H, D = C, H, D
    shapes = SHAPES
    warmup, iters = 5, 20
    device = "cuda"


def smoke_cfg() -> Cfg:
    """The CPU plumbing form (--smoke, bench/test_bench_quick.py): tiny shapes, Triton interpreter."""
    cfg = Cfg()
    cfg.C, cfg.H, cfg.D, cfg.shapes, cfg.device = 64, 2, 32, SMOKE_SHAPES, "cpu"
    cfg.warmup, cfg.iters = 1, 1
    return cfg


def _maxdiff(a, b):
    if isinstance(a, (tuple, list)):
        return max(_maxdiff(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- kernel cases
# Each builder returns (fast_fn, ref_fn, minimal_bytes). Inputs are fresh random tensors.


def _randn(*shape, dtype=torch.float32, scale=1.0, dev="cuda"):
    return (torch.randn(*shape, device=dev) * scale).to(dtype)


def case_norm_modulate(cfg, L, Lv, Nf, dev):
    x = _randn(1, L, cfg.C, dev=dev, scale=2)
    sh, sc = _randn(1, 2, cfg.C, dev=dev, scale=0.5), _randn(1, 2, cfg.C, dev=dev, scale=0.5)
    out = torch.empty(1, L, cfg.C, dtype=torch.bfloat16, device=dev)
    return (lambda: nm.norm_modulate(x, sh, sc, Lv, out=out),
            lambda: nm.norm_modulate_reference(x, sh, sc, Lv),
            L * cfg.C * (4 + 2))


def case_rms_norm(cfg, L, Lv, Nf, dev):
    x = _randn(1, L, cfg.C, dtype=torch.bfloat16, dev=dev, scale=2)
    w = (1 + _randn(cfg.C, dev=dev, scale=0.3)).to(torch.bfloat16)
    return (lambda: rn.rms_norm(x, w), lambda: rn.rms_norm_reference(x, w), L * cfg.C * (2 + 2))


def case_gated_residual(cfg, L, Lv, Nf, dev):
    x = _randn(1, L, cfg.C, dev=dev)
    y = _randn(1, L, cfg.C, dev=dev, dtype=torch.bfloat16)
    g = _randn(1, 2, cfg.C, dev=dev, scale=0.1)
    return (lambda: gr.gated_residual(x, y, g, Lv),
            lambda: gr.gated_residual_reference(x, y, g, Lv),
            L * cfg.C * (4 + 2 + 4))


def _fused_case(cfg, L, Lv, kind, dev):
    x = _randn(1, L, cfg.C, dev=dev)
    y = _randn(1, L, cfg.C, dev=dev, dtype=torch.bfloat16)
    g = _randn(1, 2, cfg.C, dev=dev, scale=0.1)
    sh, sc = _randn(1, 2, cfg.C, dev=dev, scale=0.5), _randn(1, 2, cfg.C, dev=dev, scale=0.5)
    w, b = _randn(cfg.C, dev=dev, dtype=torch.bfloat16), _randn(cfg.C, dev=dev, dtype=torch.bfloat16)
    h = torch.empty(1, L, cfg.C, dtype=torch.bfloat16, device=dev)
    nbytes = L * cfg.C * (4 + 2 + 4 + 2)
    if kind == "affine":
        return (lambda: gr.gated_residual_layernorm_affine(x, y, g, Lv, w, b, h_out=h),
                lambda: gr.gated_residual_layernorm_affine_reference(x, y, g, Lv, w, b), nbytes)
    if kind == "add":
        return (lambda: gr.residual_add_norm_modulate(x, y, sh, sc, Lv, h_out=h),
                lambda: gr.residual_add_norm_modulate_reference(x, y, sh, sc, Lv), nbytes)
    return (lambda: gr.gated_residual_norm_modulate(x, y, g, sh, sc, Lv, h_out=h),
            lambda: gr.gated_residual_norm_modulate_reference(x, y, g, sh, sc, Lv), nbytes)


def case_gated_residual_layernorm_affine(cfg, L, Lv, Nf, dev):
    return _fused_case(cfg, L, Lv, "affine", dev)


def case_residual_add_norm_modulate(cfg, L, Lv, Nf, dev):
    return _fused_case(cfg, L, Lv, "add", dev)


def case_gated_residual_norm_modulate(cfg, L, Lv, Nf, dev):
    return _fused_case(cfg, L, Lv, "gated", dev)


def case_qk_norm_rope(cfg, L, Lv, Nf, dev):
    qkv = _randn(1, L, 3 * cfg.C, dev=dev, dtype=torch.bfloat16, scale=3)
    q, k = qkv[..., :cfg.C], qkv[..., cfg.C:2 * cfg.C]
    wq, wk = _randn(cfg.C, dev=dev, dtype=torch.bfloat16), _randn(cfg.C, dev=dev, dtype=torch.bfloat16)
    ang = torch.rand(L, cfg.D // 2, device=dev) * 100
    cos, sin = ang.cos(), ang.sin()
    qo = torch.empty(1, L, cfg.H, cfg.D, dtype=torch.bfloat16, device=dev)
    ko = torch.empty_like(qo)
    return (lambda: qr.qk_norm_rope(q, k, wq, wk, cos, sin, cfg.H, q_out=qo, k_out=ko),
            lambda: qr.qk_norm_rope_reference(q, k, wq, wk, cos, sin, cfg.H),
            L * cfg.C * (2 + 2) * 2 + L * cfg.D * 4)


def case_audio_adaln(cfg, L, Lv, Nf, dev):
    x = _randn(1, L, cfg.C, dev=dev, scale=2)
    Fr = Lv // Nf
    lin = _randn(1, Fr, 2 * cfg.C, dev=dev, dtype=torch.bfloat16, scale=0.5)
    sh, sc = lin[..., :cfg.C], lin[..., cfg.C:]
    out = torch.empty(1, Lv, cfg.C, dtype=torch.bfloat16, device=dev)
    return (lambda: ai.audio_adaln(x[:, :Lv], sh, sc, Nf, out=out),
            lambda: ai.audio_adaln_reference(x[:, :Lv], sh, sc, Nf),
            Lv * cfg.C * (4 + 2))


def case_frame_cross_attention(cfg, L, Lv, Nf, dev):
    Fr = Lv // Nf
    q = _randn(1, Lv, cfg.H, cfg.D, dev=dev, dtype=torch.bfloat16)
    k = _randn(1, Fr, 5, cfg.H, cfg.D, dev=dev, dtype=torch.bfloat16)
    v = _randn(1, Fr, 5, cfg.H, cfg.D, dev=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return (lambda: ai.frame_cross_attention(q, k, v, out=out),
            lambda: ai.frame_cross_attention_reference(q, k, v),
            Lv * cfg.C * (2 + 2))


def case_audio_residual_add(cfg, L, Lv, Nf, dev):
    x = _randn(1, L, cfg.C, dev=dev)
    y = _randn(1, Lv, cfg.C, dev=dev, dtype=torch.bfloat16)

    def ref():
        x[:, :Lv] += y.float()
        return x

    return (lambda: ai.audio_residual_add(x, y), ref, Lv * cfg.C * (4 + 2 + 4))


def case_text_attention(cfg, L, Lv, Nf, dev, lens=(37, 118), text_len=512, flash=False):
    """Text cross-attention of the CFG batch (prompt / negative prompt of `lens` rows, zero-padded
    to 512): compacted keys + key bias in the Triton kernel vs cuDNN over the 512 padded keys
    (what ``auto`` picked before, profile_dit448_lazy)."""
    from s2v_fast.kernels.attention import _BACKENDS
    from s2v_fast.fast.text_kv import compact_text_kv, text_attention

    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = _randn(2, L, cfg.H, cfg.D, dev=dev, dtype=dt)
    k = _randn(2, text_len, cfg.H, cfg.D, dev=dev, dtype=dt)
    v = _randn(2, text_len, cfg.H, cfg.D, dev=dev, dtype=dt)
    for b, n in enumerate(lens):  # padding rows share one k/v row, as after the text MLP
        k[b, n:], v[b, n:] = k[b, -1], v[b, -1]
    kc, vc, bias = compact_text_kv(k, v, lens)
    full = _BACKENDS["cudnn"] if dev == "cuda" else fa.attention_reference
    fast = (lambda: fa.triton_attention(q, kc, vc, key_bias=bias)) if flash else \
        (lambda: text_attention(q, kc, vc, bias))
    return fast, lambda: full(q, k, v), 2 * L * cfg.C * (2 + 2)


def case_text_attention_flash(cfg, L, Lv, Nf, dev):
    """As text_attention, with the compacted keys in the flash kernel instead of the short-key one."""
    return case_text_attention(cfg, L, Lv, Nf, dev, flash=True)


KERNEL_CASES = {
    "norm_modulate": case_norm_modulate,
    "rms_norm": case_rms_norm,
    "gated_residual": case_gated_residual,
    "gated_residual_layernorm_affine": case_gated_residual_layernorm_affine,
    "residual_add_norm_modulate": case_residual_add_norm_modulate,
    "gated_residual_norm_modulate": case_gated_residual_norm_modulate,
    "qk_norm_rope": case_qk_norm_rope,
    "audio_adaln": case_audio_adaln,
    "frame_cross_attention": case_frame_cross_attention,
    "audio_residual_add": case_audio_residual_add,
    "text_attention": case_text_attention,
    "text_attention_flash": case_text_attention_flash,
}
# In-place ops: compare outputs on fresh copies, not on the drifting benchmark buffers.
_NO_DIFF = {"gated_residual", "audio_residual_add", "gated_residual_layernorm_affine",
            "residual_add_norm_modulate", "gated_residual_norm_modulate"}


def bench_kernel(op, L, cfg):
    Lv, Nf = cfg.shapes[L]
    torch.manual_seed(L)
    fast, ref, nbytes = KERNEL_CASES[op](cfg, L, Lv, Nf, cfg.device)
    diff = None if op in _NO_DIFF else _maxdiff(fast(), ref())
    t_fast = time_ms(fast, cfg.warmup, cfg.iters)["median_ms"]
    t_ref = time_ms(ref, max(1, cfg.warmup // 2), max(3, cfg.iters // 2))["median_ms"]
    gbs = nbytes / (t_fast * 1e-3) / 1e9
    return dict(name=f"kernel_{op}_{L}", op=op, tokens=L, noisy_tokens=Lv, C=cfg.C,
                median_ms=t_fast, ref_median_ms=t_ref, speedup=t_ref / t_fast,
                bytes=nbytes, GBps=gbs, frac_copy_ceiling=gbs / COPY_CEILING_GBS, max_abs_diff=diff)


# ----------------------------------------------------------------------------- attention


from s2v_fast.kernels import attention as attn_registry  # noqa: E402

# every registered backend that can run here (flash_attn only when the package is installed)
ATTN_BACKENDS = tuple(b for b in ("triton", "cuda", "cudnn", "sdpa_flash", "flash_attn")
                      if b in attn_registry.available_attention_backends())


def attention_case(backend, L, cfg, Lk=None):
    """(name, fn, (q, k, v)) of one attention call: self-attention over L tokens ([1, L, H, D]
    bf16, q/k/v views of one QKV buffer as in the model); Lk given: cross-attention with Lk keys.
    Fresh random inputs, seeded by the shape."""
    torch.manual_seed(L + (Lk or 0))
    dev = cfg.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    if Lk is None:
        qkv = torch.randn(1, L, 3, cfg.H, cfg.D, device=dev).to(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        suffix = ""
    else:
        q = torch.randn(1, L, cfg.H, cfg.D, device=dev).to(dt)
        k = torch.randn(1, Lk, cfg.H, cfg.D, device=dev).to(dt)
        v = torch.randn(1, Lk, cfg.H, cfg.D, device=dev).to(dt)
        suffix = f"_cross{Lk}"
    if backend == "triton":
        fn = lambda: fa.triton_attention(q, k, v)  # noqa: E731
    else:
        fn = (lambda f: (lambda: f(q, k, v)))(attn_registry._BACKENDS[backend])
    return f"attention_{backend}_{L}{suffix}", fn, (q, k, v)


def bench_attention(backend, L, cfg, Lk=None):
    """One row of ``attention_case``: median ms, TFLOP/s, max abs diff against the Triton kernel."""
    name, fn, (q, k, v) = attention_case(backend, L, cfg, Lk)
    lk = k.shape[1]
    try:
        out = fn()
    except Exception as e:  # backend unavailable for this shape/GPU
        return dict(name=name, backend=backend, tokens=L, keys=lk, error=f"{type(e).__name__}: {e}"[:300])
    rec = dict(name=name, backend=backend, tokens=L, keys=lk, heads=cfg.H, head_dim=cfg.D)
    if backend == "triton" and hasattr(fa, "_TUNED"):
        rec["config"] = {str(k_): v_ for k_, v_ in fa._TUNED.items()}.__repr__()[:400]
    ms = time_ms(fn, max(1, cfg.warmup // 2), max(3, cfg.iters // 2))["median_ms"]
    rec.update(median_ms=ms, TFLOPs=4 * cfg.H * cfg.D * L * lk / (ms * 1e-3) / 1e12)
    if backend != "triton":
        rec["max_abs_diff_vs_triton"] = _maxdiff(fa.triton_attention(q, k, v), out)
    return rec


# ----------------------------------------------------------------------------- output


def write_json(records, topic="kernels"):
    """JSON in the project's results form (bench/results_io.py): ``<topic>-<device>-<date>.json``."""
    shapes = dict(C=C, H=H, D=D, tokens={str(k): dict(noisy=v[0], per_frame=v[1]) for k, v in SHAPES.items()})
    return write_results(topic, records, extra=dict(shapes=shapes))


def print_table(records):
    print(f"{'name':52s} {'ms':>9s} {'ref ms':>9s} {'x':>6s} {'GB/s':>7s} {'%ceil':>6s} {'TFLOP/s':>8s} {'maxdiff':>9s}")
    for r in records:
        if "error" in r:
            print(f"{r['name']:52s} ERROR {r['error']}")
            continue
        f = lambda k, fmt: (format(r[k], fmt) if r.get(k) is not None else "")  # noqa: E731
        diff = r.get("max_abs_diff", r.get("max_abs_diff_vs_triton"))
        print(f"{r['name']:52s} {f('median_ms', '9.3f')} {f('ref_median_ms', '9.3f'):>9s} {f('speedup', '6.2f'):>6s} "
              f"{f('GBps', '7.0f'):>7s} {(format(100 * r['frac_copy_ceiling'], '5.1f') + '%') if 'frac_copy_ceiling' in r else '':>6s} "
              f"{f('TFLOPs', '8.1f'):>8s} {format(diff, '9.2e') if diff is not None else '':>9s}")


def run_all(cfg, sizes, only=None, cross=True):
    recs = []
    for L in sizes:
        for op in KERNEL_CASES:
            if only and not any(o in f"kernel_{op}" for o in only):
                continue
            try:
                recs.append(bench_kernel(op, L, cfg))
            except Exception as e:
                recs.append(dict(name=f"kernel_{op}_{L}", error=f"{type(e).__name__}: {e}"[:300]))
            print_table(recs[-1:])
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        for be in ATTN_BACKENDS:
            if only and not any(o in f"attention_{be}" for o in only):
                continue
            if cfg.device != "cuda" and be != "triton":
                continue
            recs.append(bench_attention(be, L, cfg))
            print_table(recs[-1:])
            if cross:
                recs.append(bench_attention(be, L, cfg, Lk=512))
                print_table(recs[-1:])
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing iterations (2 warm-up, 5 timed)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="token counts (default 32760 79200)")
    ap.add_argument("--only", nargs="*", default=None, help="substrings of names to run (e.g. attention qk_norm)")
    ap.add_argument("--no-cross", action="store_true", help="skip the 512-key cross-attention shapes")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter plumbing check on tiny shapes")
    ap.add_argument("--topic", default="kernels", help="results file topic (default kernels)")
    a = ap.parse_args(argv)
    cfg = Cfg()
    if a.quick:
        cfg.warmup, cfg.iters = 2, 5
    if a.smoke:
        cfg = smoke_cfg()
    elif not torch.cuda.is_available():
        print("needs a CUDA device (or --smoke)")
        return 2
    sizes = a.sizes or list(cfg.shapes)
    recs = run_all(cfg, sizes, a.only, cross=not a.no_cross)
    print()
    print_table(recs)
    if not a.smoke:
        print("wrote", write_json(recs, a.topic))
    return 0


# pytest-benchmark form: bench/test_bench_quick.py (test_kernel, test_attention) over the same cases.


if __name__ == "__main__":
    sys.exit(main())
