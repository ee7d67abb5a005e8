"""LoRA files merged into the DiT weights, once, before fp8 quantisation or tensor-parallel sharding.

Merging (W <- W + s * up @ down, in fp32, rounded once to the parameter's dtype) costs nothing per
step, and every later stage (fp8 scales, TP shards, the fused kernels) sees plain weights.

Our DiT's module names equal the checkpoint keys (``blocks.0.self_attn.q``, ``blocks.0.ffn.0``,
``audio_injector.injector.3.k``), so a LoRA target is ``model.get_submodule(name)``. Files are read
with safetensors only (never unpickled). Key formats, detected per key (a file may mix them):

1. PEFT: ``[base_model.model.][diffusion_model.]<module>.lora_A[.default].weight`` ([r, in]) and
   ``.lora_B[.default].weight`` ([out, r]); no alpha in the file, so the user scale is the multiplier.
2. Original Wan / lightx2v / ComfyUI: ``[model.][diffusion_model.]<module>.lora_down.weight``,
   ``.lora_up.weight``, ``.alpha`` (scalar), ``.diff`` (full weight delta), ``.diff_b`` (bias delta).
3. kohya / musubi-tuner: ``lora_unet_<module with dots as underscores>.lora_down.weight``,
   ``.lora_up.weight``, ``.alpha``; the dotted name is found by matching the model's Linear names.

Usage::

    spec = parse_lora_spec("Quark-Vision/Live-Avatar:0.5")
    lora = load_lora(resolve_lora_file(spec.source))
    print(merge_lora(model, [(lora, spec.scale)]).summary())
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import InputError
from .hub import is_hf_id

# Hugging Face repos whose LoRA file is known, so no listing of the repo is needed.
KNOWN_LORA_FILES: Dict[str, str] = {"Quark-Vision/Live-Avatar": "liveavatar.safetensors"}

KOHYA_PREFIX = "lora_unet_"
# Stripped in this order (a key may carry base_model.model. and then diffusion_model.).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.")
# Key suffix -> LoraTarget field; no suffix ends another, so the first match is the only one.
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".diff_b", "diff_b"), (".alpha", "alpha"), (".diff", "diff"),
)
# File endings that mark a source as a local file, never an HF repo id ("loras/x.safetensors").
_FILE_ENDINGS = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_FIX_FILE = "pass a .safetensors LoRA file"


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH_OR_HF_ID[:SCALE]`` value; ``scale`` None means the preset's or 1.0."""
    source: str
    scale: Optional[float] = None


@dataclass(frozen=True)
class LoraTarget:
    """Everything a LoRA file holds for one module: a low-rank pair and/or full deltas.

    ``name`` is the dotted module name, or the underscore-joined kohya name when ``underscored``
    (resolved against the model in :func:`merge_lora`). ``keys`` maps each field set here
    (``down``, ``up``, ``alpha``, ``diff``, ``diff_b``) to its tensor's key in the file, so errors
    name the file's own keys.
    """
    name: str
    down: Optional[torch.Tensor] = None  # [r, in]
    up: Optional[torch.Tensor] = None  # [out, r]
    alpha: Optional[float] = None
    diff: Optional[torch.Tensor] = None  # same shape as the weight
    diff_b: Optional[torch.Tensor] = None  # same shape as the bias
    underscored: bool = False
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def rank(self) -> Optional[int]:
        return None if self.down is None else int(self.down.shape[0])


@dataclass(frozen=True)
class LoraWeights:
    """A loaded LoRA file: its targets by name (file order) and how many tensors it held."""
    path: str
    targets: Mapping[str, LoraTarget]
    num_tensors: int

    @property
    def ranks(self) -> List[int]:
        """The distinct ranks of the low-rank pairs, sorted."""
        return sorted({t.rank for t in self.targets.values() if t.rank is not None})


@dataclass(frozen=True)
class MergedLora:
    """What one LoRA contributed: the user scale, its alpha/rank factors and counts per kind."""
    path: str
    scale: float
    alpha_factors: Tuple[float, ...]  # distinct alpha/rank (1.0 where the file has no alpha)
    low_rank: int
    diff: int
    diff_b: int


@dataclass(frozen=True)
class MergeReport:
    """Result of :func:`merge_lora`: one entry per LoRA and the number of parameters changed."""
    loras: Tuple[MergedLora, ...]
    parameters: int

    def summary(self) -> str:
        parts = []
        for m in self.loras:
            factors = "/".join(f"{f:g}" for f in m.alpha_factors) or "-"
            parts.append(f"{os.path.basename(m.path)} x{m.scale:g} (alpha/rank {factors}): "
                         f"{m.low_rank} low-rank, {m.diff} weight-delta, {m.diff_b} bias-delta")
        return f"merged LoRA {'; '.join(parts)} into {self.parameters} parameters"


