"""bench/bench_fp8.py's per-block accuracy hook on the fast path, on the CPU.

Since the fast path's last block returns only its noisy rows (the head reads nothing else), the
hook's token indices, drawn from the block input's length, can lie past that block's output. On
CUDA that index_select was a device-side assert that poisoned the context: the fp8 benchmark died
and every later fp8 row errored (issue 23, item 2; issue 31). This reproduces the shorter last
block on the tiny bf16 model and checks the hook records every block, the last one on its rows.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_fp8  # noqa: E402
from s2v_fast import S2VTransformer  # noqa: E402
from s2v_fast.config import DiTConfig  # noqa: E402
from s2v_fast.fast import set_precision
from test_fast_path import _bf16_inputs  # noqa: E402


def test_recorded_rows_clips_indices_past_a_shorter_output():
    out = torch.randn(2, 7, 3)
    idx = torch.tensor([0, 3, 6, 9, 12])
    rows, keep = bench_fp8.recorded_rows(out, idx)
    assert keep == 3 and torch.equal(rows, out[:, [0, 3, 6]])


def test_block_recorder_survives_the_shorter_last_block():
    torch.manual_seed(0)
    model = S2VTransformer(DiTConfig.preset("tiny")).to(torch.bfloat16).eval()
    set_precision(model, "fast")
    inp = _bf16_inputs(model.config)  # CFG batch of 2
    seen = {}
    with bench_fp8.BlockRecorder(n_tokens=10 ** 6) as rec:  # every row of the input
        from s2v_fast.fast import blocks as fast_path

        inner = fast_path.fast_block

        def spy(block, x, *a, **kw):
            rows_in = x.shape[1]
            out = inner(block, x, *a, **kw)
            seen[len(seen)] = (rows_in, out[0].shape[1])
            return out

        fast_path.fast_block = spy
        try:
            model(**inp)
        finally:
            fast_path.fast_block = inner  # the recorder restores the original on exit
    last = len(model.blocks) - 1
    assert set(rec.store) == set(range(len(model.blocks)))
    rows_in, rows_out = seen[last]
    assert rows_out < rows_in  # the case that broke the hook: the last block is shorter
    x_last, d_last = rec.store[last]
    assert x_last.shape[1] == d_last.shape[1] == rows_out
    assert torch.isfinite(x_last).all() and torch.isfinite(d_last).all()
