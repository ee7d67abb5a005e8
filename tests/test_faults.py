"""Faults and hostile input (issue 30, items 2-4), through the real CLI in a subprocess
(``python -m s2v_fast generate --model tiny ...``):

* SIGTERM / SIGHUP / SIGINT stop a run like Ctrl-C: the finished clips are in a playable MP4
  under the requested name with the audio trimmed to them, one line says how many, the exit code
  is 128 + the signal, and nothing hidden is left in the directory;
* a partial file and a lock left by a SIGKILLed writer are removed by the next run for that
  output; a second run for an output being written refuses at start;
* every numeric flag is checked before the model loads (one line: flag, value, valid range);
* images under 64 px on a side, audio shorter than one 4-frame latent group and non-MP4 output
  names are refused before loading; a decompression-bomb-sized image warns once, in one line.

Only three runs load the tiny model (about a minute together on 2 CPU cores); every other case
fails before loading and takes the interpreter's start-up time (run two at a time).
"""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from s2v_fast import cli
from s2v_fast.pipeline import NUMERIC_SETTINGS, S2VPipeline, SignalInterrupt
from test_pipeline_tiny import tiny_cache, write_image, write_wav  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every numeric flag: bad values (the first one is also run through a subprocess; it is shown in
# the message as typed) and good boundary values. test_table_covers_every_numeric_flag checks
# that no numeric flag of `generate` / `profile` is missing here or in NUMERIC_SETTINGS.
BAD = {
    "--height": ["100", "0", "-64", "32"],
    "--width": ["96", "0", "-64"],
    "--max-area": ["4095", "0", "-5", "10x10"],
    "--num-frames": ["81", "0", "-4", "2"],
    "--num-clips": ["0", "-1"],
    "--fps": ["0", "-16"],
    "--num-inference-steps": ["0", "-1"],
    "--guidance-scale": ["-1", "nan", "inf", "-inf", "-0.5"],
    "--flow-shift": ["-1", "0", "nan", "inf", "-inf"],
    "--seed": ["-2", str(2**63), "-100"],
    "--ulysses-degree": ["0", "-1"],
    "--ring-degree": ["0"],
    "--tensor-parallel-size": ["0", "-2"],
    "--cfg-parallel-size": ["3", "0"],
    "--vae-patch-parallel-size": ["0"],
}
GOOD = {
    "--height": ["64", "832"], "--width": ["64", "448"], "--max-area": ["64*64", "480*832"],
    "--num-frames": ["4", "80"], "--num-clips": ["1"], "--fps": ["1", "16"],
    "--num-inference-steps": ["1"], "--guidance-scale": ["0", "1", "4.5"],
    "--flow-shift": ["0.01", "3"], "--seed": ["-1", "0", str(2**63 - 1)],
    "--ulysses-degree": ["1"], "--ring-degree": ["1"], "--tensor-parallel-size": ["1"],
    "--cfg-parallel-size": ["1"], "--vae-patch-parallel-size": ["1"],
}
RANGE = {flag: valid for _, flag, _, valid in NUMERIC_SETTINGS}
PAIRED = {"--height": "--width", "--width": "--height"}  # must come together


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("fault_inputs")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(d / "one.png")
    Image.new("RGB", (200, 63), (200, 100, 50)).save(d / "thin.png")
    Image.new("1", (9500, 9500)).save(d / "huge.png")  # 90.25 MP: over PIL's 89.5 MP warning limit
    return dict(image=write_image(d / "face.png"), audio=write_wav(d / "a.wav", 2.0),
                short=write_wav(d / "short.wav", 0.1), one=str(d / "one.png"),
                thin=str(d / "thin.png"), huge=str(d / "huge.png"), dir=d)


@pytest.fixture(scope="module")
def env(tiny_cache):
    return dict(os.environ, PYTHONPATH=REPO, S2V_FAST_CACHE=tiny_cache, PYTHONUNBUFFERED="1")


def argv(files, out, *extra, quiet=True):
    return ["generate", "--model", "tiny", "--device", "cpu", "--image", files["image"],
            "--audio", files["audio"], "--output", str(out), "--max-area", "64*64",
            "--num-frames", "8", "--num-inference-steps", "1", *(["--quiet"] if quiet else []),
            *extra]


def set_flag(a, flag, value):
    a = list(a)
    if flag in a:
        i = a.index(flag)
        del a[i:i + 2]
    return a + ([f"{flag}={value}"] if value.startswith("-") else [flag, value])  # "-inf" too


def run_cli(args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "s2v_fast", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(stderr):
    """The one error line; every other stderr line is a note (or argparse's usage)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    others = [ln for ln in lines if not ln.startswith(("error:", "note:", "usage:", " "))]
    assert not others, stderr
    return errors[0]


def listing(d):
    return sorted(os.listdir(d))


# ----------------------------------------------------------------------------- numeric flags
def numeric_flags(parser):
    """Option strings of every numeric flag (int / float / area types) of every subcommand."""
    import argparse

    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= numeric_flags(sub)
        elif action.type in (int, float, cli.parse_max_area):
            flags.add(max(action.option_strings, key=len))
    return flags


def test_table_covers_every_numeric_flag():
    flags = numeric_flags(cli.build_parser())
    assert "--flow-shift" in flags and "--seed" in flags and "--max-area" in flags
    assert flags == set(BAD) == set(GOOD) == set(RANGE)
    dests = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert {name for name, *_ in NUMERIC_SETTINGS} <= dests  # table names are the CLI dests


@pytest.mark.parametrize("flag, value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_bad_number_in_process(flag, value, files, tmp_path, capsys, monkeypatch):
    """Every bad value of every numeric flag: exit 2, one line naming flag and range, no load."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(S2VPipeline, "from_pretrained", no_load)
    a = set_flag(argv(files, tmp_path / "o.mp4"), flag, value)
    if flag in PAIRED:
        a = set_flag(a, PAIRED[flag], "64")
    try:
        code = cli.main(a)
    except SystemExit as e:  # argparse's own errors (--cfg-parallel-size has choices)
        code = e.code
    assert code == 2
    line = error_line(capsys.readouterr().err)
    assert flag in line
    if flag == "--cfg-parallel-size":  # argparse's choices: it names the value and the choices
        assert "invalid choice" in line and value in line
    else:
        assert line.endswith(f" is not {RANGE[flag]}"), line
    assert listing(tmp_path) == []


@pytest.mark.parametrize("flag", sorted(GOOD))
def test_good_numbers_pass(flag, files, tmp_path):
    for value in GOOD[flag]:
        a = set_flag(argv(files, tmp_path / "o.mp4"), flag, value)
        cli.check_numeric_flags(cli.build_parser().parse_args(a))


def test_guidance_below_one_is_no_cfg():
    """What the --guidance-scale range says: any value <= 1 runs the conditional branch only
    (the same as 1: no negative or weakened guidance)."""
    import torch

    from s2v_fast.denoiser import CFGDenoiser

    c = torch.zeros(4, 8)
    for g, branches in ((0.0, 1), (0.5, 1), (1.0, 1), (1.01, 2), (4.5, 2)):
        d = CFGDenoiser(object(), torch.float32, g, False, context=c, context_null=c,
                        ref_latents=None, motion_latents=None, cond=None,
                        audio_input=torch.zeros(1, 25, 4, 8), drop_motion=True)
        assert d.use_cfg == (g > 1) and len(d.branches) == branches
    assert "any value <= 1 turns classifier-free guidance off" in RANGE["--guidance-scale"]
    assert "-1 for a random seed" in RANGE["--seed"]


# ----------------------------------------------------------------------------- quick subprocess cases
def _quick_cases(files):
    """id -> argv (with OUT for the output path): cases that fail before the model loads."""
    cases = {}
    for flag, values in BAD.items():
        extra = [flag, values[0]] + ([PAIRED[flag], "64"] if flag in PAIRED else [])
        cases[f"number{flag}"] = extra
    cases["image_1x1"] = ["--image", files["one"]]
    cases["image_200x63"] = ["--image", files["thin"]]
    cases["audio_0.1s"] = ["--audio", files["short"]]
    cases["audio_0.3s_at_8fps"] = ["--audio", write_wav(files["dir"] / "a03.wav", 0.3), "--fps", "8"]
    for name in ("clip.gif", "clip.avi", "clip.mkv", "clip"):
        cases[f"output_{name}"] = ["--output", name]
    return cases


QUICK_EXPECT = {
    "image_1x1": "is 1x1 pixels; use one at least 64 pixels on each side",
    "image_200x63": "is 200x63 pixels; use one at least 64 pixels on each side",
    "audio_0.1s": "is 0.100 s long; it must cover at least one 4-frame latent group (0.25 s at 16 fps)",
    "audio_0.3s_at_8fps": "is 0.300 s long; it must cover at least one 4-frame latent group (0.50 s at 8 fps)",
    "output_clip.gif": "has extension '.gif'; the video is H.264 + AAC in an MP4 file: use a name "
                       "ending in .mp4 (or .m4v, .mov)",
    "output_clip.avi": "has extension '.avi'",
    "output_clip.mkv": "has extension '.mkv'",
    "output_clip": "has no extension",
}


@pytest.fixture(scope="module")
def quick_runs(files, env, tmp_path_factory):
    """Run every quick case as its own CLI process (two at a time), each in an empty output
    directory; id -> (CompletedProcess, output directory)."""
    cases = _quick_cases(files)

    def one(item):
        case, extra = item
        d = tmp_path_factory.mktemp("quick")
        a = argv(files, d / "o.mp4")
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag == "--output":
                value = str(d / value)
            a = set_flag(a, flag, value)
        return case, (run_cli(a, env), d)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, cases.items()))


