"""Model resolution: ``"tiny"``, a local checkpoint directory, or a Hugging Face repo id.

Every model goes through the same loaders afterwards; this module only turns the user's
``--model`` value into a local directory in the official ``Wan-AI/Wan2.2-S2V-14B`` layout (spec §2)
and checks that the directory is complete before any heavy work starts.
"""
from __future__ import annotations

import json
import os
import re

from .errors import CheckpointError

DEFAULT_MODEL_ID = "Wan-AI/Wan2.2-S2V-14B"
TINY_MODEL = "tiny"

# File names the loaders read (spec §2, §3.1).
DIT_CONFIG = "config.json"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
VAE_CHECKPOINT = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
# Written by :func:`s2v_fast.models.tiny.write_tiny_checkpoint` next to the tiny model set: its
# version and the size + sha256 of every file, so a damaged set is told from a real checkpoint.
TINY_MANIFEST = "s2v_fast_tiny.json"

# Only what the pipeline reads: no ModelScope metadata, no example assets.
ALLOW_PATTERNS = [
    DIT_CONFIG,
    "diffusion_pytorch_model*.safetensors",
    DIT_INDEX,
    T5_CHECKPOINT,
    f"{T5_TOKENIZER}/*",
    VAE_CHECKPOINT,
    f"{WAV2VEC_DIR}/*",
]

_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def download_hint(directory: str = "DIR") -> str:
    """The download command (huggingface_hub >= 0.34 installs ``hf``; ``huggingface-cli`` is gone)."""
    return f"hf download {DEFAULT_MODEL_ID} --local-dir {directory}"


def is_tiny_dir(path: str) -> bool:
    """Whether ``path`` holds a tiny model set written by s2v_fast (it has the tiny manifest)."""
    return os.path.isfile(os.path.join(path, TINY_MANIFEST))


def tiny_rebuild_hint(directory: str) -> str:
    """How to rebuild the tiny model set in ``directory`` (one clause, no trailing period)."""
    from .models.tiny import default_cache_dir

    if _same_path(directory, default_cache_dir()):
        return (f"run again with --model tiny to rebuild it (or delete {directory}; it is "
                f"rebuilt on the next --model tiny run)")
    return (f"rebuild it with `python -m s2v_fast.models.tiny {directory}`, or use --model tiny "
            f"(the cached tiny set is rebuilt automatically)")


def repair_hint(file_path: str) -> str:
    """What to do about a damaged or unusable file of a model directory: rebuild it when the
    directory is a tiny model set written by s2v_fast, else download the official weights."""
    d = os.path.dirname(os.path.abspath(file_path))
    for _ in range(3):  # the file may sit in google/umt5-xxl/ or wav2vec2-large-xlsr-53-english/
        if is_tiny_dir(d):
            return f"{d} is a tiny model set written by s2v_fast: {tiny_rebuild_hint(d)}"
        d = os.path.dirname(d)
    return f"re-download it: {download_hint()}"


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def missing_files(path: str) -> list[str]:
    """Names (relative to ``path``) of the files the pipeline needs that are not there."""
    missing = []

    def need(rel):
        if not os.path.exists(os.path.join(path, rel)):
            missing.append(rel)

    need(DIT_CONFIG)
    index = os.path.join(path, DIT_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            missing.append(f"{DIT_INDEX} (unreadable)")
            shards = []
        for shard in shards:
            need(shard)
    elif not os.path.isfile(os.path.join(path, DIT_SINGLE)):
        missing.append(f"{DIT_INDEX} + diffusion_pytorch_model-*.safetensors")
    need(T5_CHECKPOINT)
    tok = os.path.join(path, T5_TOKENIZER)
    if not os.path.isdir(tok):
        missing.append(T5_TOKENIZER + "/")
    elif not any(os.path.exists(os.path.join(tok, f)) for f in ("tokenizer.json", "spiece.model")):
        missing.append(f"{T5_TOKENIZER}/tokenizer.json")
    need(VAE_CHECKPOINT)
    w2v = os.path.join(path, WAV2VEC_DIR)
    if not os.path.isdir(w2v):
        missing.append(WAV2VEC_DIR + "/")
    else:
        need(f"{WAV2VEC_DIR}/config.json")
        if not any(
            os.path.exists(os.path.join(w2v, f)) for f in ("model.safetensors", "pytorch_model.bin")
        ):
            missing.append(f"{WAV2VEC_DIR}/model.safetensors")
    return missing


def check_model_dir(path: str) -> str:
    """Raise a one-line :class:`CheckpointError` naming every missing file; return ``path``."""
    missing = missing_files(path)
    if missing:
        raise CheckpointError(
            f"model directory {path} is incomplete, missing: {', '.join(missing)}; "
            f"download the weights with: {download_hint(path)}"
        )
    return path


def is_hf_id(name: str) -> bool:
    return bool(_HF_ID.match(name)) and not os.path.exists(name)


def resolve_model(name_or_path: str, *, cache_dir: str | None = None) -> str:
    """Return a local directory holding a complete checkpoint in the official layout.

    * ``"tiny"``: the built-in tiny model set (random weights, produces noise; for trying the
      pipeline), materialised once in the cache (:func:`s2v_fast.models.tiny.ensure_tiny_checkpoint`).
    * an existing directory: used as is, after checking it is complete. A tiny model set written
      by s2v_fast (it carries :data:`TINY_MANIFEST`) is checked against its manifest as well: the
      tiny cache itself is rebuilt when damaged, any other such directory gets a one-line error
      saying how to rebuild it (never the 45 GB download hint).
    * ``owner/name``: downloaded (only the files the pipeline reads) with
      ``huggingface_hub.snapshot_download``; files already in the HF cache are reused.
    """
    if name_or_path == TINY_MODEL:
        from .models.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint()
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        if is_tiny_dir(expanded):
            return _check_tiny_dir(expanded)
        return check_model_dir(expanded)
    if os.path.exists(expanded):
        raise CheckpointError(
            f"--model {name_or_path} is a file; pass the checkpoint directory "
            f"(download it with: {download_hint()})"
        )
    if not is_hf_id(name_or_path):
        raise CheckpointError(
            f"model directory {name_or_path} does not exist; pass a checkpoint directory, "
            f"'{DEFAULT_MODEL_ID}' or 'tiny' (download with: {download_hint()})"
        )
    return check_model_dir(_download(name_or_path, cache_dir=cache_dir))


def _check_tiny_dir(path: str) -> str:
    from .models.tiny import default_cache_dir, ensure_tiny_checkpoint, verify_tiny_checkpoint

    if _same_path(path, default_cache_dir()):  # the package's own cache: rebuilt when damaged
        return ensure_tiny_checkpoint(path)
    problem = verify_tiny_checkpoint(path)
    if problem:
        raise CheckpointError(f"the tiny model set in {path} is damaged ({problem}); "
                              f"{tiny_rebuild_hint(path)}")
    return path


def _download(repo_id: str, *, cache_dir: str | None = None) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise CheckpointError(
            f"huggingface_hub is not installed, cannot download {repo_id}; "
            f"pip install huggingface_hub or download manually: {download_hint()}"
        ) from e
    try:
        return snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir)
    except Exception as first:  # network down, repo missing, gated, disk full ...
        try:  # a complete earlier download in the HF cache still works offline
            return snapshot_download(
                repo_id, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir, local_files_only=True
            )
        except Exception:
            reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
            raise CheckpointError(
                f"could not download {repo_id} from the Hugging Face Hub ({type(first).__name__}: "
                f"{reason[:200]}); download the weights manually with: {download_hint()} "
                f"and pass --model DIR"
            ) from first
