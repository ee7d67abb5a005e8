"""`s2v-fast generate`: flags, tiny end-to-end run, one-line errors with exit code 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from s2v_fast import cli
from test_pipeline_tiny import tiny_cache, write_image, write_video, write_wav  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import soundfile as sf

    d = tmp_path_factory.mktemp("cli_inputs")
    bad_img = d / "bad.png"
    bad_img.write_bytes(b"\x89PNG but not really")
    bad_audio = d / "bad.wav"
    bad_audio.write_bytes(os.urandom(2048))
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    return dict(image=write_image(d / "face.png"), audio=write_wav(d / "a.wav", 1.0),
                pose=write_video(d / "pose.mp4", frames=8), bad_img=str(bad_img),
                bad_audio=str(bad_audio), silent=str(d / "silent.wav"), empty=str(d / "empty.wav"),
                dir=d)


def args(files, out, *extra):
    return ["generate", "--model", "tiny", "--image", files["image"], "--audio", files["audio"],
            "--output", str(out), "--max-area", "64*64", "--num-frames", "8",
            "--num-inference-steps", "2", "--quiet", *extra]


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--image", "--audio", "--prompt", "--negative-prompt", "--height", "--width",
                 "--max-area", "--num-frames", "--num-inference-steps", "--guidance-scale",
                 "--flow-shift", "--sample-solver", "--seed", "--fps", "--init-first-frame",
                 "--pose-video", "--num-clips", "--output", "--no-trim-to-audio", "--vae-use-slicing",
                 "--vae-use-tiling", "--device", "--dtype", "--debug"):
        assert flag in text, flag
    assert cli.main([]) == 2


def test_parse_max_area():
    assert cli.parse_max_area("480*832") == 399360
    assert cli.parse_max_area("720x1280") == 921600
    assert cli.parse_max_area("4096") == 4096


def test_generate_defaults_match_spec():
    p = cli.build_parser()
    a = p.parse_args(["generate", "--image", "i.png", "--audio", "a.wav"])
    cli.apply_mode_defaults(a)
    assert (a.model, a.prompt, a.num_frames, a.num_inference_steps, a.guidance_scale, a.flow_shift,
            a.sample_solver, a.seed, a.fps, a.output, a.trim_to_audio) == (
        "Wan-AI/Wan2.2-S2V-14B", "A person speaking naturally", 80, 40, 4.5, 3.0, "unipc", 42, 16,
        "s2v_output.mp4", True)
    assert a.max_area == 480 * 832 and a.lora_specs == [] and a.mode == "faithful"
    la = p.parse_args(["generate", "--image", "i.png", "--audio", "a.wav", "--mode", "liveavatar"])
    cli.apply_mode_defaults(la)
    assert (la.num_frames, la.num_inference_steps, la.guidance_scale, la.sample_solver, la.fps,
            la.max_area, la.sink) == (48, 4, 0.0, "euler", 25, 704 * 384, "realtime")
    assert [(s.source, s.scale) for s in la.lora_specs] == [("Quark-Vision/Live-Avatar", 0.5)]


@pytest.mark.parametrize("case, needle", [
    ("missing_image", "does not exist"),
    ("bad_image", "cannot decode reference image"),
    ("missing_audio", "audio file not found"),
    ("bad_audio", "cannot decode audio"),
    ("empty_audio", "audio file"),
    ("silent_audio", "silent"),
    ("missing_pose", "pose video"),
    ("height_not_64", "not a positive multiple of 64"),
    ("frames_not_4", "multiple of 4"),
    ("bad_output_dir", "does not exist"),
    ("incomplete_model_dir", "missing"),
])
def test_bad_input_one_line_exit_2(case, needle, files, tmp_path, capsys, monkeypatch, tiny_cache):
    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    out = tmp_path / "o.mp4"
    a = args(files, out)

    def setflag(flag, value):
        a[a.index(flag) + 1] = value

    if case == "missing_image":
        setflag("--image", str(tmp_path / "nope.png"))
    elif case == "bad_image":
        setflag("--image", files["bad_img"])
    elif case == "missing_audio":
        setflag("--audio", str(tmp_path / "nope.wav"))
    elif case == "bad_audio":
        setflag("--audio", files["bad_audio"])
    elif case == "empty_audio":
        setflag("--audio", files["empty"])
    elif case == "silent_audio":
        setflag("--audio", files["silent"])
    elif case == "missing_pose":
        a += ["--pose-video", str(tmp_path / "nope.mp4")]
    elif case == "height_not_64":
        a += ["--height", "100", "--width", "64"]
    elif case == "frames_not_4":
        setflag("--num-frames", "10")
    elif case == "bad_output_dir":
        setflag("--output", str(tmp_path / "no" / "o.mp4"))
    elif case == "incomplete_model_dir":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text("{}")
        setflag("--model", str(tmp_path / "ckpt"))
    assert cli.main(a) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_debug_shows_traceback(files, tmp_path, capsys):
    a = args(files, tmp_path / "o.mp4", "--debug")
    a[a.index("--image") + 1] = str(tmp_path / "nope.png")
    assert cli.main(a) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cuda_oom_is_explained(files, tmp_path, capsys, monkeypatch, tiny_cache):
    from s2v_fast.pipeline import S2VPipeline

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)

    def oom(self, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(S2VPipeline, "generate", oom)
    assert cli.main(args(files, tmp_path / "o.mp4")) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "--vae-use-tiling" in err and "--max-area" in err
    assert "Traceback" not in err


def test_ctrl_c_keeps_finished_clips(files, tmp_path, capsys, monkeypatch, tiny_cache):
    from s2v_fast.media import probe_mp4
    from s2v_fast.pipeline import S2VPipeline

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    real = S2VPipeline.generate

    class Stop:
        def on_clip_start(self, r, info):
            if r == 1:
                raise KeyboardInterrupt

    def gen(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [Stop()]
        return real(self, *a, **k)

    monkeypatch.setattr(S2VPipeline, "generate", gen)
    out = tmp_path / "o.mp4"
    assert cli.main(args(files, out, "--no-trim-to-audio")) == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 of" in err and str(out) in err
    assert probe_mp4(str(out))["video_frames"] == 5


def test_cli_tiny_end_to_end_subprocess(files, tmp_path, tiny_cache):
    out = tmp_path / "tiny.mp4"
    env = dict(os.environ, S2V_FAST_CACHE=tiny_cache)
    a = args(files, out, "--pose-video", files["pose"], "--sample-solver", "dpm++", "--num-clips", "1")
    a[a.index("--num-frames") + 1] = "16"
    cmd = [sys.executable, "-m", "s2v_fast", *a]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "noise" in r.stderr  # the tiny model says plainly what it is
    assert f"Wrote {out}" in r.stdout and "clips          1" in r.stdout
    from s2v_fast.media import probe_mp4

    info = probe_mp4(str(out))
    assert info["video_frames"] == 13 and (info["width"], info["height"]) == (64, 64)


def test_cli_error_subprocess_no_traceback(files, tmp_path):
    a = args(files, tmp_path / "o.mp4")
    a[a.index("--num-frames") + 1] = "81"
    r = subprocess.run([sys.executable, "-m", "s2v_fast", *a], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --num-frames 81")
    assert "Traceback" not in r.stderr
