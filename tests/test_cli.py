"""Command-line entry points: expected failures end with one `error:` line and exit code 2."""

from __future__ import annotations

import pytest

from dreambooth_jax import cli


@pytest.mark.parametrize("error", [ValueError("bad --steps"), FileNotFoundError("no such folder"),
                                   NotImplementedError("DDPM variance_type='learned' is not implemented")])
def test_expected_errors_are_one_line(error, capsys, monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_JAX_TRACEBACK", raising=False)

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_bugs_keep_their_traceback():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run(main)