# ---------------------------------------------------------------------------------------- CLI form
def parse_lora_spec(text: str) -> LoraSpec:
    """Split ``PATH_OR_HF_ID[:SCALE]`` at the last colon when what follows is a number.

    A colon followed by a path (``C:\\x\\y.safetensors``) or after a drive letter (``C:y``) stays
    part of the path; any other non-number after the last colon is a mistyped scale.
    """
    text = text.strip()
    if os.path.exists(text):
        return LoraSpec(text)
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or (len(head) == 1 and head.isalpha()):
        return _spec(text, None)
    try:
        scale = float(tail)
    except ValueError:
        raise InputError(f"bad LoRA scale {tail!r} in {text!r} (fix: use PATH_OR_HF_ID[:SCALE] "
                         f"with a number, e.g. lora.safetensors:0.5)") from None
    if not math.isfinite(scale):
        raise InputError(f"bad LoRA scale {tail!r} in {text!r} (fix: use a finite number, e.g. 0.5)")
    return _spec(head, scale)


def _spec(source: str, scale: Optional[float]) -> LoraSpec:
    if not source:
        raise InputError("empty LoRA source (fix: pass --lora PATH_OR_HF_ID[:SCALE])")
    return LoraSpec(source, scale)


# ---------------------------------------------------------------------------------- file lookup
def resolve_lora_file(source: str, cache_dir: Optional[str] = None) -> str:
    """A local ``.safetensors`` path for ``source``: a file as is, the single ``*.safetensors`` of
    a directory, or the LoRA file of a Hugging Face repo ``owner/name`` (downloaded, cached)."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors")
                       and os.path.isfile(os.path.join(path, n)))
        return os.path.join(path, _pick_one(path, names))
    if is_hf_id(source) and not source.lower().endswith(_FILE_ENDINGS):
        return _download(source, cache_dir)
    raise InputError(f"LoRA file not found: {source} (fix: pass an existing .safetensors file, a "
                     f"directory holding one, or a Hugging Face repo id such as Quark-Vision/Live-Avatar)")


def _pick_one(where: str, names: Sequence[str]) -> str:
    """The one ``.safetensors`` file of a directory or repo; guessing among several is wrong."""
    if len(names) == 1:
        return names[0]
    if not names:
        raise InputError(f"no .safetensors file in {where} (fix: pass the LoRA .safetensors file itself)")
    raise InputError(f"{where} holds several .safetensors files ({', '.join(names)}) "
                     f"(fix: pass the path of one of them)")


def _download(repo_id: str, cache_dir: Optional[str]) -> str:
    """Download the repo's LoRA file; any hub failure becomes one line saying how to do it by hand."""
    filename = KNOWN_LORA_FILES.get(repo_id)
    try:
        import huggingface_hub as hub

        if filename is None:
            names = sorted(f for f in hub.list_repo_files(repo_id) if f.endswith(".safetensors"))
            filename = _pick_one(f"Hugging Face repo {repo_id}", names)
        return hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir)
    except InputError:
        raise
    except Exception as e:  # network down, repo missing or gated, disk full ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        what = filename or "FILE.safetensors"
        raise InputError(f"could not download LoRA {repo_id} from the Hugging Face Hub "
                         f"({type(e).__name__}: {reason}) (fix: download it by hand with "
                         f"`hf download {repo_id} {what} --local-dir DIR` and pass DIR/{what})") from e


# -------------------------------------------------------------------------------------- loading
def load_lora(path: str) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file (never unpickles) into per-target entries."""
    tensors = _read_safetensors(path)
    # Keyed by (name, kohya-style?): a kohya name and a dotted one never share an entry.
    fields: Dict[Tuple[str, bool], Dict[str, torch.Tensor]] = {}
    keys: Dict[Tuple[str, bool], Dict[str, str]] = {}
    unknown = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, underscored, kind = parsed
        slot = (name, underscored)
        if kind in fields.setdefault(slot, {}):
            raise InputError(f"LoRA {path}: tensors {keys[slot][kind]} and {key} are the same "
                             f"{kind} of {name} (fix: keep one of the two in the file)")
        fields[slot][kind] = tensor
        keys.setdefault(slot, {})[kind] = key
    if unknown:
        raise InputError(f"LoRA {path}: {len(unknown)} of {len(tensors)} tensors have an unknown key "
                         f"format (e.g. {', '.join(unknown[:3])}) (fix: pass a PEFT, Wan/ComfyUI or "
                         f"kohya LoRA .safetensors file)")
    targets = {(KOHYA_PREFIX if slot[1] else "") + slot[0]: _make_target(path, *slot, f, keys[slot])
               for slot, f in fields.items()}
    return LoraWeights(path, targets, len(tensors))


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise InputError(f"LoRA file not found: {path} (fix: {_FIX_FILE})")
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except Exception as e:  # not safetensors (a pickle), truncated, corrupt, unreadable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"cannot read LoRA file {path}: {_describe_unreadable(path, reason)} "
                         f"(fix: {_FIX_FILE})") from None
    if not tensors:
        raise InputError(f"cannot read LoRA file {path}: it holds no tensors (fix: {_FIX_FILE})")
    return tensors


def _describe_unreadable(path: str, reason: str) -> str:
    """Say plainly when the file is a PyTorch pickle: safetensors' own message does not."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return reason
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return f"it is a PyTorch pickle (.pt/.bin/.ckpt), which is never loaded ({reason})"
    return f"not a valid safetensors file ({reason})"


