"""Command-line entry points: expected failures (`UsageError`) end with one `error:` line and exit code 2;
every other exception, a ValueError from inside JAX included, is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import pytest

from dreambooth_jax import cli
from dreambooth_jax.errors import MissingFileError, UnsupportedError, UsageError


@pytest.mark.parametrize("error", [UsageError("bad --steps"), MissingFileError("no such folder"),
                                   UnsupportedError("DDPM variance_type='learned' is not implemented")])
def test_expected_errors_are_one_line(error, capsys, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_JAX_TRACEBACK", raising=False)

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("error", [ValueError("a bug"), FileNotFoundError("a bug"),
                                   NotImplementedError("a bug"), KeyError("a bug"), OSError("a bug")])
def test_bugs_keep_their_traceback(error):
    def main():
        raise error

    with pytest.raises(type(error)):
        cli.run_main(main)


def test_a_value_error_inside_jax_is_not_hidden():
    def main():
        jnp.ones((2, 3)) @ jnp.ones((2, 3))  # a shape bug: JAX raises TypeError / ValueError

    with pytest.raises((TypeError, ValueError)) as info:
        cli.run_main(main)
    assert not isinstance(info.value, UsageError)


def test_cli_bad_input_prints_one_error_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dreambooth_jax.sample", "--model", str(tmp_path / "nowhere"),
                          "--prompt", "x", "--output_dir", str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
