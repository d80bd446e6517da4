"""What the command-line tests share: running the console entry point in-process, as a user's shell would."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`run_cli(*args) -> (exit code, stdout, stderr)` through `cli.main.main`, the `rateq` console script, so
    that usage errors and RateQErrors go through its one-line error handler (typer's CliRunner does not)."""
    from cli.main import main

    def run(*args):
        capsys.readouterr()  # drop anything printed before
        monkeypatch.setattr(sys, "argv", ["rateq", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        out = capsys.readouterr()
        code = exc.value.code
        return (0 if code is None else code), out.out, out.err

    return run
