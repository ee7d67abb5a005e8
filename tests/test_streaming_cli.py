"""``generate --mode liveavatar`` on the tiny model: the streaming mode end to end on the CPU
(LoRA merge, runner, streaming decode, live MP4), its flag checks and what an interrupt keeps."""
import math

import pytest
import torch

from s2v_fast import cli
from test_pipeline_tiny import tiny_cache, write_image, write_wav  # noqa: F401

AUDIO_S = 2.2  # > one 48-frame clip (1.92 s): two clips, trimmed to the audio


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_inputs")
    return dict(image=write_image(d / "face.png", h=96, w=64),
                audio=write_wav(d / "a.wav", AUDIO_S), dir=d)


def argv(inputs, out, *extra):
    return ["generate", "--model", "tiny", "--mode", "liveavatar", "--image", inputs["image"],
            "--audio", inputs["audio"], "--output", str(out), "--max-area", "64*64", "--quiet",
            *extra]


def test_liveavatar_cli_writes_the_stream(inputs, tmp_path, capsys, monkeypatch, tiny_cache):
    from s2v_fast.media import probe_mp4

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    out = tmp_path / "live.mp4"
    assert cli.main(argv(inputs, out, "--lora", "tiny")) == 0
    text = capsys.readouterr().out
    assert "first frame" in text and "frames/s" in text, text
    info = probe_mp4(str(out))
    # 2 clips give 48 * 2 - 3 = 93 frames; the audio (35,200 samples at 16 kHz) trims them to
    # the frames that start before it ends: ceil(35200 * 25 / 16000) = 55
    assert info["video_frames"] == math.ceil(round(AUDIO_S * 16000) * 25 / 16000) == 55
    assert info["fps"] == 25 and info["n_audio_streams"] == 1


@pytest.mark.parametrize("extra, needle", [
    (["--guidance-scale", "5"], "no classifier-free guidance"),
    (["--num-frames", "40"], "not a multiple of 12"),
    (["--sample-solver", "unipc"], "euler only"),
    (["--enable-cpu-offload"], "does not take --enable-cpu-offload"),
    (["--lora", "missing.safetensors"], "LoRA file not found"),
    (["--lora", "tiny:abc"], "scale"),
])
def test_liveavatar_flag_errors_are_one_line(extra, needle, inputs, tmp_path, capsys,
                                             monkeypatch, tiny_cache):
    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    out = tmp_path / "x.mp4"
    assert cli.main(argv(inputs, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err
    assert not out.exists()


def test_euler_needs_the_liveavatar_mode(capsys):
    assert cli.main(["generate", "--model", "tiny", "--image", "i.png", "--audio", "a.wav",
                     "--sample-solver", "euler"]) == 2
    assert "--mode liveavatar" in capsys.readouterr().err


def test_interrupt_keeps_the_blocks_written(inputs, tmp_path, monkeypatch, tiny_cache):
    """A Ctrl-C after the second block: the live MP4 holds both blocks (9 + 12 frames)."""
    from s2v_fast.media import probe_mp4
    from s2v_fast.pipeline import GenerationInterrupted, S2VPipeline
    from s2v_fast.streaming.generate import generate_streaming

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu", loras=["tiny:0.5"])

    class StopAfter:
        def on_block_end(self, block, info):
            if block.index == 1:
                raise KeyboardInterrupt

    out = tmp_path / "cut.mp4"
    with pytest.raises(GenerationInterrupted) as e:
        generate_streaming(pipe, inputs["image"], inputs["audio"], output=str(out),
                           max_area=64 * 64, callbacks=[StopAfter()])
    assert "after 2 of 8 blocks" in str(e.value)
    assert probe_mp4(str(out))["video_frames"] == 9 + 12


def test_streaming_api_video_matches_block_decode(inputs, monkeypatch, tiny_cache):
    """The returned video is the streaming decode of the runner's blocks (first block minus 3
    frames), and a LoRA changes it."""
    from s2v_fast.pipeline import S2VPipeline
    from s2v_fast.streaming.generate import generate_streaming

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    base = S2VPipeline.from_pretrained("tiny", device="cpu")
    a = generate_streaming(base, inputs["image"], inputs["audio"], max_area=64 * 64, num_clips=1,
                           trim_to_audio=False)
    assert a.video.shape[1] == 48 - 3 and a.first_frame_seconds > 0
    lora = S2VPipeline.from_pretrained("tiny", device="cpu", loras=["tiny"])
    b = generate_streaming(lora, inputs["image"], inputs["audio"], max_area=64 * 64, num_clips=1,
                           trim_to_audio=False)
    assert b.video.shape == a.video.shape
    assert not torch.allclose(a.video, b.video)


def test_mismatched_lora_fails_before_the_weights_load(inputs, tmp_path, capsys, monkeypatch,
                                                       tiny_cache):
    """Shapes are checked against a meta-device model of the checkpoint's config."""
    from safetensors.torch import save_file

    import s2v_fast.checkpoint as ckpt

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 999),
               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(128, 4)}, str(bad))

    def no_load(*a, **k):
        raise AssertionError("the DiT weights were read")

    monkeypatch.setattr(ckpt, "load_dit", no_load)
    assert cli.main(argv(inputs, tmp_path / "o.mp4", "--lora", str(bad))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "blocks.0.self_attn.q.lora_A.weight" in err, err


def test_step_pipeline_flags_need_torchrun_and_the_mode(inputs, tmp_path, capsys):
    assert cli.main(argv(inputs, tmp_path / "o.mp4", "--step-pipeline")) == 2
    assert "torchrun --nproc-per-node 4" in capsys.readouterr().err
    faithful = [a for a in argv(inputs, tmp_path / "o.mp4", "--decode-rank") if a not in
                ("--mode", "liveavatar")]
    assert cli.main(faithful) == 2
    assert "--mode liveavatar" in capsys.readouterr().err


def test_step_pipeline_cli_writes_the_single_process_video(inputs, tmp_path, tiny_cache):
    """torchrun with 4 gloo processes (rank i runs step i of every block; the last rank decodes
    and writes): the MP4's frames equal the single-process run's, bit for bit."""
    import os
    import subprocess
    import sys

    import av
    import numpy as np

    env = dict(os.environ, S2V_FAST_CACHE=tiny_cache, OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outs = {}
    for name, launch in [("pipe", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", "4", "-m", "s2v_fast"]),
                         ("single", [sys.executable, "-m", "s2v_fast"])]:
        out = tmp_path / f"{name}.mp4"
        extra = ["--step-pipeline"] if name == "pipe" else []
        r = subprocess.run([*launch, *argv(inputs, out, "--lora", "tiny", *extra)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        with av.open(str(out)) as c:
            outs[name] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert outs["pipe"].shape == outs["single"].shape == (55, 64, 64, 3)
    assert np.array_equal(outs["pipe"], outs["single"])