@pytest.mark.parametrize("case", sorted(f"number{f}" for f in BAD))
def test_bad_number_subprocess(case, quick_runs):
    r, d = quick_runs[case]
    flag = case[len("number"):]
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    if flag == "--cfg-parallel-size":
        assert line.endswith("argument --cfg-parallel-size: invalid choice: 3 (choose from 1, 2)"), line
    else:
        assert line == f"error: {flag} {BAD[flag][0]} is not {RANGE[flag]}", line
        assert r.stderr.strip() == line  # checked right after argparse: before any other output
    assert listing(d) == []


@pytest.mark.parametrize("case", sorted(QUICK_EXPECT))
def test_bad_input_subprocess(case, quick_runs):
    r, d = quick_runs[case]
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert QUICK_EXPECT[case] in line, line
    assert "Loading" not in r.stderr  # refused before the model loads
    assert listing(d) == []  # no output under a wrong name, no lock, no partial


# ----------------------------------------------------------------------------- signals, locks
class Run:
    """A CLI run in the background; stderr lines are collected as they come."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "s2v_fast", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, what, timeout=240):
        t0 = time.monotonic()
        while not predicate():
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n" + self.stderr)
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n" + self.stderr)
            time.sleep(0.05)

    def wait_line(self, text, timeout=240):
        self.wait_for(lambda: any(text in ln for ln in self.lines), repr(text), timeout)

    def finish(self, timeout=120):
        self.proc.wait(timeout)
        self._reader.join(10)
        self.stdout = self.proc.stdout.read()
        return self.proc.returncode

    @property
    def stderr(self):
        return "\n".join(self.lines)


KILLED_WRITER = """
import sys, time, torch
from s2v_fast.video_writer import MP4Writer
w = MP4Writer(sys.argv[1], fps=16)
for r in range(3):  # three 3-second clips: the encoder's delay is well behind by the third
    w.write_frames(torch.rand(3, 48, 64, 64, generator=torch.Generator().manual_seed(r)) * 2 - 1)
