"""Step-pipelined streaming (s2v_fast.parallel.step_pipeline) against the single-process runner.

One spawn of 5 gloo processes runs every case on its own process group (built on all ranks,
in the same order): 4 DiT ranks alone (rank 4 sits out), 4 DiT ranks + the decode rank (which
has no model), and 4 DiT ranks on global ranks 1..4 (rank 0 sits out; exercises the group ->
global rank mapping). The tiny fixture DiT, 8x8 latents, 2 clips = 8 blocks x 4 steps. Every
block's final latents (and noise) must equal the single-process ``StreamingRunner``'s bit for bit:
same ops, same machine, one thread everywhere (the parent computes the reference with one thread
too, since a GEMM's rounding may depend on the thread count).
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from util import fixture

from s2v_fast.errors import InputError
from s2v_fast.parallel.step_pipeline import StepPipelineRunner, check_world, rank_rd

WORLD = 5
RD_INJECTED = [4 + (7 * k) % 27 for k in range(32)]  # exactly one per forward (8 blocks x 4 steps)
CASES = {  # name: (sink, global ranks of the group, decode rank, injected rd)
    "realtime": ("realtime", [0, 1, 2, 3], False, None),
    "realtime_decode_injected_rd": ("realtime", [0, 1, 2, 3, 4], True, RD_INJECTED),
    "offline": ("offline", [1, 2, 3, 4], False, None),
}
NUM_CLIPS = 2


def _settings(sink):
    from s2v_fast.streaming.preset import StreamingSettings

    return StreamingSettings(frames_per_clip=48, sink=sink)


def _model(cfg_dict, state=None):
    from s2v_fast.config import DiTConfig
    from s2v_fast.models.dit import S2VTransformer

    model = S2VTransformer(DiTConfig.from_dict(cfg_dict)).eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _results(blocks):
    return [dict(pos=(b.clip, b.block, b.index, b.start_frame), noise=b.noise.clone(),
                 latents=b.latents.clone()) for b in blocks]


# ----------------------------------------------------------------------------- worker (child)
def _worker(rank, port, tmp):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        setup = torch.load(os.path.join(tmp, "setup.pt"))
        model = _model(setup["config"], setup["state"])
        groups = {name: dist.new_group(ranks) for name, (_, ranks, _, _) in CASES.items()}
        for name, (sink, ranks, decode, rd) in CASES.items():
            if rank in ranks:
                decoder = decode and rank == ranks[-1]
                runner = StepPipelineRunner(None if decoder else model, _settings(sink),
                                            group=groups[name], rd_sequence=rd, decode_rank=decode,
                                            dtype=torch.float32, device="cpu")
                blocks = _results(runner.stream(**setup["inputs"], num_clips=NUM_CLIPS))
                torch.save(dict(blocks=blocks, is_output=runner.is_output),
                           os.path.join(tmp, f"{name}_{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(model, inputs, sink, rd):
    from s2v_fast.streaming.runner import StreamingRunner

    runner = StreamingRunner(model, _settings(sink), rd_sequence=rd)
    return _results(runner.stream(**inputs, num_clips=NUM_CLIPS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference, {global rank: saved run}) per case, and the wall time of the whole check."""
    t0 = time.time()
    tmp = str(tmp_path_factory.mktemp("step_pipeline"))
    config = json.load(open(fixture("liveavatar", "manifest.json")))["dit_config"]
    torch.manual_seed(0)
    model = _model(config)
    g = torch.Generator().manual_seed(1)
    s = _settings("realtime")
    inputs = dict(context=torch.randn(5, config["text_dim"], generator=g),
                  ref_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
                  motion_latents=torch.randn(1, 16, 19, 8, 8, generator=g),
                  audio=torch.randn(1, 25, config["audio_dim"], s.frames_per_clip * NUM_CLIPS,
                                    generator=g))
    torch.save(dict(config=config, state=model.state_dict(), inputs=inputs),
               os.path.join(tmp, "setup.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {name: _reference(model, inputs, sink, rd)
                for name, (sink, _, _, rd) in CASES.items()}
    finally:
        torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=True)
    out = {name: (refs[name], {r: torch.load(os.path.join(tmp, f"{name}_{r}.pt"))
                               for r in CASES[name][1]}) for name in CASES}
    return out, time.time() - t0


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_equals_single_process_bitwise(runs, name):
    ref, saved = runs[0][name]
    ranks = CASES[name][1]
    assert [r for r in ranks if saved[r]["is_output"]] == [ranks[-1]]
    assert all(not saved[r]["blocks"] for r in ranks[:-1])  # only the output rank yields
    got = saved[ranks[-1]]["blocks"]
    assert len(got) == len(ref) == NUM_CLIPS * 4
    for a, b in zip(got, ref):
        assert a["pos"] == b["pos"]
        assert a["latents"].dtype == b["latents"].dtype == torch.float32
        assert torch.equal(a["noise"], b["noise"]), a["pos"]
        assert torch.equal(a["latents"], b["latents"]), a["pos"]


def test_cases_are_sensitive_to_the_sink_refresh_and_rd(runs):
    """The comparisons above would catch a missed refresh or a wrong rd: both change blocks."""
    realtime, offline = runs[0]["realtime"][0], runs[0]["offline"][0]
    injected = runs[0]["realtime_decode_injected_rd"][0]
    same = [torch.equal(a["latents"], b["latents"]) for a, b in zip(realtime, offline)]
    assert same == [True] * 4 + [False] * 4  # same sink in clip 0, the refreshed one in clip 1
    assert not all(torch.equal(a["latents"], b["latents"]) for a, b in zip(realtime, injected))


def test_step_pipeline_is_fast(runs):
    assert runs[1] < 60


def test_world_size_must_be_steps_plus_decode_rank():
    check_world(4, 4, False)
    check_world(5, 4, True)
    with pytest.raises(InputError, match=r"needs 4 processes .* torchrun --nproc-per-node 4$"):
        check_world(5, 4, False)
    with pytest.raises(InputError, match=r"\+ 1 decode rank.* --nproc-per-node 5$"):
        check_world(4, 4, True)


def test_needs_torch_distributed():
    from s2v_fast.streaming.preset import StreamingSettings

    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(InputError, match="torchrun --nproc-per-node 5"):
        StepPipelineRunner(None, StreamingSettings(), decode_rank=True)


def test_rank_rd_takes_every_steps_th_element():
    assert list(rank_rd(range(12), 4, 1)) == [1, 5, 9]
    assert list(rank_rd(iter(range(12)), 4, 3)) == [3, 7, 11]
