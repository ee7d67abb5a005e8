"""Named ranges for the torch profiler and NVTX (Nsight Systems).

One helper for all model / pipeline code::

    from s2v_fast.profiling import trace_range, traced

    with trace_range("stage:denoise"):
        ...

    @traced("dit.block")
    def forward(...): ...

A range is emitted as ``torch.profiler.record_function(name)`` while a torch profiler is
active, and as an NVTX push/pop while NVTX is on (env ``S2V_NVTX=1``, or switched on by
:class:`~s2v_fast.profiling.session.ProfilerSession`). With neither, ``trace_range`` returns a
shared no-op context manager: one function call, two flag reads, no allocation.

Naming convention (so traces and Nsight timelines read like the pipeline):

* ``stage:<name>`` pipeline stages (``text_encode``, ``audio_features``, ``reference_encode``,
  ``denoise``, ``vae_decode``, ``motion_encode``, ``video_write``), emitted by
  :class:`~s2v_fast.profiling.stage_timer.StageTimer`;
* ``clip<i>``, ``step<j>``, ``cfg:cond`` / ``cfg:uncond``, ``block<k>``, ``attention``,
  ``cross_attention``, ``audio_injection``, ``ffn`` inside the DiT.

Names used with ``trace_range`` are remembered (:func:`range_names`) so op tables can tell user
ranges from real ops.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.autograd.profiler as _autograd_profiler

from ..options import env_options

__all__ = [
    "trace_range",
    "traced",
    "nvtx_enabled",
    "set_nvtx_enabled",
    "profiler_active",
    "range_names",
    "STAGE_PREFIX",
]

STAGE_PREFIX = "stage:"

_nvtx_state = {"on": env_options().nvtx}
_names: set[str] = set()
_names_lock = threading.Lock()
_MAX_NAMES = 100_000

# NVTX backends, resolved lazily once.
_nvtx_push = None
_nvtx_pop = None


def _resolve_nvtx():
    global _nvtx_push, _nvtx_pop
    if _nvtx_push is not None:
        return
    if torch.cuda.is_available():
        from torch.cuda import nvtx as _tn

        _nvtx_push, _nvtx_pop = _tn.range_push, _tn.range_pop
        return
    try:
        import nvtx as _nv  # the `nvtx` PyPI package; works without CUDA (no-op without a collector)

        _nvtx_push = lambda name: _nv.push_range(name, domain="s2v_fast")  # noqa: E731
        _nvtx_pop = lambda: _nv.pop_range(domain="s2v_fast")  # noqa: E731
    except Exception:  # pragma: no cover - nvtx missing
        _nvtx_push = lambda name: None  # noqa: E731
        _nvtx_pop = lambda: None  # noqa: E731


def nvtx_enabled() -> bool:
    return _nvtx_state["on"]


def set_nvtx_enabled(enabled: bool) -> None:
    """Switch NVTX ranges on or off for the whole process (env ``S2V_NVTX=1`` sets the default)."""
    _nvtx_state["on"] = bool(enabled)
    if enabled:
        _resolve_nvtx()


def profiler_active() -> bool:
    """True while a torch profiler (``torch.profiler.profile`` or autograd profiler) records."""
    return _autograd_profiler._is_profiler_enabled


def range_names() -> frozenset:
    """Every name passed to :func:`trace_range` so far in this process."""
    with _names_lock:
        return frozenset(_names)


def _remember(name: str) -> None:
    if name not in _names and len(_names) < _MAX_NAMES:
        with _names_lock:
            _names.add(name)


class _NullRange:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _NullRange()


class _Range:
    __slots__ = ("name", "_rf", "_nvtx")

    def __init__(self, name: str, use_profiler: bool, use_nvtx: bool):
        self.name = name
        self._rf = torch.profiler.record_function(name) if use_profiler else None
        self._nvtx = use_nvtx

    def __enter__(self):
        if self._nvtx:
            _nvtx_push(self.name)
        if self._rf is not None:
            self._rf.__enter__()
        return self

    def __exit__(self, *exc):
        if self._rf is not None:
            self._rf.__exit__(*exc)
        if self._nvtx:
            _nvtx_pop()
        return False


def trace_range(name: str):
    """Context manager: a named range in the torch profiler trace and in NVTX.

    Near-zero cost when no profiler is active and NVTX is off (returns a shared no-op object).
    """
    use_prof = _autograd_profiler._is_profiler_enabled
    use_nvtx = _nvtx_state["on"]
    if not (use_prof or use_nvtx):
        return _NULL
    _remember(name)
    if use_nvtx and _nvtx_push is None:
        _resolve_nvtx()
    return _Range(name, use_prof, use_nvtx)


def traced(name=None):
    """Decorator form of :func:`trace_range`; ``@traced`` or ``@traced("name")``.

    Without a name the function's ``__qualname__`` is used.
    """

    def wrap(fn, range_name):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not (_autograd_profiler._is_profiler_enabled or _nvtx_state["on"]):
                return fn(*args, **kwargs)
            with trace_range(range_name):
                return fn(*args, **kwargs)

        return inner

    if callable(name):  # used bare: @traced
        return wrap(name, name.__qualname__)
    return lambda fn: wrap(fn, name or fn.__qualname__)
