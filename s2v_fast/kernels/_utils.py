"""Small helpers shared by the Triton kernels (interpreter detection, launch helpers)."""
from __future__ import annotations

import functools
import os

import torch

from ..errors import InputError
from ..options import env_options

try:  # triton is optional at import time (the torch references must work without it)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def to_bf16(x, INTERPRET: tl.constexpr):
        """fp32 -> bf16 with round-to-nearest-even.

        The GPU cast is RNE; the triton 3.9 CPU interpreter's fp32->bf16 cast truncates (and its
        'rtne' mode rounds ties up), so under the interpreter round the bits by hand first: the
        truncating cast of an already-representable value is then exact.
        """
        if INTERPRET:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(tl.bfloat16)

    @triton.jit
    def to_dtype(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 -> DTYPE (round to nearest even for bf16 also under the interpreter)."""
        if DTYPE == tl.bfloat16:
            return to_bf16(x, INTERPRET)
        else:
            return x.to(DTYPE)

    @triton.jit
    def load_rows(base, rows, offs_d, stride, L, MASK: tl.constexpr):
        """The [len(rows), D] tile at ``base + rows * stride + offs_d`` (K or V of an attention
        kernel); with MASK, rows >= L read as 0."""
        ptrs = base + rows[:, None] * stride + offs_d[None, :]
        if MASK:
            return tl.load(ptrs, mask=rows[:, None] < L, other=0.0)
        return tl.load(ptrs)

    @triton.jit
    def dot_upcast(a, b, acc, UPCAST: tl.constexpr):
        """``tl.dot(a, b, acc)``; UPCAST (the CPU interpreter, whose bf16 x bf16 dot computes
        garbage in triton 3.9) multiplies in fp32 instead."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def kernels_usable(*tensors: torch.Tensor) -> bool:
    """Can a Triton kernel run on these tensors? CUDA tensors with triton, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if is_interpreter():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors) and len({t.device for t in tensors}) == 1


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def shape_bucket(n: int) -> int:
    """A length's tuning class: the next power of two, capped at 2^17 (one class above that)."""
    return min(next_pow2(max(n, 1)), 1 << 17)


def outputs_agree(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-2) -> bool:
    """Two kernels' outputs agree up to accumulation-order noise: max |a - b| <= rtol * max(1, max |b|)
    (and no NaN); the tuners' guard against a miscompiled variant winning."""
    err = (a.float() - b.float()).abs().max().item()
    return err == err and err <= rtol * max(1.0, b.float().abs().max().item())


@functools.lru_cache(maxsize=None)
def has_tensor_descriptor() -> bool:
    return HAS_TRITON and hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a global allocator (set once)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return

    def _alloc(size: int, alignment: int, stream):
        dev = "cpu" if is_interpreter() else "cuda"
        return torch.empty(size, dtype=torch.int8, device=dev)

    triton.set_allocator(_alloc)
    _ALLOCATOR_SET = True


def row_norm_launch(C: int, element_size: int = 4):
    """(BLOCK_C, ROWS, num_warps) for a kernel that holds whole rows of C features in registers.

    C = 5120 -> BLOCK_C 8192, one row per program, 16 warps: offline sm_90a compiles show 64
    registers/thread (2 CTAs = 32 warps per SM) against 108-144 with 8 warps (1 CTA per SM).
    S2V_ROW_NUM_WARPS overrides num_warps (GPU tuning)."""
    block_c = next_pow2(C)
    # ~4-16 KiB of fp32 per program; small C packs several rows into one program.
    rows = max(1, min(16, 4096 // block_c))
    if block_c >= 8192:
        num_warps = 16
    elif block_c >= 2048:
        num_warps = 8
    elif block_c >= 512:
        num_warps = 4
    else:
        num_warps = 2
    forced = env_options().kernels.row_num_warps
    if forced is not None:
        num_warps = forced
    return block_c, rows, num_warps


def forced_config(configs: list, index, variable: str):
    """``configs[index]`` for an ``S2V_*_CONFIG`` override (None when unset); an index past the
    list is a one-line InputError (the options only know it is an integer >= 0)."""
    if index is None:
        return None
    if index >= len(configs):
        raise InputError(f"{variable}={index}; use 0..{len(configs) - 1} (an index of the list)")
    return configs[index]


def batch_stride(t: torch.Tensor, B: int) -> int:
    """Stride of dim 0, or 0 when the tensor broadcasts over the batch (size 1)."""
    return 0 if (t.shape[0] == 1 and B != 1) else t.stride(0)


def as_segment_param(p: torch.Tensor, C: int) -> torch.Tensor:
    """Normalise a per-segment modulation tensor to [B|1, G, C] (accepts [C], [G, C], [B, G, C])."""
    if p.dim() == 1:
        p = p.view(1, 1, C)
    elif p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[-1] != C or p.shape[1] not in (1, 2):
        raise ValueError(f"modulation tensor must be [B, G<=2, {C}], got {tuple(p.shape)}")
    if p.stride(-1) != 1:
        p = p.contiguous()
    return p


def segment_expand(p: torch.Tensor, L: int, split: int | None) -> torch.Tensor:
    """Reference helper: [B|1, G, C] per-segment tensor -> [B|1, L, C] per-token (g = s >= split)."""
    if p.shape[1] == 1:
        return p.expand(p.shape[0], L, p.shape[2])
    split = L if split is None else int(split)
    split = max(0, min(L, split))
    return torch.cat(
        [p[:, 0:1].expand(-1, split, -1), p[:, 1:2].expand(-1, L - split, -1)], dim=1
    )


def clamp_split(split: int | None, L: int) -> int:
    return L if split is None else max(0, min(L, int(split)))
