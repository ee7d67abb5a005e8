import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest

from s2v_fast.testing.interpreter import use_interpreter_without_cuda  # noqa: E402

# Triton kernels run on the CPU through the interpreter; it must be switched on before triton is
# imported anywhere, so do it here when no CUDA device is present.
_HAS_CUDA = use_interpreter_without_cuda()

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


class _EnvOptionsMonkeyPatch(pytest.MonkeyPatch):
    """pytest's monkeypatch, except that setting or deleting an ``S2V_*`` variable, and undoing it,
    makes ``s2v_fast.options.env_options()`` read the environment again: the package reads it once
    per process, and tests change it in-process."""

    def setenv(self, name, value, prepend=None):
        super().setenv(name, value, prepend)
        self._forget(name)

    def delenv(self, name, raising=True):
        super().delenv(name, raising)
        self._forget(name)

    def undo(self):
        super().undo()
        self._forget("S2V_")

    @staticmethod
    def _forget(name):
        if str(name).startswith("S2V_"):
            from s2v_fast.options import reload_env_options

            reload_env_options()


@pytest.fixture
def monkeypatch():
    mp = _EnvOptionsMonkeyPatch()
    yield mp
    mp.undo()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES

