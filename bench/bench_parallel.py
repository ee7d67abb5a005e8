"""Multi-GPU benchmark: one CFG denoising step of the 14B DiT per parallel mode (torchrun).

    torchrun --nproc-per-node 8 bench/bench_parallel.py                      # auto modes, 480p+720p
    torchrun --nproc-per-node 8 bench/bench_parallel.py --modes ulysses8,ring8,tp8 --sizes 448x832
    torchrun --nproc-per-node 2 bench/bench_parallel.py --smoke             # tiny model plumbing

Random bf16 weights (bench/dit_common.py, the same seed on every rank, so every mode computes
the same function). One step = both CFG branches + the guidance combine: the 1-GPU baseline is the
pipeline's default batch-2 call on rank 0 (other ranks wait); CFG-parallel modes run one branch
per cfg rank. Per (mode, size): median step time over ranks' max, speedup vs 1 GPU, peak memory
(max over ranks), and the max-abs-relative error of the guided velocity against the 1-GPU output
(bf16: expect ~1e-2; this is the GPU check of the ring LSE merge and of TP numerics).

Mode names: ``cfg2`` / ``ulysses<u>`` / ``ring<r>`` / ``tp<t>`` joined by ``_``, optional ``_even``
(shard policy). JSON rows ``parallel_<mode>_<n>gpu_step_<size>`` (+ ``parallel_1gpu_step_<size>``
and, with ``--vae``, ``parallel_vae<n>_<n>gpu_decode_<size>``) in $S2V_BENCH_OUT (default
bench/results), file ``parallel-<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dit_common import build_random_dit, make_inputs, token_count  # noqa: E402
from results_io import write_results  # noqa: E402

from s2v_fast.parallel import (ParallelCFGDenoiser, ParallelConfig, VAEPatchParallel,  # noqa: E402
                               build_state, init_distributed, parallelize)
from s2v_fast.fast import set_precision  # noqa: E402

GUIDANCE = 4.5


def parse_mode(mode: str) -> ParallelConfig:
    kw = dict(ulysses_degree=1, ring_degree=1, tensor_parallel_size=1, cfg_parallel_size=1,
              shard_policy="frame")
    keys = {"ulysses": "ulysses_degree", "ring": "ring_degree", "tp": "tensor_parallel_size",
            "cfg": "cfg_parallel_size"}
    for tok in mode.split("_"):
        if tok == "even":
            kw["shard_policy"] = "even"
            continue
        m = re.fullmatch(r"(ulysses|ring|tp|cfg)(\d+)", tok)
        if not m:
            raise SystemExit(f"bad mode token {tok!r} in {mode!r}")
        kw[keys[m.group(1)]] = int(m.group(2))
    return ParallelConfig(**kw)


def auto_modes(n: int, heads: int = 40) -> list:
    modes = []
    if heads % n == 0:
        modes += [f"ulysses{n}", f"ulysses{n}_even"]
    modes.append(f"ring{n}")
    if n >= 4 and heads % (n // 2) == 0:
        modes.append(f"ulysses{n // 2}_ring2")
    if heads % n == 0 and 13824 % n == 0:
        modes.append(f"tp{n}")
    if n == 2:
        modes.append("cfg2")
    elif heads % (n // 2) == 0:
        modes.append(f"cfg2_ulysses{n // 2}")
    if n >= 8:
        modes.append(f"cfg2_tp2_ulysses{n // 4}")
    return modes


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, warmup: int, iters: int, group=None) -> dict:
    """Per-iteration wall time (barrier-aligned start, max over ranks), ms."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if group is not False and dist.is_initialized():
            dist.barrier(group=group)
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        dt = torch.tensor([(time.perf_counter() - t0) * 1e3], device=_dev())
        if group is not False and dist.is_initialized():
            dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        times.append(dt.item())
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": iters}


def _dev():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _peak_gb(group=None) -> float:
    if not torch.cuda.is_available():
        return 0.0
    t = torch.tensor([torch.cuda.max_memory_allocated() / 2 ** 30], device=_dev())
    if group is not False and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return round(t.item(), 2)


def _reset_peak():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def _guided(v):
    v = v.float()
    return v[1:] + GUIDANCE * (v[:1] - v[1:])


