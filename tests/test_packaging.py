"""Packaging: a wheel (``pip install .``, not editable) ships the CUDA C++ kernel sources inside the
package, as ``s2v_fast/csrc/`` (setup.py maps the checkout's top-level ``csrc/`` there), and
``cuda_attention`` compiles from the installed copy's own files; ``$S2V_CSRC_DIR`` overrides.

The wheel is built offline (``--no-build-isolation --no-index``) from a copy of what a build reads
(the top-level files, ``s2v_fast/``, ``csrc/``), so that no ``build/`` or egg-info is written into
the checkout."""
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from s2v_fast.kernels import cuda_attention as ca

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("flash_attention_sm90.cu", "fp8_attention_sm90.cu", "sm90_common.cuh")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def _cannot_build_wheels():
    """Why this interpreter cannot build the wheel offline, or None."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed"
    try:  # not imported here: setuptools' distutils shim objects to an imported distutils
        found = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return "setuptools is not installed"
    version = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if version < (68, 0):
        return f"setuptools {found} < 68 (pyproject.toml's build requirement)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # 70.1 has bdist_wheel
        return f"setuptools {found} needs the wheel package to build wheels"
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "csrc").is_dir():
        return "not run from a source checkout"
    return None


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    reason = _cannot_build_wheels()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for entry in ROOT.iterdir():  # pyproject.toml, setup.py, README.md, ...
        if entry.is_file():
            shutil.copy2(entry, src / entry.name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for folder in ("s2v_fast", "csrc"):
        shutil.copytree(ROOT / folder, src / folder, ignore=junk)
    _run([*PIP, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist")], cwd=tmp)
    (whl,) = (tmp / "dist").glob("s2v_fast-*.whl")
    return whl


def test_wheel_ships_the_cuda_sources_inside_the_package(wheel):
    zf = zipfile.ZipFile(wheel)
    names = set(zf.namelist())
    for name in SOURCES:
        assert f"s2v_fast/csrc/{name}" in names, f"{name} missing from {wheel.name}"
        assert zf.read(f"s2v_fast/csrc/{name}") == (ROOT / "csrc" / name).read_bytes()
    # nothing lands outside the package (a top-level csrc/ would litter site-packages)
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "s2v_fast"}
    # and every module of the package is in it
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "s2v_fast").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set()


def test_installed_wheel_builds_from_its_own_sources(wheel, tmp_path):
    """``pip install`` the wheel (not editable) into a fresh target, then from outside the checkout
    cuda_attention finds the installed package's s2v_fast/csrc, unless S2V_CSRC_DIR says else."""
    target = tmp_path / "site"
    _run([*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    probe = ("import json, s2v_fast; from s2v_fast.kernels import cuda_attention as c; "
             "print(json.dumps({'pkg': s2v_fast.__file__, 'dir': str(c.csrc_dir()), "
             "'srcs': [str(c.source_path(k)) for k in c.KERNELS]}))")
    env = {k: v for k, v in os.environ.items() if k not in ("S2V_CSRC_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    out = json.loads(_run([sys.executable, "-c", probe], cwd=tmp_path, env=env).splitlines()[-1])
    own = target / "s2v_fast" / "csrc"
    assert Path(out["pkg"]).resolve() == (target / "s2v_fast" / "__init__.py").resolve()
    assert Path(out["dir"]) == own.resolve()
    assert [Path(p).name for p in out["srcs"]] == [ca.KERNELS[k][0] for k in ca.KERNELS]
    for name in SOURCES:  # same bytes as the checkout: the kernel cache key (content hash) matches
        assert (own / name).read_bytes() == (ROOT / "csrc" / name).read_bytes()

    env["S2V_CSRC_DIR"] = str(ROOT / "csrc")
    out = json.loads(_run([sys.executable, "-c", probe], cwd=tmp_path, env=env).splitlines()[-1])
    assert Path(out["dir"]) == ROOT / "csrc"


def test_lookup_here_finds_every_source(monkeypatch):
    """In this process (checkout or installed): the package's own csrc, else the checkout's."""
    monkeypatch.delenv("S2V_CSRC_DIR", raising=False)
    assert ca.csrc_dir() in ca.CSRC_CANDIDATES
    assert ca.CSRC_CANDIDATES[0] == Path(ca.__file__).resolve().parents[1] / "csrc"
    for name in SOURCES:
        assert (ca.csrc_dir() / name).is_file()
    monkeypatch.setenv("S2V_CSRC_DIR", "")  # empty: as unset
    assert ca.csrc_dir() == ca.CSRC


def test_missing_sources_named(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("S2V_CSRC_DIR", str(tmp_path))
    (tmp_path / ca.KERNELS["bf16"][0]).write_text("x")
    assert ca.source_path("fp8") == tmp_path / ca.KERNELS["fp8"][0]
    reason = ca.unavailable_reason()
    assert f"S2V_CSRC_DIR={tmp_path}" in reason and ca.KERNELS["fp8"][0] in reason
    assert ca.KERNELS["bf16"][0] not in reason and "--attention-backend auto" in reason