def _parse_key(key: str) -> Optional[Tuple[str, bool, str]]:
    """``(module name, kohya-style?, field)`` of one tensor key, or None for an unknown format."""
    match = next(((s, k) for s, k in _SUFFIXES if key.endswith(s)), None)
    if match is None:
        return None
    stem, kind = key[: -len(match[0])], match[1]
    if stem.startswith(KOHYA_PREFIX):
        name = stem[len(KOHYA_PREFIX):]
        return (name, True, kind) if name and "." not in name else None
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
    return (stem, False, kind) if stem else None


def _make_target(path: str, name: str, underscored: bool, f: Dict[str, torch.Tensor],
                 keys: Dict[str, str]) -> LoraTarget:
    """Check the model-independent structure: a low-rank pair is complete, 2-D and of one rank."""
    down, up, alpha = f.get("down"), f.get("up"), f.get("alpha")
    if (down is None) != (up is None):
        have, lack = ("down", "up") if up is None else ("up", "down")
        raise InputError(f"LoRA {path}: {keys[have]} has no matching {lack} tensor "
                         f"(lora_A/lora_down needs lora_B/lora_up) (fix: {_FIX_FILE} that is complete)")
    if alpha is not None and down is None:
        raise InputError(f"LoRA {path}: {keys['alpha']} has no lora_down/lora_up pair to scale "
                         f"(fix: {_FIX_FILE} that is complete)")
    if down is not None:
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise InputError(f"LoRA {path}: {keys['down']} {list(down.shape)} and {keys['up']} "
                             f"{list(up.shape)} are not a [r, in] / [out, r] pair of one rank "
                             f"(fix: {_FIX_FILE} for Linear layers)")
    if alpha is not None:
        if alpha.numel() != 1:
            raise InputError(f"LoRA {path}: {keys['alpha']} has shape {list(alpha.shape)}, expected "
                             f"a scalar (fix: {_FIX_FILE})")
        alpha = float(alpha.item())
    return LoraTarget(name, down=down, up=up, alpha=alpha, diff=f.get("diff"),
                      diff_b=f.get("diff_b"), underscored=underscored, keys=dict(keys))


# -------------------------------------------------------------------------------------- merging
@dataclass(frozen=True)
class _Term:
    """One addition to a parameter: ``scale * left @ right`` (up @ down), or ``scale * left``."""
    scale: float
    left: torch.Tensor
    right: Optional[torch.Tensor] = None