print("written", flush=True)
time.sleep(600)
"""


def decodable_frames(path):
    import av

    n = 0
    with av.open(path) as c:
        try:
            for _ in c.decode(video=0):
                n += 1
        except av.error.InvalidDataError:  # the cut end of a partial file
            pass
    return n


def test_sigkill_leftovers_concurrent_run_and_sigterm(files, env, tmp_path):
    """A writer SIGKILLed mid-run leaves a hidden partial (playable: its first clips) and a lock
    file; the next run for that output removes both; a concurrent second run refuses at start;
    SIGTERM after clip 1 keeps clip 1 (audio trimmed), exit 143, nothing hidden left."""
    from s2v_fast.video_writer import lock_path, partial_path, probe_mp4

    out = tmp_path / "o.mp4"
    # 1. a writer killed with SIGKILL after three clips
    k = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, text=True)
    assert k.stdout.readline().strip() == "written"
    os.kill(k.pid, signal.SIGKILL)
    k.wait(30)
    stale = partial_path(out, k.pid)
    assert listing(tmp_path) == sorted([os.path.basename(stale), ".o.mp4.lock"])
    assert decodable_frames(stale) >= 48  # a fragmented partial plays up to its last fragment
    legacy = tmp_path / ".o.12345.partial.mp4"  # the naming of earlier versions
    legacy.write_bytes(b"\0" * 100)

    # 2. the next run for the output: removes the leftovers, holds the lock
    a = Run(argv(files, out, "--num-clips", "3"), env)
    a.wait_line("Loading tiny")
    assert any(ln.startswith("note: removed ") and os.path.basename(stale) in ln and legacy.name in ln
               for ln in a.lines), a.stderr
    assert listing(tmp_path) == [".o.mp4.lock"]
    assert open(lock_path(out)).read().strip() == str(a.proc.pid)

    # 3. a second run for the same output, meanwhile: refused at start, the first one untouched
    b = run_cli(argv(files, out), env)
    assert b.returncode == 2, b.stderr
    line = error_line(b.stderr)
    assert line == (f"error: '{out}' is being written by another s2v-fast run (pid {a.proc.pid}); "
                    f"wait for it to finish or choose another --output"), line
    assert "Loading" not in b.stderr
    assert os.path.exists(lock_path(out))

    # 4. SIGTERM once clip 1 is in the file (its partial appears with the first frames written)
    mine = partial_path(out, a.proc.pid)
    a.wait_for(lambda: os.path.exists(mine), "clip 1 written")
    os.kill(a.proc.pid, signal.SIGTERM)
    assert a.finish() == 128 + signal.SIGTERM == 143, a.stderr
    kept = [ln for ln in a.lines if ln.startswith("interrupted")]
    assert kept == [f"interrupted by SIGTERM after 1 of 3 clips; kept the 1 finished clip(s) "
                    f"(5 frames) in {out}"], a.stderr
    assert "Traceback" not in a.stderr and "error:" not in a.stderr
    assert listing(tmp_path) == ["o.mp4"]  # no partial, no lock, no legacy leftovers
    info = probe_mp4(str(out))
    assert info["video_frames"] == 5 and info["fps"] == 16.0 and decodable_frames(str(out)) == 5
    assert info["n_audio_streams"] == 1
    assert info["audio_duration"] == pytest.approx(5 / 16, abs=0.07)  # trimmed from 2 s


@pytest.mark.parametrize("sig, when", [("SIGHUP", "Generating 3 clip(s)"), ("SIGINT", "Loading tiny")])
def test_signal_before_first_clip_leaves_nothing(sig, when, files, env, tmp_path):
    """SIGHUP while clip 1 is sampled (and a huge image: one warning line, though the image is
    opened twice), SIGINT while the model loads: exit 128 + n, one line, an empty directory."""
    out = tmp_path / "o.mp4"
    extra = ["--num-clips", "3"] + (["--image", files["huge"]] if sig == "SIGHUP" else [])
    a = Run(argv(files, out, *extra, quiet=sig != "SIGHUP"), env)
    a.wait_line(when)
    os.kill(a.proc.pid, getattr(signal, sig))
    assert a.finish() == 128 + getattr(signal, sig), a.stderr
    lines = [ln.strip("\r") for ln in a.lines if ln.strip()]
    assert f"interrupted by {sig} before the first clip was finished; nothing was written" in lines, a.stderr
    assert "Traceback" not in a.stderr and "error:" not in a.stderr
    if sig == "SIGHUP":
        warn = [ln for ln in lines if ln.startswith("warning:")]
        assert len(warn) == 1 and "is 9500x9500 (90.2 megapixels), over PIL's decompression-bomb " \
                                  "limit" in warn[0], a.stderr
        assert "DecompressionBomb" not in a.stderr
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------- in-process units
def test_second_signal_is_ignored_while_saving():
    logged = []
    with pytest.raises(SignalInterrupt) as e:
        with cli.interrupt_signals(logged.append):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except SignalInterrupt:
                os.kill(os.getpid(), signal.SIGTERM)  # while "saving": ignored, one line
                time.sleep(0.05)
                raise
    assert e.value.signum == signal.SIGTERM and 128 + e.value.signum == 143
    assert len(logged) == 1 and "SIGTERM again: still saving the finished clips" in logged[0]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_nohup_keeps_sighup_ignored():
    prev = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with cli.interrupt_signals(lambda *a: None):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGHUP, prev)
