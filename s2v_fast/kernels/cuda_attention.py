"""CUDA C++ flash-attention forward for Hopper (``csrc/flash_attention_sm90.cu``), backend ``cuda``.

Same contract and numerics as ``flash_attention.triton_attention`` (q [B, Lq, H, D], k/v
[B, Lk, H, D] -> [B, Lq, H, D]; fp32 scores and softmax, P rounded to bf16 before P.V), for bf16
with head dim 128 on sm_90 (H100/H200). The kernel uses what Triton 3.6 does not give: a TMA
producer warpgroup and two consumer warpgroups whose softmax overlaps their asynchronous wgmma.

The source is compiled with ``nvcc`` (``$CUDA_HOME/bin``, ``PATH`` or ``/usr/local/cuda/bin``) on
first use into ``$S2V_CACHE_DIR`` (default ``~/.cache/s2v_fast``), keyed by a hash of the source,
the flags and the nvcc version, and loaded with ctypes (no torch extension build). Inputs the kernel
does not cover (other dtypes or head dims, TMA-unaligned strides) go to cuDNN SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "flash_attention_sm90.cu"
NVCC_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-use_fast_math",
              "-shared", "-Xcompiler", "-fPIC")
HEAD_DIM = 128
# Compile-time variants (-D flags): keys per tile, and FA3 ping-pong between the two consumer
# warpgroups. Entry 0 is what the backend runs; the others are kept for the per-config benchmark
# (bench/bench_attention_configs.py) and the GPU tests.
# H100 (results/attention_configs_cuda-*): 176 keys without ping-pong 659 / 649 TFLOP/s at 32,760 /
# 79,200 tokens; with ping-pong 655 / 640; 128 keys 579-588 / 634-639 (cuDNN 585 / 565).
CUDA_CONFIGS = [
    dict(BLOCK_N=176, PINGPONG=0),
    dict(BLOCK_N=176, PINGPONG=1),
    dict(BLOCK_N=128, PINGPONG=0),
    dict(BLOCK_N=128, PINGPONG=1),
]
_ERRORS = {1: "bad arguments (sizes or strides not multiples of 8 elements)",
           2: "the driver has no cuTensorMapEncodeTiled", 3: "tensor-map encoding failed",
           4: "kernel launch failed"}

_libs: dict = {}
_lock = threading.Lock()


def source_path() -> Path:
    return Path(os.environ.get("S2V_CSRC_DIR", SOURCE.parent)) / SOURCE.name


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
    if not source_path().is_file():
        return (f"attention backend 'cuda' needs {source_path()} (a source checkout of s2v_fast, "
                "or S2V_CSRC_DIR pointing at its csrc/); use --attention-backend auto")
    if find_nvcc() is None:
        return ("attention backend 'cuda' needs nvcc (the CUDA toolkit) to build "
                "csrc/flash_attention_sm90.cu: install it or set CUDA_HOME; or use "
                "--attention-backend auto")
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("S2V_CACHE_DIR", Path.home() / ".cache" / "s2v_fast"))


def _defines(config: dict) -> list:
    return [f"-DS2V_FA_{name}={int(value)}" for name, value in sorted(config.items())]


def build(config: Optional[dict] = None, verbose: bool = False) -> Path:
    """Compile the kernel library for ``config`` (default CUDA_CONFIGS[0]) once per source, flags
    and nvcc version, and return its path."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError(unavailable_reason() or "nvcc not found")
    flags = [*NVCC_FLAGS, *_defines(config or CUDA_CONFIGS[0])]
    src = source_path().read_bytes()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"flash_attention_sm90-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [nvcc, *flags, str(source_path()), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"nvcc failed to build {source_path().name}: {res.stderr.strip()[-2000:]}")
    if verbose:
        print(res.stderr)
    os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written library
    return lib


def _load(config: dict):
    key = tuple(sorted(config.items()))
    with _lock:
        if key not in _libs:
            fn = ctypes.CDLL(str(build(config))).s2v_flash_attention_sm90
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [
                ctypes.POINTER(ctypes.c_longlong), ctypes.c_float, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _libs[key] = fn
    return _libs[key]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Inputs the kernel covers: CUDA bf16, head dim 128, last dim contiguous, 16-byte aligned."""
    if q.dim() != 4 or not q.is_cuda or q.shape[-1] != HEAD_DIM:
        return False
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (H, D) or v.shape != k.shape:
        return False
    for t in (q, k, v):
        if t.dtype != torch.bfloat16 or t.device != q.device or t.stride(-1) != 1:
            return False
        if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:3]):
            return False
    return True


def cuda_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   softmax_scale: Optional[float] = None, *, config: Optional[dict] = None) -> torch.Tensor:
    """q [B, Lq, H, 128], k/v [B, Lk, H, 128] bf16 on an sm_90 GPU -> [B, Lq, H, 128] bf16.

    Other inputs are computed by cuDNN SDPA (same contract). ``config``: a CUDA_CONFIGS entry."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if not supports(q, k, v) or B * H * Lq == 0 or Lk == 0:
        from .attention import _BACKENDS

        return _BACKENDS["cudnn"](q, k, v) if softmax_scale is None else _sdpa_scaled(q, k, v, scale)
    fn = _load(config or CUDA_CONFIGS[0])
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    strides = (ctypes.c_longlong * 12)(*(s for t in (q, k, v, out) for s in t.stride()[:3]))
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        err = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, Lq, Lk, H, strides,
                 scale, ctypes.c_void_p(stream))
    if err:
        raise RuntimeError(f"cuda flash attention: {_ERRORS.get(err, f'error {err}')}")
    return out


def _sdpa_scaled(q, k, v, scale):
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)
