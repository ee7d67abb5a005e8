"""Every ``S2V_*`` environment variable of the package: read once, typed, validated, documented.

The variables used to be read with ``os.environ`` in nine files, each parsing its own way (``!=
"0"``, ``in ("1", "true", ...)``, a bare ``int()``), some at import and some on every kernel
launch; a typo silently did nothing, and most were undocumented. Here each one is a field of a
frozen dataclass that carries its name, default, parser (the valid values) and a one-line doc;
``docs/cli.md``'s table is generated from the fields (``python -m s2v_fast.options``) and a test
keeps the two equal. This module is the only reader of ``S2V_*`` in the package (a test greps for
others); it imports nothing of the package but ``errors``, so any module may use it.

:func:`env_options` parses the environment on first use and caches the result (it is cheap to call
on every kernel launch); a bad value is a one-line :class:`~s2v_fast.errors.InputError` naming the
variable, the value and the valid values, raised by whichever call reads the options first (the
CLI reads them before anything else). An empty value is the same as unset. The few module constants
tests and benchmarks patch (``folded_output.FOLD_OUTPUT``, ``fast_path.GELU_EPILOGUE``,
``fp8_attention.FP8_MIN_KEYS``, the NVTX switch, the attention backend) take their value at import,
as they always did; :func:`reload_env_options` makes the next call read the environment again
(tests that change it; ``tests/conftest.py`` does it on every ``monkeypatch.setenv``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from .errors import InputError

# Value sets the kernels share with their variables (kept here so that this module stays a leaf;
# kernels/attention.py and kernels/fp8_attention.py take them from here). The first is the default.
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "sdpa_flash", "triton", "cuda", "flash_attn", "fp8")
FP8_K_SCALES = ("channel", "token")
FP8_PV_MODES = ("fp8", "bf16")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class _Parser:
    parse: Callable[[str], object]  # the stripped, non-empty value -> the option (None: invalid)
    valid: str  # the valid values, for the error message and the docs


def _choice(*values: str) -> _Parser:
    return _Parser(lambda s: s if s in values else None, "one of " + ", ".join(values))


def _flag() -> _Parser:
    def parse(s):
        s = s.lower()
        return True if s in _TRUE else False if s in _FALSE else None

    return _Parser(parse, "1 or 0 (also true/false, yes/no, on/off)")


def _int(low: int = 0, allowed: Tuple[int, ...] = ()) -> _Parser:
    def parse(s):
        try:
            n = int(s)
        except ValueError:
            return None
        return n if n >= low and (not allowed or n in allowed) else None

    valid = ("one of " + ", ".join(map(str, allowed))) if allowed else f"an integer >= {low}"
    return _Parser(parse, valid)


def _path() -> _Parser:
    return _Parser(lambda s: s, "a directory")


def _var(name: str, default, parser: _Parser, doc: str, default_doc: str = None):
    """A dataclass field read from environment variable ``name`` (``default`` when unset/empty)."""
    return field(default=default, metadata=dict(
        env=name, parser=parser, doc=doc,
        default_doc=default_doc if default_doc is not None else _default_text(default)))


def _default_text(default) -> str:
    if isinstance(default, bool):
        return "1" if default else "0"
    return "unset" if default is None else str(default)


@dataclass(frozen=True)
class KernelTuning:
    """Kernel knobs: GPU tuning and switches of single fused paths (each off switch exists to
    measure or rule out that path)."""

    fp8_attn_k: str = _var(
        "S2V_FP8_ATTN_K", FP8_K_SCALES[0], _choice(*FP8_K_SCALES),
        "FP8 attention: K's e4m3 scales per channel (moved into Q; no per-key work in the kernel) "
        "or per key (more accurate, ~15 % slower); `s2v_fast/kernels/fp8_attention.py`")
    fp8_attn_pv: str = _var(
        "S2V_FP8_ATTN_PV", FP8_PV_MODES[0], _choice(*FP8_PV_MODES),
        "FP8 attention: P.V in e4m3 (twice the MMA rate) or in bf16 (more accurate, slower; Triton "
        "kernel only)")
    fp8_attn_impl: str = _var(
        "S2V_FP8_ATTN_IMPL", "auto", _choice("auto", "triton"),
        "FP8 attention kernel: `auto` takes the CUDA kernel on sm_90 with nvcc, else Triton; "
        "`triton` forces the Triton kernel")
    fp8_attn_min_keys: int = _var(
        "S2V_FP8_ATTN_MIN_KEYS", 4096, _int(0),
        "Backend `fp8`: calls with fewer keys (the cross-attention) take the bf16 `auto` choice "
        "(their K/V quantisation costs more than the fp8 MMAs save)")
    fp8_attn_config: Optional[int] = _var(
        "S2V_FP8_ATTN_CONFIG", None, _int(0),
        "Triton FP8 attention: force this index of `FP8_CONFIGS` instead of autotuning")
    fp8_attn_autotune: bool = _var(
        "S2V_FP8_ATTN_AUTOTUNE", True, _flag(),
        "Triton FP8 attention: time every config on first use of a shape class (0: the first "
        "config that compiles)")
    flash_config: Optional[int] = _var(
        "S2V_FLASH_CONFIG", None, _int(0),
        "Triton flash attention: force this index of `FLASH_CONFIGS` instead of autotuning")
    flash_autotune: bool = _var(
        "S2V_FLASH_AUTOTUNE", True, _flag(),
        "Triton flash attention: time every config on first use of a shape class (0: the first "
        "config that compiles)")
    row_num_warps: Optional[int] = _var(
        "S2V_ROW_NUM_WARPS", None, _int(1, (1, 2, 4, 8, 16, 32)),
        "Row kernels (norms, modulation, gated residual, audio injection): num_warps instead of "
        "the width-based choice (GPU tuning)", "by row width")
    fp8_gemm_emulate: bool = _var(
        "S2V_FP8_GEMM_EMULATE", False, _flag(),
        "FP8 GEMMs (`--quantization fp8`): never use `torch._scaled_mm`, run the exact torch "
        "emulation instead (to check it on a GPU)")
    gelu_epilogue: bool = _var(
        "S2V_GELU_EPILOGUE", True, _flag(),
        "`--precision fast`: the FFN's tanh-GELU in the cuBLASLt GEMM epilogue (0: a separate "
        "GELU kernel)")
    fold_output: bool = _var(
        "S2V_FOLD_OUTPUT", True, _flag(),
        "`--precision fast`: fold attention over a few keys (audio injectors, short prompts) "
        "into its output projection; `s2v_fast/fast/folded_output.py`")


@dataclass(frozen=True)
class EnvOptions:
    """What the environment sets for this process; ``kernels``: the kernel tuning knobs."""

    attention_backend: str = _var(
        "S2V_ATTENTION_BACKEND", ATTENTION_BACKENDS[0], _choice(*ATTENTION_BACKENDS),
        "Default of `--attention-backend` (and of `from_pretrained(attention_backend=)`)")
    cache_dir: Optional[str] = _var(
        "S2V_FAST_CACHE", None, _path(),
        "Cache root: the tiny model set (`tiny-v2/`) and the compiled CUDA kernels (`kernels/`)",
        "`$XDG_CACHE_HOME/s2v_fast`, else `~/.cache/s2v_fast`")
    csrc_dir: Optional[str] = _var(
        "S2V_CSRC_DIR", None, _path(),
        "Directory of the CUDA kernel sources (`*.cu`) that backend `cuda` and `fp8` compile",
        "the package's `s2v_fast/csrc`, else the checkout's `csrc/`")
    nvtx: bool = _var(
        "S2V_NVTX", False, _flag(),
        "Emit the named ranges (stages, steps, blocks, attention) as NVTX ranges for Nsight "
        "Systems even without a profiler running (`docs/profiling.md`)")
    kernels: KernelTuning = field(default_factory=KernelTuning)


def env_fields():
    """The dataclass field of every environment variable, in documentation order."""
    for cls in (EnvOptions, KernelTuning):
        yield from (f for f in dataclasses.fields(cls) if "env" in f.metadata)


def _parse(cls, environ):
    values = {}
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:  # EnvOptions.kernels
            values[f.name] = _parse(KernelTuning, environ)
            continue
        name, parser = f.metadata["env"], f.metadata["parser"]
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        value = parser.parse(raw)
        if value is None:
            raise InputError(f"{name}={raw!r}; use {parser.valid}")
        values[f.name] = value
    return cls(**values)


_cached: Optional[EnvOptions] = None


def env_options() -> EnvOptions:
    """The options the environment sets, parsed on the first call and then cached."""
    global _cached
    if _cached is None:
        _cached = _parse(EnvOptions, os.environ)
    return _cached


def reload_env_options() -> None:
    """Forget the cached options: the next :func:`env_options` reads the environment again."""
    global _cached
    _cached = None


def env_table_markdown() -> str:
    """The "Environment variables" table of docs/cli.md."""
    rows = ["| Variable | Default | Values | Meaning |", "|---|---|---|---|"]
    for f in env_fields():
        m = f.metadata
        rows.append(f"| `{m['env']}` | {m['default_doc']} | {m['parser'].valid} | {m['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # regenerate docs/cli.md's table: python -m s2v_fast.options
    print(env_table_markdown())
