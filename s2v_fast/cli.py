"""Command line: ``s2v-fast generate`` and ``s2v-fast profile`` (also ``python -m s2v_fast``).

All generate flags are added by :func:`add_generate_args`, so every subcommand that runs a
generation shares them (model, inputs, sampling, precision / attention backend, offload,
multi-GPU degrees, profiling). Under ``torchrun`` every rank runs the same command; rank 0 prints
and writes the MP4. Errors a user can fix print one line and exit with code 2 (``--debug`` shows
the traceback): every numeric flag is checked against ``NUMERIC_SETTINGS`` (pipeline/settings.py) right after
argparse, the inputs and the output name before any model is loaded. Ctrl-C, SIGTERM and SIGHUP
stop the run the same way: the finished clips are kept in a playable MP4 under the requested name
(audio trimmed to them), one line says how many, and the exit code is 128 + the signal (130, 143,
129). One run per output at a time: a second one for the same ``--output`` refuses at start.
Other failures exit with 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings

from .errors import InputError, S2VError
from .options import env_options

DEFAULT_MODEL = "Wan-AI/Wan2.2-S2V-14B"
DEFAULT_PROMPT = "A person speaking naturally"
DEFAULT_MAX_AREA = "480*832"
DEFAULT_OUTPUT = "s2v_output.mp4"
TINY_MAX_AREA = "128*128"  # --model tiny without --max-area: small frames so a CPU run is quick
LIVEAVATAR_LORA = "Quark-Vision/Live-Avatar:0.5"  # --mode liveavatar's default --lora

# Per-mode defaults of the flags whose default depends on --mode (None in the parser).
MODE_DEFAULTS = {
    "faithful": dict(num_frames=80, fps=16, num_inference_steps=40, guidance_scale=4.5,
                     sample_solver="unipc", max_area=DEFAULT_MAX_AREA),
    "liveavatar": dict(num_frames=48, fps=25, num_inference_steps=4, guidance_scale=0.0,
                       sample_solver="euler", max_area="704*384"),
}

TINY_NOTE = ("note: --model tiny uses small random weights: the video is noise. It exists to try "
             "the pipeline end to end (inputs, clip loop, MP4 output) without downloading 14B weights.")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130  # 130 = 128 + SIGINT
INTERRUPT_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # each exits with 128 + its number


# ------------------------------------------------------------------------------------------------
# argument parsing


def parse_max_area(value: str) -> int:
    """'480*832', '480x832' or '399360' -> pixel area (its range is checked with the other
    numeric flags, :func:`check_numeric_flags`)."""
    v = str(value).strip().lower().replace("x", "*")
    try:
        if "*" in v:
            a, b = v.split("*")
            a, b = int(a), int(b)
            if a <= 0 or b <= 0:
                raise ValueError
            area = a * b
        else:
            area = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an area; use e.g. 480*832 or 399360") from None
    return area


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line message (argparse's default is also 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def add_generate_args(p: argparse.ArgumentParser, profile: bool = False) -> None:
    """Every flag of ``generate``; reused by other subcommands that run a generation
    (``profile=True``: ``--profile-dir`` is required)."""
    from .kernels.attention import BACKEND_CHOICES
    from .parallel.config import add_parallel_args
    from .profiling.session import add_profiling_arguments
    from .runtime import default_attention_backend

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, Hugging Face repo id, or 'tiny' (built-in random "
                        f"weights for trying the pipeline; produces noise) (default: {DEFAULT_MODEL})")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: auto = cuda if available)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="DiT/latent precision (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--precision", choices=["fast", "reference"], default=None,
                   help="DiT path: fast (fused Triton kernels, per-clip caches) or reference "
                        "(the official op order) (default: fast on CUDA, reference on CPU)")
    g.add_argument("--quantization", choices=["none", "fp8"], default="none",
                   help="fp8: FP8 e4m3 GEMMs for the DiT's attention/FFN/audio linears (per-token "
                        "activation and per-channel weight scales) and, on CUDA with "
                        "--attention-backend auto, FP8 self-attention; opt-in, changes numerics: see "
                        "README (default: none, the exact bf16 path)")
    g.add_argument("--attention-backend", choices=BACKEND_CHOICES, default=default_attention_backend(),
                   help="attention kernels of every site; auto times the available ones per shape "
                        "on CUDA; fp8 serves the self-attention sites and leaves the text and "
                        "audio cross-attention to auto (default: $S2V_ATTENTION_BACKEND or auto)")
    g.add_argument("--attention-site", action="append", default=None, metavar="SITE=BACKEND",
                   help="one site's backend instead of --attention-backend's; sites: self "
                        "(self-attention), text (prompt cross-attention), audio (audio "
                        "injectors), causal (the liveavatar mode's block-causal attention); "
                        "repeatable, e.g. --attention-site self=fp8 (default: none)")
    g.add_argument("--mode", choices=list(MODE_DEFAULTS), default="faithful",
                   help="faithful: Wan2.2-S2V's 40-step CFG sampler over 80-frame clips; "
                        "liveavatar: LiveAvatar's 4-step streaming mode (block-causal attention "
                        "over KV caches, no CFG, 25 fps, 48-frame clips in blocks of 12 frames, "
                        "video written block by block) (default: faithful)")
    g.add_argument("--lora", action="append", default=None, metavar="PATH_OR_HF_ID[:SCALE]",
                   help="merge a LoRA (.safetensors: PEFT, Wan/lightx2v or kohya keys) into the "
                        "DiT before quantisation; repeatable; 'none' for no LoRA (default: none; "
                        f"{LIVEAVATAR_LORA} with --mode liveavatar and a real model)")

    g = p.add_argument_group("inputs")
    g.add_argument("--image", required=True, help="reference image (PNG/JPEG)")
    g.add_argument("--audio", required=True, help="driving speech/music audio (wav, mp3, flac, ...)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: the Wan2.2-S2V negative prompt)")
    g.add_argument("--pose-video", default=None, help="optional pose video (rendered DWPose) driving the motion")
    g.add_argument("--init-first-frame", action="store_true",
                   help="start the video from the reference image (no frames dropped from clip 1)")

    g = p.add_argument_group("size and length")
    g.add_argument("--height", type=int, default=None, help="frame height, a multiple of 64 (default: from the image and --max-area)")
    g.add_argument("--width", type=int, default=None, help="frame width, a multiple of 64 (default: from the image and --max-area)")
    g.add_argument("--max-area", type=parse_max_area, default=None,
                   help=f"largest H*W when the size follows the image, e.g. 480*832 or 720*1280 "
                        f"(default: {DEFAULT_MAX_AREA}; {TINY_MAX_AREA} with --model tiny)")
    g.add_argument("--num-frames", type=int, default=None,
                   help="frames per clip, a multiple of 4 (default: 80; liveavatar: 48, a "
                        "multiple of 12)")
    g.add_argument("--num-clips", type=int, default=None,
                   help="at most this many clips (default: as many as the audio needs, about one per 5 s)")
    g.add_argument("--fps", type=int, default=None,
                   help="output frame rate (default: the mode's rate, 16; liveavatar: 25)")
    g.add_argument("--no-trim-to-audio", dest="trim_to_audio", action="store_false",
                   help="keep every generated frame instead of cutting the video at the end of the audio")

    g = p.add_argument_group("sampling")
    g.add_argument("--num-inference-steps", type=int, default=None,
                   help="denoising steps per clip (default: 40; liveavatar: 4, the distilled "
                        "LoRA's schedule)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance over text+audio, >= 0; any value <= 1 disables it "
                        "(one conditional pass per step) (default: 4.5; liveavatar: none)")
    g.add_argument("--flow-shift", type=float, default=3.0,
                   help="flow-matching schedule shift, > 0 (default: 3.0)")
    g.add_argument("--sample-solver", choices=["unipc", "dpm++", "euler"], default=None,
                   help="sampler (default: unipc; liveavatar: euler, its only sampler)")
    g.add_argument("--step-pipeline", action="store_true",
                   help="liveavatar only, under torchrun: rank i runs denoising step i of every "
                        "block and hands the latents on (LiveAvatar's timestep-forcing pipeline); "
                        "needs --nproc-per-node = the steps (4), +1 with --decode-rank")
    g.add_argument("--decode-rank", action="store_true",
                   help="with --step-pipeline: one more rank that only decodes and writes the MP4")
    g.add_argument("--sink", choices=["realtime", "offline"], default="realtime",
                   help="liveavatar only: realtime = upstream's real-time path (reference latent "
                        "from a 1-frame encode, replaced by the first generated latent from clip 2 "
                        "on); offline = upstream's single-GPU path (second latent of a 5-frame "
                        "encode, never replaced) (default: realtime)")
    g.add_argument("--seed", type=int, default=42,
                   help="random seed, 0 to 2**63-1; -1 picks a random one (printed) (default: 42)")

    g = p.add_argument_group("memory")
    g.add_argument("--vae-use-slicing", action="store_true", help="decode the VAE batch one sample at a time")
    g.add_argument("--vae-use-tiling", action="store_true", help="VAE encode/decode in spatial tiles (less memory)")
    g.add_argument("--vae-precision", choices=["reference", "fast"], default="reference",
                   help="VAE path: reference (fp32) or fast (bf16 convolutions, fp32 norms and "
                        "heads, channels-last, preallocated causal caches; changes numerics: "
                        "PSNR >= 40 dB against fp32) (default: reference)")
    g.add_argument("--enable-cpu-offload", action="store_true",
                   help="keep every model in pinned host memory and on the GPU only during its "
                        "stage; the encoders are freed after use")
    g.add_argument("--enable-layerwise-offload", action="store_true",
                   help="as --enable-cpu-offload, and stream the DiT blocks from host memory one "
                        "at a time (lowest GPU memory)")

    add_parallel_args(p)
    add_profiling_arguments(p, require_dir=profile)

    g = p.add_argument_group("output")
    g.add_argument("--output", default=DEFAULT_OUTPUT,
                   help=f"MP4 file to write: .mp4, .m4v or .mov (default: {DEFAULT_OUTPUT})")
    g.add_argument("--debug", action="store_true", help="show full tracebacks")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


PROFILE_DEFAULTS = {"num_inference_steps": 1, "num_clips": 1}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="s2v-fast", description="Fast Wan2.2 Speech-to-Video (S2V-14B) inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    gen = sub.add_parser(
        "generate", help="generate a talking video from an image and audio",
        description="Generate a video from a reference image and audio, clip by clip, into an MP4.")
    add_generate_args(gen)
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser(
        "profile", help="profile a short generation (1 step, 1 clip) into --profile-dir",
        description="generate --profile-dir DIR with short defaults (--num-inference-steps 1, "
                    "--num-clips 1): writes trace_rank{r}.json.gz, ops_rank{r}.xlsx, ... to DIR. "
                    "Takes every generate flag.")
    add_generate_args(prof, profile=True)
    for action in prof._actions:  # say the profile defaults in --help
        if action.dest in PROFILE_DEFAULTS:
            action.default = PROFILE_DEFAULTS[action.dest]
            action.help = (action.help or "").split(" (default")[0] + \
                f" (default here: {PROFILE_DEFAULTS[action.dest]})"
    prof.set_defaults(func=cmd_generate)
    return parser


# ------------------------------------------------------------------------------------------------
# progress and summary


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def writes_output(args) -> bool:
    """The rank that writes the MP4 (and prints the summary): rank 0, or with --step-pipeline
    the last rank (the last DiT rank, or the decode rank), which has the final latents."""
    if getattr(args, "step_pipeline", False):
        return int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
    return is_rank_zero()


class ProgressDisplay:
    """One tqdm bar over all denoising steps of all clips (with ETA); rank 0 only."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled and is_rank_zero()
        self.stream = stream or sys.stderr
        self.bar = None
        self.num_clips = 0

    def on_start(self, info):
        if not self.enabled:
            return
        from tqdm import tqdm

        self.num_clips = info["num_clips"]
        print(f"Generating {info['num_clips']} clip(s) at {info['width']}x{info['height']} (W x H), "
              f"{info['total_frames']} frames, {info['num_inference_steps']} steps per clip, "
              f"seed {info['seed']}", file=self.stream, flush=True)
        self.bar = tqdm(total=info["num_clips"] * info["num_inference_steps"], unit="step",
                        file=self.stream, dynamic_ncols=True, desc="clip 1/%d" % info["num_clips"])

    def on_clip_start(self, clip, info):
        if self.bar is not None:
            self.bar.set_description(f"clip {clip + 1}/{self.num_clips}")

    def on_step_end(self, clip, step, info):
        if self.bar is not None:
            self.bar.update(1)

    def on_clip_end(self, clip, info):
        if self.bar is not None:
            self.bar.set_postfix_str(f"{clip + 1} clip(s) done")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_end = lambda self, out: self.close()  # noqa: E731


