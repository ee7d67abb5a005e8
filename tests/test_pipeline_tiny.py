"""End-to-end runs of S2VPipeline with the built-in tiny model set (real loaders, CPU).

The tiny VAE is slow on a CPU for long clips (every clip after the first decodes 19 motion
latents = 73 extra frames), so most runs use a few frames per clip; the 80-frame counts
(77 / 157 / 237) are checked with a stand-in VAE and the real tiny DiT.
"""
import os

import numpy as np
import pytest

from s2v_fast.models.tiny import TINY_VERSION
import torch

from s2v_fast.errors import CheckpointError, InputError
from s2v_fast.pipeline import (
    GenerationInterrupted,
    PipelineCallback,
    S2VPipeline,
    frames_for_clips,
)

SR = 16000


# ------------------------------------------------------------------------------------------------
# shared helpers / fixtures (also imported by test_cli.py)


def write_wav(path, seconds, amplitude=0.3, seed=0):
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    wave = amplitude * np.sin(2 * np.pi * 220 * t) + amplitude * 0.2 * rng.standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), SR)
    return str(path)


def write_image(path, h=80, w=96, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def write_video(path, frames=24, h=64, w=64, fps=16):
    import av

    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, (i * 3) % w:(i * 3) % w + 8] = 255  # a moving white bar
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return str(path)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """S2V_FAST_CACHE for this session, holding the tiny checkpoint (built once)."""
    from s2v_fast.models.tiny import ensure_tiny_checkpoint

    root = tmp_path_factory.getbasetemp() / "s2v_cache"
    ensure_tiny_checkpoint(str(root / TINY_VERSION))
    return str(root)


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache):
    return os.path.join(tiny_cache, TINY_VERSION)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    return dict(
        image=write_image(d / "face.png"),
        audio3=write_audio_once(d / "a3.wav", 3.0),
        audio1=write_audio_once(d / "a1.wav", 1.0),
        pose=write_video(d / "pose.mp4"),
        dir=d,
    )


def write_audio_once(path, seconds):
    return write_wav(path, seconds)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return S2VPipeline.from_pretrained(tiny_dir, device="cpu")


SMALL = dict(max_area=64 * 64, num_inference_steps=2)


# ------------------------------------------------------------------------------------------------


def test_tiny_checkpoint_layout_and_reuse(tiny_dir):
    from s2v_fast.hub import check_model_dir, resolve_model
    from s2v_fast.models.tiny import ensure_tiny_checkpoint

    check_model_dir(tiny_dir)
    assert os.path.isfile(os.path.join(tiny_dir, "diffusion_pytorch_model.safetensors.index.json"))
    mtime = os.path.getmtime(os.path.join(tiny_dir, "Wan2.1_VAE.pth"))
    assert ensure_tiny_checkpoint(tiny_dir) == tiny_dir  # reused, not rewritten
    assert os.path.getmtime(os.path.join(tiny_dir, "Wan2.1_VAE.pth")) == mtime
    assert resolve_model(tiny_dir) == tiny_dir


def test_loads_through_real_loaders(pipe):
    from s2v_fast.models.dit import S2VTransformer
    from s2v_fast.models.vae import WanVAE

    assert isinstance(pipe.dit, S2VTransformer) and isinstance(pipe.vae, WanVAE)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    ctx, neg = pipe.encode_prompt("A person speaking naturally")
    assert ctx.shape[1] == pipe.dit.config.text_dim and neg.shape[0] > 0


