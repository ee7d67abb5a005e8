"""CUDA C++ attention kernels for Hopper: bf16 (``csrc/flash_attention_sm90.cu``, backend ``cuda``)
and FP8 (``csrc/fp8_attention_sm90.cu``, used by the ``fp8`` backend when it can run).

Same contract and numerics as ``flash_attention.triton_attention`` (q [B, Lq, H, D], k/v
[B, Lk, H, D] -> [B, Lq, H, D]; fp32 scores and softmax, P rounded to bf16 before P.V), for bf16
with head dim 128 on sm_90 (H100/H200). The kernel uses what Triton 3.6 does not give: a TMA
producer warpgroup and two consumer warpgroups whose softmax overlaps their asynchronous wgmma.

The FP8 kernel computes ``fp8_attention``'s numbers (its torch emulation is the reference) from
``fp8_quant.quantize_qkv(..., k_perm32=True)``.

The sources are compiled with ``nvcc`` (``$CUDA_HOME/bin``, ``PATH`` or ``/usr/local/cuda/bin``) on
first use into ``$S2V_FAST_CACHE/kernels`` (default ``~/.cache/s2v_fast/kernels``), keyed by a hash
of the source, the flags and the nvcc version, and loaded with ctypes (no torch extension build). Inputs the kernel
does not cover (other dtypes or head dims, TMA-unaligned strides) go to cuDNN SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from ..options import env_options
from .sdpa import cudnn_attention, sdpa_scaled

# Where the kernel sources are found (csrc_dir): the package's own s2v_fast/csrc/ (a wheel or
# ``pip install .``: setup.py installs the checkout's top-level csrc/ there), else the checkout's
# csrc/ next to the package (editable install, PYTHONPATH); $S2V_CSRC_DIR overrides both.
_PACKAGE = Path(__file__).resolve().parents[1]
CSRC_CANDIDATES = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")
# kernel -> (source file, exported function, ctypes argument types)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_LL = ctypes.POINTER(ctypes.c_longlong)
KERNELS = {
    "bf16": ("flash_attention_sm90.cu", "s2v_flash_attention_sm90",
             [_P] * 4 + [_I] * 4 + [_LL, _F, _P]),
    "fp8": ("fp8_attention_sm90.cu", "s2v_fp8_attention_sm90", [_P] * 7 + [_I] * 6 + [_LL, _P]),
}
NVCC_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-use_fast_math",
              "-shared", "-Xcompiler", "-fPIC")
HEAD_DIM = 128
_ERRORS = {1: "bad arguments (sizes or strides not multiples of 8 elements)",
           2: "the driver has no cuTensorMapEncodeTiled", 3: "tensor-map encoding failed",
           4: "kernel launch failed"}

_libs: dict = {}
_failed: dict = {}  # kernel -> why its build or load failed (not retried)
_lock = threading.Lock()


def _has_sources(d: Path) -> bool:
    return all((d / src).is_file() for src, _, _ in KERNELS.values())


# the first candidate holding every kernel's .cu; the package's own s2v_fast/csrc when none does
# (so that the error message names where a wheel puts them)
CSRC = next((d for d in CSRC_CANDIDATES if _has_sources(d)), CSRC_CANDIDATES[0])


def csrc_dir() -> Path:
    """The directory the kernel sources are compiled from: ``$S2V_CSRC_DIR`` when set, else
    ``CSRC`` (the installed package's ``s2v_fast/csrc``, else the checkout's ``csrc/``)."""
    return Path(env_options().csrc_dir or CSRC)


def source_path(kernel: str = "bf16") -> Path:
    return csrc_dir() / KERNELS[kernel][0]


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME, $PATH or /usr/local/cuda, or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def unavailable_reason() -> Optional[str]:
    """Why the ``cuda`` backend cannot run here (one line naming the fix), or None."""
    if not torch.cuda.is_available():
        return "attention backend 'cuda' needs a CUDA GPU; use --attention-backend auto"
    if torch.cuda.get_device_capability()[0] != 9:
        return ("attention backend 'cuda' is built for Hopper (sm_90: H100/H200) only; "
                "use --attention-backend auto")
    missing = [p.name for p in map(source_path, KERNELS) if not p.is_file()]
    if missing:
        env = env_options().csrc_dir
        where = f"S2V_CSRC_DIR={env}" if env else " or ".join(map(str, CSRC_CANDIDATES))
        return (f"attention backend 'cuda' needs its CUDA sources, but {where} has no "
                f"{', '.join(missing)}: reinstall s2v_fast (its wheel ships them in "
                "s2v_fast/csrc/) or set S2V_CSRC_DIR to a directory holding them (a checkout's "
                "csrc/); or use --attention-backend auto")
    if find_nvcc() is None:
        return ("attention backend 'cuda' needs nvcc (the CUDA toolkit) to build "
                f"{source_path()}: install it or set CUDA_HOME; or use --attention-backend auto")
    return None


def _cache_dir() -> Path:
    """$S2V_FAST_CACHE/kernels (as the tiny model's cache: else $XDG_CACHE_HOME or ~/.cache)."""
    root = env_options().cache_dir or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s2v_fast"
    return Path(root) / "kernels"


def build(kernel: str = "bf16", defines: tuple = ()) -> Path:
    """Compile ``kernel``'s library once per source (with the shared header), flags and nvcc
    version, and return its path. ``defines``: extra nvcc flags such as
    ``("-DS2V_LAZY_RESCALE=0",)``, the compile-time variants ``bench/sweep_cuda_attention.py``
    times; part of the cache key."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError(unavailable_reason() or "nvcc not found")
    src = source_path(kernel)
    header = src.parent / "sm90_common.cuh"
    src_bytes = src.read_bytes() + (header.read_bytes() if header.is_file() else b"")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    flags = [*NVCC_FLAGS, *defines]
    key = hashlib.sha256(src_bytes + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"{src.stem}-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [nvcc, *flags, str(src), "-o", tmp]
    print(f"s2v_fast: building {src.name} with nvcc (first use; cached in {lib.parent})",
          file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"nvcc failed to build {src.name}: {res.stderr.strip()[-2000:]}")
    os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written library
    return lib


def _load(kernel: str, defines: tuple = ()):
    key = (kernel, *defines)
    with _lock:
        if key in _failed:
            raise RuntimeError(_failed[key])
        if key not in _libs:
            _, symbol, argtypes = KERNELS[kernel]
            try:
                fn = getattr(ctypes.CDLL(str(build(kernel, defines=defines))), symbol)
            except (OSError, RuntimeError, AttributeError) as e:
                _failed[key] = str(e)
                raise RuntimeError(str(e)) from e
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            _libs[key] = fn
    return _libs[key]


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"{what}: {_ERRORS.get(err, f'error {err}')}")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             check_pointers: bool = True) -> bool:
    """Inputs both kernels cover: CUDA bf16, head dim 128, last dim contiguous, 16-byte aligned.
    ``check_pointers=False``: all but the base pointers' alignment, which a trace (torch.compile,
    fake tensors) does not know; the ops check it when they run."""
    if q.dim() != 4 or not q.is_cuda or q.shape[-1] != HEAD_DIM:
        return False
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, D) or v.shape != k.shape:
        return False
    for t in (q, k, v):
        if t.dtype != torch.bfloat16 or t.device != q.device or t.stride(-1) != 1:
            return False
        if any(s % 8 for s in t.stride()[:3]):
            return False
    return not check_pointers or _aligned(q, k, v)


def _aligned(*tensors: torch.Tensor) -> bool:
    return not any(t.data_ptr() % 16 for t in tensors)


def cuda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   softmax_scale: Optional[float] = None, *, defines: tuple = ()) -> torch.Tensor:
    """q [B, Lq, H, 128], k/v [B, Lk, H, 128] bf16 on an sm_90 GPU -> [B, Lq, H, 128] bf16.

    Other inputs are computed by cuDNN SDPA (same contract). ``defines``: a compile-time variant
    of the kernel (:func:`build`; benchmarks and tests). The kernel runs as the custom op
    ``torch.ops.s2v_fast.flash_attention_sm90``."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if not supports(q, k, v, check_pointers=not torch.compiler.is_compiling()) \
            or B * H * Lq == 0 or Lk == 0:
        return _cudnn_fallback(q, k, v, softmax_scale)
    return flash_attention_sm90(q, k, v, softmax_scale, "\n".join(defines))


