"""The built-in tiny model set (``--model tiny``): random weights in the official file layout.

:func:`ensure_tiny_checkpoint` writes, once, a directory laid out exactly like
``Wan-AI/Wan2.2-S2V-14B`` (spec §2) but with tiny, deterministic random weights:

* DiT: ``DiTConfig.preset("tiny")`` (dim 128, 4 layers, text_dim 64, audio_dim 32), bf16, sharded
  ``diffusion_pytorch_model-0000x-of-0000n.safetensors`` + index + ``config.json``;
* ``models_t5_umt5-xxl-enc-bf16.pth``: a 2-layer umT5 encoder (d 64) with the official key names,
  and a small sentencepiece tokenizer in ``google/umt5-xxl/``;
* ``Wan2.1_VAE.pth``: the Wan2.1 VAE structure with base dim 4;
* ``wav2vec2-large-xlsr-53-english/``: a 24-layer wav2vec2 with hidden size 32 (25 hidden states).

Everything then loads through the same loaders as the 14B model, so the whole pipeline (inputs,
clip loop, MP4 writing) can be tried on a CPU in seconds. The output is noise.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

TINY_VERSION = "tiny-v1"
_T5 = dict(vocab=256, d_model=64, heads=4, d_ff=128, layers=2, buckets=32)


def default_cache_dir() -> str:
    root = os.environ.get("S2V_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "s2v_fast")
    return os.path.join(root, TINY_VERSION)


def ensure_tiny_checkpoint(directory: str | None = None) -> str:
    """Return a directory holding the tiny model set, writing it first if needed.

    The set is built in a temporary sibling directory and renamed into place, so concurrent
    callers and interrupted runs never see a half-written checkpoint.
    """
    from ..hub import missing_files

    target = os.path.abspath(directory or default_cache_dir())
    if os.path.isdir(target) and not missing_files(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        write_tiny_checkpoint(tmp)
        if os.path.isdir(target):  # incomplete leftover: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.isdir(target) and not missing_files(target):  # another process won the race
                return target
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_tiny_checkpoint(directory: str, seed: int = 0) -> str:
    """Write every file of the tiny set into ``directory`` (deterministic for a given seed)."""
    from .. import hub
    from ..checkpoint import save_pretrained
    from ..config import DiTConfig
    from .audio_features import make_tiny_wav2vec2
    from .dit import S2VTransformer
    from .text_encoder import make_tiny_tokenizer
    from .vae import WanVAE

    os.makedirs(directory, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = S2VTransformer(DiTConfig.preset("tiny"))
        _randomize(dit, seed + 1)
    save_pretrained(dit, directory, max_shard_size="1MB", dtype=torch.bfloat16)

    torch.save(tiny_t5_state_dict(seed + 2), os.path.join(directory, hub.T5_CHECKPOINT))
    make_tiny_tokenizer(os.path.join(directory, hub.T5_TOKENIZER), vocab_size=_T5["vocab"])

    vae = WanVAE.tiny(dim=4, seed=seed + 3)
    torch.save({k: v.contiguous() for k, v in vae.state_dict().items()},
               os.path.join(directory, hub.VAE_CHECKPOINT))

    make_tiny_wav2vec2(os.path.join(directory, hub.WAV2VEC_DIR), seed=seed + 4,
                       hidden_size=dit.config.audio_dim)
    return directory


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor non-trivial values (zero-initialised layers would hide code paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() >= 2 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / max(1.0, fan_in) ** 0.5)


def tiny_t5_state_dict(seed: int = 0) -> dict:
    """umT5 encoder weights with the official ``models_t5_umt5-xxl-enc-bf16.pth`` key names."""
    c = _T5
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    d, inner, ff = c["d_model"], c["d_model"], c["d_ff"]
    sd = {"token_embedding.weight": rnd(c["vocab"], d, scale=1.0)}
    for i in range(c["layers"]):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)
        for n in "qkvo":
            sd[p + f"attn.{n}.weight"] = rnd(inner, d)
        sd[p + "pos_embedding.embedding.weight"] = rnd(c["buckets"], c["heads"], scale=0.5)
        sd[p + "norm2.weight"] = (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16)
        sd[p + "ffn.gate.0.weight"] = rnd(ff, d)
        sd[p + "ffn.fc1.weight"] = rnd(ff, d)
        sd[p + "ffn.fc2.weight"] = rnd(d, ff)
    sd["norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    return sd
