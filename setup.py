"""The one part of the package layout pyproject.toml cannot express: the CUDA C++ kernel sources
stay in the checkout's top-level ``csrc/`` but are installed inside the package, as
``s2v_fast/csrc/`` (``*.cu``, ``*.cuh``: the package-data in pyproject.toml), so that a wheel or
``pip install .`` can build the ``cuda`` attention backend from its own files
(``s2v_fast/kernels/cuda_attention.py`` looks there first, then in the checkout's ``csrc/``).
Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["s2v_fast", "s2v_fast.*"]), "s2v_fast.csrc"],
      package_dir={"s2v_fast.csrc": "csrc"})
