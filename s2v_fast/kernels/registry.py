"""The attention backend registry: name -> a function with the ``attention(q, k, v)`` contract,
and what each backend declares it can do (:class:`BackendInfo`).

Its own module so that backends which call other backends (``fp8`` falls back to the bf16 choice,
``cuda`` to cuDNN) look them up here instead of importing the dispatcher (``attention.py``),
which imports them: the kernels package then has no import cycle. It imports no backend;
``attention.py`` fills it when the kernels package is imported.

Declared capabilities (read by ``configure_attention`` and the fast paths, never guessed):

* ``sites``: the attention sites (``s2v_fast.attention_sites.SITES``) the backend serves; None =
  all. ``fp8`` serves the long-key sites only: as the default backend it leaves the text and audio
  cross-attention to ``auto``, and naming it for such a site is an error.
* ``key_bias``: the backend also has a ``fn(q, k, v, key_bias)`` form (``bias_fn``) with a
  per-key additive logit bias [B, Lk]: what the fast path's compacted text keys need.
* ``fp8``: the backend changes numerics on purpose (e4m3 operands); the run summary says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional

import torch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BiasAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]],
                           torch.Tensor]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    sites: Optional[FrozenSet[str]] = None
    bias_fn: Optional[BiasAttentionFn] = None
    fp8: bool = False

    @property
    def key_bias(self) -> bool:
        return self.bias_fn is not None

    def serves(self, site: str) -> bool:
        return self.sites is None or site in self.sites


_BACKENDS: Dict[str, AttentionFn] = {}
_INFO: Dict[str, BackendInfo] = {}


def register_attention_backend(name: str, fn: AttentionFn, *, sites=None,
                               bias_fn: Optional[BiasAttentionFn] = None, fp8: bool = False) -> None:
    """Add (or replace) a backend with the ``attention`` contract and its declared capabilities."""
    _BACKENDS[name] = fn
    _INFO[name] = BackendInfo(name, None if sites is None else frozenset(sites), bias_fn, fp8)


def attention_backend_fn(name: str) -> Optional[AttentionFn]:
    """The function registered as ``name``, or None."""
    return _BACKENDS.get(name)


def backend_info(name: str) -> Optional[BackendInfo]:
    """What backend ``name`` declared when it registered, or None."""
    return _INFO.get(name)


def registered_attention_backends() -> list:
    """The registered names, sorted (``auto`` is not one: it picks among them)."""
    return sorted(_BACKENDS)
