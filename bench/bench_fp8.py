"""FP8 attention and FP8 GEMMs on the H100 vs their bf16 counterparts, plus the 14B DiT step.

    python bench/bench_fp8.py                 # everything, one table at the end (< 4 min on H100)
    python bench/bench_fp8.py --skip-dit      # kernels only
    TRITON_INTERPRET=1 python bench/bench_fp8.py --smoke   # CPU plumbing check, tiny shapes

Rows (JSON via bench/results_io.write_results("fp8", rows)):
* ``attention_fp8_<L>`` (P.V in fp8, the default), ``attention_fp8pvbf16_<L>`` (P.V in bf16),
  ``attention_cudnn_<L>`` (bf16 SDPA cuDNN); ``..._cross512``: 512 keys. B=1, 40 heads x 128.
  ``median_ms`` / ``TFLOPs`` INCLUDE the quantisation (K-mean + Q/K/V quantise kernels);
  ``kernel_*`` is the attention kernel alone, ``quant_ms`` the quantisation alone.
  Accuracy vs fp32 attention on realistic activations (fp8_attention.make_realistic_qkv, logit std
  2; ``accuracy_by_logit_std`` sweeps 1/2/3) on every 16th query row; ``vs_emulation_rel_l2`` is
  the kernel against the pure-torch emulation of the same algorithm (kernel correctness).
* ``gemm_fp8_<M>x<N>x<K>`` (per-token activation quantisation + torch._scaled_mm rowwise; time and
  TFLOP/s INCLUDE the quantisation; ``gemm_ms``/``fast_accum_ms`` without it) and
  ``gemm_bf16_<M>x<N>x<K>`` (torch.matmul), accuracy vs fp32 on the first 4096 rows.
  M = 65520 = the CFG batch of 2 x 32760 tokens (448x832).
* ``dit14b_step_448x832_fast`` (bf16) and ``dit14b_step_448x832_fp8`` (quantize_dit: fp8 linears +
  fp8 attention): one forward_step of the 14B DiT with random weights, CFG batch 2, CUDA events,
  median of 3 after 1 warm-up; fp8 output vs bf16 output (cosine, rel L2) and per-block error of
  the residual stream and of each block's update on 512 sampled tokens.
  ``dit14b_step_448x832_fp8attn``: accuracy of fp8 attention alone (one call); ``_fp8linear``: fp8
  GEMMs with bf16 attention, timed and with accuracy.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import time_ms, write_results  # noqa: E402
from s2v_fast.attention_sites import AttentionChoice  # noqa: E402
from s2v_fast.kernels import attention as attn_registry  # noqa: E402
from s2v_fast.kernels import fp8_attention as fa8  # noqa: E402
from s2v_fast.kernels import fp8_gemm as fg  # noqa: E402
from s2v_fast.fast import set_precision  # noqa: E402

H, D = 40, 128
ATTN_SIZES = (32760, 79200)
GEMM_SHAPES = ((65520, 5120, 5120), (65520, 13824, 5120), (65520, 5120, 13824))  # M, N, K
T0 = time.time()


class Cfg:
    device = "cuda"
    H, D = H, D
    attn_sizes = ATTN_SIZES
    gemm_shapes = GEMM_SHAPES
    warmup, iters = 1, 5
    q_stride = 16  # accuracy on every 16th query row
    gemm_acc_rows = 4096
    dit = dict(preset="wan2.2-s2v-14b", height=448, width=832, frames=80, tag="448x832")
    dit_iters = 3
    budget_s = 225.0
    bf16_backend = None  # the bf16 rows' attention backend: "cuda" where it runs, else "cudnn"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()





def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _elapsed():
    return time.time() - T0


# ----------------------------------------------------------------------------- attention
def _attn_flops(B, Lq, Lk, h, d):
    return 4.0 * B * h * d * Lq * Lk


def _attn_accuracy(out, q, k, v, stride, pv=None, block_n=128, emulate=True):
    qs = q[:, ::stride]
    ref = fa8.attention_fp32(qs, k, v)
    res = fg.accuracy(out[:, ::stride], ref)
    if emulate:
        emu = fa8.fp8_attention_reference(qs, k, v, pv=pv, block_n=block_n, out_dtype=torch.float32)
        res["vs_emulation_rel_l2"] = fg.accuracy(out[:, ::stride], emu)["rel_l2"]
    return res


def bench_attention_fp8(cfg, L, Lk=None, pv="fp8", config=None, sweep=False):
    Lk = Lk or L
    suffix = "" if Lk == L else f"_cross{Lk}"
    name = f"attention_{'fp8' if pv == 'fp8' else 'fp8pvbf16'}_{L}{suffix}"
    rec = dict(name=name, backend="fp8", pv=pv, tokens=L, keys=Lk, batch=1, heads=cfg.H, head_dim=cfg.D)
    try:
        q, k, v = fa8.make_realistic_qkv(1, L, cfg.H, cfg.D, Lk, seed=L + Lk, device=cfg.device)
        out = fa8.fp8_attention(q, k, v, pv=pv, config=config)  # compiles / tunes
        used = config or fa8.tuned_config(q, v, pv)
        rec["config"] = repr(used)
        key = fa8._tune_key(q, v, pv)
        if key in fa8.TUNE_LOG:
            rec["tune_log_ms"] = {str(i): t for i, t in fa8.TUNE_LOG[key].items()}
        scale = 1.0 / math.sqrt(cfg.D)
        flops = _attn_flops(1, L, Lk, cfg.H, cfg.D)
        ms = time_ms(lambda: fa8.fp8_attention(q, k, v, pv=pv, out=out, config=used), cfg.warmup, cfg.iters)["median_ms"]
        qz = fa8.quantize_qkv(q, k, v, scale, pv)
        kms = time_ms(lambda: fa8.fp8_attention(q, k, v, pv=pv, out=out, config=used, quantized=qz),
                      cfg.warmup, cfg.iters)["median_ms"]
        qms = time_ms(lambda: fa8.quantize_qkv(q, k, v, scale, pv), cfg.warmup, cfg.iters)["median_ms"]
        rec.update(median_ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12, kernel_ms=kms,
                   kernel_TFLOPs=flops / (kms * 1e-3) / 1e12, quant_ms=qms)
        fa8.fp8_attention(q, k, v, pv=pv, out=out, config=used)
        rec.update(_attn_accuracy(out, q, k, v, cfg.q_stride, pv=pv, block_n=used["BLOCK_N"]))
        rec["logit_std"] = 2.0
        if sweep:
            by = {}
            for ls in (1.0, 3.0):
                del q, k, v
                _free()
                q, k, v = fa8.make_realistic_qkv(1, L, cfg.H, cfg.D, Lk, seed=L + 7, device=cfg.device,
                                                 logit_std=ls)
                o = fa8.fp8_attention(q, k, v, pv=pv, config=used)
                by[str(ls)] = _attn_accuracy(o, q, k, v, cfg.q_stride, emulate=False)
            by["2.0"] = dict(cosine=rec["cosine"], rel_l2=rec["rel_l2"])
            rec["accuracy_by_logit_std"] = by
    except Exception as e:  # compile errors etc. must not kill the benchmark
        rec["error"] = _err(e)
        traceback.print_exc()
    _free()
    return rec


def bench_attention_bf16(cfg, L, Lk=None, backend=None):
    Lk = Lk or L
    backend = backend or cfg.bf16_backend
    suffix = "" if Lk == L else f"_cross{Lk}"
    rec = dict(name=f"attention_{backend}_{L}{suffix}", backend=backend, tokens=L, keys=Lk, batch=1,
               heads=cfg.H, head_dim=cfg.D)
    try:
        fn = attn_registry._BACKENDS[backend]
        q, k, v = fa8.make_realistic_qkv(1, L, cfg.H, cfg.D, Lk, seed=L + Lk, device=cfg.device)
        out = fn(q, k, v)
        ms = time_ms(lambda: fn(q, k, v), cfg.warmup, cfg.iters)["median_ms"]
        rec.update(median_ms=ms, TFLOPs=_attn_flops(1, L, Lk, cfg.H, cfg.D) / (ms * 1e-3) / 1e12)
        rec.update(_attn_accuracy(out, q, k, v, cfg.q_stride, emulate=False))
    except Exception as e:
        rec["error"] = _err(e)
    _free()
    return rec


def run_attention(cfg, recs):
    sizes = list(cfg.attn_sizes)
    L0 = sizes[0]
    # tune the fp8 kernel once (first size, pv=fp8); the winner is then used everywhere (each
    # tuning would compile every config again for the other shape buckets)
    r = bench_attention_fp8(cfg, L0, pv="fp8", sweep=True)
    recs.append(r)
    _print(recs[-1:])
    winner = None
    if "config" in r and "error" not in r:
        winner = eval(r["config"])  # noqa: S307 (our own repr of a dict of literals)
        idx = next((i for i, c in enumerate(fa8.FP8_CONFIGS) if c == winner), None)
        if idx is not None:
            os.environ["S2V_FP8_ATTN_CONFIG"] = str(idx)  # also for the DiT section
            from s2v_fast.options import reload_env_options

            reload_env_options()  # the options are read once per process
    recs.append(bench_attention_bf16(cfg, L0))
    _print(recs[-1:])
    recs.append(bench_attention_fp8(cfg, L0, pv="bf16", config=winner))
    _print(recs[-1:])
    for L in sizes[1:]:
        recs.append(bench_attention_fp8(cfg, L, pv="fp8", config=winner))
        _print(recs[-1:])
        recs.append(bench_attention_bf16(cfg, L))
        _print(recs[-1:])
    recs.append(bench_attention_fp8(cfg, L0, 512, pv="fp8", config=winner))
    _print(recs[-1:])
    recs.append(bench_attention_bf16(cfg, L0, 512))
    _print(recs[-1:])


# ----------------------------------------------------------------------------- GEMM
def bench_gemm(cfg, M, N, K, recs):
    tag = f"{M}x{N}x{K}"
    flops = 2.0 * M * N * K
    fp8 = dict(name=f"gemm_fp8_{tag}", M=M, N=N, K=K)
    bf = dict(name=f"gemm_bf16_{tag}", M=M, N=N, K=K)
    try:
        x = fg.realistic_linear_input(M, K, device=cfg.device, gelu=K > N, seed=K)
        w = fg.realistic_weight(N, K, device=cfg.device)
        bias = (0.02 * torch.randn(N, device=cfg.device)).to(torch.bfloat16)
        n_acc = min(M, cfg.gemm_acc_rows)
        ref = x[:n_acc].float() @ w.float().t() + bias.float()
        try:
            w8, sw = fg.quantize_weight(w)
            y = fg.fp8_linear(x, w8, sw, bias)
            # True: the real fp8 GEMM ran (torch._scaled_mm); False: the fp32 emulation did
            fp8["scaled_mm"] = fg.scaled_mm_usable(w8[:1], w8, torch.bfloat16)
            fp8["scaled_mm_state"] = dict(fg._SCALED_MM_STATE)
            ms = time_ms(lambda: fg.fp8_linear(x, w8, sw, bias), cfg.warmup, cfg.iters)["median_ms"]
            a8, sa = fg.quantize_rows(x)
            gms = time_ms(lambda: fg.fp8_gemm(a8, sa, w8, sw, bias), cfg.warmup, cfg.iters)["median_ms"]
            qms = time_ms(lambda: fg.quantize_rows(x, out=a8, scale=sa), cfg.warmup, cfg.iters)["median_ms"]
            fp8.update(median_ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12, gemm_ms=gms,
                       gemm_TFLOPs=flops / (gms * 1e-3) / 1e12, quant_ms=qms,
                       quant_GBps=M * K * (x.element_size() + 1) / (qms * 1e-3) / 1e9)
            try:
                fms = time_ms(lambda: fg.fp8_gemm(a8, sa, w8, sw, bias, use_fast_accum=True), cfg.warmup, cfg.iters)["median_ms"]
                fp8.update(fast_accum_ms=fms, fast_accum_TFLOPs=flops / (fms * 1e-3) / 1e12)
            except Exception as e:
                fp8["fast_accum_error"] = _err(e)
            fp8.update(fg.accuracy(y[:n_acc], ref))
        except Exception as e:
            fp8["error"] = _err(e)
            traceback.print_exc()
        _free()
        try:
            yb = torch.nn.functional.linear(x, w, bias)
            ms = time_ms(lambda: torch.matmul(x, w.t()), cfg.warmup, cfg.iters)["median_ms"]
            bf.update(median_ms=ms, TFLOPs=flops / (ms * 1e-3) / 1e12)
            bf.update(fg.accuracy(yb[:n_acc], ref))
        except Exception as e:
            bf["error"] = _err(e)
    except Exception as e:
        fp8.setdefault("error", _err(e))
        bf.setdefault("error", _err(e))
    recs += [fp8, bf]
    _print(recs[-2:])
    _free()


# ----------------------------------------------------------------------------- DiT
def recorded_rows(out: torch.Tensor, idx: torch.Tensor):
    """Rows ``idx`` of a block output (fp32) and how many of ``idx`` it holds. The last block on
    the fast path returns only its leading noisy rows (the head reads nothing else), so indices
    drawn from the block's input length can lie past its output: keep those below its length
    (``idx`` is increasing) instead of indexing out of bounds (a device-side assert on CUDA)."""
    keep = int((idx < out.shape[1]).sum())
    return out.index_select(1, idx[:keep]).float(), keep


class BlockRecorder:
    """Bench-only wrapper around s2v_fast.fast.blocks.fast_block: keeps, per block, the
    residual stream and the block's update on a fixed subset of tokens (fp32)."""

    def __init__(self, n_tokens=512):
        self.n = n_tokens
        self.store = {}
        self.idx = None
        self._orig = None

    def __enter__(self):
        from s2v_fast.fast import blocks as fast_path

        self._orig = fast_path.fast_block
        rec = self

        def wrapped(block, x, e0, split, cache, index, *a, **kw):
            if rec.idx is None or rec.idx.device != x.device:
                L = x.shape[1]
                rec.idx = torch.linspace(0, L - 1, min(rec.n, L), device=x.device).long()
            x_in = x.index_select(1, rec.idx).float()  # before the call: blocks update x in place
            out = rec._orig(block, x, e0, split, cache, index, *a, **kw)  # (x, next block's start)
            xo, keep = recorded_rows(out[0], rec.idx)
            rec.store[index] = (xo, xo - x_in[:, :keep])
            return out

        fast_path.fast_block = wrapped
        return self

    def __exit__(self, *exc):
        from s2v_fast.fast import blocks as fast_path

        fast_path.fast_block = self._orig
        return False


