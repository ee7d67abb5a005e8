"""Write GPU benchmark results in the project's JSON form (see bench/README.md).

One file per run: ``<topic>-<device>-<YYYYMMDD>.json`` with device name, torch/triton/cuda
versions, date, git commit, the exact command, and a list of result rows (medians in ms).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys

import torch


def device_tag() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "4090"):
        if tag in name:
            return tag
    return name.split()[-1]


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or None
    except Exception:  # pragma: no cover
        commit = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": _dt.date.today().isoformat(),
        # S2V_GIT_COMMIT first: the device machine's copy of the tree may carry a stale .git
        "git_commit": os.environ.get("S2V_GIT_COMMIT") or commit,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_results(topic: str, results: list[dict], out_dir: str | None = None, extra: dict | None = None) -> str:
    out_dir = out_dir or os.environ.get("S2V_BENCH_OUT", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    stamp = env["date"].replace("-", "")
    path = os.path.join(out_dir, f"{topic}-{device_tag()}-{stamp}.json")
    payload = dict(env)
    if extra:
        payload.update(extra)
    payload["results"] = results
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def time_ms(fn, warmup: int = 2, iters: int = 5) -> dict:
    """Median/min/max of ``fn()`` in ms: CUDA events on a GPU (after warm-up, synchronised), the
    host clock on a CPU (``--smoke`` plumbing runs)."""
    import time

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "runs": iters}
