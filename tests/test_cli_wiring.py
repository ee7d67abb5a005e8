"""CLI / Python API wiring of precision, attention backend, offload, parallel flags and `profile`."""
import gzip
import json
import os

import pytest
import torch

from s2v_fast import cli
from s2v_fast.errors import InputError
from s2v_fast.pipeline import S2VPipeline
from test_pipeline_tiny import tiny_cache, tiny_dir, write_image, write_wav  # noqa: F401

NEW_FLAGS = ("--precision", "--attention-backend", "--enable-cpu-offload",
             "--enable-layerwise-offload", "--ulysses-degree", "--ring-degree",
             "--tensor-parallel-size", "--cfg-parallel-size", "--vae-patch-parallel-size",
             "--profile-dir")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wiring_inputs")
    return dict(image=write_image(d / "face.png"), audio=write_wav(d / "a.wav", 1.0))


def _args(files, out, *extra, command="generate"):
    return [command, "--model", "tiny", "--device", "cpu", "--image", files["image"],
            "--audio", files["audio"], "--output", str(out), "--max-area", "64*64",
            "--num-frames", "8", "--num-inference-steps", "2", "--quiet", *extra]


def _capture(monkeypatch):
    """Record what every S2VPipeline.generate call returns (frames forced on)."""
    seen = []
    real = S2VPipeline.generate

    def generate(self, *a, **k):
        k["return_video"] = True
        out = real(self, *a, **k)
        seen.append(dict(video=out.video, precision=self.precision, offload=self.offload_mode,
                         pipe=self))
        return out

    monkeypatch.setattr(S2VPipeline, "generate", generate)
    return seen


def _one_error_line(capsys, needle):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- flags and defaults
@pytest.mark.parametrize("command", ["generate", "profile"])
def test_every_subcommand_has_the_new_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in NEW_FLAGS:
        assert flag in text, (command, flag)


def test_defaults(monkeypatch):
    from s2v_fast.kernels.attention import BACKEND_CHOICES

    a = cli.build_parser().parse_args(["generate", "--image", "i", "--audio", "a"])
    assert (a.precision, a.attention_backend, a.enable_cpu_offload, a.enable_layerwise_offload,
            a.ulysses_degree, a.ring_degree, a.tensor_parallel_size, a.cfg_parallel_size,
            a.vae_patch_parallel_size, a.profile_dir) == (None, "auto", False, False, 1, 1, 1, 1, 1, None)
    monkeypatch.setenv("S2V_ATTENTION_BACKEND", "sdpa")
    a = cli.build_parser().parse_args(["generate", "--image", "i", "--audio", "a"])
    assert a.attention_backend == "sdpa"
    p = cli.build_parser()
    for name in BACKEND_CHOICES:
        assert p.parse_args(["generate", "--image", "i", "--audio", "a",
                             "--attention-backend", name]).attention_backend == name


def test_profile_defaults_and_required_dir(capsys):
    p = cli.build_parser()
    a = p.parse_args(["profile", "--image", "i", "--audio", "a", "--profile-dir", "d"])
    assert (a.num_inference_steps, a.num_clips, a.profile_dir, a.func) == (1, 1, "d", cli.cmd_generate)
    a = p.parse_args(["profile", "--image", "i", "--audio", "a", "--profile-dir", "d",
                      "--num-inference-steps", "3", "--num-clips", "2"])
    assert (a.num_inference_steps, a.num_clips) == (3, 2)
    g = p.parse_args(["generate", "--image", "i", "--audio", "a"])
    cli.apply_mode_defaults(g)
    assert (g.num_inference_steps, g.num_clips) == (40, None)  # generate keeps its own defaults
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "--image", "i", "--audio", "a"])
    assert e.value.code == 2 and "--profile-dir" in capsys.readouterr().err


def test_precision_rule():
    from s2v_fast.parallel import ParallelConfig
    from s2v_fast.runtime import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(None, cpu) == ("reference", None)
    assert resolve_precision(None, cuda) == ("fast", None)
    assert resolve_precision("fast", cpu) == ("fast", None)  # torch-math fallback on the CPU
    assert resolve_precision("reference", cuda) == ("reference", None)
    # the fast path runs layerwise-offloaded blocks through their hooks, and sequence parallel
    assert resolve_precision(None, cuda, offload="layerwise") == ("fast", None)
    assert resolve_precision(None, cuda, offload="cpu") == ("fast", None)
    assert resolve_precision(None, cuda, parallel=ParallelConfig(ulysses_degree=2)) == ("fast", None)
    even = ParallelConfig(ulysses_degree=2, shard_policy="even")  # shards not frame-aligned
    assert resolve_precision(None, cuda, parallel=even)[0] == "reference"
    with pytest.raises(InputError, match="--sp-shard-policy"):
        resolve_precision("fast", cuda, parallel=even)
    with pytest.raises(InputError, match="--tensor-parallel-size"):
        resolve_precision("fast", cuda, parallel=ParallelConfig(tensor_parallel_size=2))
    assert resolve_precision(None, cuda, parallel=ParallelConfig(tensor_parallel_size=2))[0] == "reference"
    assert resolve_precision(None, cuda, parallel=ParallelConfig(cfg_parallel_size=2)) == ("fast", None)
    with pytest.raises(InputError):
        resolve_precision("fp8", cpu)