def _per_block(rec_a, rec_b):
    out = []
    for i in sorted(rec_a):
        if i not in rec_b:
            continue
        (xa, da), (xb, db) = rec_a[i], rec_b[i]
        sa, sd = fg.accuracy(xb, xa), fg.accuracy(db, da)
        out.append(dict(block=i, x_cos=round(sa["cosine"], 6), x_rel_l2=round(sa["rel_l2"], 5),
                        update_cos=round(sd["cosine"], 6), update_rel_l2=round(sd["rel_l2"], 5)))
    return out


def _dit_inputs(cfg):
    from dit_common import build_random_dit, make_inputs

    d = cfg.dit
    model = build_random_dit(d["preset"], device=cfg.device)
    set_precision(model, "fast")
    inp = make_inputs(model, d["height"], d["width"], frames=d["frames"], batch=2)
    return model, inp


def bench_dit(cfg, recs):
    from s2v_fast.quantization import quantize_dit

    tag = cfg.dit["tag"]
    base = dict(preset=cfg.dit["preset"], batch=2, height=cfg.dit["height"], width=cfg.dit["width"])
    # the bf16 baseline names its self-attention backend (what "auto" picks on the H100; naming
    # it skips auto's first-call timing of every candidate); the other sites keep auto
    bf16_backend = cfg.bf16_backend

    def self_site(model, name):
        attn_registry.configure_attention(model, AttentionChoice("auto", (("self", name),)))

    try:
        t = time.time()
        model, inp = _dit_inputs(cfg)
        self_site(model, bf16_backend)
        build_s = time.time() - t
        cond = model.prepare_conditions(inp["context"], inp["ref_latents"], inp["motion_latents"],
                                        inp["cond_states"], inp["audio_input"],
                                        inp["drop_motion_frames"], num_frames=inp["x"].shape[2],
                                        batch_size=inp["x"].shape[0])
        x, tt = inp["x"], inp["t"]
        step = lambda: model.forward_step(x, tt, cond)  # noqa: E731
        tokens = cond.seq_len
        # --- bf16 (fast path, current attention backend)
        r = dict(base, name=f"dit14b_step_{tag}_fast", tokens=tokens, attention=bf16_backend,
                 build_s=build_s)
        try:
            r["median_ms"] = time_ms(step, cfg.warmup, cfg.dit_iters)["median_ms"]
            with BlockRecorder() as rec_bf:
                out_bf = step().float()
            r["peak_GB"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
        except Exception as e:
            r["error"] = _err(e)
            raise
        recs.append(r)
        _print(recs[-1:])
        fast_ms = r["median_ms"]

        def vs_bf16(r, timed=True, all_blocks=False):
            """Median step time and speed-up (timed), then one recorded call: its accuracy and
            per-block error against the bf16 step."""
            if timed:
                r["median_ms"] = time_ms(step, cfg.warmup, cfg.dit_iters)["median_ms"]
                r["speedup_vs_fast"] = fast_ms / r["median_ms"]
            t = time.time()
            with BlockRecorder() as rec:
                out = step().float()
                _sync()
            if not timed:  # the first call: tuning and compilation included
                r["first_call_s"] = time.time() - t
            r.update(fg.accuracy(out, out_bf))
            per_block = _per_block(rec_bf.store, rec.store)
            r["per_block"] = per_block if all_blocks else per_block[-1:]

        # --- bf16 linears + fp8 attention (accuracy of the attention half; one call)
        r = dict(base, name=f"dit14b_step_{tag}_fp8attn", tokens=tokens, attention="fp8")
        try:
            self_site(model, "fp8")
            vs_bf16(r, timed=False)
        except Exception as e:
            r["error"] = _err(e)
            traceback.print_exc()
        self_site(model, bf16_backend)
        recs.append(r)
        _print(recs[-1:])
        _free()
        # --- quantise in place (bf16 weights freed layer by layer)
        t = time.time()
        quantize_dit(model, "fp8", attention=False)
        _sync()
        qs = time.time() - t
        cond.cache.clear()  # the per-clip cache holds text/audio K/V made by the bf16 linears
        _free()
        # --- fp8 linears + bf16 attention (accuracy of the GEMM half; one call)
        r = dict(base, name=f"dit14b_step_{tag}_fp8linear", tokens=tokens, attention=bf16_backend,
                 quantize_s=qs)
        try:
            vs_bf16(r)
        except Exception as e:
            r["error"] = _err(e)
            traceback.print_exc()
        recs.append(r)
        _print(recs[-1:])
        _free()
        # --- full fp8
        r = dict(base, name=f"dit14b_step_{tag}_fp8", tokens=tokens, attention="fp8", quantize_s=qs,
                 attention_config=os.environ.get("S2V_FP8_ATTN_CONFIG"))
        try:
            self_site(model, "fp8")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            vs_bf16(r, all_blocks=True)
            r["peak_GB"] = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
            r["fallbacks"] = _fallbacks()
        except Exception as e:
            r["error"] = _err(e)
            traceback.print_exc()
        recs.append(r)
        _print(recs[-1:])
    except Exception as e:
        if not any(x.get("name", "").startswith("dit14b") for x in recs):
            recs.append(dict(base, name=f"dit14b_step_{tag}_fast", error=_err(e)))
        traceback.print_exc()
    finally:
        _free()


def _fallbacks() -> dict:
    """Kernel paths given up on this machine (empty = everything ran as designed)."""
    out = {f"attention_{k}": v for k, v in fa8.FALLBACKS.items()}
    if not fg._SCALED_MM_STATE["ok"]:
        out["scaled_mm"] = fg._SCALED_MM_STATE["error"]
    if not fg._SCALED_MM_STATE["bias"]:
        out["scaled_mm_bias"] = "bias added after the GEMM"
    if fg._QUANT_FAILED:
        out["row_quantiser"] = sorted(fg._QUANT_FAILED)
    return out


# ----------------------------------------------------------------------------- output
def _f(r, k, fmt):
    v = r.get(k)
    return format(v, fmt) if isinstance(v, (int, float)) else ""


def _print(recs, header=False):
    if header:
        print(f"{'name':40s} {'ms':>9s} {'TFLOP/s':>8s} {'kern ms':>8s} {'kern TF':>8s} {'quant ms':>8s} "
              f"{'cos':>8s} {'relL2%':>7s} {'vs emu%':>7s}")
    for r in recs:
        if "error" in r and "median_ms" not in r and "cosine" not in r:
            print(f"{r['name']:40s} ERROR {r['error'][:150]}")
            continue
        kms = r.get("kernel_ms", r.get("gemm_ms"))
        ktf = r.get("kernel_TFLOPs", r.get("gemm_TFLOPs"))
        rel = r.get("rel_l2")
        emu = r.get("vs_emulation_rel_l2")
        print(f"{r['name']:40s} {_f(r, 'median_ms', '9.2f'):>9s} {_f(r, 'TFLOPs', '8.1f'):>8s} "
              f"{format(kms, '8.2f') if kms is not None else '':>8s} {format(ktf, '8.1f') if ktf is not None else '':>8s} "
              f"{_f(r, 'quant_ms', '8.3f'):>8s} {_f(r, 'cosine', '8.5f'):>8s} "
              f"{format(100 * rel, '7.2f') if rel is not None else '':>7s} "
              f"{format(100 * emu, '7.3f') if emu is not None else '':>7s}"
              + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))


