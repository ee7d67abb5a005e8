"""The ``auto`` attention choice: per shape class, the fastest registered backend that agrees with
cuDNN, timed on the first real inputs of that class (so ``auto`` is never slower than cuDNN SDPA).

Apart from the dispatcher (``attention.py``) because a backend uses it too: ``fp8`` hands calls
with few keys to the bf16 ``auto`` choice. It reads the registry and imports no backend.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._utils import outputs_agree, shape_bucket
from .registry import attention_backend_fn

# Candidates `auto` times on CUDA, cuDNN first (the reference every other output is checked against).
AUTO_CANDIDATES = ("cudnn", "cuda", "triton", "flash_attn", "sdpa_flash")
# Shapes below this many score entries (Lq * Lk per head) are cheap: auto uses plain SDPA.
AUTO_MIN_SCORES = 1 << 22

_auto_choice: Dict[Tuple, str] = {}


def _auto_key(q, k) -> Tuple:
    return (q.device.index, q.dtype, q.shape[0], q.shape[2], q.shape[3], shape_bucket(q.shape[1]),
            shape_bucket(k.shape[1]))


def _time_backend(fn, q, k, v, iters: int = 3) -> float:
    fn(q, k, v)  # warm-up (compiles / tunes)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(q, k, v)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def resolve_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The backend ``auto`` uses for these inputs (times the candidates on first sight)."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if q.shape[1] * k.shape[1] < AUTO_MIN_SCORES or torch.cuda.is_current_stream_capturing():
        return _auto_choice.get(_auto_key(q, k), "sdpa")
    key = _auto_key(q, k)
    choice = _auto_choice.get(key)
    if choice is not None:
        return choice
    timings, ref = {}, None
    for name in AUTO_CANDIDATES:
        fn = attention_backend_fn(name)
        if fn is None:
            continue
        try:
            out = fn(q, k, v)
            if ref is None:
                ref = out
            elif not outputs_agree(out, ref):
                continue
            timings[name] = _time_backend(fn, q, k, v)
        except Exception:  # not supported for this shape / GPU
            continue
    choice = min(timings, key=timings.get) if timings else "sdpa"
    _auto_choice[key] = choice
    return choice


def auto_choices() -> Dict[Tuple, str]:
    """What ``auto`` picked so far, per shape class (for logs and benchmarks)."""
    return dict(_auto_choice)
