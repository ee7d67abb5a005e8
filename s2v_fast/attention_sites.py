"""Where the DiT attends, and which backend each place uses.

The model attends at four *sites*:

* ``self``: a block's self-attention over the whole token sequence (faithful mode);
* ``text``: a block's cross-attention to the prompt (512 padded text rows, or fewer after the
  fast path compacts them, ``s2v_fast/fast/text_kv.py``);
* ``audio``: an audio injector's per-frame cross-attention (a few audio tokens per latent frame);
* ``causal``: the streaming mode's block-causal self-attention of one block of noisy frames over
  its rolling KV cache and the cond ("sink") tokens (``models/causal.py``).

Every attention module holds an :class:`AttentionSlot` for its site. The plain model's slots call
:func:`reference_attention` (PyTorch SDPA, the reference math); ``configure_attention`` in
``s2v_fast/kernels/attention.py`` fills the slots of a model from an :class:`AttentionChoice`
(``--attention-backend`` and ``--attention-site SITE=BACKEND``). The choice lives in the model's
slots, not in a process global, so two models in one process can use different backends.

This module imports nothing of the package: the models use it without importing a kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

SITES = ("self", "text", "audio", "causal")
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense softmax attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] (SDPA)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class AttentionSlot:
    """The attention of one module at one site: ``slot(q, k, v)`` with the dense contract above.

    ``backend`` is the configured backend name ("reference" until ``configure_attention`` runs);
    ``fn`` does the work. Fast paths read ``backend`` to decide what they may fuse (e.g. the text
    cross-attention keeps its compacted keys only for a backend that takes a key bias)."""

    __slots__ = ("site", "backend", "fn")

    def __init__(self, site: str, backend: str = "reference", fn: AttentionFn = reference_attention):
        if site not in SITES:
            raise ValueError(f"unknown attention site {site!r}; sites: {', '.join(SITES)}")
        self.site, self.backend, self.fn = site, backend, fn

    def set(self, backend: str, fn: AttentionFn) -> None:
        self.backend, self.fn = backend, fn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(q, k, v)

    def __repr__(self) -> str:
        return f"AttentionSlot({self.site}={self.backend})"


@dataclass(frozen=True)
class AttentionChoice:
    """The backend of every site: ``default`` (``--attention-backend``) unless ``overrides``
    (``--attention-site SITE=BACKEND``) names the site. Validated against the registry by
    ``kernels.attention.check_attention_choice``; a default that a backend declares it does not
    serve at a site (``fp8`` below 4096 keys) gives that site ``auto``."""

    default: str = "auto"
    overrides: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        for site, _ in self.overrides:
            if site not in SITES:
                raise ValueError(f"--attention-site {site}=...: unknown site; use one of "
                                 f"{', '.join(SITES)}")

    def explicit(self, site: str) -> Optional[str]:
        """The backend named for ``site`` by an override, else None."""
        return dict(self.overrides).get(site)

    def with_site(self, site: str, backend: str) -> "AttentionChoice":
        kept = tuple((s, b) for s, b in self.overrides if s != site)
        return AttentionChoice(self.default, kept + ((site, backend),))

    @classmethod
    def parse(cls, default: str = "auto", sites: Iterable[str] = ()) -> "AttentionChoice":
        """From ``--attention-backend`` and the ``--attention-site`` values ("SITE=BACKEND")."""
        pairs = []
        for item in sites or ():
            site, sep, backend = str(item).partition("=")
            if not sep or not site.strip() or not backend.strip():
                raise ValueError(f"--attention-site {item!r}: use SITE=BACKEND, e.g. self=fp8 "
                                 f"(sites: {', '.join(SITES)})")
            pairs.append((site.strip(), backend.strip()))
        return cls(default, tuple(pairs))

    def describe(self, effective: Optional[Dict[str, str]] = None) -> str:
        """One line for the run summary: ``self=cudnn text=auto ...`` (effective when given)."""
        eff = effective or {s: self.explicit(s) or self.default for s in SITES}
        return " ".join(f"{s}={eff[s]}" for s in SITES if s in eff)
