"""Tensor parallelism for the S2V DiT as a transform (gpt-fast style): the model stays plain.

Sharded (Megatron layout, per TP rank r of n):
* self-attn, text cross-attn, audio injectors: q, k, v column-parallel (output rows
  ``[r*C/n, (r+1)*C/n)`` = heads ``[r*H/n, (r+1)*H/n)``), o row-parallel (input columns), its
  output all-reduced; q/k RMSNorm over the full width becomes a cross-rank sum of squares
  (self-attn: q and k statistics in one all-reduce);
* FFN: ffn.0 column-parallel, ffn.2 row-parallel + all-reduce.
A row-parallel bias is kept on TP rank 0 only (zeros elsewhere) so the all-reduce adds it once.
Everything else (embeddings, time MLP, audio encoder, FramePack, AdaLN linears, head) is
replicated. Per block: 6 all-reduces (self qk-stats, self o, cross q-stats, cross k-stats,
cross o, FFN); per audio injector: 3.

:func:`load_dit_sharded` reads only this rank's slices from the safetensors files
(``safe_open(...).get_slice``); :func:`apply_tensor_parallel` slices an already loaded model.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import CheckpointError

_ATTN = r"(?:blocks\.\d+\.(?:self_attn|cross_attn)|audio_injector\.injector\.\d+)"
_PLAN = [
    (re.compile(_ATTN + r"\.(?:q|k|v)\.(?:weight|bias)$"), "col"),
    (re.compile(_ATTN + r"\.norm_(?:q|k)\.weight$"), "col"),
    (re.compile(_ATTN + r"\.o\.weight$"), "row"),
    (re.compile(_ATTN + r"\.o\.bias$"), "row_bias"),
    (re.compile(r"blocks\.\d+\.ffn\.0\.(?:weight|bias)$"), "col"),
    (re.compile(r"blocks\.\d+\.ffn\.2\.weight$"), "row"),
    (re.compile(r"blocks\.\d+\.ffn\.2\.bias$"), "row_bias"),
]


def tp_kind(name: str) -> Optional[str]:
    """'col' (shard dim 0), 'row' (shard dim 1), 'row_bias' (rank 0 only) or None (replicated)."""
    for pat, kind in _PLAN:
        if pat.search(name):
            return kind
    return None


def tp_index(kind: Optional[str], shape: Tuple[int, ...], rank: int, size: int):
    """Index tuple of this rank's slice (None = whole tensor)."""
    if kind == "col":
        n = shape[0] // size
        return (slice(rank * n, (rank + 1) * n),) + (slice(None),) * (len(shape) - 1)
    if kind == "row":
        n = shape[1] // size
        return (slice(None), slice(rank * n, (rank + 1) * n))
    return None


