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



def test_errors_quoting_brackets_print_as_one_line(monkeypatch, capsys):
    # A text spec error quotes `hf:NAME[/CONFIG]`: printed as plain text, exit code 2, no traceback.
    import sys

    from cli.main import main

    monkeypatch.setattr(sys, "argv", ["rateq", "eval", "--data", "nosuchtext"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "Traceback" not in err and "hf:NAME[/CONFIG]" in err
