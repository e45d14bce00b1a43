"""Shared fixtures: tiny random diffusers pipelines, built once per test session with PyTorch."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# XLA's persistent compilation cache, fresh for each session (so no test depends on an earlier run): the
# trainer tests compile the same step several times (e.g. a run, then its resumption); a hit takes ~5 s
# instead of ~17 s on 2 CPU cores. Set through the environment so test subprocesses share it; before JAX loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dreambooth_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, str]:
    """{'sd1': path, 'sd2': path, 'sdxl': path} of tiny pipelines saved by diffusers."""
    from make_tiny_pipeline import KINDS, make_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: make_tiny_pipeline(str(root / kind), kind) for kind in KINDS}


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_kind(request) -> str:
    return request.param
