"""Offload benchmark (issue 9): one CFG denoising step of the 14B DiT under none / cpu-offload /
layerwise offload; median step time, peak GPU memory, slowdown vs no offload.

Setup: Wan2.2-S2V-14B config, random bf16 weights drawn on the GPU (bench/dit_common.py: built on
meta, materialised tensor by tensor), 448x832, 80 frames, motion present (F=20, latent 56x104,
batch 2 = cond + uncond). Step-invariant conditions are prepared once (as the pipeline does);
the timed call is ``model.forward_step`` (CUDA events, median after warm-up). The peak is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` with the mode set up, so it
includes the weights each mode keeps on the GPU.

* none: whole DiT on the GPU.
* cpu_offload: ``ModelOffloader`` (the DiT is a stage: onloaded once per clip); the step runs with
  the DiT on the GPU, and ``onload_ms`` (host->GPU of 32.6 GB) is reported separately plus the
  per-step cost amortised over ``--steps-per-clip``.
* layerwise: ``enable_layerwise_offload``: 40 blocks in pinned host memory, 2 GPU slots, prefetch
  of block i+1 on a side stream. Also reported: one block's H2D copy time (copy bandwidth) vs
  the per-block compute time of 'none', which shows how much room the overlap has.
  Target (issue 9): peak <= 24 GB and <= 1.15x the 'none' step time.

Every mode's velocity is compared with 'none' (``max_abs_diff_vs_none``; expected 0).
Results: JSON via bench/results_io.py, topic "offload", rows ``offload_<mode>_step_<H>x<W>``.

    python bench/bench_offload.py                      # the lead's H100 call (~3-5 min)
    python bench/bench_offload.py --modes none,layerwise,layerwise_noprefetch
    python bench/bench_offload.py --smoke              # tiny model, CPU plumbing check
Needs ~33 GB of free host RAM (page-locked) for the offload modes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dit_common import build_random_dit, make_inputs, token_count  # noqa: E402
from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.offload import ModelOffloader, enable_layerwise_offload  # noqa: E402
from s2v_fast.fast import set_precision  # noqa: E402

MODES = ("none", "cpu_offload", "layerwise", "layerwise_noprefetch")
GB = 1e9
GIB = 2 ** 30


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _mem(dev):
    if dev.type != "cuda":
        return {"peak_mem_gb": None, "peak_mem_gib": None, "allocated_before_gb": None}
    return {"peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / GB, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(dev) / GB, 3)}


def _elapsed_ms(fn, dev):
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    return (time.perf_counter() - t0) * 1e3, out


def _block_copy_ms(lw, dev, reps=5):
    """H2D time of one packed block (the prefetch unit) on its own, side stream like the hook."""
    if dev.type != "cuda":
        return None, None
    pb = lw._packed[1 % lw.num_blocks]
    dst = torch.empty(pb.nbytes, dtype=torch.uint8, device=dev)
    s = torch.cuda.Stream(dev)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            a.record(s)
            dst.copy_(pb.host, non_blocking=True)
            b.record(s)
        b.synchronize()
        times.append(a.elapsed_time(b))
    del dst
    ms = statistics.median(times)
    return ms, pb.nbytes / (ms * 1e-3) / GB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="none,cpu_offload,layerwise",
                    help=f"comma list of {MODES} ('none' first: it is the ratio baseline)")
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--steps-per-clip", type=int, default=40, help="for the amortised onload cost")
    ap.add_argument("--preset", default="wan2.2-s2v-14b")
    ap.add_argument("--precision", default="fast", choices=["fast", "reference"],
                    help="DiT precision mode (default fast, the CUDA default)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, small shape, CPU ok; no JSON")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--topic", default="offload", help="results file topic (default offload)")
    args = ap.parse_args(argv)
    modes = [m.strip().replace("-", "_") for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    if args.smoke:
        args.preset, args.height, args.width, args.frames = "tiny", 64, 64, 8
        args.warmup, args.iters = 1, 2

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if dev.type != "cuda" and not args.smoke:
        ap.error("needs a CUDA device (use --smoke for a CPU plumbing check)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    H, W, frames = args.height, args.width, args.frames
    tag = f"{H}x{W}"

    t0 = time.perf_counter()
    model = build_random_dit(args.preset, device=dev, dtype=dtype)
    set_precision(model, args.precision)
    _sync(dev)
    build_s = time.perf_counter() - t0
    nb = len(model.blocks)
    block_params_gb = sum(p.numel() * p.element_size() for p in model.blocks.parameters()) / GB
    total_params_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    print(f"[offload] {args.preset} {dtype} on {dev}: {total_params_gb:.2f} GB weights "
          f"({block_params_gb:.2f} GB in {nb} blocks), built in {build_s:.1f} s", flush=True)

    inp = make_inputs(model, H, W, frames=frames, batch=2, motion=True)
    x, t = inp.pop("x"), inp.pop("t")
    cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=x.shape[0], **inp)
    tokens = cond.seq_len
    if not args.smoke and tokens != token_count(H, W, frames, motion=True):
        print(f"[offload] note: {tokens} tokens, dit_common.token_count says "
              f"{token_count(H, W, frames, motion=True)}", flush=True)

    def step():
        return model.forward_step(x, t, cond)

    rows, outs = [], {}
    base_ms = None

    def add_row(mode, timing, extra, out):
        nonlocal base_ms
        if mode == "none":
            base_ms = timing["median_ms"]
            outs["none"] = out
        row = {"name": f"offload_{mode}_step_{tag}", "mode": mode, "tokens": tokens,
               "height": H, "width": W, "frames": frames, "batch": 2, "dtype": str(dtype),
               **timing, **_mem(dev),
               "ratio_to_none": (round(timing["median_ms"] / base_ms, 4) if base_ms else None),
               "max_abs_diff_vs_none": (float((out - outs["none"]).abs().max()) if "none" in outs
                                        else None),
               **extra}
        rows.append(row)
        print(f"[offload] {row['name']}: median {row['median_ms']:.1f} ms, peak "
              f"{row['peak_mem_gb']} GB, x{row['ratio_to_none']} vs none, "
              f"diff {row['max_abs_diff_vs_none']} | "
              + ", ".join(f"{k}={v}" for k, v in extra.items()), flush=True)

    ordered = [m for m in MODES if m in modes]  # none first, cpu_offload last (leaves host copy)
    ordered = [m for m in ordered if m != "cpu_offload"] + (["cpu_offload"] if "cpu_offload" in modes else [])
    for mode in ordered:
        if mode == "none":
            _reset_peak(dev)
            timing = time_ms(step, args.warmup, args.iters)
            add_row(mode, timing, {"per_block_ms": round(timing["median_ms"] / nb, 3)}, step())
        elif mode.startswith("layerwise"):
            setup_ms, lw = _elapsed_ms(lambda: enable_layerwise_offload(
                model, dev, prefetch=(mode == "layerwise")), dev)
            copy_ms, gbps = _block_copy_ms(lw, dev)
            _reset_peak(dev)
            timing = time_ms(step, args.warmup, args.iters)
            out = step()
            extra = {"setup_s": round(setup_ms / 1e3, 2), "block_gb": round(lw.block_bytes / GB, 4),
                     "block_copy_ms": copy_ms and round(copy_ms, 2),
                     "h2d_gbps": gbps and round(gbps, 1),
                     "per_block_ms": round(timing["median_ms"] / nb, 3),
                     "loads": lw.stats["loads"], "misses": lw.stats["misses"],
                     "pinned": lw._packed[0].pinned}
            add_row(mode, timing, extra, out)
            lw.disable()  # blocks back on the GPU for the next mode
            _sync(dev)
        elif mode == "cpu_offload":
            off = ModelOffloader(dev)
            reg_ms, _ = _elapsed_ms(lambda: off.register("dit", model), dev)
            _reset_peak(dev)
            onload_ms, _ = _elapsed_ms(lambda: off.onload("dit"), dev)
            with off.use("dit"):
                timing = time_ms(step, args.warmup, args.iters)
                out = step()
            offload_ms, _ = _elapsed_ms(lambda: off.offload("dit"), dev)
            spc = args.steps_per_clip
            amort = timing["median_ms"] + onload_ms / spc
            extra = {"register_s": round(reg_ms / 1e3, 2), "onload_ms": round(onload_ms, 1),
                     "onload_gbps": round(total_params_gb / (onload_ms * 1e-3), 1) if onload_ms else None,
                     "offload_ms": round(offload_ms, 1), "steps_per_clip": spc,
                     "pinned": off._components["dit"].pack.pinned,
                     "amortised_step_ms": round(amort, 1),
                     "amortised_ratio_to_none": round(amort / base_ms, 4) if base_ms else None}
            add_row(mode, timing, extra, out)
            off.unregister("dit", device=dev)

    if dev.type == "cuda" and (H, W) == (448, 832):  # the target is stated at 448x832
        lw_row = next((r for r in rows if r["mode"] == "layerwise"), None)
        if lw_row and lw_row["ratio_to_none"] is not None:
            ok = lw_row["peak_mem_gb"] <= 24 and lw_row["ratio_to_none"] <= 1.15
            print(f"[offload] issue-9 target (layerwise peak <= 24 GB, <= 1.15x none): "
                  f"{'MET' if ok else 'NOT MET'}", flush=True)
    if not args.smoke and not args.no_write:
        path = write_results(args.topic, rows, extra={"preset": args.preset, "warmup": args.warmup,
                                                       "iters": args.iters, "build_s": round(build_s, 1),
                                                       "weights_gb": round(total_params_gb, 3),
                                                       "block_weights_gb": round(block_params_gb, 3)})
        print(f"[offload] wrote {path}")
    return rows


if __name__ == "__main__":
    main()