def _cudnn_fallback(q, k, v, softmax_scale: Optional[float]) -> torch.Tensor:
    if softmax_scale is None:
        return cudnn_attention(q, k, v)
    return sdpa_scaled(q, k, v, float(softmax_scale))


# The launchers as torch.library custom ops, so that torch.compile and CUDA graphs see one opaque
# call with a known output (the fake implementations) instead of a ctypes call they cannot trace.
# Each launches its kernel on the current stream with the same arguments as a direct call.


@torch.library.custom_op("s2v_fast::flash_attention_sm90", mutates_args=(), device_types="cuda")
def flash_attention_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         softmax_scale: Optional[float], defines: str) -> torch.Tensor:
    """The bf16 kernel (``csrc/flash_attention_sm90.cu``) on inputs :func:`supports` covers, but
    for the base pointers: misaligned ones (known only here, when traced) take cuDNN, contiguous
    like the kernel's output. ``softmax_scale`` None = 1/sqrt(D); ``defines``: nvcc flags, one a
    line ("" for the default build)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if not _aligned(q, k, v):
        return _cudnn_fallback(q, k, v, softmax_scale).contiguous()
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    fn = _load("bf16", tuple(defines.split("\n")) if defines else ())
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    strides = (ctypes.c_longlong * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        err = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Lq, Lk, H, strides,
                 scale, ctypes.c_void_p(stream))
    _check(err, "cuda flash attention")
    return out


@flash_attention_sm90.register_fake
def _(q, k, v, softmax_scale, defines):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.shape == k.shape,
                 lambda: "flash_attention_sm90: q [B, Lq, H, D], k and v [B, Lk, H, D]")
    return q.new_empty(q.shape)


def cuda_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       softmax_scale: Optional[float] = None, *,
                       quantized: Optional[dict] = None, k_scale: Optional[str] = None) -> torch.Tensor:
    """FP8 attention (``fp8_attention``'s numerics, P.V in fp8) with the CUDA kernel: q [B, Lq, H,
    128], k/v [B, Lk, H, 128] bf16 on an sm_90 GPU -> bf16. ``k_scale``: "channel" or "token"
    (default ``fp8_quant.default_k_scale()``): the kernel runs without or with per-key
    scales. ``quantized``: the output of ``quantize_qkv(..., "fp8", k_perm32=True)``
    (benchmarks timing the kernel alone; its own k_scale then applies). The kernel runs as the
    custom op ``torch.ops.s2v_fast.fp8_attention_sm90``."""
    from .fp8_quant import quantize_qkv  # here: fp8_quant needs torch's float8 dtypes

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if not supports(q, k, v, check_pointers=not torch.compiler.is_compiling()):
        raise ValueError("cuda fp8 attention needs CUDA bf16 q/k/v with head dim 128")
    qz = quantized if quantized is not None else quantize_qkv(
        q, k, v, scale, "fp8", use_kernels=True, k_perm32=True, k_scale=k_scale)
    if qz.get("Lkp", 0) % 32:
        raise ValueError("cuda fp8 attention needs quantize_qkv(..., k_perm32=True)")
    return fp8_attention_sm90(qz["q8"], qz["qs"], qz["k8"], qz["ks"], qz["vt"], qz["vs"],
                              B, H, Lk, qz["Lkp"], qz["Lp"])


@torch.library.custom_op("s2v_fast::fp8_attention_sm90", mutates_args=(), device_types="cuda")
def fp8_attention_sm90(q8: torch.Tensor, qs: torch.Tensor, k8: torch.Tensor,
                       ks: Optional[torch.Tensor], vt: torch.Tensor, vs: torch.Tensor,
                       B: int, H: int, Lk: int, Lkp: int, Lp: int) -> torch.Tensor:
    """The fp8 kernel (``csrc/fp8_attention_sm90.cu``) on ``quantize_qkv(..., k_perm32=True)``'s
    tensors (q8 [B*H, Lq, D], k8 [B*H, Lkp, D], vt [B*H, D, Lp]; ``ks`` None with per-channel K
    scales) -> [B, Lq, H, D] bf16."""
    Lq, D = q8.shape[1], q8.shape[2]
    fn = _load("fp8")
    out = torch.empty((B, Lq, H, D), dtype=torch.bfloat16, device=q8.device)
    strides = (ctypes.c_longlong * 3)(*out.stride()[:3])
    with torch.cuda.device(q8.device):
        stream = torch.cuda.current_stream(q8.device).cuda_stream
        ks_ptr = ks.data_ptr() if ks is not None else None
        err = fn(q8.data_ptr(), qs.data_ptr(), k8.data_ptr(), ks_ptr, vt.data_ptr(),
                 vs.data_ptr(), out.data_ptr(), B, H, Lq, Lk, Lkp, Lp, strides,
                 ctypes.c_void_p(stream))
    _check(err, "cuda fp8 attention")
    return out


@fp8_attention_sm90.register_fake
def _(q8, qs, k8, ks, vt, vs, B, H, Lk, Lkp, Lp):
    torch._check(q8.dim() == 3 and q8.shape[0] == B * H,
                 lambda: "fp8_attention_sm90: q8 [B*H, Lq, D]")
    return q8.new_empty((B, q8.shape[1], H, q8.shape[2]), dtype=torch.bfloat16)