class _ModelIndex:
    """The model's modules and parameters by name, and its Linear names in kohya's underscore form."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.kohya: Dict[str, Optional[str]] = {}
        for n, m in self.modules.items():
            if isinstance(m, nn.Linear):
                # Two names of one underscore form ("a_b.c", "a.b_c") can't be told apart: no guess.
                u = n.replace(".", "_")
                self.kohya[u] = None if u in self.kohya else n

    def name_of(self, target: LoraTarget) -> Optional[str]:
        return self.kohya.get(target.name) if target.underscored else target.name


def merge_lora(model: nn.Module, loras: Sequence[Tuple[LoraWeights, Optional[float]]]) -> MergeReport:
    """Merge LoRAs into ``model`` in place: ``W <- W + scale * alpha/rank * up @ down`` (and the full
    ``diff``/``diff_b`` deltas times ``scale``), computed in fp32 on the weight's device and rounded
    once to the weight's dtype. ``scale`` None means 1.0; alpha/rank is 1.0 when the file has no
    alpha. Everything is validated before any weight changes, so a failing merge leaves the model
    as it was. Parameters keep their identity (merged with ``copy_``)."""
    index = _ModelIndex(model)
    plan: Dict[int, Tuple[nn.Parameter, List[_Term]]] = {}
    merged = []
    for lora, scale in loras:
        terms, info = _plan_lora(index, lora, 1.0 if scale is None else float(scale))
        merged.append(info)
        for param, term in terms:
            plan.setdefault(id(param), (param, []))[1].append(term)
    with torch.no_grad():
        for param, param_terms in plan.values():
            _apply(param, param_terms)
    return MergeReport(tuple(merged), len(plan))


def check_lora(model: nn.Module, loras: Sequence[Tuple[LoraWeights, Optional[float]]]) -> None:
    """Every check :func:`merge_lora` makes, without merging: works on a meta-device model, so
    a LoRA that does not fit the checkpoint fails before any weight is read."""
    index = _ModelIndex(model)
    for lora, scale in loras:
        _plan_lora(index, lora, 1.0 if scale is None else float(scale))


def _plan_lora(index: _ModelIndex, lora: LoraWeights, scale: float
               ) -> Tuple[List[Tuple[nn.Parameter, _Term]], MergedLora]:
    """Resolve and shape-check every tensor of one LoRA; raise before anything is merged."""
    unmatched: List[str] = []
    terms: List[Tuple[nn.Parameter, _Term]] = []
    factors, counts, seen = set(), {"low_rank": 0, "diff": 0, "diff_b": 0}, {}
    for target in lora.targets.values():
        name = index.name_of(target)
        found = _target_params(index, name, target)
        missing = [key for kind, key in target.keys.items() if found.get(kind) is None]
        if missing:
            unmatched += missing
            continue
        first_key = next(iter(target.keys.values()))
        if name in seen:
            raise InputError(f"LoRA {lora.path}: {seen[name]} and {first_key} both target layer "
                             f"{name} (fix: keep one of the two in the file)")
        seen[name] = first_key
        _check_shapes(lora.path, name, target, found)
        if target.down is not None:
            factor = 1.0 if target.alpha is None else target.alpha / target.rank
            factors.add(factor)
            terms.append((found["up"], _Term(scale * factor, target.up, target.down)))
            counts["low_rank"] += 1
        for kind in ("diff", "diff_b"):
            if getattr(target, kind) is not None:
                terms.append((found[kind], _Term(scale, getattr(target, kind))))
                counts[kind] += 1
    if unmatched:
        raise InputError(f"LoRA {lora.path}: {len(unmatched)} of {lora.num_tensors} tensors match no "
                         f"layer of the model (e.g. {', '.join(unmatched[:3])}); is it made for this "
                         f"model? (fix: pass a LoRA trained for Wan2.2-S2V-14B)")
    return terms, MergedLora(lora.path, scale, tuple(sorted(factors)), **counts)


def _target_params(index: _ModelIndex, name: Optional[str], target: LoraTarget
                   ) -> Dict[str, Optional[nn.Parameter]]:
    """The parameter each field of ``target`` updates (None where the model has none).

    A low-rank pair needs an ``nn.Linear``; a full ``diff`` may update any module's weight (norms,
    convs) or a bare parameter such as ``blocks.0.modulation``; ``diff_b`` updates the bias."""
    if name is None:
        return {}
    module = index.modules.get(name)
    weight = index.params.get(f"{name}.weight")
    linear_weight = weight if isinstance(module, nn.Linear) else None
    return {"down": linear_weight, "up": linear_weight, "alpha": linear_weight,
            "diff": weight if weight is not None else index.params.get(name),
            "diff_b": index.params.get(f"{name}.bias")}


def _check_shapes(path: str, name: str, target: LoraTarget, found: Mapping[str, nn.Parameter]) -> None:
    if target.down is not None:
        out_f, in_f = found["up"].shape
        _expect(path, name, target.keys["down"], target.down, (target.rank, in_f), found["up"])
        _expect(path, name, target.keys["up"], target.up, (out_f, target.rank), found["up"])
    for kind in ("diff", "diff_b"):
        delta = getattr(target, kind)
        if delta is not None:
            _expect(path, name, target.keys[kind], delta, tuple(found[kind].shape), found[kind])


def _expect(path: str, name: str, key: str, tensor: torch.Tensor, shape: Tuple[int, ...],
            param: nn.Parameter) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise InputError(f"LoRA {path}: tensor {key} has shape {list(tensor.shape)}, expected "
                         f"{list(shape)} for layer {name} (parameter {list(param.shape)}); is it made "
                         f"for this model? (fix: pass a LoRA trained for Wan2.2-S2V-14B)")


def _apply(param: nn.Parameter, terms: Sequence[_Term]) -> None:
    """Add every term to ``param`` in fp32 on its device, then round once to its dtype.

    The delta is formed as ``(up @ down) * scale`` and then added, the order PEFT's
    ``merge_and_unload`` uses, so an fp32 merge matches it bit for bit."""
    acc = param.detach().to(torch.float32, copy=True)
    for t in terms:
        delta = t.left.to(acc.device, torch.float32)
        if t.right is not None:
            delta = delta @ t.right.to(acc.device, torch.float32)
        acc += delta * t.scale
    param.copy_(acc)
