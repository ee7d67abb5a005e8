"""s2v_fast.options: the one reader of ``S2V_*`` environment variables.

Parsing and defaults, one-line errors for bad values, the cache, the docs/cli.md table generated
from the dataclass fields, and that no other module of the package reads an ``S2V_*`` variable.
"""
import ast
import dataclasses
import os
import pathlib
import re

import pytest
import torch

from s2v_fast import options
from s2v_fast.errors import InputError
from s2v_fast.options import EnvOptions, KernelTuning, env_options, reload_env_options

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "s2v_fast"
NAMES = [f.metadata["env"] for f in options.env_fields()]


@pytest.fixture
def clean_env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_variable_once():
    assert len(NAMES) == len(set(NAMES)) == 16
    assert all(re.fullmatch(r"S2V_[A-Z0-9_]+", n) for n in NAMES)
    for f in options.env_fields():
        assert f.metadata["doc"] and "\n" not in f.metadata["doc"] and "|" not in f.metadata["doc"]


def test_defaults(clean_env):
    o = env_options()
    assert o == EnvOptions() and o.kernels == KernelTuning()
    assert (o.attention_backend, o.cache_dir, o.csrc_dir, o.nvtx) == ("auto", None, None, False)
    k = o.kernels
    assert (k.fp8_attn_k, k.fp8_attn_pv, k.fp8_attn_impl, k.fp8_attn_min_keys, k.fp8_attn_config,
            k.fp8_attn_autotune) == ("channel", "fp8", "auto", 4096, None, True)
    assert (k.flash_config, k.flash_autotune, k.row_num_warps, k.fp8_gemm_emulate, k.gelu_epilogue,
            k.fold_output) == (None, True, None, False, True, True)


@pytest.mark.parametrize("name, raw, path, value", [
    ("S2V_ATTENTION_BACKEND", "cudnn", "attention_backend", "cudnn"),
    ("S2V_FAST_CACHE", "/tmp/c", "cache_dir", "/tmp/c"),
    ("S2V_CSRC_DIR", " /src ", "csrc_dir", "/src"),
    ("S2V_NVTX", "1", "nvtx", True),
    ("S2V_NVTX", "On", "nvtx", True),
    ("S2V_NVTX", "no", "nvtx", False),
    ("S2V_FP8_ATTN_K", "token", "kernels.fp8_attn_k", "token"),
    ("S2V_FP8_ATTN_PV", "bf16", "kernels.fp8_attn_pv", "bf16"),
    ("S2V_FP8_ATTN_IMPL", "triton", "kernels.fp8_attn_impl", "triton"),
    ("S2V_FP8_ATTN_MIN_KEYS", "48", "kernels.fp8_attn_min_keys", 48),
    ("S2V_FP8_ATTN_CONFIG", "3", "kernels.fp8_attn_config", 3),
    ("S2V_FP8_ATTN_AUTOTUNE", "0", "kernels.fp8_attn_autotune", False),
    ("S2V_FLASH_CONFIG", "0", "kernels.flash_config", 0),
    ("S2V_FLASH_AUTOTUNE", "false", "kernels.flash_autotune", False),
    ("S2V_ROW_NUM_WARPS", "8", "kernels.row_num_warps", 8),
    ("S2V_FP8_GEMM_EMULATE", "1", "kernels.fp8_gemm_emulate", True),
    ("S2V_GELU_EPILOGUE", "0", "kernels.gelu_epilogue", False),
    ("S2V_FOLD_OUTPUT", "0", "kernels.fold_output", False),
    ("S2V_FOLD_OUTPUT", "", "kernels.fold_output", True),  # empty: as unset
    ("S2V_ATTENTION_BACKEND", "", "attention_backend", "auto"),
])
def test_parsing(clean_env, name, raw, path, value):
    clean_env.setenv(name, raw)
    got = env_options()
    for part in path.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("name, raw, valid", [
    ("S2V_ATTENTION_BACKEND", "flash", "one of auto, sdpa, cudnn, sdpa_flash, triton, cuda, flash_attn, fp8"),
    ("S2V_NVTX", "maybe", "1 or 0"),
    ("S2V_FP8_ATTN_K", "block", "one of channel, token"),
    ("S2V_FP8_ATTN_PV", "fp16", "one of fp8, bf16"),
    ("S2V_FP8_ATTN_IMPL", "cuda", "one of auto, triton"),
    ("S2V_FP8_ATTN_MIN_KEYS", "4k", "an integer >= 0"),
    ("S2V_FP8_ATTN_CONFIG", "-1", "an integer >= 0"),
    ("S2V_FLASH_CONFIG", "x", "an integer >= 0"),
    ("S2V_FLASH_AUTOTUNE", "2", "1 or 0"),
    ("S2V_ROW_NUM_WARPS", "12", "one of 1, 2, 4, 8, 16, 32"),
    ("S2V_FOLD_OUTPUT", "off please", "1 or 0"),
])
def test_bad_value_is_one_line_error(clean_env, name, raw, valid):
    clean_env.setenv(name, raw)
    with pytest.raises(InputError) as e:
        env_options()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}={raw!r}; use ") and valid in msg, msg