def _shard_tensor(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    kind = tp_kind(name)
    if kind == "row_bias":
        return t.clone() if rank == 0 else torch.zeros_like(t)
    idx = tp_index(kind, tuple(t.shape), rank, size)
    return t if idx is None else t[idx].clone()


# ----------------------------------------------------------------------------- runtime pieces
def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(t, group=group)
    return t


class DistributedRMSNorm(nn.Module):
    """`WanRMSNorm` over a width split across TP ranks: the sum of squares is all-reduced.

    cdt(x * rsqrt(sum_all(x^2) / full_dim + eps)) * weight_local (stats in fp32).
    """

    def __init__(self, weight: torch.Tensor, eps: float, full_dim: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.full_dim, self.group = eps, full_dim, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ss = _all_reduce(xf.pow(2).sum(dim=-1, keepdim=True), self.group)
        n = xf * torch.rsqrt(ss / self.full_dim + self.eps)
        return n.to(x.dtype) * self.weight


def _tp_qk_norm_rope(attn, group, full_dim: int):
    """SelfAttention.qk_norm_rope with one all-reduce for the q and k statistics."""
    from ..models.block import linear
    from ..models.rope import apply_rope

    def qk_norm_rope(h, rope):
        q, k = linear(h, attn.q), linear(h, attn.k)
        qf, kf = q.float(), k.float()
        ss = _all_reduce(torch.stack([qf.pow(2).sum(-1), kf.pow(2).sum(-1)], dim=-1), group)
        r = torch.rsqrt(ss / full_dim + attn.norm_q.eps).unsqueeze(-1)  # [B, L, 2, 1]
        q = (qf * r[..., 0, :]).to(q.dtype) * attn.norm_q.weight
        k = (kf * r[..., 1, :]).to(k.dtype) * attn.norm_k.weight
        return apply_rope(attn._heads(q), rope), apply_rope(attn._heads(k), rope)

    return qk_norm_rope


def _reduce_output_hook(group):
    def hook(module, args, output):
        return _all_reduce(output, group)
    return hook


def _reduce_method(fn, group):
    def wrapped(*args, **kwargs):
        return _all_reduce(fn(*args, **kwargs), group)
    return wrapped


# ----------------------------------------------------------------------------- the transform
def apply_tensor_parallel(model, group, rank: Optional[int] = None,
                          size: Optional[int] = None):
    """Shard ``model`` (an ``S2VTransformer``) over ``group`` in place and add the collectives.

    If the weights were loaded already sharded (:func:`load_dit_sharded`), only the runtime
    pieces are installed. Works on meta tensors too (for building random sharded models).
    """
    if size is None:
        size = dist.get_world_size(group)
        rank = dist.get_rank(group)
    if getattr(model, "_tp_applied", False):
        return model
    c = model.config
    if c.num_heads % size or c.dim % size or c.ffn_dim % size:
        raise ValueError(f"tensor parallel size {size} must divide heads {c.num_heads}, dim "
                         f"{c.dim} and ffn_dim {c.ffn_dim}")
    if getattr(model, "_tp_sharded", None) is None:
        with torch.no_grad():
            for name, p in list(model.named_parameters()):
                if tp_kind(name) is not None:
                    _set_param(model, name, _shard_tensor(name, p.data, rank, size))
        model._tp_sharded = (rank, size)
    elif tuple(model._tp_sharded) != (rank, size):
        raise ValueError(f"model weights are sharded as {model._tp_sharded}, not {(rank, size)}")

    attn_modules = []
    for blk in model.blocks:
        attn_modules += [blk.self_attn, blk.cross_attn]
        blk.ffn_forward = _reduce_method(blk.ffn_forward, group)
    attn_modules += list(model.audio_injector.injector)
    for attn in attn_modules:
        attn.num_heads //= size
        for nm in ("norm_q", "norm_k"):
            norm = getattr(attn, nm)
            setattr(attn, nm, DistributedRMSNorm(norm.weight.data, norm.eps, c.dim, group))
        attn.register_forward_hook(_reduce_output_hook(group))
    for blk in model.blocks:
        blk.self_attn.qk_norm_rope = _tp_qk_norm_rope(blk.self_attn, group, c.dim)
    model._tp_applied = True
    model._tp_group = group
    return model


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    setattr(mod, attr, nn.Parameter(tensor, requires_grad=False))


def load_dit_sharded(path: str, tp_rank: int, tp_size: int, device="cpu",
                     dtype: Optional[torch.dtype] = None, group=None, config=None):
    """Build ``S2VTransformer`` holding only TP rank ``tp_rank``'s slices of the checkpoint.

    Each sharded tensor is read with ``get_slice`` (the rest of it is never read); row-parallel
    biases are read on rank 0 only. With ``group`` the runtime collectives are installed too
    (else call :func:`apply_tensor_parallel` later with the TP group).
    """
    from ..checkpoint import checkpoint_files, iter_checkpoint_tensors, _assign, _header_shapes
    from ..config import DiTConfig
    from ..models.dit import S2VTransformer

    cfg = config or DiTConfig.from_json(path if os.path.isdir(path) else os.path.dirname(path))
    if cfg.num_heads % tp_size or cfg.ffn_dim % tp_size:
        raise CheckpointError(f"tensor parallel size {tp_size} must divide the {cfg.num_heads} "
                              f"heads and the FFN width {cfg.ffn_dim}")
    with torch.device("meta"):
        model = S2VTransformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: v[0] for k, v in _header_shapes(checkpoint_files(path)).items()}
    bad = sorted(k for k in expected if found.get(k) != expected[k])
    extra = sorted(k for k in found if k not in expected)
    if bad or extra:
        raise CheckpointError(f"checkpoint {path} does not match its config.json ({len(bad)} "
                              f"missing/mis-shaped e.g. {bad[:3]}, {len(extra)} unexpected e.g. "
                              f"{extra[:3]}); re-download the Wan2.2-S2V-14B DiT weights")

    def select(name):
        return not (tp_kind(name) == "row_bias" and tp_rank != 0)

    def slices(name, shape):
        return tp_index(tp_kind(name), shape, tp_rank, tp_size)

    loaded_dtype = dtype
    for name, t in iter_checkpoint_tensors(path, select=select, slices=slices, device=device,
                                           dtype=dtype):
        _assign(model, name, t.contiguous())
        loaded_dtype = loaded_dtype or t.dtype
    for name, shape in expected.items():
        if tp_kind(name) == "row_bias" and tp_rank != 0:
            _assign(model, name, torch.zeros(shape, device=device, dtype=loaded_dtype))
    model._tp_sharded = (tp_rank, tp_size)
    model.eval()
    model.requires_grad_(False)
    if group is not None:
        apply_tensor_parallel(model, group, tp_rank, tp_size)
    return model
