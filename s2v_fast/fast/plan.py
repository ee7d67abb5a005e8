"""What the fast step fuses, decided at every step from facts the other features declare.

The fast path used to detect the other features by their internals (an offload hook in a block's
hook dictionary, an ``attend`` in a module's ``__dict__``, ``isinstance`` of a quantised linear).
Each feature now declares what the fast path needs to know, and :func:`build_plan` reads only that:

* layerwise offload sets ``model.block_streamer`` (weights arrive per block): no fusion across a
  block boundary, and the runner calls ``before_block`` / ``after_block`` around each block;
* sequence parallelism sets ``model.parallel_strategy``: every block computes all its rows (its
  attention exchanges q, k, v as equal shards);
* a linear declares ``weight_format`` ("fp8" for ``FP8Linear``; ``nn.Linear`` is "dense"): a GELU
  before an fp8 linear fuses into its activation quantiser, and only dense linears fold;
* each attention slot declares its backend (``s2v_fast/attention_sites.py``): the fused text and
  audio attention kernels run for ``auto``; another backend is called as configured (the text
  keys stay compacted only for a backend that takes a key bias).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..kernels.registry import backend_info
from .folded_output import weight_format

# backends the fast path treats as "pick the fused kernel": the dispatcher's own choice, and the
# plain model's SDPA slot before anyone configured attention
FUSED_CHOICES = ("auto", "reference")


@dataclass(frozen=True)
class FastPlan:
    """Per block: ``fuse_next[i]`` (block i's FFN residual computes block i+1's norm1),
    ``fp8_ffn_out[i]`` (GELU fused into the FFN's fp8 second linear); per clip: ``rows_out_last``
    (the last block computes only the noisy rows), ``streamer`` (block weights per block, or
    None), ``text`` ("fused": compacted keys, the short-key / flash kernels and folding; "bias":
    compacted keys through the site's backend; "dense": all padded keys through it) and
    ``audio`` ("fused": the per-frame kernels and folding; "dense": the site's backend)."""

    fuse_next: Tuple[bool, ...]
    fp8_ffn_out: Tuple[bool, ...]
    rows_out_last: bool
    streamer: Optional[object]
    text: str
    audio: str


def _site_mode(slot, dense_name: str = "dense") -> str:
    if slot.backend in FUSED_CHOICES:
        return "fused"
    info = backend_info(slot.backend)
    return "bias" if dense_name == "bias" and info is not None and info.key_bias else "dense"


def build_plan(model) -> FastPlan:
    blocks = model.blocks
    streamer = model.block_streamer
    inject = model.audio_injector.layer_to_index
    n = len(blocks)
    fuse = tuple(i not in inject and i + 1 < n and streamer is None for i in range(n))
    fp8_out = tuple(weight_format(b.ffn[2]) == "fp8" for b in blocks)
    text = _site_mode(blocks[0].cross_attn.attn, "bias")
    audio = _site_mode(model.audio_injector.injector[0].attn) if len(model.audio_injector.injector) else "fused"
    return FastPlan(fuse_next=fuse, fp8_ffn_out=fp8_out, rows_out_last=model.parallel_strategy is None,
                    streamer=streamer, text=text, audio=audio)
