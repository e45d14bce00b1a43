"""Shared fixtures: tiny random diffusers pipelines, built once per test session with PyTorch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# XLA's persistent compilation cache, fresh for each session (so no test depends on an earlier run): the
# trainer tests compile the same step several times (e.g. a run, then its resumption); a hit takes ~5 s
# instead of ~17 s on 2 CPU cores. Set through the environment so test subprocesses share it; before JAX
# loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dreambooth_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite is compile-bound: LLVM at -O0 compiles the tiny train step ~40% faster and runs it ~3x slower,
# a good trade for tests that run a few steps. Tests that add XLA flags append to these (`xla_flags`).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_backend_optimization_level=0"]))


def xla_flags_with(*flags: str) -> str:
    """This session's XLA_FLAGS plus `flags` (for test subprocesses, e.g. 8 simulated devices)."""
    return " ".join([os.environ["XLA_FLAGS"], *flags])


def run_processes(argv: list[str], *, processes: int = 2, devices: int = 2,
                  timeout: float = 600) -> list[str]:
    """Runs `python ARGV` as the processes of one JAX multi-process job on CPU (gloo collectives, `devices`
    simulated devices each) and returns their outputs; fails the test with the log of a process that
    failed."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": xla_flags_with(f"--xla_force_host_platform_device_count={devices}"),
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": str(processes), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen([sys.executable, *argv], env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
    return logs


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, str]:
    """{'sd1': path, 'sd2': path, 'sdxl': path} of tiny pipelines saved by diffusers."""
    # our modules load in the fixtures: JAX must not load before the environment above is set
    from make_tiny_pipeline import KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: save_tiny_pipeline(str(root / kind), kind) for kind in KINDS}


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> str:
    """Four synthetic 'photos' of a toy (80x72, so resized and cropped at 64 px)."""
    from train_helpers import draw_images

    return draw_images(tmp_path_factory.mktemp("instance"), 4, seed=0)


@pytest.fixture(scope="session")
def class_dir(tmp_path_factory) -> str:
    from train_helpers import draw_images

    return draw_images(tmp_path_factory.mktemp("class"), 4, seed=1)


@pytest.fixture(scope="session")
def one_device_run(tiny_pipelines, instance_dir, class_dir, tmp_path_factory) -> str:
    """The output folder of a one-device CLI run (`train_helpers.full_run_argv`, global batch 8) that the
    multi-device and multi-process runs must equal."""
    from train_helpers import full_run_argv, run_argv

    from dreambooth_jax.train import main

    out = tmp_path_factory.mktemp("one_device") / "out"
    main(run_argv(tiny_pipelines, instance_dir, out, *full_run_argv(class_dir), "--train_batch_size", "8"))
    return str(out)


@pytest.fixture(scope="session")
def tiny_flux_pipelines(tmp_path_factory) -> dict[str, str]:
    """{'flux-dev': path, 'flux-schnell': path} of tiny `FluxPipeline`s saved by diffusers."""
    from make_tiny_pipeline import FLUX_KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_flux_pipelines")
    return {kind: save_tiny_pipeline(str(root / kind), kind) for kind in FLUX_KINDS}
