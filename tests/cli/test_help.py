"""Every command's --help renders (help texts are rich markup: a stray bracket breaks them)."""

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = ["calibrate", "solve", "show", "export", "apply", "eval", "version"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_renders(command):
    args = ["--help"] if command is None else [command, "--help"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
    if command is None:
        for c in COMMANDS:
            assert c in res.output
