"""`torchrun ... s2v_fast generate --model tiny` with 2 gloo processes on the CPU.

Each multi-process run goes through the real CLI under ``torch.distributed.run`` (the
``tests/cli_capture.py`` wrapper only saves what ``generate`` returns on each rank). Checks: exit
code 0, exactly one MP4 written (by rank 0) with the single-process frame count, the summary
printed once, both ranks agree on the seed (``--seed -1`` is drawn on rank 0 and broadcast) and
their frames are equal, and the frames match the single-process run.

Tolerance: max |frame difference| <= 2e-4 on frames in [-1, 1]. The runs are fp32; sharding the
sequence (Ulysses), running the CFG branches as two batch-1 calls instead of one batch-2 call, or
splitting the weights (TP) only reorders floating-point sums (~1e-7 relative per op); through 2
steps x 2 clips and the random-weight tiny VAE decode this grows to 1.2e-5 .. 2.1e-5 (measured on
a 2-core CPU). 2e-4 leaves a 10x margin for other BLAS builds and is 39x below one uint8 step
of the MP4 (2/255 = 7.8e-3). At 64x64 the VAE has a single tile, so VAE patch parallel runs its
one-tile path here (its multi-tile numerics are tested in test_parallel_dist.py).
"""
import pytest
import torch

import cli_capture
from test_pipeline_tiny import tiny_cache, write_image, write_wav  # noqa: F401

TOL = 2e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_parallel_inputs")
    return dict(image=write_image(d / "face.png"), audio=write_wav(d / "a.wav", 1.0))


def _cmd(files, out, *extra):
    # 1 s of audio, 8 frames per clip -> 2 clips (the second one uses the motion context)
    return ["generate", "--model", "tiny", "--device", "cpu", "--image", files["image"],
            "--audio", files["audio"], "--output", str(out), "--max-area", "64*64",
            "--num-frames", "8", "--num-inference-steps", "2", "--quiet", *extra]


def _run(tmp_path, tiny_cache, argv, nproc):
    return cli_capture.run(tmp_path, argv, nproc, env=dict(S2V_FAST_CACHE=tiny_cache))


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, files, tiny_cache):
    """Ulysses 2 with --seed -1 first (its seed is then used by the other runs)."""
    runs = {}
    d = tmp_path_factory.mktemp("ulysses2")
    runs["ulysses2"] = (d, *_run(d, tiny_cache, _cmd(files, d / "out.mp4", "--seed", "-1",
                                                     "--ulysses-degree", "2"), 2))
    seed = str(runs["ulysses2"][2][0]["seed"])
    for name, extra in [("cfg2", ["--cfg-parallel-size", "2"]),
                        ("tp2_vae2_offload", ["--tensor-parallel-size", "2",
                                              "--vae-patch-parallel-size", "2",
                                              "--enable-cpu-offload"])]:
        d = tmp_path_factory.mktemp(name)
        runs[name] = (d, *_run(d, tiny_cache, _cmd(files, d / "out.mp4", "--seed", seed, *extra), 2))
    d = tmp_path_factory.mktemp("single")
    runs["single"] = (d, *_run(d, tiny_cache, _cmd(files, d / "out.mp4", "--seed", seed), 1))
    return runs


@pytest.mark.parametrize("name", ["ulysses2", "cfg2", "tp2_vae2_offload"])
def test_torchrun_cli_matches_single_process(parallel_runs, name):
    from s2v_fast.media import probe_mp4

    d, proc, (r0, r1) = parallel_runs[name]
    sd, _, (single,) = parallel_runs["single"]
    # one MP4, written by rank 0 only; nothing left behind by rank 1
    assert sorted(p.name for p in d.iterdir() if "mp4" in p.name) == ["out.mp4"]
    assert r0["output_path"] == str(d / "out.mp4") and r1["output_path"] is None
    assert proc.stdout.count("Wrote ") == 1 and "Loading tiny" in proc.stderr
    assert probe_mp4(str(d / "out.mp4"))["video_frames"] == probe_mp4(str(sd / "out.mp4"))["video_frames"] == 13
    assert r0["world"] == r1["world"] == 2 and r0["precision"] == "reference"
    # both ranks ran the same clips with the same seed
    assert r0["seed"] == r1["seed"] == single["seed"]
    assert torch.equal(r0["video"], r1["video"])
    assert r0["video"].shape == single["video"].shape == (3, 13, 64, 64)
    err = (r0["video"] - single["video"]).abs().max().item()
    assert err <= TOL, f"{name}: max frame difference {err:.2e} > {TOL}"
    if name == "tp2_vae2_offload":
        assert r0["offload"] == "cpu" and "only saves GPU memory" in proc.stderr