def test_from_pretrained_precision(tiny_dir):
    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cpu", load_text_encoder=False,
                                       load_audio_encoder=False)
    assert pipe.precision == pipe.dit.precision == "reference"  # CPU default
    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cpu", precision="fast",
                                       load_text_encoder=False, load_audio_encoder=False)
    assert pipe.dit.precision == "fast"
    pipe.precision = "reference"
    assert pipe.dit.precision == "reference"
    with pytest.raises(InputError):
        pipe.precision = "turbo"


def test_cli_precision_reaches_the_model(files, tmp_path, monkeypatch, tiny_cache):
    """Default (reference on the CPU) in-process; --precision fast in a subprocess without
    TRITON_INTERPRET, i.e. what a CPU user gets: the fast path's torch fallbacks."""
    import cli_capture

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    seen = _capture(monkeypatch)
    assert cli.main(_args(files, tmp_path / "a.mp4")) == 0
    _, (fast,) = cli_capture.run(tmp_path, _args(files, tmp_path / "b.mp4", "--precision", "fast"),
                                 env=dict(S2V_FAST_CACHE=tiny_cache), drop_env=("TRITON_INTERPRET",))
    assert (seen[0]["precision"], fast["precision"]) == ("reference", "fast")
    # same math, a few float roundings apart (the fast path computes RoPE in fp32, not fp64)
    assert (seen[0]["video"] - fast["video"]).abs().max() < 1e-3