def test_frame_counts_80_frames_per_clip(pipe, inputs):
    """77 / 157 / 237 frames for 1 / 2 / 3 clips of 80 frames (stand-in VAE, real tiny DiT)."""

    class FastVAE:
        def encode(self, v):
            return torch.zeros(v.shape[0], 16, 1 + (v.shape[2] - 1) // 4, v.shape[3] // 8, v.shape[4] // 8)

        def decode(self, z):
            return torch.zeros(z.shape[0], 3, 1 + 4 * (z.shape[2] - 1), z.shape[3] * 8, z.shape[4] * 8)

    fast = S2VPipeline(pipe.dit, FastVAE(), pipe.text_encoder, pipe.audio_encoder, device="cpu")
    feats = torch.randn(25, 520, pipe.dit.config.audio_dim)  # 10.4 s at 50 Hz -> 3 clips of 80
    counts = []

    class Count(PipelineCallback):
        def on_clip_end(self, r, info):
            counts.append(info["frames"])

    out = fast.generate(inputs["image"], None, audio_feats_50hz=feats, num_frames=80,
                        trim_to_audio=False, callbacks=[Count()], **SMALL)
    assert out.num_clips == 3
    assert list(np.cumsum(counts)) == [77, 157, 237] == [frames_for_clips(n, 80, True) for n in (1, 2, 3)]
    assert out.video.shape == (3, 237, 64, 64)
    out = fast.generate(inputs["image"], None, audio_feats_50hz=feats, num_frames=80, num_clips=2,
                        trim_to_audio=False, **SMALL)
    assert out.num_frames == 157


def test_one_clip_80_frames_trimmed_to_audio(pipe, inputs, tmp_path):
    from s2v_fast.media import probe_mp4

    out_path = str(tmp_path / "one.mp4")
    out = pipe.generate(inputs["image"], inputs["audio3"], num_frames=80, output=out_path,
                        return_video=True, **SMALL)
    assert out.num_clips == 1
    assert out.num_frames == 48  # 77 generated, trimmed to 3 s at 16 fps
    assert out.video.shape == (3, 48, 64, 64) and out.video.abs().max() <= 1
    info = probe_mp4(out_path)
    assert info["video_frames"] == 48 and (info["width"], info["height"]) == (64, 64)
    assert info["n_audio_streams"] == 1
    assert [f for f in os.listdir(tmp_path) if f != "one.mp4"] == []  # no temp files left


def test_no_trim_keeps_every_frame(pipe, inputs):
    out = pipe.generate(inputs["image"], inputs["audio1"], num_frames=32, trim_to_audio=False, **SMALL)
    assert out.num_frames == 29  # 1 s of audio -> 1 clip of 32 - 3 frames (> 16 audio frames)
    out = pipe.generate(inputs["image"], inputs["audio1"], num_frames=32, **SMALL)
    assert out.num_frames == 16


def test_same_seed_same_frames(pipe, inputs):
    kw = dict(num_frames=8, num_clips=1, **SMALL)
    a = pipe.generate(inputs["image"], inputs["audio1"], seed=7, **kw).video
    b = pipe.generate(inputs["image"], inputs["audio1"], seed=7, **kw).video
    c = pipe.generate(inputs["image"], inputs["audio1"], seed=8, **kw).video
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_init_first_frame_frame_rule(pipe, inputs):
    out = pipe.generate(inputs["image"], inputs["audio1"], num_frames=8, num_clips=1,
                        trim_to_audio=False, init_first_frame=True, **SMALL)
    assert out.num_frames == 8  # nothing dropped (default: 8 - 3 = 5)


def test_pose_video_is_used(pipe, inputs):
    seen = {}

    class Spy(PipelineCallback):
        def on_clip_start(self, r, info):
            seen[r] = info["cond"]

    kw = dict(num_frames=8, num_clips=1, seed=3, **SMALL)
    with_pose = pipe.generate(inputs["image"], inputs["audio1"], pose_video=inputs["pose"],
                              callbacks=[Spy()], **kw)
    assert seen[0] is not None and seen[0].shape == (1, 16, 2, 8, 8)
    plain = pipe.generate(inputs["image"], inputs["audio1"], **kw)
    assert not torch.equal(with_pose.video, plain.video)


def test_interrupt_keeps_finished_clips(pipe, inputs, tmp_path):
    from s2v_fast.media import probe_mp4

    class StopAtClip1(PipelineCallback):
        def on_clip_start(self, r, info):
            if r == 1:
                raise KeyboardInterrupt

    out_path = str(tmp_path / "partial.mp4")
    with pytest.raises(GenerationInterrupted) as ei:
        pipe.generate(inputs["image"], inputs["audio3"], num_frames=8, output=out_path,
                      callbacks=[StopAtClip1()], **SMALL)
    assert isinstance(ei.value, KeyboardInterrupt)
    assert ei.value.clips_done == 1 and ei.value.frames_written == 5
    assert probe_mp4(out_path)["video_frames"] == 5
    assert sorted(os.listdir(tmp_path)) == ["partial.mp4"]


def test_interrupt_before_first_clip_leaves_nothing(pipe, inputs, tmp_path):
    class StopNow(PipelineCallback):
        def on_step_end(self, r, i, info):
            raise KeyboardInterrupt

    out_path = str(tmp_path / "none.mp4")
    with pytest.raises(KeyboardInterrupt) as ei:
        pipe.generate(inputs["image"], inputs["audio1"], num_frames=8, output=out_path,
                      callbacks=[StopNow()], **SMALL)
    assert not isinstance(ei.value, GenerationInterrupted)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_raise_one_line_errors(pipe, inputs, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cases = [
        dict(image=str(tmp_path / "missing.png")),
        dict(image=str(bad)),
        dict(audio=str(tmp_path / "missing.wav")),
        dict(height=100, width=64),
        dict(num_frames=10),
        dict(output=str(tmp_path / "no_such_dir" / "o.mp4")),
    ]
    for case in cases:
        kw = dict(image=inputs["image"], audio=inputs["audio1"], **SMALL)
        kw.update(case)
        with pytest.raises(InputError) as ei:
            pipe.generate(kw.pop("image"), kw.pop("audio"), **kw)
        assert "\n" not in str(ei.value)


def test_hub_local_dir_missing_files(tmp_path):
    from s2v_fast.hub import resolve_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as ei:
        resolve_model(str(tmp_path))
    msg = str(ei.value)
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/", "Wan2.1_VAE.pth",
                 "wav2vec2-large-xlsr-53-english/", "hf download Wan-AI/Wan2.2-S2V-14B"):
        assert name in msg
    assert "\n" not in msg


def test_hub_download(monkeypatch, tiny_dir):
    import huggingface_hub

    from s2v_fast import hub

    calls = []

    def fake_ok(repo_id, allow_patterns=None, cache_dir=None, local_files_only=False):
        calls.append((repo_id, allow_patterns))
        return tiny_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_ok)
    assert hub.resolve_model("Wan-AI/Wan2.2-S2V-14B") == tiny_dir
    assert calls[0][0] == "Wan-AI/Wan2.2-S2V-14B" and "Wan2.1_VAE.pth" in calls[0][1]

    def fake_fail(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_fail)
    with pytest.raises(CheckpointError) as ei:
        hub.resolve_model("Wan-AI/Wan2.2-S2V-14B")
    assert "hf download Wan-AI/Wan2.2-S2V-14B --local-dir" in str(ei.value)
    assert "\n" not in str(ei.value)
    with pytest.raises(CheckpointError):
        hub.resolve_model("./not/a/dir/at/all")