def _print_details(recs):
    for r in recs:
        if "accuracy_by_logit_std" in r:
            print(f"{r['name']}: accuracy by logit std: " + ", ".join(
                f"{k}: cos {v['cosine']:.5f} rel {100 * v['rel_l2']:.2f}%" for k, v in sorted(r["accuracy_by_logit_std"].items())))
        if "tune_log_ms" in r:
            print(f"{r['name']}: tuning (config index: ms) {r['tune_log_ms']}")
        if "per_block" in r and len(r["per_block"]) > 1:
            pb = r["per_block"]
            pick = [pb[i] for i in sorted({0, len(pb) // 4, len(pb) // 2, 3 * len(pb) // 4, len(pb) - 1})]
            print(f"{r['name']}: per block (x rel L2 % / update rel L2 %): " + ", ".join(
                f"b{p['block']} {100 * p['x_rel_l2']:.2f}/{100 * p['update_rel_l2']:.2f}" for p in pick))
        if r.get("speedup_vs_fast"):
            print(f"{r['name']}: speed-up vs bf16 fast step {r['speedup_vs_fast']:.3f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter plumbing check on tiny shapes")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-dit", action="store_true")
    ap.add_argument("--topic", default="fp8", help="results file topic (default fp8)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="attention token counts")
    ap.add_argument("--dit-size", default=None, help="HxW of the DiT step section (default 448x832)")
    ap.add_argument("--dit-iters", type=int, default=3, help="timed DiT steps per row (default 3)")
    ap.add_argument("--bf16-backend", default=None,
                    help="attention backend of the bf16 rows (default: cuda where it runs, else cudnn)")
    a = ap.parse_args(argv)
    cfg = Cfg()
    cfg.dit_iters = a.dit_iters
    cfg.bf16_backend = a.bf16_backend or (
        "cuda" if "cuda" in attn_registry.available_attention_backends() else "cudnn")
    if a.dit_size:
        h, w = (int(t) for t in a.dit_size.lower().split("x"))
        cfg.dit = dict(cfg.dit, height=h, width=w, tag=f"{h}x{w}")
    if a.smoke:
        cfg.device, cfg.H, cfg.D = "cpu", 2, 64
        cfg.attn_sizes = (96, 160)
        cfg.gemm_shapes = ((64, 64, 128), (64, 96, 64))
        cfg.warmup, cfg.iters, cfg.q_stride, cfg.gemm_acc_rows = 0, 1, 2, 64
        cfg.dit = dict(preset="tiny", height=64, width=64, frames=8, tag="64x64_smoke")
        cfg.bf16_backend = "sdpa"  # cuDNN needs a GPU
    elif not torch.cuda.is_available():
        print("needs a CUDA device (or --smoke)")
        return 2
    if a.sizes:
        cfg.attn_sizes = tuple(a.sizes)
    recs = []
    sections = [("attention", a.skip_attention, lambda: run_attention(cfg, recs)),
                ("gemm", a.skip_gemm, lambda: [bench_gemm(cfg, *s, recs) for s in cfg.gemm_shapes]),
                ("dit", a.skip_dit, lambda: bench_dit(cfg, recs))]
    for name, skip, fn in sections:
        if skip:
            continue
        if name == "dit" and _elapsed() > cfg.budget_s - 75 and not a.smoke:
            recs.append(dict(name=f"dit14b_step_{cfg.dit['tag']}_fast", error=f"skipped: {_elapsed():.0f} s used"))
            continue
        print(f"--- {name} ({_elapsed():.0f} s)")
        try:
            fn()
        except Exception as e:  # a section must never kill the others
            recs.append(dict(name=f"{name}_section", error=_err(e)))
            traceback.print_exc()
    print()
    _print_details(recs)
    if not a.smoke:

        print("wrote", write_results(a.topic, recs, extra=dict(wall_s=_elapsed(), heads=cfg.H, head_dim=cfg.D,
                                                               fallbacks=_fallbacks())))
    fb = _fallbacks()
    if fb:
        print("FALLBACKS (kernel paths not used here):", fb)
    print(f"\n=== FP8 summary ({_elapsed():.0f} s; ms/TFLOP/s include quantisation; accuracy vs fp32, "
          f"DiT rows vs the bf16 step) ===")
    _print(recs, header=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
