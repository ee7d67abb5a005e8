"""Run-time options of a pipeline: DiT precision, attention backend, offload, multi-GPU setup
(:class:`RuntimeOptions`, built and checked once by :func:`runtime_options`).

Each check raises a one-line :class:`~s2v_fast.errors.InputError` and runs before any weights
are loaded. The mechanisms themselves live elsewhere: ``kernels/attention.py`` (backends),
``offload.py`` (ModelOffloader, LayerwiseOffloader), ``parallel/`` (mesh, DiT transform, CFG
and VAE patch parallel); this module only decides and validates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import InputError
from .options import env_options

PRECISIONS = ("fast", "reference")
OFFLOAD_MODES = ("cpu", "layerwise")
OFFLOAD_FLAGS = {"cpu": "--enable-cpu-offload", "layerwise": "--enable-layerwise-offload"}
# Backends whose kernels exist only on CUDA (triton also runs under TRITON_INTERPRET=1).
_CUDA_ONLY_BACKENDS = ("cudnn", "sdpa_flash", "triton", "fp8")


# ----------------------------------------------------------------------------- attention
def default_attention_backend() -> str:
    return env_options().attention_backend


def attention_choice(name=None, sites=(), device=None):
    """The validated :class:`~s2v_fast.attention_sites.AttentionChoice` of ``--attention-backend``
    (``name``: a backend name, default ``S2V_ATTENTION_BACKEND``, or an AttentionChoice) and
    ``--attention-site`` (``sites``); an unusable backend, a bad site or a backend that does not
    serve its site is a one-line InputError."""
    from .attention_sites import AttentionChoice
    from .kernels.attention import effective_backends

    try:
        if isinstance(name, AttentionChoice):
            choice = name
            for item in sites or ():
                choice = choice.with_site(*AttentionChoice.parse("auto", [item]).overrides[0])
        else:
            choice = AttentionChoice.parse(name or default_attention_backend(), sites)
    except ValueError as e:
        raise InputError(str(e)) from None
    dev = torch.device(device) if device is not None else None
    named = {choice.default, *(b for _, b in choice.overrides)}
    for b in sorted(named):
        if dev is not None and dev.type != "cuda" and b in _CUDA_ONLY_BACKENDS and not (
                b in ("triton", "fp8") and os.environ.get("TRITON_INTERPRET") == "1"):
            raise InputError(f"attention backend {b} needs a CUDA device; on the CPU use "
                             "--attention-backend auto or sdpa")
    try:
        effective_backends(choice)
    except ValueError as e:
        raise InputError(str(e)) from None
    return choice


# ----------------------------------------------------------------------------- offload
def check_offload_mode(offload: Optional[str]) -> Optional[str]:
    if offload in (None, "", "none"):
        return None
    if offload not in OFFLOAD_MODES:
        raise InputError(f"offload={offload!r}: use None, 'cpu' or 'layerwise'")
    return offload


def offload_mode_from_flags(cpu: bool, layerwise: bool) -> Optional[str]:
    if cpu and layerwise:
        raise InputError("--enable-cpu-offload and --enable-layerwise-offload are exclusive; pass "
                         "one (layerwise offload also keeps the encoders and the VAE off the GPU "
                         "outside their stages)")
    return "layerwise" if layerwise else ("cpu" if cpu else None)


# ----------------------------------------------------------------------------- precision
def fast_precision_blocker(parallel=None) -> Optional[str]:
    """Why precision 'fast' cannot run with these options (None when it can); the reason names
    the flag. ``parallel``: a ParallelConfig or None. (Every offload mode supports 'fast'.)"""
    if parallel is not None:
        from .parallel.runner import fast_precision_unsupported

        return fast_precision_unsupported(parallel)
    return None


def resolve_precision(precision: Optional[str], device, *, offload: Optional[str] = None,
                      parallel=None) -> Tuple[str, Optional[str]]:
    """-> (precision, note). Default: 'fast' on CUDA, 'reference' on the CPU (the fused Triton
    kernels run only on CUDA) or when an option does not support 'fast' yet (the note says
    which). An explicit 'fast' that cannot run is an InputError naming the flag. ``offload``
    is accepted for the callers' symmetry: every offload mode runs 'fast'."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use fast or reference")
    blocker = fast_precision_blocker(parallel)
    if precision == "fast":
        if blocker:
            raise InputError(f"{blocker}; use --precision reference")
        return "fast", None
    if precision == "reference":
        return "reference", None
    if torch.device(device).type != "cuda":
        return "reference", None
    if blocker:
        return "reference", f"{blocker}; using --precision reference"
    return "fast", None


