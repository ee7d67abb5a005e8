"""The single attention entry point of the DiT (the dispatcher), and the table of its backends.

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

This module imports the backends and registers them (``registry.py``; other modules may add
backends with ``register_attention_backend(name, fn)``); the backends import the registry, the
SDPA functions (``sdpa.py``) and the ``auto`` resolver (``auto.py``), never this module.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..options import ATTENTION_BACKENDS, env_options
from .auto import AUTO_CANDIDATES, AUTO_MIN_SCORES, auto_choices, resolve_auto  # noqa: F401 (API)
from .registry import (  # noqa: F401 (API: register_attention_backend, _BACKENDS for benchmarks)
    _BACKENDS,
    AttentionFn,
    attention_backend_fn,
    register_attention_backend,
    registered_attention_backends,
)
from .sdpa import cudnn_attention, sdpa_attention, sdpa_flash_attention

try:  # opt-in, never picked by `auto`; absent on a torch without float8 dtypes
    from .fp8_attention import fp8_attention_backend
except Exception:  # pragma: no cover
    fp8_attention_backend = None

ENV_VAR = "S2V_ATTENTION_BACKEND"  # its default (s2v_fast.options); benchmarks name it


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


register_attention_backend("sdpa", sdpa_attention)
register_attention_backend("cudnn", cudnn_attention)
register_attention_backend("sdpa_flash", sdpa_flash_attention)
register_attention_backend("triton", triton_backend)
_fa = _flash_attn_fn()
if _fa is not None:
    register_attention_backend("flash_attn", _fa)
del _fa
if _cuda_backend_listed():
    register_attention_backend("cuda", cuda_backend)
if fp8_attention_backend is not None:
    register_attention_backend("fp8", fp8_attention_backend)

BACKEND_CHOICES = ATTENTION_BACKENDS

_current = env_options().attention_backend


def available_attention_backends() -> list:
    return ["auto"] + registered_attention_backends()


def check_attention_backend(name: str) -> str:
    """Return ``name`` if usable here, else raise ValueError with a one-line fix."""
    if name == "cuda":
        from .cuda_attention import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            raise ValueError(reason)
    if name == "auto" or attention_backend_fn(name) is not None:
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense softmax attention, q [B,Lq,H,D], k/v [B,Lk,H,D] -> [B,Lq,H,D]."""
    name = _current
    if name == "auto":
        name = resolve_auto(q, k, v)
    fn = attention_backend_fn(name)
    if fn is None:  # e.g. a bad S2V_ATTENTION_BACKEND value
        check_attention_backend(name)
    return fn(q, k, v)