@pytest.mark.parametrize("solver, latent_dtype", [("unipc", torch.bfloat16), ("dpm++", torch.float32)])
def test_bf16_dtype_map(tiny_dir, inputs, solver, latent_dtype):
    """Spec §4.13/§8: bf16 noise/audio/pose latents, fp32 ref/motion latents and velocities;
    UniPC keeps bf16 latents, DPM++ returns fp32 after its first step."""
    bf16 = S2VPipeline.from_pretrained(tiny_dir, device="cpu", dtype="bfloat16")
    seen = {}

    class Spy(PipelineCallback):
        def on_clip_start(self, r, info):
            seen.update(noise=info["noise"].dtype, audio=info["audio_input"].dtype,
                        cond=info["cond"].dtype, ref=info["ref_latents"].dtype,
                        motion=info["motion_latents"])  # clip 0 drops its motion: not computed

        def on_step_end(self, r, i, info):
            seen.update(latents=info["latents"].dtype, v=info["v_cond"].dtype)

    out = bf16.generate(inputs["image"], inputs["audio1"], num_frames=4, num_clips=1,
                        sample_solver=solver, pose_video=inputs["pose"], callbacks=[Spy()], **SMALL)
    assert seen == dict(noise=torch.bfloat16, audio=torch.bfloat16, cond=torch.bfloat16,
                        ref=torch.float32, motion=None, latents=latent_dtype, v=torch.float32)
    assert out.video.dtype == torch.float32 and torch.isfinite(out.video).all()
