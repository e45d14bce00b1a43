"""The repository root shadows no installed package.

`python -m pytest` / `python -m dreambooth_jax.<cmd>` started from the root put the root first on `sys.path`.
A top-level regular package of ours named like a dependency (our Pallas `kernels/` once, against PyPI's
`kernels` that transformers >= 5.25 requires) then hides the dependency, and diffusers / transformers fail to
import.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _from_root(code: str) -> subprocess.CompletedProcess:
    """`code` run from the repository root, with Python's default `sys.path` (cwd first, as `python -c` puts
    it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_no_top_level_folder_is_a_package():
    """Only `dreambooth_jax` is a regular package at the root: any other would win over an installed
    namesake."""
    packages = sorted(d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py")))
    assert packages == ["dreambooth_jax"]


def test_pypi_kernels_and_diffusers_import_from_the_root():
    pytest.importorskip("kernels", reason="PyPI's kernels comes with transformers >= 5.25")
    r = _from_root("import importlib.metadata as md, os, kernels, dreambooth_jax.kernels as ours\n"
                   "pypi = md.distribution('kernels').locate_file('kernels/__init__.py')\n"
                   "print(os.path.realpath(kernels.__file__), os.path.realpath(pypi))\n"
                   "assert ours.group_norm\n"
                   "from diffusers import AutoencoderKL\n")
    assert r.returncode == 0, r.stderr[-3000:]
    found, installed = r.stdout.split()[-2:]
    assert found == installed, f"`import kernels` from the root found {found}, not PyPI's {installed}"
