"""Profile one 14B DiT denoising step (CFG batch 2, fast path) with the built-in profiler.

Random bf16 weights (bench/dit_common.py), 448x832, 80 frames, motion present. One warm-up step
runs outside the profiler; the profiled step writes ``trace_rank0.json.gz`` and ``ops_rank0.xlsx``
(sheets summary / stages / kernels, with charts) into ``--profile-dir`` and prints the ``kernels``
sheet (GPU time by category) and the top kernels by GPU time.

    python bench/profile_dit.py --profile-dir prof_dit
    python bench/profile_dit.py --profile-dir prof_dit --precision reference
    python bench/profile_dit.py --profile-dir prof_fp8 --quantization fp8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dit_common import build_random_dit, make_inputs  # noqa: E402

from s2v_fast.attention_sites import AttentionChoice  # noqa: E402
from s2v_fast.profiling import ProfileOptions, ProfilerSession  # noqa: E402
from s2v_fast.profiling.flops import dit_forward_flops, s2v_token_counts  # noqa: E402
from s2v_fast.fast import set_precision  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-dir", required=True)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--precision", default="fast", choices=["fast", "reference"])
    ap.add_argument("--attention-backend", default=os.environ.get("S2V_ATTENTION_BACKEND", "auto"),
                    help="the self-attention site's backend (the other sites keep auto)")
    ap.add_argument("--preset", default="wan2.2-s2v-14b")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8"],
                    help="fp8: FP8 linears, and FP8 self-attention unless --attention-backend is named")
    ap.add_argument("--with-stack", action="store_true",
                    help="record Python call stacks (as --profile-with-stack); the trace's size "
                         "and a strict json.load of it are printed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    model = build_random_dit(args.preset, device="cuda",  # the self site; the others keep auto
                             attention=AttentionChoice("auto", (("self", args.attention_backend),)))
    set_precision(model, args.precision)
    if args.quantization != "none":
        from s2v_fast.quantization import quantize_dit

        fp8_attn = args.attention_backend == "auto"
        quantize_dit(model, args.quantization, attention="fp8" if fp8_attn else False)
    H, W = args.height, args.width
    inp = make_inputs(model, H, W, batch=2)
    x, t = inp.pop("x"), inp.pop("t")
    cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=2, **inp)
    model.forward_step(x, t, cond)  # warm-up: Triton compiles, attention auto-selection
    torch.cuda.synchronize()

    tc = s2v_token_counts(H, W)
    flops = 2 * dit_forward_flops(model.config, tokens=tc["total"], video_tokens=tc["video"]).total
    opts = ProfileOptions(profile_dir=args.profile_dir, with_flops=True, with_stack=args.with_stack)
    with ProfilerSession(opts, output_path=os.path.join(args.profile_dir, "step")) as prof:
        with prof.stage_timer.stage("denoise"):
            model.forward_step(x, t, cond)
        prof.stage_timer.add_flops("denoise", flops)
    for p in prof.paths:
        print("wrote", p)
    import gzip
    import json

    for p in prof.paths:
        if p.endswith(".json.gz"):
            with gzip.open(p, "rb") as f:
                raw = f.read()
            events = len(json.loads(raw.decode("utf-8"))["traceEvents"])  # strict UTF-8 JSON
            print(f"trace {p}: {os.path.getsize(p) / 1e6:.1f} MB gz, {len(raw) / 1e6:.1f} MB JSON, "
                  f"{events} events, valid UTF-8 JSON")

    import pandas as pd

    xlsx = next(p for p in prof.paths if p.endswith(".xlsx"))
    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 70)
    kernels = pd.read_excel(xlsx, sheet_name="kernels")
    print("\nkernels sheet (GPU time by category):")
    print(kernels[[c for c in ("category", "time_ms", "count", "pct_of_time", "top_kernel")
                   if c in kernels.columns]].to_string(index=False))
    from collections import defaultdict

    from s2v_fast.profiling.export import device_kernel_records

    per = defaultdict(lambda: [0.0, 0])
    for name, us in device_kernel_records(prof.prof):
        per[name][0] += us
        per[name][1] += 1
    total = sum(v[0] for v in per.values())
    print(f"\ntop GPU kernels (of {total / 1e3:.1f} ms GPU time):")
    for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"  {us / 1e3:9.1f} ms {100 * us / total:5.1f}%  x{n:<5d} {name[:100]}")


if __name__ == "__main__":
    main()
