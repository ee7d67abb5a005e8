"""DiT checkpoint I/O in the official diffusers layout (spec §2).

Layout: ``config.json`` + ``diffusion_pytorch_model.safetensors.index.json`` +
``diffusion_pytorch_model-0000N-of-0000M.safetensors`` shards, or a single
``diffusion_pytorch_model.safetensors``.

* :func:`load_dit` builds the model on the meta device, validates every tensor name and shape
  from the safetensors headers first (all problems reported together in one
  :class:`CheckpointError`), then loads tensor by tensor, casting each to the requested
  dtype/device and assigning it in place of the meta parameter (``load_state_dict(assign=True)``
  semantics: never two copies of the weights).
* :func:`save_pretrained` writes the sharded layout.
* :func:`iter_checkpoint_tensors` streams selected tensors or slices (``safe_open.get_slice``).
* :func:`load_tensor_file` is the one reader of pickled ``.pth`` / ``.bin`` files in the package
  (VAE, T5): ``torch.load(weights_only=True)`` with no fallback, so no file we read can run code;
  a pickle that needs the full unpickler is refused with a one-line :class:`CheckpointError`.

The DiT is read only through safetensors (``safe_open``), which holds no code.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DiTConfig
from .errors import CheckpointError
from .hub import download_hint, repair_hint

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
DOWNLOAD_HINT = f"download the weights with `{download_hint()}`"


# ----------------------------------------------------------------------------- discovery
def checkpoint_files(path: str) -> List[str]:
    """Safetensors files of a DiT checkpoint directory (index order), checked to exist."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist; {DOWNLOAD_HINT}")
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"cannot read checkpoint index {index} ({exc!r}); "
                                  f"re-download it: {DOWNLOAD_HINT}") from None
        root = os.path.realpath(path)
        bad = [f for f in files if not isinstance(f, str) or os.path.commonpath(
            [root, os.path.realpath(os.path.join(root, f))]) != root]
        if bad:
            raise CheckpointError(f"checkpoint index {index} names shard(s) outside {path}: "
                                  f"{_short(bad)}; re-download it: {DOWNLOAD_HINT}")
        full = [os.path.join(path, f) for f in files]
        missing = [p for p in full if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"missing checkpoint shard(s) {_short(missing)}; {DOWNLOAD_HINT}")
        return full
    single = os.path.join(path, SINGLE_NAME)
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"no DiT weights in {path} (expected {INDEX_NAME} + shards or "
                          f"{SINGLE_NAME}); {DOWNLOAD_HINT}")


def _short(names: Iterable, limit: int = 10) -> str:
    names = [str(n) for n in names]
    head = ", ".join(names[:limit])
    return head + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _safe_open(file: str, device: str = "cpu"):
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as exc:  # safetensors raises several exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"cannot read checkpoint shard {file} as safetensors ({first}); "
                              f"{_fix(file)}") from None


def _fix(file: str) -> str:
    """The repair advice for a damaged DiT file: rebuild (tiny set) or download again."""
    hint = repair_hint(file)
    return DOWNLOAD_HINT if hint.startswith("re-download") else hint


# ----------------------------------------------------------------------------- pickled files
def _unpickler_refusal(what: str, path: str, exc: BaseException, fix: str) -> str:
    """One line from torch's multi-line weights-only refusal: the blocked global when there is
    one (``posix.system``), else the unsupported opcode (a corrupt file looks the same)."""
    text = str(exc)
    m = re.search(r"unsupported GLOBAL ([\w.]+)", text, re.I)
    if m:
        return (f"refusing to load {what} {path}: its pickle calls {m.group(1)}, which only "
                f"Python's full unpickler allows (it can run code), and s2v_fast reads only plain "
                f"tensor files; {fix}")
    detail = next((ln.strip().rstrip(".") for ln in text.splitlines()
                   if ln.strip().lower().startswith("unsupported")), "not a tensor pickle")
    return (f"cannot read {what} {path}: it is corrupt or a pickle that needs Python's full "
            f"unpickler (which can run code; s2v_fast reads only plain tensor files) "
            f"({detail[:120]}); {fix}")


