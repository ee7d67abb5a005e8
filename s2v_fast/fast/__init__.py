"""The fast path as a transform of the plain DiT: ``apply_fast_path(model)``.

Like ``quantize_dit`` and ``apply_tensor_parallel``, it changes how a loaded
:class:`~s2v_fast.models.dit.S2VTransformer` runs, not what it computes (within the bounds of
tests/test_fast_path.py): it installs :class:`~s2v_fast.fast.blocks.FastBlocks` as the model's
block runner, so ``forward_step`` runs the fused Triton kernels with the per-clip caches
(``blocks.py``), planned from what the other features declare (``plan.py``). ``remove_fast_path``
puts the plain runner back. Attention slots left unconfigured get the ``auto`` dispatcher.

* ``blocks.py``: the fused block, audio injection and block runner; the per-clip cache.
* ``plan.py``: what may fuse in a clip (offload, sequence parallel, fp8, attention backends).
* ``text_kv.py``: exact compaction of the padded text keys; ``folded_output.py``: attention over
  few keys folded into its output projection.
"""
from __future__ import annotations

from ..models.dit import PlainBlocks
from .blocks import FastBlocks

PRECISIONS = ("fast", "reference")


def apply_fast_path(model):
    """Run ``model``'s blocks on the fused fast path (in place; returns the model)."""
    from ..kernels.attention import backend_fn

    for slot in model.attention_slots():
        if slot.backend == "reference":  # never configured: the dispatcher's choice
            slot.set("auto", backend_fn("auto"))
    model.blocks_runner = FastBlocks()
    return model


def remove_fast_path(model):
    """Back to the plain reference block loop (in place; returns the model)."""
    model.blocks_runner = PlainBlocks()
    return model


def set_precision(model, precision: str):
    """``"fast"``: :func:`apply_fast_path`; ``"reference"``: :func:`remove_fast_path`."""
    if precision == "fast":
        return apply_fast_path(model)
    if precision == "reference":
        return remove_fast_path(model)
    raise ValueError(f"precision {precision!r}; use one of {', '.join(PRECISIONS)}")