# ----------------------------------------------------------------------------- all of them
VAE_PRECISIONS = ("reference", "fast")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a pipeline runs, checked once (:func:`runtime_options`) before any weights are read:
    the DiT path (``precision``; ``note`` says why a default fell back to reference), attention
    per site, quantisation, offload (and whether the encoders are dropped after their first
    use), the parallel layout (a ParallelConfig or ParallelState, or None) and the VAE path."""

    precision: str
    attention: object  # AttentionChoice
    quantization: str = "none"
    offload: Optional[str] = None
    free_encoders: bool = False
    parallel: object = None
    vae_precision: str = "reference"
    note: Optional[str] = None


def runtime_options(device, *, precision: Optional[str] = None, attention_backend=None,
                    attention_sites=(), offload: Optional[str] = None, free_encoders: bool = False,
                    quantization: Optional[str] = None, parallel=None,
                    vae_precision: str = "reference") -> RuntimeOptions:
    """Every run-time option validated, each once (one-line InputError naming the flag)."""
    device = torch.device(device)
    offload = check_offload_mode(offload)
    if vae_precision not in VAE_PRECISIONS:
        raise InputError(f"--vae-precision {vae_precision!r}: use reference or fast")
    attention = attention_choice(attention_backend, attention_sites, device)
    pconf = getattr(parallel, "config", parallel)  # ParallelState -> its ParallelConfig
    precision, note = resolve_precision(precision, device, offload=offload, parallel=pconf)
    quantization = check_quantization(quantization, offload=offload, parallel=pconf)
    return RuntimeOptions(precision=precision, attention=attention, quantization=quantization,
                          offload=offload, free_encoders=bool(free_encoders), parallel=parallel,
                          vae_precision=vae_precision, note=note)


# ----------------------------------------------------------------------------- multi-GPU
def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with "
                         "torchrun") from None


def parallel_config_from_args(args):
    """The ParallelConfig of the parsed flags, validated against $WORLD_SIZE and the guidance
    scale, or None for a single-process run (all degrees 1 and no torchrun)."""
    from .parallel.config import ParallelConfig

    pc = ParallelConfig.from_args(args)
    world = world_size_from_env()
    if not pc.enabled and world == 1:
        return None
    return pc.validate(world, guidance_scale=getattr(args, "guidance_scale", None))


def validate_parallel_for_model(config, model_path: str, world_size: Optional[int] = None) -> None:
    """Head / width divisibility against the checkpoint's config.json (no weights read)."""
    from .config import DiTConfig

    c = DiTConfig.from_json(model_path)
    config.validate(world_size if world_size is not None else world_size_from_env(),
                    num_heads=c.num_heads, ffn_dim=c.ffn_dim, dim=c.dim)


def init_parallel(parallel, device: torch.device):
    """ParallelConfig -> ParallelState (torch.distributed from the torchrun environment: gloo on
    the CPU, NCCL on CUDA with device cuda:LOCAL_RANK); a ParallelState is returned as is."""
    from .parallel.config import ParallelConfig, init_distributed

    if not isinstance(parallel, ParallelConfig):
        return parallel
    return init_distributed(parallel, backend="gloo" if device.type != "cuda" else None)


# ----------------------------------------------------------------------------- quantization
def check_quantization(mode: Optional[str], *, offload: Optional[str] = None, parallel=None) -> str:
    """``--quantization``: 'none' or 'fp8' (FP8 e4m3 GEMMs for the large DiT linears). Combinations
    that are not supported yet are one-line errors naming the flag."""
    from .quantization import MODES

    mode = (mode or "none").lower()
    if mode not in MODES:
        raise InputError(f"--quantization {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return mode
    if offload is not None:
        raise InputError(f"--quantization {mode} cannot be combined with {OFFLOAD_FLAGS[offload]} yet; "
                         "drop one of them")
    if parallel is not None and getattr(parallel, "tensor_parallel_size", 1) > 1:
        raise InputError(f"--quantization {mode} cannot be combined with --tensor-parallel-size > 1 "
                         "yet; use --ulysses-degree / --ring-degree instead")
    return mode
