"""Loading a pipeline: :func:`from_pretrained` (``S2VPipeline.from_pretrained``) checks every
option, resolves the checkpoint, reads and merges LoRAs, loads the DiT (sharded for tensor
parallelism), quantises it, loads the VAE and the encoders, and hands the components to the
pipeline class, then to offload (:mod:`.placement`). Every option is checked before any weight is
read."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch

from ..errors import InputError
from ..profiling.stage_timer import current_stage_timer
from .placement import enable_offload
from .settings import DEFAULT_MODEL


def from_pretrained(cls, model: str = DEFAULT_MODEL, device=None, dtype=None, *,
                    precision: Optional[str] = None, attention_backend=None,
                    offload: Optional[str] = None, free_encoders: bool = False,
                    quantization: Optional[str] = None, parallel=None, audio_device=None, cache_dir: Optional[str] = None,
                    load_text_encoder: bool = True, load_audio_encoder: bool = True,
                    loras: Sequence = (), vae_precision: str = "reference", runtime=None):
    """Load every component from ``model``: ``"tiny"``, a local checkpoint directory in the
    official layout, or a Hugging Face repo id (downloaded on first use).

    ``device``: default CUDA when available, else CPU. ``dtype``: default bf16 on CUDA, fp32 on
    the CPU. The wav2vec2 audio encoder runs in fp32 (on ``audio_device``, default ``device``).
    ``precision``: the DiT path, ``"fast"`` (fused Triton kernels) or ``"reference"``; default
    fast on CUDA, reference on the CPU or with options fast does not support yet.
    ``attention_backend``: a backend name for every attention site, or an
    :class:`~s2v_fast.attention_sites.AttentionChoice` (per-site overrides); default
    ``$S2V_ATTENTION_BACKEND`` or ``auto``. It configures this pipeline's DiT only.
    ``offload``: ``"cpu"`` (:meth:`S2VPipeline.enable_cpu_offload`) or ``"layerwise"``
    (:meth:`S2VPipeline.enable_layerwise_offload`); the weights are then loaded into host memory, never
    all onto the GPU at once. ``free_encoders``: with offload, drop the text / audio encoders
    after their first use (a pipeline that generates once).
    ``parallel``: a :class:`~s2v_fast.parallel.ParallelConfig` (under torchrun;
    torch.distributed is initialised here, gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) or
    an existing :class:`~s2v_fast.parallel.ParallelState`. Every option is checked (one-line
    :class:`InputError`) before any weights are read.
    ``vae_precision``: ``"reference"`` (fp32, the default) or ``"fast"`` (bf16 convolutions with
    fp32 norms and heads, ``s2v_fast.fast.vae``; opt-in until measured on a GPU, changes numerics:
    PSNR >= 40 dB against fp32).
    ``runtime``: a :class:`~s2v_fast.runtime.RuntimeOptions` already checked (the CLI's) instead
    of ``precision`` / ``attention_backend`` / ``offload`` / ``free_encoders`` / ``quantization``
    / ``parallel`` / ``vae_precision``.
    ``loras``: LoRAs to merge into the DiT (``"PATH_OR_HF_ID[:SCALE]"`` strings or
    :class:`~s2v_fast.lora.LoraSpec`), once, in fp32, before quantisation; the files are
    resolved (downloaded) and read before the DiT is.
    """
    from .. import hub
    from ..models.audio_features import AudioFeatureExtractor
    from ..models.dit import S2VTransformer
    from ..models.text_encoder import TextEncoder
    from ..models.vae import WanVAE
    from ..fast import set_precision
    from ..kernels.attention import configure_attention
    from ..runtime import init_parallel, runtime_options, validate_parallel_for_model

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype, device)
    if runtime is None:
        runtime = runtime_options(device, precision=precision, attention_backend=attention_backend,
                                  offload=offload, free_encoders=free_encoders,
                                  quantization=quantization, parallel=parallel,
                                  vae_precision=vae_precision)
    precision, attention, quantization = runtime.precision, runtime.attention, runtime.quantization
    offload, free_encoders, parallel = runtime.offload, runtime.free_encoders, runtime.parallel
    pconf = getattr(parallel, "config", parallel)  # ParallelState -> its ParallelConfig
    path = hub.resolve_model(model, cache_dir=cache_dir)
    lora_weights = _read_loras(loras, cache_dir, model_path=path)
    if lora_weights:  # keys and shapes against the checkpoint's config, no weights read
        from ..config import DiTConfig
        from ..lora import check_lora

        with torch.device("meta"):
            check_lora(S2VTransformer(DiTConfig.from_json(path)), lora_weights)
    state = None
    if parallel is not None:
        validate_parallel_for_model(pconf, path, getattr(parallel, "world_size", None))
        state = init_parallel(parallel, device)
        if device.type == "cuda":
            device = state.device  # cuda:LOCAL_RANK
        if state.world_size == 1:
            state = None
    # With offload every weight goes to host memory first: the GPU never holds them all.
    load_device = torch.device("cpu") if offload else device
    tp = state.config.tensor_parallel_size if state is not None else 1
    if lora_weights and tp > 1:
        raise InputError("--lora with --tensor-parallel-size > 1 is not supported yet (the "
                         "merge needs the unsharded weights); drop one of them")
    timer = current_stage_timer()
    with timer.stage("model_load"), _no_transformers_progress_bars():
        if tp > 1:  # read only this rank's slices of the sharded weights
            from ..parallel import load_dit_sharded

            dit = load_dit_sharded(path, state.tp_rank, tp, device=load_device, dtype=dtype)
        else:
            dit = S2VTransformer.from_pretrained(path, device=load_device, dtype=dtype)
        configure_attention(dit, attention)
        set_precision(dit, precision)
        if lora_weights:
            from ..lora import merge_lora

            merge_lora(dit, lora_weights)
        if quantization != "none":  # in place, layer by layer
            from ..quantization import quantize_dit

            # on the GPU the default `auto` attention becomes fp8 self-attention too (faster
            # than cuDNN bf16: results/attention_configs-*); a backend the user named stays
            fp8_attn = (device.type == "cuda" and attention.default == "auto"
                        and attention.explicit("self") is None)
            quantize_dit(dit, quantization, attention="fp8" if fp8_attn else False)
        vae = WanVAE.from_file(os.path.join(path, hub.VAE_CHECKPOINT), device=load_device,
                               dtype=torch.float32)
        if runtime.vae_precision == "fast":
            from ..fast.vae import apply_fast_vae

            apply_fast_vae(vae)
        text = (TextEncoder.from_pretrained(path, device=load_device, dtype=dtype)
                if load_text_encoder else None)
        audio = (AudioFeatureExtractor.from_pretrained(
            os.path.join(path, hub.WAV2VEC_DIR), device=audio_device or device)
            if load_audio_encoder else None)
        pipe = cls(dit, vae, text, audio, device=device, dtype=dtype, model_path=path,
                   parallel=state)
        if offload is not None:
            enable_offload(pipe, offload, free_encoders)
    return pipe


def _read_loras(loras, cache_dir=None, model_path: Optional[str] = None) -> list:
    """[(LoraWeights, scale)] of LoRA specs (strings or LoraSpec), resolved and validated.
    ``tiny`` names the tiny model set's own LoRA file (with ``--model tiny`` only)."""
    from .. import hub
    from ..lora import LoraSpec, load_lora, parse_lora_spec, resolve_lora_file
    from ..models.tiny import TINY_LORA

    out = []
    for spec in loras or ():
        spec = spec if isinstance(spec, LoraSpec) else parse_lora_spec(spec)
        source = spec.source
        if source == "tiny":
            if model_path is None or not hub.is_tiny_dir(model_path):
                raise InputError("--lora tiny is the tiny model set's LoRA; use it with --model tiny")
            source = os.path.join(model_path, TINY_LORA)
        out.append((load_lora(resolve_lora_file(source, cache_dir=cache_dir)), spec.scale))
    return out


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """Local loads are fast; transformers' per-tensor 'Loading weights' bar is only noise."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def parse_dtype(dtype, device: torch.device) -> torch.dtype:
    """``--dtype`` (a name, a torch dtype or None: bf16 on CUDA, fp32 elsewhere) -> torch dtype."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float": torch.float32}
    if str(dtype) not in names:
        raise InputError(f"--dtype {dtype} is not supported; use bfloat16 or float32")
    return names[str(dtype)]
