"""The single attention entry point of the DiT, and its backends.

``attention(q, k, v)``: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype.
Dense, unmasked, non-causal softmax attention with scale 1/sqrt(D) (spec §4.10, §10.6). Every
S2V attention (self, text cross, audio per-frame cross) has this contract.

Backends (``--attention-backend`` / env ``S2V_ATTENTION_BACKEND``):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, PyTorch picks the kernel.
* ``cudnn``: SDPA restricted to cuDNN attention (the official code's fastest path on H100).
* ``sdpa_flash``: SDPA restricted to its built-in FlashAttention-2.
* ``triton``: our Triton flash-attention forward (``flash_attention.py``).
* ``cuda``: our CUDA C++ flash-attention forward for Hopper (``csrc/flash_attention_sm90.cu`` via
  ``cuda_attention.py``; bf16, head dim 128, sm_90; built with nvcc on first use). Listed when CUDA
  and nvcc are present.
* ``fp8``: our FP8 attention (``fp8_attention.py``; opt-in, changes numerics: per-token Q/K e4m3
  scales, K mean-centred): the CUDA kernel ``csrc/fp8_attention_sm90.cu`` on Hopper with nvcc,
  else the Triton kernel; self-attention only (short key sequences take the bf16 ``auto`` choice).
* ``flash_attn``: the ``flash_attn`` package (FlashAttention-3 ``flash_attn_interface`` when
  importable, else FlashAttention-2); only listed when installed.
* ``auto`` (default): on CUDA, the first call of each shape class times every available
  candidate (cuDNN always among them) on the real inputs and keeps the fastest whose output
  agrees with cuDNN; so ``auto`` is never slower than cuDNN SDPA. On CPU it is ``sdpa``.

Other modules may add backends with ``register_attention_backend(name, fn)``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..options import ATTENTION_BACKENDS, env_options
from ._utils import outputs_agree, shape_bucket

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENV_VAR = "S2V_ATTENTION_BACKEND"  # its default (s2v_fast.options); benchmarks name it


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention over [B, L, H, D] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_only(backend_name: str) -> AttentionFn:
    def run(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return sdpa_attention(q, k, v)

    run.__name__ = f"sdpa_{backend_name.lower()}"
    return run


def triton_backend(q, k, v):
    from .flash_attention import triton_attention

    return triton_attention(q, k, v)


def cuda_backend(q, k, v):
    from . import cuda_attention

    reason = cuda_attention.unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return cuda_attention.cuda_attention(q, k, v)


def _cuda_backend_listed() -> bool:
    from . import cuda_attention

    return (torch.cuda.is_available() and cuda_attention.source_path().is_file()
            and cuda_attention.find_nvcc() is not None)


def _flash_attn_fn() -> Optional[AttentionFn]:
    """FlashAttention-3 (hopper build) or -2 from the flash_attn package, when importable."""
    try:  # FA3 ships as `flash_attn_interface`
        from flash_attn_interface import flash_attn_func as fa3

        def run3(q, k, v):
            out = fa3(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return run3
    except Exception:
        pass
    try:
        from flash_attn import flash_attn_func as fa2

        return lambda q, k, v: fa2(q, k, v)
    except Exception:
        return None


_BACKENDS: Dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "cudnn": _sdpa_only("CUDNN_ATTENTION"),
    "sdpa_flash": _sdpa_only("FLASH_ATTENTION"),
    "triton": triton_backend,
}
_fa = _flash_attn_fn()
if _fa is not None:
    _BACKENDS["flash_attn"] = _fa
del _fa
if _cuda_backend_listed():
    _BACKENDS["cuda"] = cuda_backend

# Candidates `auto` times on CUDA, cuDNN first (the reference every other output is checked against).
AUTO_CANDIDATES = ("cudnn", "cuda", "triton", "flash_attn", "sdpa_flash")
# Shapes below this many score entries (Lq * Lk per head) are cheap: auto uses plain SDPA.
AUTO_MIN_SCORES = 1 << 22
BACKEND_CHOICES = ATTENTION_BACKENDS

_current = env_options().attention_backend
_auto_choice: Dict[Tuple, str] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Add (or replace) a backend with the ``attention`` contract."""
    _BACKENDS[name] = fn


def available_attention_backends() -> list:
    return ["auto"] + sorted(_BACKENDS)


def check_attention_backend(name: str) -> str:
    """Return ``name`` if usable here, else raise ValueError with a one-line fix."""
    if name == "cuda":
        from .cuda_attention import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            raise ValueError(reason)
    if name == "auto" or name in _BACKENDS:
        return name
    if name == "flash_attn":
        raise ValueError("attention backend 'flash_attn' needs the flash-attn package "
                         "(pip install flash-attn); or use --attention-backend auto")
    raise ValueError(f"unknown attention backend {name!r}; choose one of "
                     f"{', '.join(available_attention_backends())}")


def set_attention_backend(name: str) -> None:
    global _current
    _current = check_attention_backend(name)


def get_attention_backend() -> str:
    return _current


@contextlib.contextmanager
def attention_backend(name: str):
    """Temporarily use backend ``name`` (``with attention_backend("triton"): ...``)."""
    global _current
    prev, _current = _current, check_attention_backend(name)
    try:
        yield
    finally:
        _current = prev


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
        fn = _BACKENDS.get(name)
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense softmax attention, q [B,Lq,H,D], k/v [B,Lk,H,D] -> [B,Lq,H,D]."""
    name = _current
    if name == "auto":
        name = resolve_auto(q, k, v)
    fn = _BACKENDS.get(name)
    if fn is None:  # e.g. a bad S2V_ATTENTION_BACKEND value
        check_attention_backend(name)
    return fn(q, k, v)
