"""The built-in tiny model set (``--model tiny``): random weights in the official file layout.

:func:`ensure_tiny_checkpoint` writes, once, a directory laid out exactly like
``Wan-AI/Wan2.2-S2V-14B`` (spec §2) but with tiny, deterministic random weights:

* DiT: ``DiTConfig.preset("tiny")`` (dim 128, 4 layers, text_dim 64, audio_dim 32), bf16, sharded
  ``diffusion_pytorch_model-0000x-of-0000n.safetensors`` + index + ``config.json``;
* ``models_t5_umt5-xxl-enc-bf16.pth``: a 2-layer umT5 encoder (d 64) with the official key names,
  and a small sentencepiece tokenizer in ``google/umt5-xxl/``;
* ``Wan2.1_VAE.pth``: the Wan2.1 VAE structure with base dim 4;
* ``wav2vec2-large-xlsr-53-english/``: a 24-layer wav2vec2 with hidden size 32 (25 hidden states);
* ``tiny_lora.safetensors``: a rank-4 PEFT LoRA on every LoRA target LiveAvatar's has (self- and
  cross-attention q/k/v/o, FFN in/out, audio injector q/k/v/o), for ``--lora tiny``.

plus ``s2v_fast_tiny.json`` (the version and the sha256 of every file): a damaged or outdated set
is told from a real checkpoint, and the cached one is rebuilt by itself
(``python -m s2v_fast.models.tiny [DIR]`` rebuilds one by hand).

Everything then loads through the same loaders as the 14B model, so the whole pipeline (inputs,
clip loop, MP4 writing) can be tried on a CPU in seconds. The output is noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch

from ..options import env_options

TINY_VERSION = "tiny-v2"
TINY_LORA = "tiny_lora.safetensors"
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
_T5 = dict(vocab=256, d_model=64, heads=4, d_ff=128, layers=2, buckets=32)


def default_cache_dir() -> str:
    root = env_options().cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "s2v_fast")
    return os.path.join(root, TINY_VERSION)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(directory: str) -> None:
    """Record the version and the size + sha256 of every file of the set (written last)."""
    from ..hub import TINY_MANIFEST

    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel != TINY_MANIFEST:
                files[rel] = {"size": os.path.getsize(full), "sha256": _file_digest(full)}
    with open(os.path.join(directory, TINY_MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": "s2v_fast tiny model set", "version": TINY_VERSION,
                   "files": dict(sorted(files.items()))}, f, indent=1)


def verify_tiny_checkpoint(directory: str) -> str | None:
    """``None`` when ``directory`` holds the tiny set exactly as :func:`write_tiny_checkpoint`
    wrote it (this version, every file present with its recorded size and sha256); else a short
    reason. Reads the ~6 MB set once (a few ms)."""
    from ..hub import TINY_MANIFEST, missing_files

    manifest = os.path.join(directory, TINY_MANIFEST)
    if not os.path.isfile(manifest):
        missing = missing_files(directory)
        if missing:
            return f"missing {', '.join(missing)}"
        return f"no {TINY_MANIFEST} (written by an older s2v_fast)"
    try:
        with open(manifest, encoding="utf-8") as f:
            meta = json.load(f)
        version, files = meta["version"], meta["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {TINY_MANIFEST} ({type(exc).__name__})"
    if version != TINY_VERSION:
        return f"written as {version!r}, this s2v_fast writes {TINY_VERSION!r}"
    root = os.path.realpath(directory)
    for rel, want in files.items():
        full = os.path.realpath(os.path.join(root, str(rel)))
        if os.path.commonpath([root, full]) != root:
            return f"{TINY_MANIFEST} names a file outside the directory ({rel})"
        if not os.path.isfile(full):
            return f"{rel} is missing"
        try:
            if (os.path.getsize(full) != want["size"]) or _file_digest(full) != want["sha256"]:
                return f"{rel} differs from the file s2v_fast wrote"
        except (OSError, KeyError, TypeError):
            return f"{rel} cannot be checked"
    missing = missing_files(directory)
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def _replaceable(target: str) -> bool:
    """Only the tiny cache, a directory carrying the tiny manifest, or an empty directory is ever
    deleted and rewritten (never, say, a real checkpoint passed by mistake)."""
    from ..hub import _same_path, is_tiny_dir

    return (_same_path(target, default_cache_dir()) or is_tiny_dir(target)
            or not os.listdir(target))


def ensure_tiny_checkpoint(directory: str | None = None, *, rebuild: bool = False) -> str:
    """Return a directory holding the tiny model set, writing it first if needed.

    An existing set is checked against its manifest (:func:`verify_tiny_checkpoint`); a damaged
    or outdated one is rebuilt, with one line on stderr saying why (``rebuild=True`` rebuilds in
    any case). The set is built in a temporary sibling directory and renamed into place, so
    concurrent callers and interrupted runs never see a half-written checkpoint. When the set
    cannot be rebuilt, a one-line :class:`~s2v_fast.errors.CheckpointError` says how to fix it.
    """
    from ..errors import CheckpointError
    from ..hub import tiny_rebuild_hint

    target = os.path.abspath(os.path.expanduser(directory or default_cache_dir()))
    problem = None
    if os.path.isdir(target):
        problem = "rebuild requested" if rebuild else verify_tiny_checkpoint(target)
        if problem is None:
            return target
        if not _replaceable(target):
            why = verify_tiny_checkpoint(target) if rebuild else problem
            raise CheckpointError(
                f"{target} is not a tiny model set written by s2v_fast ({why}); refusing to "
                "replace it: pass an empty or new directory for the tiny set")
        print(f"s2v_fast: rebuilding the tiny model set in {target} ({problem})",
              file=sys.stderr, flush=True)
    elif os.path.exists(target):
        raise CheckpointError(f"{target} is a file, not a directory for the tiny model set; "
                              "remove it or choose another directory")
    try:
        _build_into_place(target, keep_valid=not rebuild)
    except OSError as exc:
        what = f"is damaged ({problem}) and " if problem else ""
        raise CheckpointError(
            f"the tiny model set in {target} {what}could not be written ({type(exc).__name__}: "
            f"{exc.strerror or exc}); {tiny_rebuild_hint(target)} once the directory is "
            "writable, or set S2V_FAST_CACHE to a writable directory") from None
    return target


def _build_into_place(target: str, keep_valid: bool = True) -> None:
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    old = None
    try:
        write_tiny_checkpoint(tmp)
        if os.path.isdir(target):
            if keep_valid and verify_tiny_checkpoint(target) is None:  # rebuilt meanwhile
                return
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.", dir=parent)
            os.rename(target, os.path.join(old, "set"))  # aside first: the swap is two renames
        try:
            os.rename(tmp, target)
        except OSError:
            if os.path.isdir(target) and verify_tiny_checkpoint(target) is None:
                return  # another process won the race
            raise
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


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
    write_tiny_lora(dit, os.path.join(directory, TINY_LORA), seed=seed + 5)
    _write_manifest(directory)
    return directory


def write_tiny_lora(dit, path: str, seed: int = 0, rank: int = 4) -> str:
    """A PEFT-format LoRA (``<module>.lora_A.default.weight`` [r, in], ``lora_B`` [out, r], no
    alpha) for every LiveAvatar target of ``dit``: its merge visibly changes the weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in dit.named_modules():
        target = name.endswith(LORA_TARGETS) or (
            name.startswith("audio_injector.injector.") and name.rsplit(".", 1)[-1] in "qkvo")
        if target and isinstance(mod, torch.nn.Linear):
            out_f, in_f = mod.weight.shape
            tensors[f"{name}.lora_A.default.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
            tensors[f"{name}.lora_B.default.weight"] = torch.randn(out_f, rank, generator=g) * 0.02
    save_file(tensors, path)
    return path


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


def main(argv=None) -> int:
    """``python -m s2v_fast.models.tiny [DIR]``: (re)build the tiny model set (default: the cache)."""
    import argparse

    from ..errors import S2VError

    p = argparse.ArgumentParser(prog="python -m s2v_fast.models.tiny",
                                description="(Re)build the tiny random-weight model set.")
    p.add_argument("directory", nargs="?", default=None,
                   help=f"where to write it (default: {default_cache_dir()})")
    a = p.parse_args(argv)
    try:
        print(ensure_tiny_checkpoint(a.directory, rebuild=True))
    except S2VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
