"""The 14B DiT on one GPU: one forward, and one denoising step with CFG, reference vs fast.

Setup: Wan2.2-S2V-14B config with random bf16 weights drawn on the GPU (bench/dit_common.py),
80 frames, motion present. Modes (one model, one run, so the numbers compare):

* ``forward``: one DiT call, one branch (batch 1), ``model(...)`` in ``reference`` precision
  (the faithful module path; conditions computed inside the call): issue 2's figure.
* ``reference``: one step with CFG (batch 2) the way the official code runs it: ``model(...)``
  in ``reference`` precision, recomputing every step-invariant input at every call.
* ``fast``: the default path: conditions prepared once per clip (``prepare_conditions``, reported
  as ``prepare_ms``), then ``forward_step`` in ``fast`` precision (Triton kernels, caches).
* ``fast_nofold``: ``fast`` without folding the few-key cross-attentions (audio, short prompt)
  into their output projections (``S2V_FOLD_OUTPUT=0``; fast/folded_output.py). It runs
  before ``fast``, so ``fast`` meets the warmer board.
* ``fast_sep_gelu``: ``fast`` with the FFN GELU as its own kernel instead of the GEMM epilogue.
* ``compile``: ``torch.compile`` of each block (reference math) with the prepared conditions;
  the alternative to the hand-fused path (issue 5 asks which is faster).

Timing: CUDA events, median after warm-up; fresh random inputs (never zeros). FLOPs are the
analytic counts of ``s2v_fast.profiling.flops``; the floor is GEMM FLOPs at 790 TFLOP/s plus
attention FLOPs at 627 TFLOP/s (measured H100 ceilings, ../shared/spec/performance.md). Each
step row also reports the relative L2 error and cosine of its velocity against ``reference``.

    python bench/bench_dit.py                                   # 448x832: forward, reference, fast
    python bench/bench_dit.py --sizes 704x1280 --modes reference,fast
    python bench/bench_dit.py --modes fast,compile
    python bench/bench_dit.py --smoke                           # tiny config, CPU plumbing check
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_common import build_random_dit, make_inputs  # noqa: E402
from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.attention_sites import AttentionChoice  # noqa: E402
from s2v_fast.kernels import attention as attn  # noqa: E402
from s2v_fast.profiling.flops import dit_forward_flops, s2v_token_counts  # noqa: E402
from s2v_fast.fast import set_precision  # noqa: E402

GEMM_TFLOPS, ATTN_TFLOPS = 790.0, 627.0  # measured H100 bf16 ceilings (performance.md)
MODES = ("forward", "reference", "fast_nofold", "fast", "fast_sep_gelu", "compile")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = out.double().flatten(), ref.double().flatten()
    return {"rel_l2_vs_reference": float((a - b).norm() / b.norm()),
            "cosine_vs_reference": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}


def floor_ms(flops) -> float:
    return (flops.gemm / (GEMM_TFLOPS * 1e12) + (flops.total - flops.gemm) / (ATTN_TFLOPS * 1e12)) * 1e3


def compile_blocks(model) -> None:
    """torch.compile every block's forward (reference math); one graph shared by all 40 blocks."""
    for blk in model.blocks:
        blk.forward = torch.compile(blk.forward, dynamic=False)


