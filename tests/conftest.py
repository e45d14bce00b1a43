"""Shared fixtures: tiny random diffusers pipelines, built once per test session with PyTorch."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, str]:
    """{'sd1': path, 'sd2': path, 'sdxl': path} of tiny pipelines saved by diffusers."""
    from make_tiny_pipeline import KINDS, make_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: make_tiny_pipeline(str(root / kind), kind) for kind in KINDS}


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_kind(request) -> str:
    return request.param