# ----------------------------------------------------------------------------- attention backend
def test_run_time_options_are_checked_once(files, tmp_path, monkeypatch, tiny_cache):
    """The CLI checks precision, attention, offload, quantisation, parallel and VAE flags once
    (runtime_options) and hands the result to from_pretrained, which does not check them again."""
    from s2v_fast import runtime

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    calls, kwargs = [], []
    real = runtime.runtime_options
    monkeypatch.setattr(runtime, "runtime_options", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_fp = S2VPipeline.from_pretrained.__func__

    def from_pretrained(cls, *a, **k):
        kwargs.append(k)
        return real_fp(cls, *a, **k)

    monkeypatch.setattr(S2VPipeline, "from_pretrained", classmethod(from_pretrained))
    assert cli.main(_args(files, tmp_path / "o.mp4", "--vae-precision", "fast")) == 0
    assert len(calls) == 1
    opts = kwargs[0]["runtime"]
    assert isinstance(opts, runtime.RuntimeOptions)
    assert (opts.precision, opts.vae_precision, opts.quantization) == ("reference", "fast", "none")


def test_bad_vae_precision_is_an_input_error(tiny_cache, monkeypatch):
    from s2v_fast.errors import InputError

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    with pytest.raises(InputError, match="^--vae-precision 'bf16': use reference or fast$"):
        S2VPipeline.from_pretrained("tiny", device="cpu", vae_precision="bf16")


def test_attention_backend_and_sites_reach_the_loaded_dit(files, tmp_path, monkeypatch, tiny_cache,
                                                          capsys):
    """--attention-backend and --attention-site travel to from_pretrained as one AttentionChoice
    and configure that pipeline's DiT (every site), which the run summary prints."""
    from s2v_fast.kernels import attention

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    loaded = []
    real = S2VPipeline.from_pretrained.__func__

    def from_pretrained(cls, *a, **k):
        loaded.append(real(cls, *a, **k))
        return loaded[-1]

    monkeypatch.setattr(S2VPipeline, "from_pretrained", classmethod(from_pretrained))
    assert cli.main(_args(files, tmp_path / "o.mp4", "--attention-backend", "sdpa",
                          "--attention-site", "text=triton", "--vae-precision", "fast")) == 0
    assert attention.configured_backends(loaded[0].dit_module) == dict(
        self="sdpa", text="triton", audio="sdpa", causal="sdpa")
    from s2v_fast.fast.vae import is_fast_vae

    assert is_fast_vae(loaded[0].vae)  # --vae-precision reaches from_pretrained
    assert "attention self=sdpa text=triton audio=sdpa causal=sdpa" in capsys.readouterr().err


@pytest.mark.parametrize("site, needle", [("text", "--attention-site 'text': use SITE=BACKEND"),
                                          ("cross=sdpa", "unknown site"),
                                          ("text=fp8", "does not serve the text site")])
def test_bad_attention_site_is_one_line(site, needle, files, tmp_path, capsys):
    assert cli.main(_args(files, tmp_path / "o.mp4", "--attention-site", site)) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("backend, needle", [("flash_attn", "flash-attn package"),
                                             ("cudnn", "needs a CUDA device")])
def test_unusable_attention_backend_is_one_line(backend, needle, files, tmp_path, capsys):
    from s2v_fast.kernels import attention

    if backend == "flash_attn" and "flash_attn" in attention.available_attention_backends():
        pytest.skip("flash-attn is installed")
    out = tmp_path / "o.mp4"
    assert cli.main(_args(files, out, "--attention-backend", backend)) == 2
    _one_error_line(capsys, needle)
    assert not out.exists()


# ----------------------------------------------------------------------------- offload
def test_offload_flags_are_exclusive(files, tmp_path, capsys):
    assert cli.main(_args(files, tmp_path / "o.mp4", "--enable-cpu-offload",
                          "--enable-layerwise-offload")) == 2
    _one_error_line(capsys, "exclusive")


@pytest.mark.parametrize("flag, mode", [("--enable-cpu-offload", "cpu"),
                                        ("--enable-layerwise-offload", "layerwise")])
def test_cli_offload_same_frames(flag, mode, files, tmp_path, capsys, monkeypatch, tiny_cache):
    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    seen = _capture(monkeypatch)
    assert cli.main(_args(files, tmp_path / "plain.mp4")) == 0
    assert cli.main(_args(files, tmp_path / "off.mp4", flag)) == 0
    assert "only saves GPU memory" in capsys.readouterr().err  # the one-line CPU note
    plain, off = seen
    assert plain["offload"] is None and off["offload"] == mode
    assert torch.equal(plain["video"], off["video"])
    pipe = off["pipe"]
    assert pipe.text_encoder is None and pipe.audio_encoder is None  # freed after their stage
    assert pipe.offloader.names == ["dit", "vae"] and pipe.offloader.on_device == set()


class _WhereAreModels:
    """Which offloaded components are on the device during each stage."""

    def __init__(self, pipe):
        self.pipe, self.steps, self.clip_ends = pipe, set(), set()

    def on_step_end(self, clip, step, info):
        self.steps |= {frozenset(self.pipe.offloader.on_device)}

    def on_clip_end(self, clip, info):
        self.clip_ends |= {frozenset(self.pipe.offloader.on_device)}


@pytest.mark.parametrize("mode", ["cpu", "layerwise"])
def test_api_offload_same_output_and_stages_move_models(mode, tiny_dir, files):
    kw = dict(max_area=64 * 64, num_frames=8, num_inference_steps=2, seed=3)
    ref = S2VPipeline.from_pretrained(tiny_dir, device="cpu").generate(files["image"], files["audio"], **kw)
    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cpu", offload=mode)
    assert pipe.offload_mode == mode
    assert sorted(pipe.offloader.names) == ["audio_encoder", "dit", "text_encoder", "vae"]
    if mode == "layerwise":
        lw = pipe.dit._s2v_layerwise
        assert all(p.numel() == 0 for p in pipe.dit.blocks.parameters())  # blocks in host buffers
    where = _WhereAreModels(pipe)
    out = pipe.generate(files["image"], files["audio"], callbacks=[where], **kw)
    assert torch.equal(out.video, ref.video)
    assert where.steps == {frozenset({"dit"})}  # denoising: only the DiT on the device
    assert where.clip_ends == {frozenset({"vae"})}  # after decode / motion encode: only the VAE
    assert pipe.offloader.on_device == set()  # nothing left on the device after generate
    if mode == "layerwise":
        assert lw.stats["misses"] >= 1 and lw.stats["hits"] > 0
    # encoders are kept (free_encoders=False): a second generation gives the same video
    again = pipe.generate(files["image"], files["audio"], **kw)
    assert torch.equal(again.video, ref.video)


def test_api_free_encoders(tiny_dir, files):
    from s2v_fast.errors import S2VError

    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cpu", offload="cpu", free_encoders=True)
    pipe.generate(files["image"], files["audio"], max_area=64 * 64, num_frames=8,
                  num_inference_steps=1, num_clips=1)
    assert pipe.text_encoder is None and pipe.audio_encoder is None
    with pytest.raises(S2VError, match="freed after its first use"):
        pipe.generate(files["image"], files["audio"], max_area=64 * 64, num_frames=8,
                      num_inference_steps=1, num_clips=1)


# ----------------------------------------------------------------------------- parallel flags
def test_parallel_flags_without_torchrun(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(_args(files, tmp_path / "o.mp4", "--ulysses-degree", "2")) == 2
    _one_error_line(capsys, "torchrun --nproc-per-node 2")


def test_parallel_checks_heads_before_loading_weights(files, tmp_path, capsys, monkeypatch, tiny_cache):
    """tiny DiT has 2 heads: ulysses 4 cannot split them; no weights are read, no process group."""
    import torch.distributed as dist

    from s2v_fast.models.dit import S2VTransformer

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    monkeypatch.setenv("WORLD_SIZE", "4")

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the parallel layout was checked")

    monkeypatch.setattr(S2VTransformer, "from_pretrained", no_load)
    assert cli.main(_args(files, tmp_path / "o.mp4", "--ulysses-degree", "4")) == 2
    _one_error_line(capsys, "--ulysses-degree=4 must divide the 2 attention heads")
    assert not dist.is_initialized()


def test_cfg_parallel_needs_guidance(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(_args(files, tmp_path / "o.mp4", "--cfg-parallel-size", "2",
                          "--guidance-scale", "1")) == 2
    _one_error_line(capsys, "--cfg-parallel-size 2 needs classifier-free guidance")


def test_torchrun_world_without_degrees(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(_args(files, tmp_path / "o.mp4")) == 2
    _one_error_line(capsys, "world size is 2")


def test_fast_precision_with_tensor_parallel_is_refused(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(_args(files, tmp_path / "o.mp4", "--precision", "fast",
                          "--tensor-parallel-size", "2")) == 2
    _one_error_line(capsys, "--tensor-parallel-size")


# ----------------------------------------------------------------------------- profile
def test_profile_subcommand(files, tmp_path, capsys, monkeypatch, tiny_cache):
    from openpyxl import load_workbook

    monkeypatch.setenv("S2V_FAST_CACHE", tiny_cache)
    d = tmp_path / "prof"
    a = _args(files, tmp_path / "p.mp4", "--profile-dir", str(d), command="profile")
    i = a.index("--num-inference-steps")
    del a[i:i + 2]  # profile's own default: 1 step (and 1 clip)
    assert cli.main(a) == 0
    out = capsys.readouterr().out
    assert "clips          1" in out and "(1 steps" in out
    with gzip.open(d / "trace_rank0.json.gz", "rt") as f:
        trace = json.load(f)
    assert trace["traceEvents"]
    assert "ops_rank0.xlsx" in out
    wb = load_workbook(d / "ops_rank0.xlsx")
    assert {"summary", "stages", "kernels"} <= set(wb.sheetnames)
    assert os.path.isfile(tmp_path / "p.mp4")
    # the effective options of the run: printed with the summary, kept in the info sheet
    assert "run options: mode=faithful precision=reference attention=self=auto," in out
    info = {r[0]: r[1] for r in wb["info"].iter_rows(values_only=True)}
    assert info["run.precision"] == "reference" and info["run.quantization"] == "none"
    assert info["run.attention"].startswith("self=auto,text=auto")


# ----------------------------------------------------------------------------- quantization
def test_quantization_fp8_runs_end_to_end(files, tmp_path, monkeypatch):
    """--quantization fp8 swaps the DiT's large linears for FP8 ones (CPU: the exact e4m3
    emulation) and still writes a video; it differs from the exact run only by fp8 error."""
    from s2v_fast.quantization import FP8Linear

    seen = _capture(monkeypatch)
    out = tmp_path / "q.mp4"
    assert cli.main(_args(files, out, "--quantization", "fp8")) == 0 and out.exists()
    blk = seen[-1]["pipe"].dit_module.blocks[0]
    assert isinstance(blk.self_attn.q, FP8Linear) and isinstance(blk.ffn[0], FP8Linear)
    assert cli.main(_args(files, tmp_path / "b.mp4")) == 0
    q, b = (torch.as_tensor(s["video"]).float() for s in seen[-2:])
    rel = ((q - b).norm() / b.norm()).item()
    assert 0 < rel < 0.2, rel  # changed (fp8 is lossy) but the same video


def test_quantization_with_offload_is_refused(files, tmp_path, capsys):
    assert cli.main(_args(files, tmp_path / "o.mp4", "--quantization", "fp8",
                          "--enable-cpu-offload")) == 2
    _one_error_line(capsys, "--quantization fp8")