class StreamingProgress:
    """A tqdm bar over the blocks of the streaming mode, with frames/s and time to first frame."""

    def __init__(self, enabled: bool = True, stream=None, any_rank: bool = False):
        self.enabled = enabled and (any_rank or is_rank_zero())
        self.stream = stream or sys.stderr
        self.bar = None

    def on_start(self, info):
        if not self.enabled:
            return
        from tqdm import tqdm

        print(f"Streaming {info['num_clips']} clip(s) ({info['num_blocks']} blocks) at "
              f"{info['width']}x{info['height']} (W x H), {info['steps']} steps per block, "
              f"{info['fps']} fps, seed {info['seed']}", file=self.stream, flush=True)
        self.bar = tqdm(total=info["num_blocks"], unit="block", file=self.stream,
                        dynamic_ncols=True)

    def on_block_end(self, block, info):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{info['frames_per_second']:.1f} frames/s, first frame "
                                     f"{info['first_frame_seconds']:.2f} s")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_end = lambda self, out: self.close()  # noqa: E731


def format_summary(out, model: str) -> str:
    secs = out.num_frames / out.fps if out.fps else 0.0
    lines = [
        f"Wrote {out.output_path}",
        f"  resolution     {out.width}x{out.height} (W x H)",
        f"  clips          {out.num_clips}",
        f"  frames         {out.num_frames} ({secs:.2f} s at {out.fps} fps)",
        f"  sampling       {out.seconds_per_step:.3f} s/step ({out.num_steps_run} steps, "
        f"{out.denoise_seconds:.1f} s)",
        f"  total time     {out.total_seconds:.1f} s",
        f"  seed           {out.seed}",
    ]
    if out.first_frame_seconds is not None:
        rate = out.frames_per_second or 0.0
        lines.append(f"  first frame    {out.first_frame_seconds:.2f} s after the start")
        lines.append(f"  speed          {rate:.2f} frames/s ({rate / out.fps:.2f}x real time)")
    if out.peak_memory_bytes is not None:
        lines.append(f"  peak GPU mem   {out.peak_memory_bytes / 2**30:.2f} GiB")
    if model == "tiny":
        lines.append("  (tiny model: random weights, the video is noise)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# generate


def resolve_device(name: str):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a device; use cuda, cuda:N or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available; use --device cpu")
    return dev


def apply_mode_defaults(args) -> None:
    """Fill the flags whose default depends on ``--mode`` (and ``--model tiny``), parse the
    ``--lora`` specs, and refuse flag combinations the mode does not have (one line each)."""
    from .lora import parse_lora_spec

    for name, value in MODE_DEFAULTS[args.mode].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if isinstance(args.max_area, str):
        args.max_area = parse_max_area(TINY_MAX_AREA if args.model == "tiny" else args.max_area)
    loras = args.lora
    if loras is None:
        loras = [LIVEAVATAR_LORA] if args.mode == "liveavatar" and args.model != "tiny" else []
    args.lora_specs = [parse_lora_spec(x) for x in loras if x.strip().lower() != "none"]
    if args.mode == "faithful" or not args.step_pipeline:
        if args.step_pipeline or args.decode_rank:
            raise InputError("--step-pipeline and --decode-rank belong to --mode liveavatar under "
                             "torchrun; add --mode liveavatar --step-pipeline or drop them")
    else:
        from .parallel.step_pipeline import check_world
        from .runtime import world_size_from_env

        check_world(world_size_from_env(), args.num_inference_steps, args.decode_rank)
    if args.mode == "faithful":
        if args.sample_solver == "euler":
            raise InputError("--sample-solver euler is the liveavatar mode's sampler; use unipc or "
                             "dpm++, or pass --mode liveavatar")
        return
    refused = [("--pose-video", args.pose_video is not None),
               ("--init-first-frame", args.init_first_frame),
               ("--enable-cpu-offload", args.enable_cpu_offload),
               ("--enable-layerwise-offload", args.enable_layerwise_offload)]
    refused += [(f"--{n.replace('_', '-')}", (getattr(args, n, None) or 1) > 1)
                for n in ("ulysses_degree", "ring_degree", "tensor_parallel_size",
                          "cfg_parallel_size", "vae_patch_parallel_size")]
    bad = [flag for flag, used in refused if used]
    if bad:
        raise InputError(f"--mode liveavatar does not take {', '.join(bad)} yet; drop it (the "
                         "step-pipelined multi-GPU form is in the Python API, docs/multi_gpu.md)")
    if args.guidance_scale > 1:
        raise InputError(f"--guidance-scale {args.guidance_scale:g}: --mode liveavatar has no "
                         "classifier-free guidance (its LoRA is distilled for one pass per step); "
                         "drop the flag")
    if args.sample_solver != "euler":
        raise InputError(f"--sample-solver {args.sample_solver}: --mode liveavatar samples with "
                         "euler only; drop the flag")
    if args.num_frames % 12:
        raise InputError(f"--num-frames {args.num_frames} with --mode liveavatar is not a multiple "
                         "of 12 (blocks of 3 latent frames = 12 video frames); use 48, the default")


def check_numeric_flags(args) -> None:
    """Every numeric flag against its valid range (``NUMERIC_SETTINGS``, pipeline/settings.py),
    right after argparse: one-line InputError naming the flag, the value and the range."""
    from .pipeline.settings import check_numeric_settings

    check_numeric_settings(vars(args))


def precheck_inputs(args) -> None:
    """Fail fast (before loading any model) on bad settings, inputs and output path."""
    from . import media
    from .models.audio_features import load_audio
    from .pipeline.settings import AUDIO_SAMPLE_RATE, validate_settings

    validate_settings(height=args.height, width=args.width, num_frames=args.num_frames,
                      num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                      sample_solver=args.sample_solver if args.mode == "faithful" else None,
                      max_area=args.max_area,
                      num_clips=args.num_clips, fps=args.fps, flow_shift=args.flow_shift,
                      seed=args.seed)
    media.check_output_writable(args.output)
    media.check_reference_image(args.image)
    wave = load_audio(args.audio, sr=AUDIO_SAMPLE_RATE)
    media.check_audio_duration(args.audio, len(wave) / AUDIO_SAMPLE_RATE, fps=args.fps,
                               trim_to_audio=args.trim_to_audio)
    if args.pose_video is not None:
        media.read_pose_video(args.pose_video, 64, 64, num_frames=1)


def lock_output(path, log):
    """The output's exclusive lock (refuses when another run writes the same file); says which
    partial files of a killed earlier run it removed."""
    from .video_writer import OutputLock

    lock = OutputLock.acquire(path)
    if lock.removed:
        names = ", ".join(os.path.basename(p) for p in lock.removed)
        log(f"note: removed {names}, left for this output by an earlier run that was killed")
    return lock


@contextlib.contextmanager
def interrupt_signals(log):
    """While the run lasts, SIGINT, SIGTERM and SIGHUP raise ``SignalInterrupt`` (a
    KeyboardInterrupt carrying the signal): the pipeline keeps the finished clips and the exit
    code is 128 + the signal. A second signal while the run stops is ignored (it is saving the
    clips; one line says so), a third ends the process at once. A signal that was ignored when
    the run started (``nohup``) stays ignored. Main thread only."""
    from .pipeline.interrupts import SignalInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1:
            raise SignalInterrupt(signum)
        if len(received) == 2:
            log(f"\n{signal.Signals(signum).name} again: still saving the finished clips; send it "
                f"once more to quit at once")
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    saved = {}
    for name in INTERRUPT_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        prev = signal.getsignal(sig)
        if prev == signal.SIG_IGN:
            continue
        saved[sig] = prev
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in saved.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


@contextlib.contextmanager
def one_line_warnings():
    """The input warnings of :mod:`s2v_fast.media` (a huge reference image) as one
    ``warning: ...`` line each; every other warning as Python shows it."""
    from .media import LargeImageWarning

    prev = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LargeImageWarning):
            if is_rank_zero():
                print(f"warning: {message}", file=sys.stderr, flush=True)
            return
        prev(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = prev


def prepare_options(args, device, log):
    """Check the precision / attention / offload / multi-GPU / VAE flags, each once, before any
    weights are loaded -> the :class:`~s2v_fast.runtime.RuntimeOptions` ``from_pretrained`` takes."""
    from .runtime import (OFFLOAD_FLAGS, offload_mode_from_flags, parallel_config_from_args,
                          runtime_options)

    offload = offload_mode_from_flags(args.enable_cpu_offload, args.enable_layerwise_offload)
    # --step-pipeline: every rank runs the whole model on its own step; no DiT parallelism
    parallel = None if args.step_pipeline else parallel_config_from_args(args)
    opts = runtime_options(device, precision=args.precision,
                           attention_backend=args.attention_backend,
                           attention_sites=args.attention_site or (), offload=offload,
                           free_encoders=offload is not None, quantization=args.quantization,
                           parallel=parallel, vae_precision=args.vae_precision)
    if opts.note:
        log(f"note: {opts.note}")
    if offload is not None and device.type != "cuda":
        log(f"note: {OFFLOAD_FLAGS[offload]} only saves GPU memory; on {device} it just copies "
            "weights between host buffers")
    if parallel is not None:
        log(f"Multi-process run: {parallel.describe()} over {os.environ.get('WORLD_SIZE', '1')} "
            f"process(es)")
    return opts


def run_options(pipe, args) -> dict:
    """The effective options of a loaded run (the profiler prints and records them)."""
    from .kernels.attention import configured_backends

    att = ",".join(f"{s}={b}" for s, b in configured_backends(pipe.dit_module).items())
    return dict(mode=args.mode, precision=pipe.precision, attention=att,
                quantization=getattr(pipe.dit_module, "quantization", "none"),
                vae_precision=args.vae_precision, offload=pipe.offload_mode or "none",
                dtype=str(pipe.dtype).replace("torch.", ""))


def describe_attention(model) -> str:
    """``self=cudnn text=auto audio=auto causal=cudnn``: the backend each site of ``model`` uses."""
    from .kernels.attention import configured_backends

    return " ".join(f"{site}={b}" for site, b in configured_backends(model).items())


def cmd_generate(args) -> int:
    """``generate`` and ``profile`` (the same run; profile has short defaults and a profile dir)."""
    from .parallel.config import destroy_distributed
    from .pipeline import S2VPipeline
    from .profiling.session import ProfileOptions

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_rank_zero() else (lambda *a: None)
    if args.model == "tiny":
        log(TINY_NOTE)
    args.identical_on_all_ranks = True  # an error before loading: every rank reports the same
    device = resolve_device(args.device)
    options = prepare_options(args, device, log)
    precheck_inputs(args)
    profile = ProfileOptions.from_args(args)  # validates --profile-dir before any heavy work
    args.identical_on_all_ranks = False
    lock = None
    if args.step_pipeline:
        device = _init_step_pipeline(device)
    try:
        if writes_output(args):  # rank 0 (the last rank with --step-pipeline) writes the MP4
            lock = lock_output(args.output, log)
        t0 = time.perf_counter()
        log(f"Loading {args.model} on {device} ...")
        pipe = S2VPipeline.from_pretrained(args.model, device=device, dtype=args.dtype,
                                           loras=args.lora_specs, runtime=options)
        if args.vae_use_slicing:
            pipe.vae.enable_slicing()
        if args.vae_use_tiling:
            pipe.vae.enable_tiling()
        log(f"Loaded in {time.perf_counter() - t0:.1f} s (precision {pipe.precision}; attention "
            f"{describe_attention(pipe.dit_module)})")
        return _run(pipe, args, profile)
    finally:
        if lock is not None:
            lock.release()
        if options.parallel is not None or args.step_pipeline:
            destroy_distributed()


def _init_step_pipeline(device):
    """torch.distributed for --step-pipeline from the torchrun environment (gloo on the CPU,
    NCCL on cuda:LOCAL_RANK); returns this rank's device."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _run(pipe, args, profile) -> int:
    """One generation (under the profiler when asked); rank 0 prints the summary."""
    from .profiling.session import run_profiled

    if args.mode == "liveavatar":
        return _run_streaming(pipe, args, profile)
    progress = ProgressDisplay(enabled=not args.quiet)

    def run(stage_timer):
        return pipe.generate(
            args.image, args.audio, prompt=args.prompt, negative_prompt=args.negative_prompt,
            height=args.height, width=args.width, max_area=args.max_area, num_frames=args.num_frames,
            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            flow_shift=args.flow_shift, sample_solver=args.sample_solver, seed=args.seed, fps=args.fps,
            init_first_frame=args.init_first_frame, pose_video=args.pose_video,
            num_clips=args.num_clips, output=args.output, trim_to_audio=args.trim_to_audio,
            callbacks=[progress], stage_timer=stage_timer)

    try:
        if profile.any:
            out, paths = run_profiled(run, profile, output_path=args.output,
                                      run_options=run_options(pipe, args))
        else:
            out, paths = run(None), []
        args.written_output = out.output_path  # an interrupt from here on finds the MP4 complete
    finally:
        progress.close()
    if is_rank_zero():
        print(format_summary(out, args.model), flush=True)
        for path in paths:
            print(f"  profile        {path}", flush=True)
    return EXIT_OK


def _run_streaming(pipe, args, profile) -> int:
    """``--mode liveavatar``: the streaming runner, written to the MP4 block by block."""
    from .profiling.session import run_profiled
    from .streaming.generate import generate_streaming
    from .streaming.preset import StreamingSettings

    seed = args.seed if args.seed >= 0 else random.randint(0, 2**31 - 1)
    runner = None
    if args.step_pipeline:
        from .parallel.step_pipeline import StepPipelineRunner
        from .pipeline.placement import from_rank0

        (seed,) = from_rank0(seed)  # every rank must draw the same noise and rd
    settings = StreamingSettings(steps=args.num_inference_steps, shift=args.flow_shift,
                                 fps=args.fps, frames_per_clip=args.num_frames, seed=seed,
                                 sink=args.sink)
    if args.step_pipeline:
        runner = StepPipelineRunner(pipe.dit, settings, decode_rank=args.decode_rank)
    writer = writes_output(args)
    progress = StreamingProgress(enabled=not args.quiet and writer, any_rank=True)

    def run(stage_timer):
        return generate_streaming(pipe, args.image, args.audio, prompt=args.prompt,
                                  settings=settings, height=args.height, width=args.width,
                                  max_area=args.max_area, num_clips=args.num_clips,
                                  output=args.output if writer else None,
                                  trim_to_audio=args.trim_to_audio, callbacks=[progress],
                                  runner=runner)

    try:
        if profile.any:
            out, paths = run_profiled(run, profile, output_path=args.output,
                                      run_options=run_options(pipe, args))
        else:
            out, paths = run(None), []
        args.written_output = out.output_path
    finally:
        progress.close()
    if writer:
        print(format_summary(out, args.model), flush=True)
        for path in paths:
            print(f"  profile        {path}", flush=True)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# error reporting


def _oom_advice(parser_flags: set) -> str:
    tips = ["--vae-use-tiling"]
    tips += [f for f in ("--enable-cpu-offload", "--enable-layerwise-offload") if f in parser_flags]
    tips += ["a lower --max-area (e.g. 480*832)", "fewer --num-frames (e.g. 48)"]
    return "out of GPU memory; try " + ", ".join(tips)


def _is_oom(exc) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


def _flags(parser) -> set:
    """Every option string of the parser and its subcommands (to suggest only existing flags)."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _flags(sub)
    return flags


def main(argv=None) -> int:
    try:  # a bad S2V_* variable: one line, before the parser (whose defaults come from them)
        env_options()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    rank = os.environ.get("RANK", "0")

    def fail(msg, code):
        if rank != "0" and getattr(args, "identical_on_all_ranks", False):
            return code  # torchrun: rank 0 says it once
        if debug:
            traceback.print_exc()
        where = f"[rank {rank}] " if rank != "0" else ""
        print(f"error: {where}{msg}", file=sys.stderr, flush=True)
        return code

    from .pipeline.interrupts import GenerationInterrupted, PartialOutputError, interrupt_signal

    def interrupted(e, msg):
        sig = interrupt_signal(e)
        if is_rank_zero():
            print(f"\n{msg}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if sig is None else 128 + sig

    try:
        log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if is_rank_zero() else (lambda *a: None)
        with one_line_warnings(), interrupt_signals(log):
            if args.func is cmd_generate:
                args.identical_on_all_ranks = True
                apply_mode_defaults(args)
                check_numeric_flags(args)
            return args.func(args)
    except GenerationInterrupted as e:
        return interrupted(e, str(e))
    except KeyboardInterrupt as e:
        sig = interrupt_signal(e)
        what = "interrupted" if sig is None else f"interrupted by {signal.Signals(sig).name}"
        written = getattr(args, "written_output", None)
        if written:
            return interrupted(e, f"{what} after the video was written; {written} is complete")
        return interrupted(e, f"{what} before the first clip was finished; nothing was written")
    except PartialOutputError as e:
        msg = str(e)
        if _is_oom(e.cause):
            msg += "; " + _oom_advice(_flags(parser))
        return fail(msg, EXIT_FAILED)
    except S2VError as e:
        return fail(str(e), EXIT_USAGE)
    except Exception as e:  # noqa: BLE001
        if _is_oom(e):
            return fail(_oom_advice(_flags(parser)), EXIT_USAGE)
        first = (str(e).strip().splitlines() or [""])[0]
        hint = "" if debug else " (run with --debug for the traceback)"
        return fail(f"{type(e).__name__}: {first}{hint}", EXIT_FAILED)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
