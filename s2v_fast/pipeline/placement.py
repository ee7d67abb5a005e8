"""Where a pipeline's components live: offload (every component in host memory, on the device
only while its stage runs; the DiT blocks streamed with ``layerwise``), the encoders freed after
their first use, and the multi-process transforms (TP/SP DiT, VAE patch parallel).

The functions take the :class:`~s2v_fast.pipeline.S2VPipeline` and keep its public attributes
``offloader``, ``offload_mode``, ``free_encoders`` and ``parallel`` current; the stages only ask
:func:`on_device` / :func:`done_with`.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import S2VError


def enable_offload(pipe, mode: str, free_encoders: bool) -> None:
    """Register every component with a :class:`~s2v_fast.offload.ModelOffloader` (``"cpu"``), and
    with ``"layerwise"`` stream the DiT blocks from host memory too."""
    from ..offload import ModelOffloader, enable_layerwise_offload

    if pipe.offloader is not None:
        raise S2VError(f"offload ({pipe.offload_mode}) is already enabled on this pipeline")
    off = ModelOffloader(pipe.device)
    if mode == "layerwise":
        enable_layerwise_offload(pipe.dit_module, pipe.device)
    off.register("dit", pipe.dit_module)
    off.register("vae", getattr(pipe.vae, "vae", pipe.vae))  # the VAE inside VAEPatchParallel
    if pipe.text_encoder is not None:
        off.register("text_encoder", pipe.text_encoder)
    audio = pipe.audio_encoder
    if audio is not None and torch.device(getattr(audio, "device", pipe.device)) == pipe.device:
        off.register("audio_encoder", audio)  # (an encoder on its own audio_device stays)
    pipe.offloader, pipe.offload_mode, pipe.free_encoders = off, mode, bool(free_encoders)


def on_device(pipe, name: str):
    """Context in which component ``name`` is on the device (no-op without offload)."""
    off = pipe.offloader
    if off is None or name not in off:
        return contextlib.nullcontext()
    return off.use(name)


def done_with(pipe, name: str) -> None:
    """After an encoder's stage: release it when ``free_encoders`` asks for it."""
    off = pipe.offloader
    if off is not None and pipe.free_encoders and name in off:
        off.release(name)
        setattr(pipe, name, None)
        pipe._freed.add(name)


def missing_component(pipe, name: str, hint: str) -> S2VError:
    """The error for a stage whose component was never loaded or was freed."""
    if name in pipe._freed:
        return S2VError(f"the {name.replace('_', ' ')} was freed after its first use "
                        f"(free_encoders=True); {hint}, or load the pipeline again")
    return S2VError(f"this pipeline has no {name.replace('_', ' ')}; {hint}")


def attach_parallel(pipe, state) -> None:
    """Multi-process run: TP/SP DiT transform, VAE patch parallel (see docs/multi_gpu.md)."""
    from ..parallel import VAEPatchParallel, parallelize

    pipe.parallel = state
    pipe.dit = parallelize(pipe.dit, state)
    if state.config.vae_patch_parallel_size > 1:
        pipe.vae = VAEPatchParallel(pipe.vae, state.vae_group)


def from_rank0(*values):
    """Rank 0's values on every rank (one broadcast over the default process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    box = list(values)
    dist.broadcast_object_list(box, src=0)
    return tuple(box)
