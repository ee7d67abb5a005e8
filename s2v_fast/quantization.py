"""Opt-in FP8 inference for the DiT: ``quantize_dit(model, "fp8")``.

The exact bf16 path stays the default; quantisation is applied to a loaded model (checkpoint
keys are unchanged, so load first, then quantise):

* The large linears become :class:`FP8Linear` (e4m3 weights, per-output-channel scales, computed
  once here; per-token activation scales computed on every call by a Triton kernel; GEMM by
  ``torch._scaled_mm`` rowwise on Hopper, exact fp32 emulation elsewhere; see
  ``s2v_fast/kernels/fp8_gemm.py``): per block self-attention q, k, v, o, cross-attention q, k,
  v, o, FFN in/out; per audio injector q, k, v, o. Small or precision-critical linears (time and
  text embeddings, modulation, head, audio AdaLN, patch embedding) stay bf16.
* With ``attention=True`` (default for "fp8") the model's self-attention sites (``self`` and the
  streaming mode's ``causal``) use backend ``"fp8"`` (``s2v_fast/kernels/fp8_attention.py``); the
  text and audio cross-attention keep theirs (their few keys do not pay for fp8).

The model code calls ``F.linear(x, layer.weight, layer.bias)`` (``models/block.py: linear``) and
reads ``layer.weight.dtype``. :class:`FP8Linear` therefore exposes ``weight`` as a small tensor
subclass that *reports* the original dtype and shape and turns ``F.linear`` into the fp8 GEMM
(any other op sees the dequantised weight), so no model code changes.

Accuracy (see tests/test_fp8.py, bench/bench_fp8.py): a single fp8 GEMM is ~3.5 % relative L2
from fp32 (mean row cosine 0.9994; the e4m3 3-bit-mantissa floor), fp8 attention 2-3 %
(cosine >= 0.9998) on realistic activations.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .kernels.fp8_gemm import FP8_DTYPE, dequantize, fp8_gemm, fp8_linear, quantize_rows, quantize_weight

MODES = ("none", "fp8")
GROUPS = ("self_attn", "cross_attn", "ffn", "audio")
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}


class FP8WeightView(torch.Tensor):
    """What ``FP8Linear.weight`` returns: shape/dtype/device of the original weight, no storage.

    Routed to the module's fp8 GEMM: ``F.linear(x, w, b)``, and with ``wt = w.t()``:
    ``torch._addmm_activation(b, x, wt, use_gelu=...)`` (the fast path's FFN GELU epilogue),
    ``torch.addmm(b, x, wt)``, ``torch.mm / torch.matmul / x @ wt``. Every other torch op is
    applied to the dequantised weight (so ``.float()``, printing etc. work, at full cost)."""

    @staticmethod
    def __new__(cls, owner: "FP8Linear", transposed: bool = False):
        w8 = owner.weight_fp8
        shape = tuple(w8.shape)[::-1] if transposed else tuple(w8.shape)
        view = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=owner.compute_dtype,
                                                   device=w8.device, requires_grad=False)
        view._owner = owner
        view._transposed = transposed
        return view

    def dequantize(self) -> torch.Tensor:
        w = self._owner.dequantized_weight()
        return w.t() if self._transposed else w

    def __repr__(self, *, tensor_contents=None):
        return (f"FP8WeightView(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"stored=float8_e4m3fn + per-channel fp32 scale{', transposed' if self._transposed else ''})")

    @staticmethod
    def _plain(t):
        return t.dequantize() if isinstance(t, FP8WeightView) else t

    @classmethod
    def _route(cls, func, args, kwargs):
        """The fp8 GEMM for the linear-shaped calls, else None."""
        V = FP8WeightView
        if func in _LINEAR_FUNCS:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, V) and not w._transposed and not isinstance(x, V) and not isinstance(b, V):
                return w._owner.fp8_forward(x, b)
            return None
        if func in _TRANSPOSE_FUNCS and len(args) == 1 and isinstance(args[0], V):
            return V(args[0]._owner, not args[0]._transposed)
        if func in _ADDMM_FUNCS and len(args) >= 3:
            b, x, wt = args[:3]
            if isinstance(wt, V) and wt._transposed and not isinstance(x, V) and x.dim() == 2 \
                    and (b is None or (not isinstance(b, V) and b.dim() == 1)) \
                    and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
                y = wt._owner.fp8_forward(x, b)
                if func is _ADDMM_ACT and (args[3] if len(args) > 3 else kwargs.get("use_gelu", False)):
                    y = F.gelu(y, approximate="tanh")  # the cuBLASLt GELU epilogue is the tanh form
                elif func is _ADDMM_ACT:
                    y = F.relu(y)
                return y
            return None
        if func in _MM_FUNCS and len(args) == 2 and not kwargs:
            x, wt = args
            if isinstance(wt, V) and wt._transposed and not isinstance(x, V):
                return wt._owner.fp8_forward(x, None)
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        y = cls._route(func, args, kwargs)
        if y is not None:
            return y
        if getattr(func, "__name__", "") == "__get__":  # metadata (dtype, shape, device, ...)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(cls._plain, args), **tree_map(cls._plain, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return func(*tree_map(cls._plain, args), **tree_map(cls._plain, kwargs or {}))


_ADDMM_ACT = torch._addmm_activation
_ADDMM_FUNCS = {_ADDMM_ACT, torch.addmm}
_MM_FUNCS = {torch.mm, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.matmul}
_TRANSPOSE_FUNCS = {torch.Tensor.t, torch.t}


class FP8Linear(nn.Module):
    """Linear layer with e4m3 weights (per-output-channel scale) and per-token fp8 activations.

    Buffers: ``weight_fp8`` [out, in] float8_e4m3fn, ``weight_scale`` [out] fp32; ``bias`` stays a
    parameter in the original dtype. Output dtype = the original weight dtype (bf16 in production).
    A state dict with a plain ``weight`` key (an original checkpoint) loads too: it is quantised.

    ``weight_format = "fp8"`` is the declared fact the fast path plans with (``nn.Linear`` is
    "dense"): a GELU before it fuses into the activation quantiser, and it cannot be folded."""

    weight_format = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.bfloat16, device=None, use_fast_accum: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype
        self.use_fast_accum = use_fast_accum
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, **kw) -> "FP8Linear":
        w = lin.weight.detach()
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = lin.in_features, lin.out_features
        m.compute_dtype = w.dtype
        m.use_fast_accum = kw.get("use_fast_accum", False)
        w8, sw = quantize_weight(w)
        m.register_buffer("weight_fp8", w8)
        m.register_buffer("weight_scale", sw)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        else:
            m.register_parameter("bias", None)
        return m

    @property
    def weight(self) -> FP8WeightView:
        # a fresh view per access (a few microseconds): no cached tensor in the module's state
        return FP8WeightView(self)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale).to(self.compute_dtype)

    def fp8_forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fp8_linear(x, self.weight_fp8, self.weight_scale, bias, out_dtype=self.compute_dtype,
                          use_fast_accum=self.use_fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fp8_forward(x, self.bias)

    def forward_quantized(self, a8: torch.Tensor, sa: torch.Tensor, lead: Tuple[int, ...]) -> torch.Tensor:
        """The GEMM on an input already quantised by ``quantize_rows`` (a8 [M, K], sa [M])."""
        y = fp8_gemm(a8, sa, self.weight_fp8, self.weight_scale, self.bias, self.compute_dtype,
                     self.use_fast_accum)
        return y.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        if wkey in state_dict:  # an unquantised checkpoint: quantise on load
            sd = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != wkey}
            w8, sw = quantize_weight(state_dict[wkey].to(self.weight_fp8.device))
            sd[prefix + "weight_fp8"], sd[prefix + "weight_scale"] = w8, sw
            state_dict = sd
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights=float8_e4m3fn/channel, "
                f"activations=float8_e4m3fn/token, out={self.compute_dtype}")


def same_input_linears(x: torch.Tensor, layers) -> List[torch.Tensor]:
    """``[layer(x) for layer in layers]``; when they are all FP8Linear the activation is quantised
    once for all of them (self-attention q, k, v: one pass over x instead of three), with the
    same numbers as calling each layer."""
    layers = list(layers)
    if len(layers) < 2 or not all(isinstance(m, FP8Linear) for m in layers):
        return [F.linear(x.to(m.weight.dtype), m.weight, m.bias) for m in layers]
    a8, sa = quantize_rows(x.to(layers[0].compute_dtype))
    return [m.forward_quantized(a8, sa, x.shape[:-1]) for m in layers]


def gelu_linear(u: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(gelu_tanh(u))`` (the FFN's second linear). For an FP8Linear the GELU runs inside
    the activation quantiser, so the GELU output is never written out and read back."""
    if isinstance(layer, FP8Linear):
        a8, sa = quantize_rows(u.to(layer.compute_dtype), gelu=True)
        return layer.forward_quantized(a8, sa, u.shape[:-1])
    g = F.gelu(u, approximate="tanh")
    return F.linear(g.to(layer.weight.dtype), layer.weight, layer.bias)


def target_linears(model: nn.Module, groups: Iterable[str] = GROUPS) -> List[Tuple[nn.Module, str, str]]:
    """(parent module, attribute name, qualified name) of every linear ``quantize_dit`` replaces."""
    groups = set(groups)
    bad = groups - set(GROUPS)
    if bad:
        raise ValueError(f"unknown groups {sorted(bad)}; choose from {GROUPS}")
    out = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        if "self_attn" in groups:
            out += [(blk.self_attn, n, f"blocks.{i}.self_attn.{n}") for n in "qkvo"]
        if "cross_attn" in groups:
            out += [(blk.cross_attn, n, f"blocks.{i}.cross_attn.{n}") for n in "qkvo"]
        if "ffn" in groups:
            out += [(blk.ffn, "0", f"blocks.{i}.ffn.0"), (blk.ffn, "2", f"blocks.{i}.ffn.2")]
    inj = getattr(model, "audio_injector", None)
    if inj is not None and "audio" in groups:
        for j, ca in enumerate(inj.injector):
            out += [(ca, n, f"audio_injector.injector.{j}.{n}") for n in "qkvo"]
    return out


@torch.no_grad()
def quantize_dit(model: nn.Module, mode: str = "fp8", *, attention=None,
                 groups: Iterable[str] = GROUPS, use_fast_accum: bool = False) -> nn.Module:
    """Quantise a loaded S2V DiT in place (layer by layer: each bf16 weight is released as soon as
    its fp8 copy exists, so peak memory grows by one weight, not by the model).

    ``mode``: "fp8" or "none" (no-op). ``attention``: True / "fp8" (default for mode "fp8")
    sets the self-attention sites (``self``, ``causal``) to backend "fp8"; False leaves them
    alone; another backend name sets that one. ``groups``: which linears (see :data:`GROUPS`). ``use_fast_accum``: fp8 GEMM
    fast accumulation (faster, less accurate; off by default).
    Call it before the first denoising step: the fast path caches per-clip text/audio K/V made
    with the linears of its first call. Returns the model (``model.quantization`` = mode)."""
    mode = (mode or "none").lower()
    if mode in ("none", "bf16", "off"):
        return model
    if mode != "fp8":
        raise ValueError(f"quantization mode {mode!r}; choose one of {MODES}")
    for parent, name, _ in target_linears(model, groups):
        lin = getattr(parent, name)
        if isinstance(lin, FP8Linear):
            continue
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"expected nn.Linear at {name}, got {type(lin).__name__}")
        setattr(parent, name, FP8Linear.from_linear(lin, use_fast_accum=use_fast_accum))
        del lin  # the only reference: the bf16 weight is freed here
    model.quantization = mode
    if attention is None or attention is True:
        attention = "fp8"
    if attention:
        from .kernels.attention import backend_fn

        fn = backend_fn(str(attention))
        for slot in model.attention_slots():
            if slot.site in ("self", "causal"):
                slot.set(str(attention), fn)
    return model


def quantized_linears(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