def load_tensor_file(path: str, what: str, fix: Optional[str] = None, *, mmap: bool = False):
    """Read a ``.safetensors`` file, or a pickled ``.pth`` / ``.bin`` with
    ``torch.load(weights_only=True)`` and never anything looser: a pickle that needs the full
    unpickler (it could run code, e.g. ``os.system``) is refused with a one-line
    :class:`CheckpointError` naming the file. ``what`` names the file in messages
    (``"VAE checkpoint"``); ``fix`` is the advice appended (default: rebuild / re-download).
    ``mmap`` maps zip-format files instead of reading them (falls back to a plain read for the
    legacy format; still weights-only)."""
    fix = fix or repair_hint(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(f"cannot read {what} {path} ({first}); {fix}") from None
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ..." and the like
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                if not (mmap and "mmap" in str(exc)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(_unpickler_refusal(what, path, exc, fix)) from None
        raise CheckpointError(f"cannot read {what} {path} (corrupt pickle: "
                              f"{(str(exc).splitlines() or [''])[0][:120]}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, I/O error, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"cannot read {what} {path} ({type(exc).__name__}: {first}); "
                              f"{fix}") from None


# ----------------------------------------------------------------------------- reading
def iter_checkpoint_tensors(
    path: str,
    select: Union[None, Iterable[str], Callable[[str], bool]] = None,
    slices: Optional[Callable[[str, Tuple[int, ...]], Optional[tuple]]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the selected tensors of a checkpoint, shard by shard.

    select: None (all), a collection of names, or a predicate name -> bool.
    slices: optional fn(name, shape) -> index tuple (e.g. ``(slice(0, 2560), slice(None))``)
    read through ``get_slice`` so only that part is loaded; None means the whole tensor.
    """
    if select is not None and not callable(select):
        wanted = set(select)
        select = wanted.__contains__
    dev = str(torch.device(device))
    for file in checkpoint_files(path):
        with _safe_open(file, dev if dev.startswith("cuda") else "cpu") as f:
            for name in f.keys():
                if select is not None and not select(name):
                    continue
                idx = None
                if slices is not None:
                    sl = f.get_slice(name)
                    idx = slices(name, tuple(sl.get_shape()))
                t = f.get_tensor(name) if idx is None else f.get_slice(name)[idx]
                yield name, t.to(device=device, dtype=dtype or t.dtype)


def _header_shapes(files: List[str]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    shapes = {}
    for file in files:
        with _safe_open(file) as f:
            for name in f.keys():
                shapes[name] = (tuple(f.get_slice(name).get_shape()), file)
    return shapes


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(tensor, requires_grad=False))
    else:
        mod._buffers[attr] = tensor


def load_dit(path: str, device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = None, config: Optional[DiTConfig] = None):
    """Build `S2VTransformer` from a checkpoint directory (config.json + safetensors)."""
    from .models.dit import S2VTransformer

    cfg = config or DiTConfig.from_json(path if os.path.isdir(path) else os.path.dirname(path))
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = S2VTransformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = _header_shapes(files)

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{k}: checkpoint {list(found[k][0])} vs model {list(s)}"
                  for k, s in expected.items() if k in found and found[k][0] != s]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_short(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_short(mismatched, 5)}")
        raise CheckpointError(f"checkpoint {path} does not match its config.json ("
                              + "; ".join(parts) + "); check the directory holds the complete "
                              f"Wan2.2-S2V-14B DiT weights or {DOWNLOAD_HINT}")

    for name, tensor in iter_checkpoint_tensors(path, device=device, dtype=dtype):
        _assign(model, name, tensor)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- writing
def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"bad shard size {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
            "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(model: nn.Module, path: str, max_shard_size: Union[int, str] = "10GB",
                    dtype: Optional[torch.dtype] = None) -> List[str]:
    """Write config.json + safetensors (sharded with an index when larger than one shard)."""
    os.makedirs(path, exist_ok=True)
    model.config.to_json(os.path.join(path, CONFIG_NAME))
    limit = _parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", dtype=dtype or t.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    for stale in os.listdir(path):
        if stale.startswith("diffusion_pytorch_model") and (
                stale.endswith(".safetensors") or stale == INDEX_NAME):
            os.remove(os.path.join(path, stale))
    n = len(shards)
    if n == 1:
        file = os.path.join(path, SINGLE_NAME)
        save_file(shards[0], file, metadata={"format": "pt"})
        return [file]
    weight_map, written = {}, []
    for i, shard in enumerate(shards, 1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        written.append(os.path.join(path, fname))
    with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    return written