def bench_size(model, H: int, W: int, frames: int, modes, args, dev) -> list:
    rows, outs = [], {}
    tc = s2v_token_counts(H, W, frames)
    flops1 = dit_forward_flops(model.config, tokens=tc["total"], video_tokens=tc["video"])
    tag = f"{H}x{W}"
    prefix = "dit14b" if args.preset == "wan2.2-s2v-14b" else f"dit_{args.preset}"
    peak = lambda: round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None  # noqa: E731

    def row(name, timing, batch, **extra):
        fl = flops1 * batch
        r = dict(name=name, tokens=tc["total"], video_tokens=tc["video"], height=H, width=W,
                 frames=frames, batch=batch, shape=f"B={batch} L={tc['total']} C={model.config.dim} "
                 f"layers={model.config.num_layers}", **timing,
                 tflops=round(fl.total / (timing["median_ms"] * 1e-3) / 1e12, 1),
                 floor_ms=round(floor_ms(fl), 1),
                 ratio_to_floor=round(timing["median_ms"] / floor_ms(fl), 3),
                 peak_mem_gb=peak(), attention_backend=args.attention_backend, **extra)
        rows.append(r)
        print(f"[dit] {name}: {r['median_ms']:.1f} ms ({r['tflops']} TFLOP/s, x{r['ratio_to_floor']} floor, "
              f"peak {r['peak_mem_gb']} GB) " + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        return r

    inp2 = make_inputs(model, H, W, frames=frames, batch=2, motion=True, seed=H + W)

    if "forward" in modes:
        set_precision(model, "reference")
        inp1 = {k: (v[:1] if isinstance(v, torch.Tensor) and k != "t" else v) for k, v in inp2.items()}
        inp1["t"], inp1["context"] = inp2["t"][:1], inp2["context"][:1]
        torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
        t = time_ms(lambda: model(**inp1), args.warmup, args.iters)
        row(f"{prefix}_forward_{tag}_bf16", t, 1, precision="reference", motion=True)

    if any(m in modes for m in MODES[1:]):
        set_precision(model, "reference")
        torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
        outs["reference"] = model(**inp2)
        if "reference" in modes:
            t = time_ms(lambda: model(**inp2), args.warmup, args.iters)
            row(f"{prefix}_step_{tag}_reference", t, 2, precision="reference", cfg="batch 2")

    x, tt = inp2["x"], inp2["t"]
    cond_kw = {k: v for k, v in inp2.items() if k not in ("x", "t")}

    if "fast_nofold" in modes:
        from s2v_fast.fast import folded_output

        set_precision(model, "fast")
        folded_output.FOLD_OUTPUT = False
        try:
            cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **cond_kw)
            out = model.forward_step(x, tt, cond)
            t = time_ms(lambda: model.forward_step(x, tt, cond), args.warmup, args.iters)
            row(f"{prefix}_step_{tag}_fast_nofold", t, 2, precision="fast", fold_output=False,
                **compare(out, outs["reference"]))
        finally:
            folded_output.FOLD_OUTPUT = True
        del cond

    if "fast" in modes:
        set_precision(model, "fast")
        torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
        prep = time_ms(lambda: model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **cond_kw),
                       1, 3)
        cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **cond_kw)
        out = model.forward_step(x, tt, cond)
        t = time_ms(lambda: model.forward_step(x, tt, cond), args.warmup, args.iters)
        r = row(f"{prefix}_step_{tag}_fast", t, 2, precision="fast", cfg="batch 2",
                prepare_ms=round(prep["median_ms"], 1), **compare(out, outs["reference"]),
                auto_choices=str({f"Lq{k[5]}/Lk{k[6]}": v for k, v in attn.auto_choices().items()}))
        if "reference" in modes:
            ref_ms = next(q["median_ms"] for q in rows if q["name"].endswith("_reference"))
            r["speedup_vs_reference"] = round(ref_ms / r["median_ms"], 3)
        if "fast_nofold" in modes:
            nofold_ms = next(q["median_ms"] for q in rows if q["name"].endswith("_fast_nofold"))
            r["speedup_vs_fast_nofold"] = round(nofold_ms / r["median_ms"], 4)
        del cond

    if "fast_sep_gelu" in modes:
        from s2v_fast.fast import blocks as fast_path

        set_precision(model, "fast")
        fast_path.GELU_EPILOGUE = False
        try:
            cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **cond_kw)
            out = model.forward_step(x, tt, cond)
            t = time_ms(lambda: model.forward_step(x, tt, cond), args.warmup, args.iters)
            row(f"{prefix}_step_{tag}_fast_sep_gelu", t, 2, precision="fast", gelu="separate kernel",
                **compare(out, outs["reference"]))
        finally:
            fast_path.GELU_EPILOGUE = True
        del cond

    if "compile" in modes:
        set_precision(model, "reference")
        saved = [blk.forward for blk in model.blocks]
        try:
            compile_blocks(model)
            cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **cond_kw)
            torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
            t0 = time.perf_counter()
            out = model.forward_step(x, tt, cond)
            _sync(dev)
            compile_s = time.perf_counter() - t0
            t = time_ms(lambda: model.forward_step(x, tt, cond), args.warmup, args.iters)
            row(f"{prefix}_step_{tag}_compile", t, 2, precision="reference+torch.compile(blocks)",
                first_call_s=round(compile_s, 1), **compare(out, outs["reference"]))
        except Exception as e:  # record, do not lose the other rows
            rows.append(dict(name=f"{prefix}_step_{tag}_compile", error=f"{type(e).__name__}: {e}"[:400]))
            print(f"[dit] compile failed: {e}", flush=True)
        finally:
            for blk, f in zip(model.blocks, saved):
                blk.forward = f
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="448x832", help="comma list of HxW (default 448x832)")
    ap.add_argument("--modes", default="forward,reference,fast", help=f"comma list of {MODES}")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--preset", default="wan2.2-s2v-14b")
    ap.add_argument("--attention-backend", default=os.environ.get(attn.ENV_VAR, "auto"),
                    help="the self-attention site's backend (the text and audio sites keep auto)")
    ap.add_argument("--topic", default="dit", help="results file topic (default dit)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, no JSON")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    attn.check_attention_backend(args.attention_backend)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.smoke:
        args.preset, args.sizes, args.frames, args.warmup, args.iters = "tiny", "64x64", 8, 1, 1
    elif dev.type != "cuda":
        ap.error("needs a CUDA device (use --smoke for a CPU plumbing check)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_random_dit(args.preset, device=dev, dtype=dtype,
                             attention=AttentionChoice("auto", (("self", args.attention_backend),)))
    _sync(dev)
    print(f"[dit] built {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, "
          f"{dtype}) in {time.perf_counter() - t0:.1f} s; attention backend {args.attention_backend}",
          flush=True)
    rows = []
    for size in args.sizes.split(","):
        H, W = (int(v) for v in size.lower().split("x"))
        rows += bench_size(model, H, W, args.frames, modes, args, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not args.smoke:
        print("[dit] wrote", write_results(args.topic, rows))
    return rows


if __name__ == "__main__":
    main()
