"""The attention dispatcher of the DiT, the table of its backends, and the per-site configuration.

``attention(q, k, v, backend="auto")``: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in
q's dtype. Dense, unmasked, non-causal softmax attention with scale 1/sqrt(D) (spec §4.10,
§10.6). Every S2V attention (self, text cross, audio per-frame cross, block-causal) has this
contract. There is no process-wide backend: :func:`configure_attention` fills a model's
per-site slots (``s2v_fast/attention_sites.py``) from an ``AttentionChoice``.

Backends (``--attention-backend`` for every site, ``--attention-site SITE=NAME`` for one; the
default comes from env ``S2V_ATTENTION_BACKEND``):

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, PyTorch picks the kernel.
* ``cudnn``: SDPA restricted to cuDNN attention (the official code's fastest path on H100).
* ``sdpa_flash``: SDPA restricted to its built-in FlashAttention-2.
* ``triton``: our Triton flash-attention forward (``flash_attention.py``).
* ``cuda``: our CUDA C++ flash-attention forward for Hopper (``csrc/flash_attention_sm90.cu`` via
  ``cuda_attention.py``; bf16, head dim 128, sm_90; built with nvcc on first use). Listed when CUDA
  and nvcc are present.
* ``fp8``: our FP8 attention (``fp8_attention.py``; opt-in, changes numerics: per-token Q/K e4m3
  scales, K mean-centred): the CUDA kernel ``csrc/fp8_attention_sm90.cu`` on Hopper with nvcc,
  else the Triton kernel; it serves the long-key sites (self, causal) only: as the default backend
  the text and audio sites take ``auto``, and calls with few keys take the bf16 ``auto`` choice.
* ``flash_attn``: the ``flash_attn`` package (FlashAttention-3 ``flash_attn_interface`` when
  importable, else FlashAttention-2); only listed when installed.
* ``auto`` (default): on CUDA, the first call of each shape class times every available
  candidate (cuDNN always among them) on the real inputs and keeps the fastest whose output
  agrees with cuDNN; so ``auto`` is never slower than cuDNN SDPA. On CPU it is ``sdpa``.

This module imports the backends and registers them with their declared capabilities
(``registry.py``; other modules may add backends with ``register_attention_backend(name, fn)``); the backends import the registry, the
SDPA functions (``sdpa.py``) and the ``auto`` resolver (``auto.py``), never this module.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from ..attention_sites import SITES, AttentionChoice
from ..options import ATTENTION_BACKENDS
from .auto import AUTO_CANDIDATES, AUTO_MIN_SCORES, auto_choices, resolve_auto  # noqa: F401 (API)
from .registry import (  # noqa: F401 (API: register_attention_backend, _BACKENDS for benchmarks)
    _BACKENDS,
    AttentionFn,
    attention_backend_fn,
    backend_info,
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


def _triton_bias(q, k, v, key_bias):
    from .flash_attention import triton_attention

    return triton_attention(q, k, v, key_bias=key_bias)


register_attention_backend("sdpa", sdpa_attention)
register_attention_backend("cudnn", cudnn_attention)
register_attention_backend("sdpa_flash", sdpa_flash_attention)
register_attention_backend("triton", triton_backend, bias_fn=_triton_bias)
_fa = _flash_attn_fn()
if _fa is not None:
    register_attention_backend("flash_attn", _fa)
del _fa
if _cuda_backend_listed():
    register_attention_backend("cuda", cuda_backend)
if fp8_attention_backend is not None:  # its calls below FP8_MIN_KEYS take `auto`: long-key sites
    register_attention_backend("fp8", fp8_attention_backend, sites=("self", "causal"), fp8=True)

BACKEND_CHOICES = ATTENTION_BACKENDS


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense softmax attention, q [B,Lq,H,D], k/v [B,Lk,H,D] -> [B,Lq,H,D], with ``backend``
    (``auto``: the fastest that agrees with cuDNN for this shape class, see ``auto.py``)."""
    name = resolve_auto(q, k, v) if backend == "auto" else backend
    fn = attention_backend_fn(name)
    if fn is None:
        check_attention_backend(name)
    return fn(q, k, v)


def _auto_fn(q, k, v):
    return attention_backend_fn(resolve_auto(q, k, v))(q, k, v)


def backend_fn(name: str) -> AttentionFn:
    """The function a site configured with backend ``name`` calls."""
    return _auto_fn if name == "auto" else attention_backend_fn(check_attention_backend(name))


def effective_backends(choice: AttentionChoice) -> Dict[str, str]:
    """site -> backend for ``choice``; ValueError (one line) for an unusable or unknown backend
    or a site override the backend does not serve. A default backend that declares it does not
    serve a site leaves that site to ``auto``."""
    out = {}
    for site in SITES:
        explicit = choice.explicit(site)
        name = check_attention_backend(explicit or choice.default)
        info = backend_info(name)
        if info is not None and not info.serves(site):
            if explicit:
                raise ValueError(f"attention backend {name!r} does not serve the {site} site "
                                 f"(it serves {', '.join(sorted(info.sites))}); pick another "
                                 f"backend for --attention-site {site}=...")
            name = "auto"
        out[site] = name
    return out


def configure_attention(target, choice=None) -> Dict[str, str]:
    """Fill every attention slot of ``target`` (anything with ``attention_slots()``: the DiT, its
    streaming mode's ``causal`` slot included) from ``choice`` (an :class:`AttentionChoice` or a backend name for all sites);
    returns the effective site -> backend map. ValueError as :func:`effective_backends`."""
    if choice is None or isinstance(choice, str):
        choice = AttentionChoice(choice or "auto")
    eff = effective_backends(choice)
    for slot in target.attention_slots():
        slot.set(eff[slot.site], backend_fn(eff[slot.site]))
    return eff


def configured_backends(target) -> Dict[str, str]:
    """site -> the backend its slots use now (``"mixed"`` if slots of one site differ)."""
    out: Dict[str, str] = {}
    for slot in target.attention_slots():
        prev = out.setdefault(slot.site, slot.backend)
        if prev != slot.backend:
            out[slot.site] = "mixed"
    return out


@contextlib.contextmanager
def attention_config(target, choice=None):
    """``configure_attention(target, choice)`` for a ``with`` block; the slots get their previous
    backends back on exit (benchmarks and tests that compare backends on one model)."""
    saved = [(slot, slot.backend, slot.fn) for slot in target.attention_slots()]
    try:
        yield configure_attention(target, choice)
    finally:
        for slot, backend, fn in saved:
            slot.set(backend, fn)