def make_step(model_or_pdit, state, inp, cfg_parallel: bool):
    """-> step() returning the guided velocity [1, 16, F, h, w] fp32."""
    if cfg_parallel:
        den = ParallelCFGDenoiser(model_or_pdit, state, inp["x"].dtype, GUIDANCE,
                                  context=inp["context"][0], context_null=inp["context"][1],
                                  ref_latents=inp["ref_latents"],
                                  motion_latents=inp["motion_latents"], cond=inp["cond_states"],
                                  audio_input=inp["audio_input"][:1],
                                  drop_motion=inp["drop_motion_frames"])
        x1, t1 = inp["x"][:1], inp["t"][:1]
        return lambda: den(x1, t1)[0]
    cond = model_or_pdit.prepare_conditions(
        inp["context"], inp["ref_latents"], inp["motion_latents"], inp["cond_states"],
        inp["audio_input"], inp["drop_motion_frames"], num_frames=inp["x"].shape[2],
        batch_size=2)
    x2 = inp["x"][:1].expand(2, -1, -1, -1, -1)  # both branches denoise the same latent
    t2 = inp["t"][:1].expand(2)
    return lambda: _guided(model_or_pdit.forward_step(x2, t2, cond))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="auto", help="comma list (see docstring) or 'auto'")
    ap.add_argument("--sizes", default="448x832,704x1280")
    ap.add_argument("--frames", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the 1-GPU run (no speedup)")
    ap.add_argument("--clip0", action="store_true", help="motion dropped (clip 0 token count)")
    ap.add_argument("--precision", default=None, help="model.precision (reference|fast)")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--vae", action="store_true", help="also time VAE patch-parallel decode")
    ap.add_argument("--smoke", action="store_true", help="tiny DiT, tiny sizes (CPU/gloo ok)")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        ap.error("compares parallel layouts: launch with torchrun --nproc-per-node N (N >= 2), "
                 "e.g. torchrun --nproc-per-node 2 bench/bench_parallel.py --smoke")
    init_distributed(ParallelConfig(ulysses_degree=world) if world > 1 else ParallelConfig(),
                     timeout_s=3600)
    rank = dist.get_rank() if dist.is_initialized() else 0
    dev = _dev()
    preset = "tiny" if args.smoke else "wan2.2-s2v-14b"
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    sizes = [tuple(int(v) for v in s.split("x")) for s in
             (["64x64"] if args.smoke else args.sizes.split(","))]
    frames = 8 if args.smoke else args.frames
    heads = 2 if args.smoke else 40
    modes = auto_modes(world, heads) if args.modes == "auto" else args.modes.split(",")
    from s2v_fast.attention_sites import AttentionChoice

    choice = AttentionChoice("auto", (("self", args.attention_backend),) if args.attention_backend else ())

    def build():
        m = build_random_dit(preset, device=dev, dtype=dtype, seed=0, attention=choice)
        if args.precision:
            set_precision(m, args.precision)
        return m

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    rows, base = [], {}
    tag = lambda h, w: f"{h}x{w}"  # noqa: E731
    # ---------------------------------------------------------------- 1-GPU baseline (rank 0)
    if not args.no_baseline:
        if rank == 0:
            model = build()
            for h, w in sizes:
                inp = make_inputs(model, h, w, frames=frames, batch=2, motion=not args.clip0)
                _reset_peak()
                step = make_step(model, None, inp, False)
                t = timed(step, args.warmup, args.iters, group=False)
                base[(h, w)] = (t["median_ms"], step().cpu())
                rows.append(dict(name=f"parallel_1gpu_step_{tag(h, w)}", gpus=1, mode="1gpu",
                                 tokens=token_count(h, w, frames, not args.clip0),
                                 peak_mem_gb=_peak_gb(group=False), **t))
                log(f"1gpu {tag(h, w)}: {t['median_ms']:.1f} ms")
            del model, inp, step
            _reset_peak()
        if dist.is_initialized():
            dist.barrier()

    # ---------------------------------------------------------------- parallel modes
    for mode in modes:
        pc = parse_mode(mode)
        if pc.dit_world_size != world:
            log(f"skip {mode}: needs {pc.dit_world_size} ranks")
            continue
        st = build_state(pc)
        model = build()
        pdit = parallelize(model, st)
        for h, w in sizes:
            inp = make_inputs(model, h, w, frames=frames, batch=2, motion=not args.clip0)
            _reset_peak()
            step = make_step(pdit, st, inp, pc.cfg_parallel_size == 2)
            t = timed(step, args.warmup, args.iters)
            v = step()
            row = dict(name=f"parallel_{mode}_{world}gpu_step_{tag(h, w)}", gpus=world, mode=mode,
                       config=pc.describe(), tokens=token_count(h, w, frames, not args.clip0),
                       peak_mem_gb=_peak_gb(), **t)
            if (h, w) in base:
                row["baseline_ms"] = base[(h, w)][0]
                row["speedup_vs_1gpu"] = round(base[(h, w)][0] / t["median_ms"], 3)
                row["rel_err_vs_1gpu"] = _rel(v, base[(h, w)][1])
            rows.append(row)
            log(f"{mode} {tag(h, w)}: {t['median_ms']:.1f} ms  speedup "
                f"{row.get('speedup_vs_1gpu')}  peak {row['peak_mem_gb']} GB  "
                f"err {row.get('rel_err_vs_1gpu')}")
            del inp, step, v
        del model, pdit
        _reset_peak()

    # ---------------------------------------------------------------- VAE patch parallel
    if args.vae and world > 1:
        from s2v_fast.models.vae import WanVAE

        vae = (WanVAE.tiny(dim=4) if args.smoke else WanVAE()).to(dev).eval().requires_grad_(False)
        st = build_state(ParallelConfig(ulysses_degree=world, vae_patch_parallel_size=world))
        for h, w in sizes:
            z = torch.randn(1, 16, 1 + 77 // 4 if not args.smoke else 3, h // 8, w // 8,
                            device=dev, generator=torch.Generator(device=dev).manual_seed(3))
            vae.enable_tiling()
            single = timed(lambda: vae.decode(z), 1, 2, group=False) if rank == 0 else None
            pv = VAEPatchParallel(vae, st.vae_group)
            t = timed(lambda: pv.decode(z), 1, 2)
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                rows.append(dict(name=f"parallel_vae{world}_{world}gpu_decode_{tag(h, w)}",
                                 gpus=world, mode=f"vae{world}", baseline_ms=single["median_ms"],
                                 speedup_vs_1gpu=round(single["median_ms"] / t["median_ms"], 3),
                                 tiles=len(vae.decode_tile_boxes(h // 8, w // 8)), **t))
                log(f"vae{world} {tag(h, w)}: {t['median_ms']:.1f} ms vs tiled 1gpu "
                    f"{single['median_ms']:.1f} ms")

    if rank == 0:
        path = write_results("parallel", rows, extra={"world_size": world, "smoke": args.smoke})
        print(f"wrote {path}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