def test_bad_config_index_is_one_line_error(clean_env):
    from s2v_fast.kernels import flash_attention as fa

    clean_env.setenv("S2V_FLASH_CONFIG", str(len(fa.FLASH_CONFIGS)))
    with pytest.raises(InputError, match=rf"^S2V_FLASH_CONFIG={len(fa.FLASH_CONFIGS)}; use 0\.\.\d+"):
        fa._pick_config(*(4 * [torch.zeros(1, 16, 1, 64)]), 0.125)


def test_read_once_then_cached(clean_env):
    first = env_options()
    assert env_options() is first
    os.environ["S2V_FP8_ATTN_K"] = "token"  # behind the cache's back: not seen ...
    try:
        assert env_options().kernels.fp8_attn_k == "channel"
        reload_env_options()  # ... until the options are read again
        assert env_options().kernels.fp8_attn_k == "token"
    finally:
        del os.environ["S2V_FP8_ATTN_K"]
        reload_env_options()
    assert dataclasses.is_dataclass(first) and first.__dataclass_params__.frozen


def test_cli_reports_a_bad_variable_in_one_line(clean_env, capsys):
    from s2v_fast.cli import main

    clean_env.setenv("S2V_ROW_NUM_WARPS", "three")
    assert main(["generate", "--image", "i.png", "--audio", "a.wav"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: S2V_ROW_NUM_WARPS='three'; use one of 1, 2, 4, 8, 16, 32"]


def test_docs_table_is_the_generated_one():
    text = (ROOT / "docs" / "cli.md").read_text()
    m = re.search(r"<!-- env-table: generated by python -m s2v_fast.options -->\n(.*?)\n<!-- /env-table -->",
                  text, re.S)
    assert m, "docs/cli.md lost its environment-variable table markers"
    assert m.group(1) == options.env_table_markdown(), "regenerate it: python -m s2v_fast.options"
    for name in NAMES:
        assert f"| `{name}` |" in m.group(1)


def _module_string_constants(tree):
    """Module-level NAME = "string" assignments (an env var name kept in a constant)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def _environ_keys(tree):
    """The key expression of every environment read: os.environ[k], os.environ.get/pop/setdefault(k),
    os.getenv(k), k in os.environ."""
    def is_environ(n):
        return isinstance(n, ast.Attribute) and n.attr == "environ" or \
            isinstance(n, ast.Name) and n.id == "environ"

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            yield node.slice
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            if isinstance(f, ast.Attribute) and is_environ(f.value) or \
                    isinstance(f, (ast.Attribute, ast.Name)) and getattr(f, "attr", getattr(f, "id", "")) == "getenv":
                yield node.args[0]
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            yield node.left


def test_no_other_module_reads_s2v_variables():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "options.py":
            continue
        src = path.read_text()
        rel = path.relative_to(ROOT)
        for i, line in enumerate(src.splitlines(), 1):
            if re.search(r"environ|getenv", line) and "S2V_" in line:
                offenders.append(f"{rel}:{i}: {line.strip()}")
        tree = ast.parse(src)
        consts = _module_string_constants(tree)
        for key in _environ_keys(tree):
            name = getattr(key, "id", None)
            value = key.value if isinstance(key, ast.Constant) else consts.get(name)
            if isinstance(value, str) and value.startswith("S2V_"):
                offenders.append(f"{rel}:{key.lineno}: reads {value}")
            elif value is None and name and name.isupper():  # a constant imported from elsewhere
                offenders.append(f"{rel}:{key.lineno}: reads ${name} (a name from another module)")
    assert not offenders, "read S2V_* through s2v_fast.options.env_options():\n" + "\n".join(offenders)


def test_grep_check_sees_a_reader(tmp_path):
    """The check above would catch the old readers (a constant name, a literal)."""
    src = 'import os\nENV = "S2V_X"\na = os.environ.get(ENV)\nb = os.getenv("S2V_Y", "1")\n'
    tree = ast.parse(src)
    consts = _module_string_constants(tree)
    keys = [k.value if isinstance(k, ast.Constant) else consts.get(k.id) for k in _environ_keys(tree)]
    assert keys == ["S2V_X", "S2V_Y"]
